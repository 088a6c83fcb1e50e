"""Train one benchmark row and write its JSON files; the driver runs each row in a fresh process.

    python -m benchmarks.run_row --out runs/bench-cpu --row inrank --scale cpu [--set max_steps=50]

Writes ``<out>/rows/<row>/``: ``metrics.json`` (the table's numbers and how they were
measured), ``log_history.json`` (per logging step: train or eval loss, wall and training
time, per-layer mode and rank) and ``rank_pattern.json`` (final layout per layer). A fresh
process per row keeps each row's peak memory its own.

Measurement rules, the same for every row: same data, seed, steps, batch, sequence length,
learning-rate schedule and thread count. Tokens/s counts optimizer steps ``skip_steps`` to the
end with evaluation time subtracted (rank decisions stay in: they are part of training).
Peak memory is the process's peak resident set during training on CPU (the kernel's
high-water mark, reset when training starts) and ``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from benchmarks.config import SCALES, Row, Scale, get_row, parse_settings
from benchmarks.flops import average_flops, dense_flops, layout, layout_flops, other_flops
from hf_lowrank.files import read_json, write_json

DATA_DIR = "data"


# -- data and model ----------------------------------------------------------------------------


def data_key(scale: Scale) -> dict[str, Any]:
    """The settings a prepared data folder depends on."""
    keys = ("dataset", "data_files", "vocab_size", "block_size", "max_train_tokens", "max_eval_tokens", "seed")
    return {k: getattr(scale, k) for k in keys}


def prepare_data(scale: Scale, out: Path) -> Path:
    """Tokenizer and LM blocks for ``scale`` under ``out/data``, built once and reused by every row."""
    from hf_lowrank.data import build_lm_datasets, get_tokenizer, load_text_corpus

    folder = out / DATA_DIR
    stamp = folder / "data_settings.json"
    if stamp.is_file() and read_json(stamp) == data_key(scale):
        return folder
    corpus = load_text_corpus(scale.dataset, seed=scale.seed, data_files=scale.data_files)
    tokenizer = get_tokenizer(corpus, scale.vocab_size, cache_dir=folder / "tokenizer")
    data = build_lm_datasets(corpus, tokenizer, scale.block_size, scale.max_train_tokens, scale.max_eval_tokens)
    data.save_to_disk(str(folder / "lm"))
    write_json(stamp, data_key(scale))
    return folder


def load_data(folder: Path):
    """``(tokenizer, DatasetDict)`` saved by :func:`prepare_data` (memory-mapped)."""
    import datasets

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
    return tokenizer, datasets.load_from_disk(str(folder / "lm"))


def build_model(family: str, scale: Scale, vocab_size: int, pad_id: int) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of the scale's shape (seeded: every row of a family starts equal).

    GPT-2 without dropout (short pre-training runs, as in nanoGPT) and with PyTorch's fused
    tanh-GELU (the same function as GPT-2's ``gelu_new``, one kernel instead of six). The
    Llama row has the same hidden size, depth and heads with an MLP of width 8/3 d, so both
    have 12 d^2 parameters per block.
    """
    torch.manual_seed(scale.seed)
    ids = {"bos_token_id": pad_id, "eos_token_id": pad_id, "pad_token_id": pad_id}
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=scale.block_size, n_embd=scale.n_embd, n_layer=scale.n_layer,
            n_head=scale.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            activation_function="gelu_pytorch_tanh", **ids,
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=scale.n_embd, intermediate_size=16 * round(8 * scale.n_embd / 3 / 16),
        num_hidden_layers=scale.n_layer, num_attention_heads=scale.n_head, num_key_value_heads=scale.n_head,
        max_position_embeddings=scale.block_size, tie_word_embeddings=True, **ids,
    )
    return transformers.LlamaForCausalLM(config)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters, shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return {"trainable": sum(p.numel() for p in unique if p.requires_grad), "total": sum(p.numel() for p in unique)}


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


class Recorder(transformers.TrainerCallback):
    """Clocks (evaluation excluded), the layout each step ran with, and the log history with ranks."""

    def __init__(self, skip_steps: int, device: str):
        self.skip_steps, self.device = skip_steps, device
        self.history: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []  # {"step", "layout"}: layout steps >= step ran with
        self.eval_seconds = 0.0
        self.memory_kind = ""

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.memory_kind = reset_peak_memory(self.device)
        self.history.append({"step": 0, "wall_seconds": 0.0, "train_seconds": 0.0, "layers": self._layers(model)})
        self._sync()
        self.start = time.perf_counter()
        self.steady_start: float | None = None

    @staticmethod
    def _layers(model) -> dict[str, list]:
        return {n: [mode, rank] for n, (mode, rank, _, _) in layout(model).items()}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        lay = layout(model)
        if not self.changes or lay != self.changes[-1]["layout"]:
            self.changes.append({"step": state.global_step, "layout": lay})
            if state.global_step > 0:  # a rank decision took effect: log the new ranks at the exact step
                wall = time.perf_counter() - self.start
                entry = {"step": state.global_step, "wall_seconds": wall, "train_seconds": wall - self.eval_seconds}
                self.history.append({**entry, "layers": self._layers(model)})
        if state.global_step == self.skip_steps:
            self._sync()
            self.steady_start = time.perf_counter()
            self.steady_eval_start = self.eval_seconds

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if "eval_loss" not in logs and "loss" not in logs:
            return
        if "eval_loss" in logs:
            self.eval_seconds += logs.get("eval_runtime", 0.0)
        wall = time.perf_counter() - self.start
        entry = {"step": state.global_step, "wall_seconds": wall, "train_seconds": wall - self.eval_seconds}
        for key in ("loss", "eval_loss", "learning_rate"):
            if key in logs:
                entry[key] = logs[key]
        entry["layers"] = self._layers(model)
        self.history.append(entry)

    def on_train_end(self, args, state, control, **kwargs):
        self._sync()
        self.end = time.perf_counter()
        self.peak_memory = peak_memory_bytes(self.device)
        self.train_seconds = self.end - self.start - self.eval_seconds
        self.steady_seconds = self.end - self.steady_start - (self.eval_seconds - self.steady_eval_start)


class Progress(transformers.TrainerCallback):
    """One progress bar per row: loss, last eval loss and rank fraction as the run goes."""

    def __init__(self, label: str):
        self.label = label
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.label, unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.3f}"
        if "eval_loss" in logs:
            self.postfix["eval"] = f"{logs['eval_loss']:.3f}"
        lay = layout(model)
        if lay:
            self.postfix["rank"] = f"{sum(r for _, r, _, _ in lay.values()) / sum(min(i, o) for _, _, i, o in lay.values()):.2f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


# -- one row -----------------------------------------------------------------------------------


def training_args(row: Row, scale: Scale, output_dir: Path) -> transformers.TrainingArguments:
    """Identical for every row except the optimizer of the plain-Trainer rows."""
    extra: dict[str, Any] = {}
    if row.optim:
        extra["optim"] = row.optim
    if row.optim and row.optim.startswith("galore"):
        rank = scale.galore_rank or max(1, scale.n_embd // 4)
        extra["optim_target_modules"] = r".*\.(self_attn|mlp)\.\w+_proj"
        extra["optim_args"] = f"rank={rank},update_proj_gap={scale.galore_update_proj_gap},scale=1.0,proj_type=std"
    return transformers.TrainingArguments(
        str(output_dir),
        max_steps=scale.max_steps,
        per_device_train_batch_size=scale.batch_size,
        per_device_eval_batch_size=scale.batch_size,
        learning_rate=scale.learning_rate,
        lr_scheduler_type=scale.lr_scheduler_type,
        warmup_steps=scale.warmup_steps,
        weight_decay=scale.weight_decay,
        max_grad_norm=scale.max_grad_norm,
        bf16=scale.bf16,
        seed=scale.seed,
        eval_strategy="steps",
        eval_steps=scale.eval_steps,
        save_strategy="no",
        logging_steps=scale.logging_steps,
        report_to="none",
        use_cpu=scale.device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def run_row(row: Row, scale: Scale, out: Path, order: int = 0) -> dict[str, Any]:
    """Train ``row`` at ``scale`` and write its JSON files under ``out/rows/<name>``; returns the metrics."""
    if scale.device == "cpu" and scale.threads:
        torch.set_num_threads(scale.threads)
    if scale.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"scale device 'cuda' but torch sees no GPU (torch {torch.__version__}); use --scale cpu.")
    tokenizer, data = load_data(prepare_data(scale, out))
    model = build_model(row.family, scale, len(tokenizer), tokenizer.pad_token_id)
    row_dir = out / "rows" / row.name
    args = training_args(row, scale, row_dir / "trainer")
    recorder, progress = Recorder(scale.skip_steps, scale.device), Progress(row.label)
    common = dict(args=args, train_dataset=data["train"], eval_dataset=data["validation"], callbacks=[recorder, progress])
    if row.lowrank is not None:
        from hf_lowrank import LowRankConfig, get_lowrank_model
        from hf_lowrank.trainer import LowRankTrainer

        model = get_lowrank_model(model, LowRankConfig.from_dict(row.lowrank))
        trainer = LowRankTrainer(model=model, **common)
    else:
        trainer = transformers.Trainer(model=model, **common)
    for cls in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cls)
    lay0 = layout(model)
    other = other_flops(model, scale.block_size)
    trainer.train()

    history = recorder.history
    final = [e for e in history if "eval_loss" in e and e["step"] == scale.max_steps]
    if not final:
        metrics = trainer.evaluate()
        entry = {"step": scale.max_steps, "wall_seconds": None, "train_seconds": recorder.train_seconds, "eval_loss": metrics["eval_loss"]}
        history.append({**entry, "layers": Recorder._layers(model)})
        final = [entry]
    eval_loss = final[-1]["eval_loss"]
    tokens_per_step = scale.batch_size * scale.block_size * args.gradient_accumulation_steps * args.world_size
    steady_steps = scale.max_steps - scale.skip_steps
    final_layout = layout(model)
    decision_seconds = float(getattr(trainer, "decision_seconds", 0.0))
    counts = parameter_counts(model)
    metrics = {
        "name": row.name,
        "label": row.label,
        "reference": row.reference,
        "family": row.family,
        "order": order,
        "changes_rank": row.changes_rank,
        "note": row.note,
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss) if eval_loss < 700 else math.inf,
        "tokens_per_second": steady_steps * tokens_per_step / recorder.steady_seconds,
        "steady_steps": steady_steps,
        "steady_seconds": recorder.steady_seconds,
        "train_seconds": recorder.train_seconds,
        "eval_seconds": recorder.eval_seconds,
        "decision_seconds": decision_seconds,
        "decision_share": decision_seconds / recorder.train_seconds,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "peak_memory_bytes": recorder.peak_memory,
        "memory_kind": recorder.memory_kind,
        # FLOPs per token of forward + backward; "run" averages the layouts the measured steps ran with.
        "flops_per_token_run": average_flops(recorder.changes, other, scale.skip_steps, scale.max_steps),
        "flops_per_token_final": layout_flops(final_layout, other),
        "flops_per_token_dense": dense_flops(lay0, other),
        "layout_changes": [{"step": c["step"], "rank_sum": sum(r for _, r, _, _ in c["layout"].values())} for c in recorder.changes],
        "plans": [
            {"step": p["step"], "reason": p["reason"], "lr_factor": p["lr_factor"], "layers_changed": len(p["changes"])}
            for p in getattr(trainer, "plan_history", [])
        ],
        "strategy_report": trainer.strategy.report() if hasattr(getattr(trainer, "strategy", None), "report") else None,
        "lowrank_config": row.lowrank,
        "optim": args.optim.value if hasattr(args.optim, "value") else str(args.optim),
        "optim_args": args.optim_args,
        "scale": scale.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if scale.device == "cuda" else "cpu",
    }
    pattern = {
        n: {"mode": m, "rank": r, "full_rank": min(i, o), "in_features": i, "out_features": o}
        for n, (m, r, i, o) in final_layout.items()
    }
    row_dir.mkdir(parents=True, exist_ok=True)
    write_json(row_dir / "metrics.json", metrics)
    write_json(row_dir / "log_history.json", history)
    write_json(row_dir / "rank_pattern.json", pattern)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="benchmark directory")
    parser.add_argument("--row", required=True, help="row name (see benchmarks/config.py)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scale setting")
    parser.add_argument("--fixed-rank", type=float, default=None, help="InRank's final rank fraction, for the rows that take it")
    parser.add_argument("--order", type=int, default=0, help="position of the row in the table")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale].replace(**parse_settings(args.set))
    run_row(get_row(args.row, args.fixed_rank, scale), scale, Path(args.out), args.order)


if __name__ == "__main__":
    main()
