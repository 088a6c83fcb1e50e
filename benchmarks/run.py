"""Every strategy side by side on the same data, seed and steps; prints measured ratios to full rank.

    python -m benchmarks.run --scale cpu --out runs/bench-cpu        # GPT-2 4x192 on SOTU, < 30 min on 2 cores
    python -m benchmarks.run --scale gpu --out runs/bench-gpu        # GPT-2 small (124M) in bf16
    hf-lowrank report runs/bench-cpu                                 # regenerate table and plots

Each row runs in its own subprocess (``--row NAME``) so that its peak memory is its own; it
writes ``rows/<name>.json``, and the driver writes ``report.md`` and the plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

MLP = {"target_modules": ["c_fc", "c_proj"], "exclude_modules": r".*attn.*"}
LLAMA_MLP = {"target_modules": ["gate_proj", "up_proj", "down_proj"]}

SCALES = {
    "cpu": dict(
        n_layer=4, n_embd=192, n_head=4, block_size=128, vocab_size=4096, max_steps=300, per_device_train_batch_size=8,
        learning_rate=2e-3, warmup_steps=20, max_eval_tokens=32768, eval_steps=50, logging_steps=10, use_cpu=True,
    ),
    "gpu": dict(
        n_layer=12, n_embd=768, n_head=12, block_size=512, vocab_size=16384, max_steps=2000, per_device_train_batch_size=32,
        learning_rate=6e-4, warmup_steps=100, max_eval_tokens=262144, eval_steps=200, logging_steps=50, bf16=True,
    ),
}

# name -> (label, reference row, recipe overrides). "fixed_rank" is filled with InRank's mean final rank.
ROWS = {
    "full": ("full rank", "full", {"lowrank": {**MLP, "mode": "dense", "strategy": "fixed"}}),
    "inrank": ("InRank", "full", {"lowrank": {**MLP, "init": "spectral", "strategy": "inrank"}}),
    "fixed": ("fixed rank (control)", "full", {"lowrank": {**MLP, "strategy": "fixed", "rank": "fixed_rank"}}),
    "cuttlefish": ("Cuttlefish", "full", {"lowrank": {**MLP, "strategy": "cuttlefish", "frobenius_decay": 1e-4}}),
    "warm_start": ("warm start (Kamalakara)", "full", {"lowrank": {**MLP, "strategy": "warm_start", "rank": "fixed_rank"}}),
    "dynamic": ("dynamic rank", "full", {"lowrank": {**MLP, "strategy": "dynamic", "strategy_args": {"rank": "fixed_rank"}}}),
    "llama_full": ("Llama full rank", "llama_full", {"architecture": "llama", "lowrank": {**LLAMA_MLP, "mode": "dense", "strategy": "fixed"}}),
    "galore": ("GaLore (Llama)", "llama_full", {"architecture": "llama", "galore": True}),
}


def _fill(value, fixed_rank):
    if value == "fixed_rank":
        return fixed_rank
    if isinstance(value, dict):
        return {k: _fill(v, fixed_rank) for k, v in value.items()}
    return value


def _layout(model) -> dict[str, list]:
    return {n: [l.mode, l.rank if l.mode != "dense" else l.full_rank] for n, l in model.lowrank_layers().items()}


def _other_flops(model, opts) -> float:
    """Matmul FLOPs per token outside the low-rank layers: other linear layers and attention scores."""
    from transformers.pytorch_utils import Conv1D

    from hf_lowrank.layer import LowRankLinear

    flops = 0.0
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            continue
        if isinstance(module, torch.nn.Linear):
            flops += 6.0 * module.in_features * module.out_features
        elif isinstance(module, Conv1D):
            flops += 6.0 * module.weight.numel()
    return flops + 12.0 * opts.n_layer * opts.block_size * opts.n_embd


def run_row(name: str, scale: str, out: Path, fixed_rank: float, order: int) -> dict:
    """Train one row and write ``rows/<name>.json``."""
    import transformers

    from hf_lowrank.metrics import perplexity
    from hf_lowrank.recipe import RecipeOptions, load_data, train_one

    label, reference, overrides = ROWS[name]
    overrides = _fill(overrides, fixed_rank)
    galore = overrides.pop("galore", False)
    opts = RecipeOptions(**{**SCALES[scale], **overrides, "output_dir": str(out / "runs" / name), "seed": 0})
    tokenizer, data, labels = load_data(opts)
    history: list[dict] = []
    start = [0.0]

    class Recorder(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            start[0] = time.perf_counter()
            history.append({"step": 0, "time": 0.0, **({"layout": _layout(model)} if hasattr(model, "lowrank_layers") else {})})

        def on_log(self, args, state, control, logs=None, model=None, **kw):
            entry = {"step": state.global_step, "time": time.perf_counter() - start[0]}
            if "eval_loss" in logs:
                entry["eval_loss"] = logs["eval_loss"]
            if hasattr(model, "lowrank_layers"):
                entry["layout"] = _layout(model)
            history.append(entry)

    if galore:
        result, log, model = _galore_row(opts, tokenizer, data, Recorder())
        shapes = {}
    else:
        result = train_one(opts, opts.lowrank, opts.output_dir, tokenizer, data, labels, callbacks=(Recorder(),))
        trainer = result.pop("trainer")
        model, log = trainer.model, trainer.state.log_history
        shapes = {n: [l.in_features, l.out_features] for n, l in model.lowrank_layers().items()}
    eval_seconds = sum(e.get("eval_runtime", 0.0) for e in log)
    train_seconds = result["train_seconds"] - eval_seconds
    tokens = opts.max_steps * opts.per_device_train_batch_size * opts.gradient_accumulation_steps * opts.block_size
    from hf_lowrank.report import run_flops

    if torch.cuda.is_available() and not opts.use_cpu:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"
    layouts = [e for e in history if "layout" in e]
    row = {
        "name": name,
        "label": label,
        "reference": reference,
        "order": order,
        "eval_loss": result["eval_loss"],
        "perplexity": perplexity(result["eval_loss"]),
        "tokens_per_second": tokens / train_seconds,
        "train_seconds": train_seconds,
        "decision_seconds": result.get("decision_seconds", 0.0),
        "trainable_params": result["trainable_params"],
        "total_params": result["total_params"],
        "peak_memory_mb": peak,
        "memory_kind": kind,
        "flops_per_token": run_flops(layouts, shapes, _other_flops(model, opts), opts.max_steps),
        "history": history,
        "final_ranks": {n: r for n, (_, r) in layouts[-1]["layout"].items()} if layouts else {},
        "full_ranks": {n: min(s) for n, s in shapes.items()},
        "options": dataclasses.asdict(opts),
    }
    (out / "rows").mkdir(parents=True, exist_ok=True)
    from hf_lowrank.files import write_json

    write_json(out / "rows" / f"{name}.json", row)
    return row


def _galore_row(opts, tokenizer, data, recorder):
    """GaLore through transformers' Trainer (dense weights, low-rank gradient projection)."""
    import transformers

    from hf_lowrank.recipe import build_model

    model = build_model(opts, len(tokenizer))
    args = transformers.TrainingArguments(
        opts.output_dir, max_steps=opts.max_steps, per_device_train_batch_size=opts.per_device_train_batch_size,
        per_device_eval_batch_size=opts.per_device_train_batch_size, learning_rate=opts.learning_rate,
        lr_scheduler_type=opts.lr_scheduler_type, warmup_steps=opts.warmup_steps, weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm, bf16=opts.bf16, seed=opts.seed, eval_strategy="steps", eval_steps=opts.eval_steps,
        save_strategy="no", logging_steps=opts.logging_steps, report_to="none", use_cpu=opts.use_cpu, disable_tqdm=False,
        optim="galore_adamw", optim_target_modules=[r".*mlp.*"], optim_args=f"rank={max(8, opts.n_embd // 6)},update_proj_gap=50,scale=0.25",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"], callbacks=[recorder])
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    metrics = trainer.evaluate()
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    result = {"eval_loss": metrics["eval_loss"], "train_seconds": seconds, "trainable_params": n, "total_params": n}
    return result, trainer.state.log_history, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--out", default="runs/bench-cpu")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--fixed-rank", type=float, default=0.15, help=argparse.SUPPRESS)
    parser.add_argument("--order", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help="override a scale option, e.g. --set max_steps=50")
    args = parser.parse_args()
    out = Path(args.out)
    for item in args.set:
        key, _, value = item.partition("=")
        for scale in SCALES.values():
            scale[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    if args.row:
        run_row(args.row, args.scale, out, args.fixed_rank, args.order)
        return
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}")
    rows.sort(key=list(ROWS).index)  # InRank before the rows that take its final rank
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "load average at start": open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?",
        "scale": args.scale,
        "settings": json.dumps(SCALES[args.scale]),
        "rows": rows,
    }
    fixed_rank = 0.15
    from hf_lowrank.files import read_json, write_json

    write_json(out / "benchmark.json", meta)
    for order, name in enumerate(rows):
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.run", "--scale", args.scale, "--out", str(out), "--row", name,
               "--fixed-rank", str(fixed_rank), "--order", str(order)] + [f"--set={s}" for s in args.set]
        subprocess.run(cmd, check=True, cwd=Path(__file__).parents[1])
        row = read_json(out / "rows" / f"{name}.json")
        if name == "inrank" and row["final_ranks"]:
            fixed_rank = round(sum(row["final_ranks"].values()) / sum(row["full_ranks"].values()), 3)
        print(
            f"[{name}] eval ppl {row['perplexity']:.2f}  tokens/s {row['tokens_per_second']:,.0f}  "
            f"trainable {row['trainable_params']:,}  peak {row['peak_memory_mb']:,.0f} MB  ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    from hf_lowrank.report import write_report

    print(write_report(out).read_text())


if __name__ == "__main__":
    main()
