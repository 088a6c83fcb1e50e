"""Every strategy side by side on the same data, seed and steps; prints measured ratios to full rank.

    python -m benchmarks.run --scale cpu --out runs/bench-cpu    # GPT-2 4x256 on SOTU, 2 CPU cores, < 30 min
    python -m benchmarks.run --scale gpu --out runs/bench-gpu    # GPT-2 small (124M) in bf16, one GPU
    hf-lowrank report runs/bench-cpu                             # regenerate report.md and the plots

Rows: full rank, InRank, the fixed-rank control, Cuttlefish, warm start (Kamalakara), dynamic
rank (Shin), and GaLore through transformers' ``optim="galore_adamw"`` beside a Llama-style
full-rank row of the same size (GaLore only projects ``nn.Linear``, and GPT-2 uses
``Conv1D``). Each row trains in a fresh ``python -m benchmarks.run_row`` process (its own
peak memory), writes ``rows/<name>/*.json``, and gets a one-line summary here; the driver
then writes ``report.md`` with the table, the targets met or missed, and the PNG plots.
This is a measurement, not a test: it prints ratios and fails only if a row crashes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.config import ROW_BY_NAME, ROW_NAMES, SCALES, Scale, get_row, parse_settings
from hf_lowrank.files import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU model, cores, memory, and GPU if any, in one line."""
    import torch

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
    import transformers

    parts.append(f"torch {torch.__version__}, transformers {transformers.__version__}")
    return ", ".join(parts)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3]) + " (1, 5, 15 min)"
    except OSError:
        return "unknown"


def inrank_rank_fraction(out: Path) -> float | None:
    """Sum of InRank's final ranks over the sum of full ranks, from its ``rank_pattern.json``."""
    path = out / "rows" / "inrank" / "rank_pattern.json"
    if not path.is_file():
        return None
    pattern = read_json(path)
    low = [p for p in pattern.values() if p["mode"] != "dense"]
    return round(sum(p["rank"] for p in low) / sum(p["full_rank"] for p in low), 4) if low else None


def skip_reason(name: str) -> str | None:
    """Why a row cannot run here, or None."""
    if name == "galore" and importlib.util.find_spec("galore_torch") is None:
        return "galore-torch is not installed (pip install galore-torch)"
    return None


def summary_line(metrics: dict[str, Any], reference: dict[str, Any] | None, seconds: float) -> str:
    """The one line printed as each row finishes."""
    m = metrics
    rel = lambda key: f" ({m[key] / reference[key]:.2f}x)" if reference else ""  # noqa: E731
    return (
        f"{m['label']}: ppl {m['perplexity']:.1f}{rel('perplexity')} | {m['tokens_per_second']:,.0f} tok/s{rel('tokens_per_second')} "
        f"| trainable {m['trainable_params']:,}{rel('trainable_params')} | peak {m['peak_memory_bytes'] / 2**20:,.0f} MiB "
        f"| decisions {100 * m['decision_share']:.2f}% | {seconds:.0f} s"
    )


def run_benchmark(
    scale_name: str,
    out: Path,
    rows: list[str],
    settings: dict[str, Any] | None = None,
    fixed_rank: float | None = None,
    isolate: bool = True,
    command: str | None = None,
) -> Path:
    """Run ``rows`` (each in a fresh process unless ``isolate`` is False), then write the report.

    Returns the path of ``report.md``. In-process rows share one process, so a row's peak
    memory can include what earlier rows left allocated; use it for smoke runs only.
    """
    from benchmarks.run_row import prepare_data, run_row
    from hf_lowrank.report import write_report

    settings = settings or {}

    scale: Scale = SCALES[scale_name].replace(**settings)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    meta = {
        "command": command or "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load average at start": load_average(),
        "scale": scale_name,
        "settings": scale.to_dict(),
        "rows": rows,
    }
    write_json(out / "benchmark.json", meta)
    prepare_data(scale, out)
    set_args = [f"--set={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()]
    failed = []
    for order, name in enumerate(rows):
        row_dir = out / "rows" / name
        row_dir.mkdir(parents=True, exist_ok=True)
        (row_dir / "metrics.json").unlink(missing_ok=True)
        reason = skip_reason(name)
        if reason:
            row = ROW_BY_NAME[name]
            write_json(row_dir / "metrics.json", {"name": name, "label": row.label, "reference": row.reference, "order": order, "skipped": reason})
            print(f"[{order + 1}/{len(rows)}] {row.label}: skipped, {reason}", flush=True)
            continue
        rank = fixed_rank if fixed_rank is not None else inrank_rank_fraction(out)
        cmd = [sys.executable, "-m", "benchmarks.run_row", "--out", str(out), "--row", name, "--scale", scale_name, "--order", str(order)]
        cmd += set_args + (["--fixed-rank", str(rank)] if rank is not None else [])
        t = time.perf_counter()
        if isolate:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        else:
            run_row(get_row(name, rank, scale), scale, out, order)
            status = 0
        seconds = time.perf_counter() - t
        if status != 0 or not (row_dir / "metrics.json").is_file():
            failed.append(name)
            print(f"[{order + 1}/{len(rows)}] {name}: FAILED (exit {status}, see the output above)", flush=True)
            continue
        metrics = read_json(row_dir / "metrics.json")
        ref_file = out / "rows" / metrics["reference"] / "metrics.json"
        reference = read_json(ref_file) if metrics["reference"] != name and ref_file.is_file() else None
        if reference is not None and "eval_loss" not in reference:
            reference = None
        print(f"[{order + 1}/{len(rows)}] " + summary_line(metrics, reference, seconds), flush=True)
    meta["load average at end"] = load_average()
    meta["runtime"] = f"{(time.perf_counter() - start) / 60:.1f} min"
    write_json(out / "benchmark.json", meta)
    report = write_report(out)
    if failed:
        raise SystemExit(f"rows failed: {failed}; the report covers the others ({report})")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu: GPT-2 4x256 on 2 cores; gpu: GPT-2 small, bf16")
    parser.add_argument("--out", default=None, help="benchmark directory (default runs/bench-<scale>)")
    parser.add_argument("--rows", default=",".join(ROW_NAMES), help=f"comma-separated subset of {','.join(ROW_NAMES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scale setting, e.g. --set max_steps=50")
    parser.add_argument("--fixed-rank", type=float, default=None, help="rank fraction for fixed/warm_start/dynamic (default: InRank's final)")
    parser.add_argument("--in-process", action="store_true", help="run rows in this process (smoke runs; peak memory then mixes rows)")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROW_NAMES]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; choose from {ROW_NAMES}")
    rows.sort(key=ROW_NAMES.index)  # InRank runs before the rows that take its final rank
    try:
        settings = parse_settings(args.set)
        SCALES[args.scale].replace(**settings)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    out = Path(args.out or f"runs/bench-{args.scale}")
    report = run_benchmark(args.scale, out, rows, settings, args.fixed_rank, isolate=not args.in_process)
    print()
    print(report.read_text())
    print(f"report: {report}")


if __name__ == "__main__":
    main()
