"""Whole training steps of benchmark rows timed side by side: forward, backward, clipping, the optimizer, the strategy.

    python -m benchmarks.speed_rows --scale cpu-long --set architecture=llama \\
        --rows full,galore,apollo,warm_start --inrank-rank 0.375          # the peers against the warm start
    python -m benchmarks.speed_rows --scale cpu-wide --rows full,warm_start --inrank-rank 0.375

Each row is built as the benchmark builds it (the scale's model, the row's ``LowRankConfig`` or
the peer's ``optim``, ``optim_args`` and ``optim_target_modules``), its optimizer and schedule
made by the Trainer's own ``create_optimizer_and_scheduler``, so GaLore and APOLLO are the
optimizers their users get, and a low-rank row is bound with ``bind_training`` so that the
preconditioner and the re-balancing run as in training. Then every row trains on the same
batch, one whole step per row a round, the order reversed every other round: load that comes
and goes hits every row of a round alike.

A step is what an optimizer step costs in training: forward and backward, gradient clipping,
``optimizer.step`` (GaLore's SVD of the gradient every ``update_proj_gap`` steps, APOLLO's
random projections, the low-rank preconditioner), the schedule, and for a low-rank row
``update_ranks`` (the re-balancing every ``rebalance_every`` steps). The table gives the mean
step (amortised: GaLore's SVD steps count once per ``update_proj_gap``), the median step, and
each row's speed against the first row (the mean step of the first over the row's).

A row whose strategy changes shapes is timed in the layout it trains in after its switch: the
warm start factorized at its rank from step 0 (spectral split, the same optimizer settings).
Its dense phase runs at the dense row's speed; the table's last column folds that phase in.
Strategies that choose their own ranks (inrank, cuttlefish, dynamic) are refused: their layout
depends on the run. A measurement, not a test: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

import torch

from benchmarks.config import SCALES, get_row, parse_settings

CHOSEN_RANKS = ("inrank", "inrank_residual", "cuttlefish", "dynamic")  # rows whose layout the run decides
PHASED = {"warm_start": "dense_steps"}  # rows timed in their factorized phase; the setting of their dense phase


def timed_layout(row) -> tuple[dict[str, Any] | bool, float]:
    """The row's LowRankConfig settings to time (its layout after any switch), and the fraction of training spent dense."""
    if row.lowrank is False or row.lowrank.get("mode") == "dense":
        return row.lowrank, 0.0
    strategy = row.lowrank.get("strategy", "fixed")
    if row.name in CHOSEN_RANKS or strategy in CHOSEN_RANKS:
        raise ValueError(
            f"--rows {row.name} is not allowed: its ranks come from the run, so one layout cannot stand for it; "
            "time full, the peers, spectral, fixed or warm_start"
        )
    if strategy not in PHASED:
        return row.lowrank, 0.0
    from hf_lowrank.strategies import get_strategy

    dense = dict(row.lowrank.get("strategy_args") or {}).get(PHASED[strategy], get_strategy(strategy).Args().dense_steps)
    lowrank = {k: v for k, v in row.lowrank.items() if k != "strategy_args"}
    return {**lowrank, "mode": "factorized", "init": "spectral", "strategy": "fixed"}, dense


def build_row(row, scale, tokenizer, data, out_dir: str) -> dict[str, Any]:
    """Model, optimizer and schedule of ``row``, built as the benchmark's training builds them."""
    import transformers

    from hf_lowrank import LowRankConfig, get_lowrank_model
    from hf_lowrank.recipe_build import build_model, training_arguments
    from hf_lowrank.trainer import LowRankTrainer

    opts = scale.options(**row.recipe)
    lowrank, dense_phase = timed_layout(row)
    transformers.set_seed(opts.seed)
    model = build_model(opts, tokenizer)
    trainer_class = transformers.Trainer
    if lowrank is not False:
        model, trainer_class = get_lowrank_model(model, LowRankConfig.from_dict(lowrank, source="lowrank")), LowRankTrainer
    trainer = trainer_class(
        model=model, args=training_arguments(opts, out_dir), train_dataset=data["train"], eval_dataset=data["validation"], processing_class=tokenizer,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=opts.max_steps)
    if lowrank is not False:
        model.bind_training(opts.max_steps, trainer.optimizer, trainer.lr_scheduler)
    dense_fraction = dense_phase if isinstance(dense_phase, float) else dense_phase / opts.max_steps
    return {
        "model": model, "optimizer": trainer.optimizer, "scheduler": trainer.lr_scheduler, "lowrank": lowrank is not False,
        "clip": trainer.args.max_grad_norm, "dense_fraction": dense_fraction, "step": 0,
    }


def train_step(r: dict[str, Any], batch: dict[str, torch.Tensor]) -> None:
    """One optimizer step of a built row, as the Trainer's loop runs it."""
    model, optimizer = r["model"], r["optimizer"]
    loss = model(**batch).loss
    loss.backward()
    if r["clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["clip"])
    optimizer.step()
    r["scheduler"].step()
    optimizer.zero_grad(set_to_none=True)
    r["step"] += 1
    if r["lowrank"]:
        model.update_ranks(r["step"], optimizer, r["scheduler"])


def time_rows(built: dict[str, dict[str, Any]], batch: dict[str, torch.Tensor], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each row's steps, one step per row a round (:func:`hf_lowrank.speed.alternating_times`)."""
    from hf_lowrank.speed import alternating_times

    for r in built.values():
        r["model"].train()
    return alternating_times({name: (lambda r=r: train_step(r, batch)) for name, r in built.items()}, rounds, warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu-long")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a scale setting, e.g. --set architecture=llama")
    parser.add_argument("--rows", default="full,warm_start", help="comma-separated rows; the first is the reference")
    parser.add_argument("--inrank-rank", type=float, default=None, help="rank fraction of the rows that take one (fixed, spectral, warm_start)")
    parser.add_argument("--rounds", type=int, default=400, help="timed rounds (GaLore and APOLLO refresh every 200 steps: cover at least one)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    try:
        if len(rows) < 2 or len(set(rows)) != len(rows):
            raise ValueError(f"--rows {args.rows} is not allowed; give two or more distinct rows, the reference first, e.g. full,warm_start")
        for flag, value in (("--rounds", args.rounds), ("--warmup", args.warmup)):
            if value < (1 if flag == "--rounds" else 0):
                raise ValueError(f"{flag} {value} is not allowed; give a whole number >= {1 if flag == '--rounds' else 0}")
        settings = parse_settings(args.set)
        scale = SCALES[args.scale].replace(**settings) if settings else SCALES[args.scale]
        scale.check()
        chosen = [get_row(name, scale, args.inrank_rank) for name in rows]
        for row in chosen:
            timed_layout(row)
    except ValueError as e:
        raise SystemExit(f"benchmarks.speed_rows: {e}") from None
    from hf_lowrank.recipe_build import load_data

    if scale.device == "cpu" and scale.threads:
        torch.set_num_threads(scale.threads)
    opts = scale.options()
    tokenizer, data, _ = load_data(opts)
    examples = [data["train"][i] for i in range(opts.per_device_train_batch_size)]
    ids = torch.tensor([e["input_ids"] for e in examples])
    batch = {"input_ids": ids, "labels": ids.clone()}
    with tempfile.TemporaryDirectory(prefix="speed-rows-") as tmp:
        built = {row.name: build_row(row, scale, tokenizer, data, tmp) for row in chosen}
        times = time_rows(built, batch, args.rounds, args.warmup)
    ref = rows[0]
    mean = {name: statistics.fmean(t) for name, t in times.items()}
    print(
        f"{args.scale} ({opts.architecture} {opts.n_layer} x {opts.n_embd}), batch {opts.per_device_train_batch_size} x "
        f"{opts.block_size}, {scale.threads or torch.get_num_threads()} thread(s), {args.rounds} rounds after {args.warmup} untimed"
    )
    print(f"| row | timed layout | mean step | median step | speed / {ref} (mean) | median of per-round ratios | whole run / {ref} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in chosen:
        name, r = row.name, built[row.name]
        rounds = statistics.median(f / t for t, f in zip(times[name], times[ref]))
        whole = mean[ref] / (r["dense_fraction"] * mean[ref] + (1 - r["dense_fraction"]) * mean[name])
        if row.recipe:  # a peer: the plain model under its optimizer
            lay = row.recipe["training"]["optim"] + ", dense"
        else:
            lay = ", ".join(sorted({f"{s['mode']} {s['rank'] or ''}".strip() for s in r["model"].rank_pattern().values()}))
        phase = f" (after {r['dense_fraction']:.0%} dense)" if r["dense_fraction"] else ""
        print(
            f"| {row.label} | {lay}{phase} | {1000 * mean[name]:.1f} ms | {1000 * statistics.median(times[name]):.1f} ms "
            f"| {mean[ref] / mean[name]:.2f}x | {rounds:.2f}x | {whole:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
