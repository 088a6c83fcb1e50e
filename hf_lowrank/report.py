"""Tables and plots of a benchmark or training-run directory, rebuilt from the JSON files the runs wrote.

A benchmark directory (``python -m benchmarks.run``) holds ``benchmark.json`` and, per row,
``rows/<name>/metrics.json``, ``log_history.json`` and ``rank_pattern.json``. A training run
(``hf-lowrank train``) holds ``results.json``, whose Trainer log history has the losses and the
per-layer ranks. :func:`write_report` writes ``report.md`` and the PNG plots (drawn by
:mod:`hf_lowrank.plots`) next to them; ``hf-lowrank report RUN_DIR`` calls it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .files import read_json
from .plots import plot_eval_loss, plot_final_ranks, plot_ranks, plot_run_loss, use_files_backend
from .results import RESULTS_NAME, format_results

PLOTS = ("eval_loss.png", "ranks.png", "final_ranks.png")

# The benchmark's targets: InRank, and the best low-rank row, within 2% of full-rank perplexity
# at <= 0.5x the parameters of the layers the benchmark makes low-rank (its placement: the MLP
# or every block layer); the best row also at >= 1.3x full rank's tokens/s; every strategy
# better than the fixed-rank control; rank decisions <= 2% of run time; measured speedup >= 80%
# of the FLOP-predicted one.
TARGETS = {"ppl_ratio": 1.02, "speedup": 1.3, "placement_ratio": 0.5, "decision_share": 0.02, "speedup_efficiency": 0.8}

COLUMNS = (
    "row", "eval ppl", "ppl / full", "tokens/s", "measured speedup", "FLOP speedup (run)",
    "FLOP speedup (final ranks)", "measured / FLOP (run)", "trainable", "total", "trainable / full",
    "low-rank layers' params / dense", "weights + optimizer state", "peak memory", "final ranks", "rank decisions",
)


# -- loading -----------------------------------------------------------------------------------


def load_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of a benchmark, in run order: its metrics plus ``history`` and ``pattern``."""
    rows = []
    for folder in sorted(Path(run_dir, "rows").iterdir()):
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            continue
        row = read_json(metrics_file)
        row["history"] = read_json(folder / "log_history.json") if (folder / "log_history.json").is_file() else []
        row["pattern"] = read_json(folder / "rank_pattern.json") if (folder / "rank_pattern.json").is_file() else {}
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("order", 0))


def _done(row: dict[str, Any]) -> bool:
    return "eval_loss" in row and not row.get("skipped")


def _reference(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ref = next((r for r in rows if r["name"] == row.get("reference")), None)
    return ref if ref is not None and _done(ref) else None


def placement_ratio(row: dict[str, Any]) -> float:
    """Weights the placement's layers hold at the end over what they hold dense (bias excluded):
    ``r*(i+o)`` factorized, ``i*o + r*(i+o)`` residual (its frozen ``W0`` is stored too); NaN
    without a rank pattern."""
    pattern = row.get("pattern") or {}
    if not pattern:
        return math.nan
    stored = dense = 0
    for p in pattern.values():
        i, o, r = p["in_features"], p["out_features"], p["rank"]
        stored += {"dense": i * o, "factorized": r * (i + o), "residual": i * o + r * (i + o)}[p["mode"]]
        dense += i * o
    return stored / dense


def ratios(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Perplexity, speed, parameter and FLOP ratios of ``row`` to its reference row (NaN without one)."""
    ref = _reference(row, rows)
    keys = ("ppl", "speedup", "trainable", "placement", "flop_run", "flop_final", "efficiency")
    if ref is None or not _done(row):
        return {k: math.nan for k in keys}
    flop_run = ref["flops_per_token_run"] / row["flops_per_token_run"]
    speedup = row["tokens_per_second"] / ref["tokens_per_second"]
    return {
        "ppl": row["perplexity"] / ref["perplexity"],
        "speedup": speedup,
        "trainable": row["trainable_params"] / ref["trainable_params"],
        "placement": placement_ratio(row),
        "flop_run": flop_run,
        "flop_final": ref["flops_per_token_final"] / row["flops_per_token_final"],
        "efficiency": speedup / flop_run,
    }


# -- table and targets -------------------------------------------------------------------------


def _fmt(value: float, pattern: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def _bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _mib(n: float | None) -> str:
    """Exact byte counts (benchmarks/memory.py) in MiB with two decimals; "-" for a row measured without them."""
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def final_ranks(row: dict[str, Any]) -> str:
    """The final ranks of a row's low-rank layers as ``lo-hi of full`` (``dense`` when none is factorized)."""
    if not row.get("pattern"):
        return "-"  # a peer's plain model: no low-rank layers
    low = [p for p in row.get("pattern", {}).values() if p["mode"] != "dense"]
    if not low:
        return "dense"
    ranks, fulls = sorted(p["rank"] for p in low), sorted({p["full_rank"] for p in low})
    span = f"{ranks[0]}" if ranks[0] == ranks[-1] else f"{ranks[0]}-{ranks[-1]}"
    frozen = " + W0" if any(p["mode"] == "residual" for p in low) else ""
    return f"{span} of {'/'.join(map(str, fulls))}{frozen}"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table; each ratio is against the row's reference (full rank of its architecture)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for r in rows:
        if not _done(r):
            why = r.get("skipped") or r.get("error") or "no result"
            lines.append(f"| {r['label']} | " + " | ".join(["-"] * (len(COLUMNS) - 2)) + f" | not run: {why} |")
            continue
        q = ratios(r, rows)
        cells = [
            r["label"],
            f"{r['perplexity']:.1f}",
            _fmt(q["ppl"], "{:.3f}"),
            f"{r['tokens_per_second']:,.0f}",
            _fmt(q["speedup"], "{:.2f}x"),
            _fmt(q["flop_run"], "{:.2f}x"),
            _fmt(q["flop_final"], "{:.2f}x"),
            _fmt(q["efficiency"], "{:.0%}"),
            f"{r['trainable_params']:,}",
            f"{r['total_params']:,}",
            _fmt(q["trainable"], "{:.2f}"),
            _fmt(q["placement"], "{:.2f}"),
            _mib((r.get("memory") or {}).get("weights_plus_optimizer_peak_bytes")),
            _bytes(r["peak_memory_bytes"]),
            final_ranks(r),
            f"{100 * r['decision_share']:.2f}%" if r["decision_seconds"] else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target of the benchmark issue: met or missed, with the measured value."""
    by_name = {r["name"]: r for r in rows if _done(r)}
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"- **{'met' if ok else 'missed'}**: {text}")

    half = TARGETS["placement_ratio"]
    inrank = by_name.get("inrank")
    if inrank is not None and _reference(inrank, rows) is not None:
        q = ratios(inrank, rows)
        line(
            q["ppl"] <= TARGETS["ppl_ratio"] and q["placement"] <= half,
            f"InRank within 2% of full rank's perplexity at <= {half}x the low-rank layers' parameters: "
            f"{q['ppl']:.3f}x ({inrank['perplexity']:.1f}) at {q['placement']:.2f}x",
        )
    low = [
        r for r in by_name.values()
        if r["name"] != r.get("reference") and r.get("lowrank_config") and r["lowrank_config"].get("mode") != "dense"
        and _reference(r, rows) is not None  # a peer's row (no lowrank_config) is not a low-rank row of this library
    ]
    if low:
        best = min(low, key=lambda r: r["perplexity"])
        q = ratios(best, rows)
        line(
            q["ppl"] <= TARGETS["ppl_ratio"] and q["placement"] <= half and q["speedup"] >= TARGETS["speedup"],
            f"best low-rank row ({best['label']}) within 2% of full rank at <= {half}x the low-rank layers' parameters "
            f"and >= {TARGETS['speedup']}x tokens/s: {q['ppl']:.3f}x at {q['placement']:.2f}x, {q['speedup']:.2f}x tokens/s",
        )
    fixed = by_name.get("fixed")
    if fixed is not None:
        for r in by_name.values():
            if r.get("lowrank_config") and r["name"] not in ("full", "fixed") and r["family"] == fixed["family"]:
                line(
                    r["perplexity"] < fixed["perplexity"],
                    f"{r['label']} better than the fixed-rank control: perplexity {r['perplexity']:.1f} vs {fixed['perplexity']:.1f}",
                )
    for r in by_name.values():
        if r["decision_seconds"]:
            line(r["decision_share"] <= TARGETS["decision_share"], f"{r['label']}: rank decisions {100 * r['decision_share']:.2f}% of run time (<= 2%)")
    for r in by_name.values():
        q = ratios(r, rows)
        if r["name"] != r.get("reference") and not math.isnan(q["flop_run"]) and abs(q["flop_run"] - 1.0) > 0.01:
            line(
                q["efficiency"] >= TARGETS["speedup_efficiency"],
                f"{r['label']}: measured speedup {q['speedup']:.2f}x is {q['efficiency']:.0%} of the FLOP-predicted "
                f"{q['flop_run']:.2f}x (>= 80%)",
            )
    return out


# -- a training run ----------------------------------------------------------------------------

RUN_LABELS = {"lowrank": "low-rank", "full_rank": "full rank"}


def run_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a results.json (low-rank, and full rank when compared) as rows of the rank plot.

    The layout at step 0 is ``initial_pattern`` (older results without it start from the first
    logged ranks when no plan came before them). Each logging step of the Trainer's log
    history carries the rank of every layer (``lowrank/rank/<layer>``); between logging steps,
    the applied plans say which layer changed to which mode and rank at which step. A row's
    ``history`` holds both, in step order, as ``layers`` (layer -> [mode, rank]).
    """
    from .trainer import RANK_LOG_PREFIX

    rows = []
    for key, label in RUN_LABELS.items():
        run = results.get(key)
        if run is None:
            continue
        full_ranks = run.get("full_ranks", {})
        initial = run.get("initial_pattern") or {}
        modes = {n: spec["mode"] for n, spec in initial.items()}
        ranks = {n: full_ranks.get(n) if spec["mode"] == "dense" else spec["rank"] for n, spec in initial.items()}
        history = [{"step": 0, "layers": _layers(ranks, modes, run)}] if initial else []
        events = [(e["step"], 1, e) for e in run.get("log_history", [])]
        events += [(p["step"], 0, p) for p in run.get("plan_history", [])]  # a plan acts before that step's log
        for step, is_log, event in sorted(events, key=lambda t: (t[0], t[1])):
            if is_log:
                logged = {k[len(RANK_LOG_PREFIX):]: v for k, v in event.items() if k.startswith(RANK_LOG_PREFIX)}
                ranks.update(logged)
                history.append({**event, "layers": _layers(ranks, modes, run)} if logged else event)
                continue
            for change in event["changes"]:
                name, op = change["layer"], change["op"]
                ranks[name] = full_ranks.get(name) if op == "to_dense" else change["rank"]
                modes[name] = OP_MODES.get(op, modes.get(name, run.get("mode", "?")))
            history.append({"step": step, "layers": _layers(ranks, modes, run)})
        first = next((e for e in history if e.get("layers")), None)
        if not initial and first is not None and not any(
            p["step"] <= first["step"] for p in run.get("plan_history", [])
        ):
            history.insert(0, {"step": 0, "layers": first["layers"]})
        pattern = {n: {"full_rank": f, "rank": run["ranks"].get(n, f)} for n, f in full_ranks.items()}
        rows.append(
            {"name": key, "label": f"{label} ({run['strategy']})", "history": history,
             "pattern": pattern, "plans": run.get("plan_history", []), "changes_rank": key == "lowrank"}
        )
    return rows


OP_MODES = {"to_dense": "dense", "to_factorized": "factorized", "to_residual": "residual"}


def _layers(ranks: dict[str, int | None], modes: dict[str, str], run: dict[str, Any]) -> dict[str, list]:
    return {n: [modes.get(n, run.get("mode", "?")), r] for n, r in ranks.items() if r is not None}




# -- the report --------------------------------------------------------------------------------


def row_settings(row: dict[str, Any]) -> str:
    """A row's low-rank settings in one line (``optim`` for a plain-Trainer row)."""
    config = row.get("lowrank_config")
    if not config:
        return f"optim={row.get('optim')}" + (f", optim_args={row['optim_args']}" if row.get("optim_args") else "")
    return ", ".join(f"{k}={v}" for k, v in config.items())


def benchmark_markdown(run_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]], plots: list[str]) -> str:
    """The text of a benchmark's ``report.md``."""
    lines = [f"# Benchmark: {meta.get('scale', '?')} scale", ""]
    for key in ("command", "date", "machine", "load average at start", "load average at end", "runtime"):
        if key in meta:
            lines.append(f"- {key}: `{meta[key]}`" if key == "command" else f"- {key}: {meta[key]}")
    settings = meta.get("settings")
    if settings:
        lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if meta.get("ablation"):
        lines.append("- ablation (every low-rank row): " + ", ".join(f"{k}={v}" for k, v in meta["ablation"].items()))
    lines += ["", table(rows), ""]
    notes = [f"- {r['label']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["Notes:", *notes, ""]
    lines += ["Row settings (LowRankConfig, or the Trainer's optimizer for rows without one):", ""]
    lines += [f"- {r['label']}: {row_settings(r)}" for r in rows]
    lines.append("")
    lines += ["## Targets", "", *targets(rows), ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"




def write_report(run_dir: str | Path) -> Path:
    """Regenerate ``report.md`` and the plots in ``run_dir``; returns the path of ``report.md``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such folder (give the output_dir of hf-lowrank train, or a benchmark's run folder)")
    out = run_dir / "report.md"
    if (run_dir / "rows").is_dir():
        rows = load_rows(run_dir)
        if not rows:
            raise FileNotFoundError(f"{run_dir / 'rows'}: no rows/<name>/metrics.json to report")
        meta = read_json(run_dir / "benchmark.json") if (run_dir / "benchmark.json").is_file() else {}
        use_files_backend()
        done = [r for r in rows if _done(r)]
        plots = []
        plot_eval_loss(done, run_dir / "eval_loss.png")
        plots.append("eval_loss.png")
        if plot_ranks(done, run_dir / "ranks.png"):
            plots.append("ranks.png")
        if plot_final_ranks(done, run_dir / "final_ranks.png"):
            plots.append("final_ranks.png")
        out.write_text(benchmark_markdown(run_dir, meta, rows, plots))
    elif (run_dir / RESULTS_NAME).is_file():
        results = read_json(run_dir / RESULTS_NAME)
        rows = run_rows(results)
        use_files_backend()
        plots = [name for name, plot in (("loss.png", plot_run_loss), ("ranks.png", plot_ranks)) if plot(rows, run_dir / name)]
        text = "```\n" + format_results(results) + "\n```\n"
        out.write_text(text + "".join(f"\n![{p}]({p})\n" for p in plots))
    else:
        raise FileNotFoundError(
            f"{run_dir}: neither rows/ (a benchmark from python -m benchmarks.run) nor {RESULTS_NAME} (a training run) is there"
        )
    return out
