"""Every strategy side by side on the same data, seed and steps; prints measured ratios to full rank.

    python -m benchmarks.run --scale cpu --out runs/bench-cpu            # GPT-2 4x256, 300 steps, 2 CPU cores
    python -m benchmarks.run --scale cpu-long --out runs/bench-long      # GPT-2 4x128 to its plateau, < 60 min
    python -m benchmarks.run --scale cpu-long --lr-sweep 1e-3,2e-3,4e-3 --rows full,inrank --out runs/sweep
    python -m benchmarks.run --scale cpu-long --seeds 0,1,2 --rows full,spectral --inrank-rank 1.0 --out runs/seeds
    benchmarks/gpu.sh runs/bench-gpu                                     # GPT-2 small's shape, bf16, one GPU
    python -m benchmarks.report runs/bench-cpu                           # regenerate report.md and the plots

Each row trains through ``hf_lowrank.recipe.train_one`` in a fresh ``python -m
benchmarks.run_row`` process (its own peak memory), writes ``rows/<name>/*.json`` and gets a
one-line summary here, with its time. With ``--lr-sweep`` each row runs at every rate (under
``sweep/<name>/lr-<rate>/``) and ``rows/<name>`` holds its run at the rate of lowest eval
perplexity. The driver then adds each row's time to full rank's final perplexity and writes
``report.md`` with the table, the targets met or missed, the sweep and the PNG plots. With
``--seeds`` the whole benchmark runs once per seed (init and data order) into ``seed-<N>/``
and ``paired.md`` gives each row's mean, spread and ratio to full rank paired by seed.
This is a measurement, not a test: it prints ratios and fails only if a row crashes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.config import (
    SCALES,
    Scale,
    default_rows,
    get_row,
    parse_rates,
    parse_settings,
    row_names,
    row_steps,
    takes_inrank_rank,
)
from benchmarks.flops import total_flops
from hf_lowrank.checks import fail
from hf_lowrank.files import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
ROW_FILES = ("metrics.json", "log_history.json", "rank_pattern.json")
PREFLIGHT_RANK = 0.25  # stands in for InRank's final rank when the rows that take it are checked up front


def code_version() -> str:
    """The library's version and the repository's commit (``+changes`` when the work tree differs), or the version alone."""
    from hf_lowrank import __version__

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return __version__
    if commit.returncode != 0:
        return __version__
    return f"{__version__} at {commit.stdout.strip()}{' +changes' if dirty.stdout.strip() else ''}"


def machine() -> str:
    """CPU model, cores, memory, and GPU if any, in one line."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    parts = [f"{cpu}, {os.cpu_count()} cores"]
    try:
        parts.append(f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    parts.append(f"torch {torch.__version__}, transformers {transformers.__version__}")
    return ", ".join(parts)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3]) + " (1, 5, 15 min)"
    except OSError:
        return "unknown"


def rank_fraction(row_dir: Path) -> float | None:
    """Sum of a row's final low-rank ranks over the sum of their full ranks, from its ``rank_pattern.json``."""
    path = row_dir / "rank_pattern.json"
    if not path.is_file():
        return None
    low = [p for p in read_json(path).values() if p["mode"] != "dense"]
    return round(sum(p["rank"] for p in low) / sum(p["full_rank"] for p in low), 4) if low else None


def summary_line(metrics: dict[str, Any], reference: dict[str, Any] | None, seconds: float) -> str:
    """The one line printed as each row (or sweep point) finishes."""
    m = metrics
    rel = lambda key: f" ({m[key] / reference[key]:.2f}x)" if reference else ""  # noqa: E731
    return (
        f"{m['label']} (lr {m['learning_rate']:g}): ppl {m['perplexity']:.1f}{rel('perplexity')} "
        f"| {m['tokens_per_second']:,.0f} tok/s{rel('tokens_per_second')} "
        f"| trainable {m['trainable_params']:,}{rel('trainable_params')} | peak {m['peak_memory_bytes'] / 2**20:,.0f} MiB "
        f"| decisions {100 * m['decision_share']:.2f}% | {seconds:.0f} s"
    )


# -- time to quality ---------------------------------------------------------------------------


def time_to_quality(metrics: dict[str, Any], history: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The first evaluation at which a row's perplexity is at most ``target``: its step, training time and FLOPs.

    ``step`` is None when no evaluation reached it. The resolution is the evaluation interval.
    """
    for entry in sorted((e for e in history if "eval_loss" in e), key=lambda e: e["step"]):
        if math.exp(min(entry["eval_loss"], 700.0)) <= target:
            step = entry["step"]
            flops = total_flops(metrics["flop_layouts"], metrics["other_flops_per_token"], step, metrics["tokens_per_step"])
            return {"target_perplexity": target, "step": step, "train_seconds": entry["train_seconds"], "flops": flops}
    return {"target_perplexity": target, "step": None, "train_seconds": None, "flops": None}


def annotate_quality(out: Path) -> None:
    """Write ``time_to_quality`` into every row's ``metrics.json``: against its reference's final perplexity."""
    rows_dir = out / "rows"
    for folder in sorted(p for p in rows_dir.iterdir() if (p / "metrics.json").is_file()):
        metrics = read_json(folder / "metrics.json")
        ref_file = rows_dir / metrics.get("reference", "") / "metrics.json"
        if "perplexity" not in metrics or not ref_file.is_file() or "perplexity" not in read_json(ref_file):
            continue
        history = read_json(folder / "log_history.json")
        metrics["time_to_quality"] = time_to_quality(metrics, history, read_json(ref_file)["perplexity"])
        write_json(folder / "metrics.json", metrics)


# -- the driver --------------------------------------------------------------------------------


def _run_one(
    name: str, scale_name: str, settings: dict[str, Any], scale: Scale, row_dir: Path, order: int,
    rate: float | None, inrank_rank: float | None, isolate: bool, ablation: dict[str, Any],
) -> int:
    """Train one row (at one sweep rate) into ``row_dir``; returns the exit status."""
    from benchmarks.run_row import run_row

    for filename in ROW_FILES:
        (row_dir / filename).unlink(missing_ok=True)
    if not isolate:
        run_row(get_row(name, scale, inrank_rank, ablation), scale, row_dir, order, {} if rate is None else {"learning_rate": rate})
        return 0
    cmd = [sys.executable, "-m", "benchmarks.run_row", "--out", str(row_dir), "--row", name, "--scale", scale_name, "--order", str(order)]
    cmd += [f"--set={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()]
    cmd += [f"--lowrank={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in ablation.items()]
    cmd += [] if rate is None else ["--learning-rate", repr(rate)]
    cmd += [] if inrank_rank is None else ["--inrank-rank", repr(inrank_rank)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


class SetupError(ValueError):
    """A setting, row or rate the benchmark cannot run with; raised before any data is read."""


def check_rows(rows: list[str]) -> list[str]:
    """``rows`` in run order (InRank before the rows that take its final rank); unknown names fail."""
    names = row_names()
    if not rows or any(r not in names for r in rows):
        fail("--rows", ",".join(rows), f"choose from {','.join(names)}")
    return sorted(set(rows), key=names.index)


def run_benchmark(
    scale_name: str,
    out: Path,
    rows: list[str],
    settings: dict[str, Any] | None = None,
    inrank_rank: float | None = None,
    isolate: bool = True,
    command: str | None = None,
    rates: list[float] | None = None,
    ablation: dict[str, Any] | None = None,
) -> Path:
    """Run ``rows`` (each in a fresh process unless ``isolate`` is False), at each of ``rates`` if given; write the report.

    ``ablation`` overrides LowRankConfig settings of every low-rank row (see ``get_row``).
    Returns the path of ``report.md``. In-process rows share one process, so a row's peak
    memory can include what earlier rows left allocated; use it for smoke runs only.
    """
    import torch

    from benchmarks.report import write_benchmark_report
    from hf_lowrank.recipe import check, load_data

    settings, ablation = settings or {}, ablation or {}
    try:  # every setting, and each row's layers, ranks and schedule against the model, before any data is read
        scale = SCALES[scale_name].replace(**settings)
        if scale.device == "cuda" and not torch.cuda.is_available():
            fail("device", "cuda", f"torch {torch.__version__} sees no GPU here; use --scale cpu or --set device=cpu")
        rows = check_rows(rows or default_rows(scale))
        for name in rows:
            row = get_row(name, scale, inrank_rank or PREFLIGHT_RANK, ablation)
            if takes_inrank_rank(name) and inrank_rank is None and "inrank" not in rows and rank_fraction(out / "rows" / "inrank") is None:
                fail("--rows", ",".join(rows), f"row {name!r} takes InRank's final rank: add inrank, or pass --inrank-rank")
            check(scale.options(**row.recipe, lowrank=row.lowrank, max_steps=row_steps(row, scale.options().max_steps)))
    except ValueError as e:
        raise SetupError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    meta = {
        "command": command or "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "code": code_version(),  # a default that changes later changes what a row without an ablation ran
        "load average at start": load_average(),
        "scale": scale_name,
        "settings": scale.to_dict(),
        "rows": rows,
        "lr_sweep": rates,
        "ablation": ablation,
    }
    write_json(out / "benchmark.json", meta)
    t = time.perf_counter()
    load_data(scale.options())  # trains and caches the tokenizer once, and fails early on a bad corpus
    print(f"data ready: {time.perf_counter() - t:.0f} s", flush=True)
    failed = []
    for order, name in enumerate(rows):
        row_dir = out / "rows" / name
        shutil.rmtree(row_dir, ignore_errors=True)
        shutil.rmtree(out / "sweep" / name, ignore_errors=True)
        rank = inrank_rank if inrank_rank is not None else rank_fraction(out / "rows" / "inrank")
        runs = []
        for rate in rates or [None]:
            run_dir = row_dir if rate is None else out / "sweep" / name / f"lr-{rate:g}"
            t = time.perf_counter()
            status = _run_one(name, scale_name, settings, scale, run_dir, order, rate, rank, isolate, ablation)
            seconds = time.perf_counter() - t
            label = name if rate is None else f"{name} (lr {rate:g})"
            if status != 0 or not (run_dir / "metrics.json").is_file():
                print(f"[{order + 1}/{len(rows)}] {label}: FAILED (exit {status}, see the output above)", flush=True)
                continue
            metrics = read_json(run_dir / "metrics.json")
            ref_file = out / "rows" / metrics["reference"] / "metrics.json"
            reference = read_json(ref_file) if metrics["reference"] != name and ref_file.is_file() else None
            print(f"[{order + 1}/{len(rows)}] " + summary_line(metrics, reference, seconds), flush=True)
            runs.append((metrics, run_dir))
        if not runs:
            failed.append(name)
            continue
        if rates:
            _keep_best(runs, row_dir)
    annotate_quality(out)
    meta["load average at end"] = load_average()
    meta["runtime"] = f"{(time.perf_counter() - start) / 60:.1f} min"
    write_json(out / "benchmark.json", meta)
    report = write_benchmark_report(out)
    if failed:
        raise SystemExit(f"rows failed: {failed}; the report covers the others ({report})")
    return report


def parse_seeds(text: str, settings: dict[str, Any]) -> list[int]:
    """``--seeds 0,1,2`` as distinct ints >= 0; refused together with ``--set seed=``."""
    if "seed" in settings:
        fail("--seeds", text, "give either --seeds or --set seed=N, not both")
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        fail("--seeds", text, "give distinct whole numbers >= 0, e.g. --seeds 0,1,2")
    return seeds


def run_seeds(
    scale_name: str, out: Path, rows: list[str], settings: dict[str, Any], seeds: list[int],
    inrank_rank: float | None, isolate: bool, rates: list[float] | None, ablation: dict[str, Any],
) -> Path:
    """Run the benchmark once per seed into ``out/seed-<N>/``; write ``out/paired.md`` and return its path."""
    from benchmarks.report import paired_table

    for seed in seeds:  # the first seed's setup check also covers the others: only the seed differs
        run_benchmark(
            scale_name, out / f"seed-{seed}", rows, {**settings, "seed": seed}, inrank_rank, isolate=isolate,
            rates=rates, ablation=ablation,
        )
    path = out / "paired.md"
    path.write_text(
        "# Rows across seeds\n\nEach row's eval perplexity at every seed, their mean and spread ((max - min) / mean), "
        "and its ratio to full rank trained with the same seed (init and data order).\n\n" + paired_table([out]) + "\n"
    )
    return path


def merge_runs(out: Path, parts: list[Path]) -> Path:
    """One benchmark directory from ``parts`` run apart (two processes at once, or two machines).

    The parts must share the scale, its settings and the ablation, and hold different rows;
    rows and sweep points are copied, their order is the table's, the time to quality is taken
    again against the merged full-rank row, and ``report.md`` is written. Returns its path.
    """
    from benchmarks.report import write_benchmark_report

    metas = [read_json(p / "benchmark.json") for p in parts]
    for key in ("scale", "settings", "ablation"):  # parts may sweep different rates: each row reports its own
        values = [m.get(key) for m in metas]
        if any(v != values[0] for v in values):
            fail("--merge", [str(p) for p in parts], f"the parts differ in {key} ({values}); merge runs of one benchmark only")
    seen: dict[str, Path] = {}
    for part in parts:
        for row in sorted(p.name for p in (part / "rows").iterdir() if (p / "metrics.json").is_file()):
            if row in seen:
                fail("--merge", [str(p) for p in parts], f"row {row!r} is in both {seen[row]} and {part}; keep it in one part")
            seen[row] = part
    if out.exists():
        fail("--out", str(out), "give a new directory for the merged benchmark")
    order = row_names()
    for row, part in seen.items():
        shutil.copytree(part / "rows" / row, out / "rows" / row)
        if (part / "sweep" / row).is_dir():
            shutil.copytree(part / "sweep" / row, out / "sweep" / row)
        metrics = read_json(out / "rows" / row / "metrics.json")
        metrics["order"] = order.index(row) if row in order else len(order)
        write_json(out / "rows" / row / "metrics.json", metrics)
    meta = {
        **metas[0],
        "command": " ; ".join(m["command"] for m in metas),
        "merged from": [str(p) for p in parts],
        "rows": sorted(seen, key=lambda r: order.index(r) if r in order else len(order)),
        "load average at start": " | ".join(m.get("load average at start", "?") for m in metas),
        "load average at end": " | ".join(m.get("load average at end", "?") for m in metas),
        "runtime": " + ".join(m.get("runtime", "?") for m in metas) + " (parts)",
    }
    write_json(out / "benchmark.json", meta)
    annotate_quality(out)
    return write_benchmark_report(out)


def _keep_best(runs: list[tuple[dict[str, Any], Path]], row_dir: Path) -> None:
    """Copy the sweep point of lowest eval perplexity to ``row_dir``, with every point's result in its metrics."""
    best_metrics, best_dir = min(runs, key=lambda run: run[0]["perplexity"])
    row_dir.mkdir(parents=True, exist_ok=True)
    for name in ROW_FILES:
        shutil.copyfile(best_dir / name, row_dir / name)
    sweep = [{"learning_rate": m["learning_rate"], "perplexity": m["perplexity"], "folder": str(d.relative_to(row_dir.parents[1]))} for m, d in runs]
    write_json(row_dir / "metrics.json", {**best_metrics, "sweep": sweep})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu, cpu-long (to full rank's plateau), cpu-wide (cpu-long at width 256) or gpu")
    parser.add_argument("--out", default=None, help="benchmark directory (default runs/bench-<scale>)")
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(row_names())} (default: all; galore and apollo only with architecture=llama)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scale setting, e.g. --set max_steps=50")
    parser.add_argument("--lowrank", action="append", default=[], metavar="KEY=VALUE", help="ablation: a LowRankConfig setting of every low-rank row, e.g. init_scale=0.5 or strategy_args.threshold=0.95")
    parser.add_argument("--lr-sweep", default=None, metavar="LR,LR,...", help="run each row at each rate and report it at its best")
    parser.add_argument("--seeds", default=None, metavar="N,N,...", help="run the benchmark at each seed into OUT/seed-<N>/ and report ratios paired by seed")
    parser.add_argument("--inrank-rank", type=float, default=None, help="rank fraction for fixed/spectral/warm_start/dynamic (default: InRank's final)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR", help="merge benchmark directories of one benchmark run apart into --out, then report")
    parser.add_argument("--in-process", action="store_true", help="run rows in this process (smoke runs; peak memory then mixes rows)")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.out:
            raise SystemExit("benchmarks.run: --merge needs --out NEW_DIR")
        try:
            report = merge_runs(Path(args.out), [Path(p) for p in args.merge])
        except ValueError as e:
            raise SystemExit(f"benchmarks.run: {e}") from None
        print(report.read_text())
        return
    rows = [r for r in (args.rows or "").split(",") if r]  # none: default_rows of the scale
    out = Path(args.out or f"runs/bench-{args.scale}")
    try:
        settings = parse_settings(args.set)
        ablation = parse_settings(args.lowrank, "--lowrank")
        rates = parse_rates(args.lr_sweep) if args.lr_sweep else None
        seeds = parse_seeds(args.seeds, settings) if args.seeds else None
    except ValueError as e:
        raise SystemExit(f"benchmarks.run: {e}") from None
    try:
        if seeds is not None:
            report = run_seeds(args.scale, out, rows, settings, seeds, args.inrank_rank, not args.in_process, rates, ablation)
        else:
            report = run_benchmark(args.scale, out, rows, settings, args.inrank_rank, isolate=not args.in_process, rates=rates, ablation=ablation)
    except SetupError as e:
        raise SystemExit(f"benchmarks.run: {e}") from None
    print()
    print(report.read_text())
    print(f"report: {report}")


if __name__ == "__main__":
    main()
