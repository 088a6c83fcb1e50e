"""Train one benchmark row through the recipe and write its JSON files; the driver runs each row in a fresh process.

    python -m benchmarks.run_row --out runs/bench-cpu/rows/inrank --row inrank --scale cpu [--set max_steps=50]

A row is ``hf_lowrank.recipe.train_one`` with the scale's options and the row's ``lowrank``
settings (the recipe's model builder, data and ``TrainingArguments``), plus a :class:`Recorder`
callback. It writes, in its folder: ``metrics.json`` (the table's numbers and how they were
measured), ``log_history.json`` (per logging step: train or eval loss, wall and training time,
per-layer mode and rank) and ``rank_pattern.json`` (final layout per layer). A fresh process
per row keeps each row's peak memory its own.

Measurement rules, the same for every row: same data, seed, steps, batch, sequence length,
learning-rate schedule and thread count. Tokens/s counts optimizer steps ``skip_steps`` to the
end with evaluation time subtracted (rank decisions stay in: they are part of training).
Peak memory is the process's peak resident set during training on CPU (the kernel's
high-water mark, reset when training starts) and ``torch.cuda.max_memory_allocated`` on GPU;
``metrics.json``'s ``memory`` adds the bytes of weights, gradients and optimizer state counted
from the tensors themselves (:mod:`benchmarks.memory`), at the end and at their peak, and the
process peak on GPU too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks.config import SCALES, Row, Scale, get_row, parse_settings, row_steps
from benchmarks.flops import (
    average_flops,
    dense_flops,
    layout,
    layout_flops,
    other_flops,
    total_flops,
)
from benchmarks.memory import MemoryCounter
from hf_lowrank.files import write_json

# -- measurement -------------------------------------------------------------------------------


def reset_peak_memory(device: str) -> str:
    """Reset the peak-memory counter; returns what will be measured."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return "cuda max_memory_allocated"
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
        return "process peak RSS during training"
    except OSError:
        return "process peak RSS (whole process)"


def peak_memory_bytes(device: str) -> int:
    """Peak since :func:`reset_peak_memory`."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _layers(model) -> dict[str, list]:
    """``{layer: [mode, rank]}`` from the model's own layer report (none for a peer's plain model)."""
    return {r["layer"]: [r["mode"], r["rank"]] for r in model.layer_report()} if _lowrank(model) else {}


def _lowrank(model) -> bool:
    """Whether ``model`` is a LowRankModel (a peer's row trains the plain transformers model)."""
    return hasattr(model, "lowrank_layers")


def process_peak_bytes() -> int:
    """The process's peak resident set since the last reset (the CPU measure; beside cuda's on GPU)."""
    return peak_memory_bytes("cpu")


class Recorder(transformers.TrainerCallback):
    """Readings of the recipe's training clock, the layout each step ran with, and the log history with ranks.

    ``self.clock`` is :func:`hf_lowrank.recipe.run_clock` (evaluation excluded, the GPU
    synchronised before each reading), handed to ``train_one`` before this callback so it has
    taken an evaluation out before this one reads it; the run's training seconds are its own.
    """

    def __init__(self, skip_steps: int, device: str, seq_len: int):
        from hf_lowrank.recipe import run_clock

        self.skip_steps, self.device, self.seq_len = skip_steps, device, seq_len
        self.clock = run_clock(sync=torch.cuda.synchronize if device == "cuda" else None)
        self.history: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []  # {"step", "layout"}: the layout steps >= step ran with
        self.eval_seconds = 0.0
        self.ended = False

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _entry(self, step: int, model) -> dict[str, Any]:
        train = self.clock.seconds
        return {"step": step, "wall_seconds": time.perf_counter() - self.start, "train_seconds": train, "layers": _layers(model)}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.device == "cuda":
            reset_peak_memory("cpu")  # the process peak too, beside cuda's
        self.memory_kind = reset_peak_memory(self.device)
        self.other = other_flops(model.get_base_model() if _lowrank(model) else model, self.seq_len)
        self.dense_layout = layout(model)
        self._sync()
        self.start = time.perf_counter()
        self.steady_start = None
        self.history.append(self._entry(0, model))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        lay = layout(model)
        if not self.changes or lay != self.changes[-1]["layout"]:
            self.changes.append({"step": state.global_step, "layout": lay})
            if state.global_step > 0:  # a rank decision took effect: log the new ranks at the exact step
                self.history.append(self._entry(state.global_step, model))
        if state.global_step == self.skip_steps:
            self.steady_start = self.clock.seconds

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if "eval_loss" not in logs and "loss" not in logs:
            return
        if self.ended:  # the recipe's final evaluation: keep it unless a periodic one ran at this step
            if "eval_loss" in logs and not any(e["step"] == state.global_step and "eval_loss" in e for e in self.history):
                self.history.append({**self.final_entry, "eval_loss": logs["eval_loss"]})
            return
        if "eval_loss" in logs:
            self.eval_seconds += logs.get("eval_runtime", 0.0)
        entry = self._entry(state.global_step, model)
        entry.update({k: logs[k] for k in ("loss", "eval_loss", "learning_rate") if k in logs})
        self.history.append(entry)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.ended = True
        self.peak_memory = peak_memory_bytes(self.device)
        self.process_peak = process_peak_bytes()
        self.train_seconds = self.clock.seconds  # stopped by its own on_train_end, which runs first
        self.steady_seconds = self.train_seconds - self.steady_start
        self.final_entry = {**self._entry(state.global_step, model), "train_seconds": self.train_seconds}
        self.final_layout = layout(model)
        self.strategy_state = model.strategy.state_dict() if _lowrank(model) else {}


# -- one row -----------------------------------------------------------------------------------


@contextlib.contextmanager
def compiled(backend: str | None):
    """Within the block, Trainers compile the model with ``backend`` (accelerate's dynamo plugin reads the variable)."""
    if backend is None:
        yield
        return
    before = os.environ.get("ACCELERATE_DYNAMO_BACKEND")
    os.environ["ACCELERATE_DYNAMO_BACKEND"] = backend
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_DYNAMO_BACKEND")
        else:
            os.environ["ACCELERATE_DYNAMO_BACKEND"] = before


def run_row(row: Row, scale: Scale, row_dir: Path, order: int = 0, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``row`` at ``scale`` (RecipeOptions ``overrides`` on top) and write its JSON files in ``row_dir``."""
    from hf_lowrank.recipe import load_data, train_one
    from hf_lowrank.strategies import get_strategy

    opts = scale.options(**row.recipe, **(overrides or {}))
    opts = dataclasses.replace(opts, max_steps=row_steps(row, opts.max_steps))
    if scale.device == "cpu" and scale.threads:
        torch.set_num_threads(scale.threads)
    if scale.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"scale device 'cuda' but torch sees no GPU (torch {torch.__version__}); use --scale cpu or --set device=cpu.")
    tokenizer, data, labels = load_data(opts)
    recorder = Recorder(scale.skip_steps, scale.device, opts.block_size)
    memory = MemoryCounter(scale.skip_steps)
    row_dir.mkdir(parents=True, exist_ok=True)
    # The trained model is not kept: a benchmark row measures, and GPT-2 small is 0.4 GB a row.
    with tempfile.TemporaryDirectory(prefix="trainer-", dir=row_dir) as tmp, compiled(scale.compile_backend if row.compiled else None):
        result = train_one(opts, row.lowrank, tmp, tokenizer, data, labels, callbacks=[recorder.clock, recorder, memory])

    tokens_per_step = opts.per_device_train_batch_size * opts.block_size * opts.gradient_accumulation_steps * result["world_size"]
    steady_steps = opts.max_steps - scale.skip_steps
    other = recorder.other
    metrics = {
        "name": row.name,
        "label": row.label,
        "reference": row.reference,
        "family": opts.architecture,
        "order": order,
        "changes_rank": bool(row.lowrank) and get_strategy(row.lowrank.get("strategy", "fixed")).changes_shapes,  # its rank curves are drawn
        "compiled": row.compiled,
        "note": row.note,
        "learning_rate": opts.learning_rate,
        "max_steps": opts.max_steps,
        "eval_loss": result["eval_loss"],
        "perplexity": result["perplexity"],
        "tokens_per_second": steady_steps * tokens_per_step / recorder.steady_seconds,
        "tokens_per_step": tokens_per_step,
        "steady_steps": steady_steps,
        "steady_seconds": recorder.steady_seconds,
        "train_seconds": recorder.train_seconds,
        "eval_seconds": recorder.eval_seconds,
        "decision_seconds": result["decision_seconds"],
        "decision_share": result["decision_seconds"] / recorder.train_seconds,
        "trainable_params": result["trainable_params"],
        "total_params": result["total_params"],
        "peak_memory_bytes": recorder.peak_memory,
        "memory_kind": recorder.memory_kind,
        # counted from the tensors themselves (benchmarks/memory.py), beside the process's peak
        "memory": {
            **memory.metrics(),
            "process_peak_rss_bytes": recorder.process_peak,
            **({"cuda_max_allocated_bytes": recorder.peak_memory} if scale.device == "cuda" else {}),
        },
        **{k: opts.training[k] for k in ("optim", "optim_args", "optim_target_modules") if k in opts.training},
        # FLOPs per token of forward + backward; "run" averages the layouts the measured steps ran with.
        "flops_per_token_run": average_flops(recorder.changes, other, scale.skip_steps, opts.max_steps),
        "flops_per_token_final": layout_flops(recorder.final_layout, other),
        "flops_per_token_dense": dense_flops(recorder.dense_layout, other),
        "train_flops": total_flops(recorder.changes, other, opts.max_steps, tokens_per_step),
        "layout_changes": [{"step": c["step"], "rank_sum": sum(r for _, r, _, _ in c["layout"].values())} for c in recorder.changes],
        "flop_layouts": recorder.changes,
        "other_flops_per_token": other,
        "plans": [
            {"step": p["step"], "reason": p["reason"], "lr_factor": p["lr_factor"], "layers_changed": len(p["changes"])}
            for p in result["plan_history"]
        ],
        "strategy_state": recorder.strategy_state,
        "lowrank_config": row.lowrank,
        "recipe_options": {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "lowrank"},
        "scale": scale.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if scale.device == "cuda" else "cpu",
    }
    pattern = {
        n: {"mode": m, "rank": r, "full_rank": min(i, o), "in_features": i, "out_features": o}
        for n, (m, r, i, o) in recorder.final_layout.items()
    }
    write_json(row_dir / "metrics.json", metrics)
    write_json(row_dir / "log_history.json", recorder.history)
    write_json(row_dir / "rank_pattern.json", pattern)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the row's folder")
    parser.add_argument("--row", required=True, help="row name (see benchmarks/config.py)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scale setting")
    parser.add_argument("--lowrank", action="append", default=[], metavar="KEY=VALUE", help="ablation: a LowRankConfig setting of every low-rank row")
    parser.add_argument("--learning-rate", type=float, default=None, help="this row's learning rate (a sweep point)")
    parser.add_argument("--inrank-rank", type=float, default=None, help="InRank's final rank fraction, for the rows that take it")
    parser.add_argument("--order", type=int, default=0, help="position of the row in the table")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale].replace(**parse_settings(args.set))
    overrides = {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
    run_row(get_row(args.row, scale, args.inrank_rank, parse_settings(args.lowrank, "--lowrank")), scale, Path(args.out), args.order, overrides)


if __name__ == "__main__":
    main()
