"""Tables and plots of a run or benchmark directory, from the JSON files the runs wrote.

A benchmark directory holds ``rows/<name>.json`` (one per row, see ``benchmarks/run.py``);
a recipe run directory holds ``results.json``. ``write_report`` regenerates ``report.md``
and, for benchmarks, the PNG plots beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .files import read_json

COLUMNS = (
    "row", "eval ppl", "ppl / full", "tokens/s", "speed / full", "trainable", "total", "trainable / full",
    "peak mem (MB)", "rank decisions", "FLOP-predicted speedup", "measured speedup", "measured / predicted",
)


def layer_flops(mode: str, rank: int, in_f: int, out_f: int) -> float:
    """Matmul FLOPs per token of forward + backward through one layer in ``mode``."""
    dense, low = in_f * out_f, rank * (in_f + out_f)
    if mode == "dense":
        return 6.0 * dense
    if mode == "factorized":
        return 6.0 * low
    return 4.0 * dense + 6.0 * low  # residual: W0 forward and input gradient, no weight gradient


def run_flops(history: list[dict[str, Any]], shapes: dict[str, list[int]], other_flops: float, max_steps: int) -> float:
    """FLOPs per token averaged over the run's steps, with each logged layout held until the next log."""
    if not history:
        return other_flops
    total, prev_step, prev = 0.0, 0, history[0]["layout"]
    for entry in history[1:] + [{"step": max_steps, "layout": history[-1]["layout"]}]:
        span = max(0, min(entry["step"], max_steps) - prev_step)
        total += span * (other_flops + sum(layer_flops(m, r, *shapes[n]) for n, (m, r) in prev.items()))
        prev_step, prev = min(entry["step"], max_steps), entry["layout"]
    return total / max(1, max_steps)


def load_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The benchmark rows in the order they were run."""
    rows = [read_json(p) for p in sorted((run_dir / "rows").glob("*.json"))]
    return sorted(rows, key=lambda r: r["order"])


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of a benchmark, ratios against the row named ``full``."""
    base = {r["reference"]: r for r in rows if r["name"] == r["reference"]}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        ref = base.get(r["reference"], r)
        predicted = ref["flops_per_token"] / r["flops_per_token"] if r.get("flops_per_token") else math.nan
        measured = r["tokens_per_second"] / ref["tokens_per_second"]
        cells = [
            r["label"],
            f"{r['perplexity']:.2f}",
            f"{r['perplexity'] / ref['perplexity']:.3f}",
            f"{r['tokens_per_second']:,.0f}",
            f"{measured:.2f}x",
            f"{r['trainable_params']:,}",
            f"{r['total_params']:,}",
            f"{r['trainable_params'] / ref['trainable_params']:.2f}",
            f"{r['peak_memory_mb']:,.0f} ({r['memory_kind']})",
            f"{100 * r['decision_seconds'] / max(r['train_seconds'], 1e-9):.2f}%",
            f"{predicted:.2f}x",
            f"{measured:.2f}x",
            f"{measured / predicted:.0%}" if predicted == predicted else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_key, name, xlabel in (("step", "eval_loss_vs_step.png", "optimizer step"), ("time", "eval_loss_vs_time.png", "wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            points = [(e[x_key], e["eval_loss"]) for e in r["history"] if "eval_loss" in e]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=r["label"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss")
        ax.set_title(f"Eval loss vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    for r in rows:
        ranks = [(e["step"], {n: rank for n, (_, rank) in e["layout"].items()}) for e in r["history"] if "layout" in e]
        if len({json.dumps(x[1], sort_keys=True) for x in ranks}) <= 1:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for layer in ranks[0][1]:
            ax.step([s for s, _ in ranks], [lay[layer] for _, lay in ranks], where="post", label=layer.replace("transformer.", ""))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("active rank")
        ax.set_title(f"Per-layer rank: {r['label']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        name = f"ranks_{r['name']}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    with_layers = [r for r in rows if r.get("final_ranks")]
    if with_layers:
        layers = sorted({n for r in with_layers for n in r["final_ranks"]})
        grid = [[r["final_ranks"].get(n, math.nan) / r["full_ranks"].get(n, 1) for n in layers] for r in with_layers]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(layers) + 3), 0.45 * len(with_layers) + 2))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(layers)), [n.replace("transformer.", "").replace("model.", "") for n in layers], rotation=70, fontsize=7)
        ax.set_yticks(range(len(with_layers)), [r["label"] for r in with_layers], fontsize=8)
        for i, r in enumerate(with_layers):
            for j, n in enumerate(layers):
                if n in r["final_ranks"]:
                    ax.text(j, i, str(r["final_ranks"][n]), ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, label="final rank / full rank")
        ax.set_title("Final rank per layer")
        fig.tight_layout()
        fig.savefig(out / "final_ranks_heatmap.png", dpi=110)
        plt.close(fig)
        written.append("final_ranks_heatmap.png")
    return written


def write_report(run_dir: str | Path) -> Path:
    """Regenerate ``report.md`` (and the plots of a benchmark) in ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    out = run_dir / "report.md"
    if (run_dir / "rows").is_dir():
        rows = load_rows(run_dir)
        if not rows:
            raise FileNotFoundError(f"{run_dir / 'rows'}: no row results to report")
        meta = read_json(run_dir / "benchmark.json") if (run_dir / "benchmark.json").is_file() else {}
        plots = _plots(rows, run_dir)
        body = [f"# Benchmark: {meta.get('scale', '?')} scale", ""]
        body += [f"- {k}: {v}" for k, v in meta.items() if k != "rows"]
        body += ["", table(rows), ""] + [f"![{p}]({p})" for p in plots]
        out.write_text("\n".join(body) + "\n")
    elif (run_dir / "results.json").is_file():
        from .recipe import format_results

        out.write_text("```\n" + format_results(read_json(run_dir / "results.json")) + "\n```\n")
    else:
        raise FileNotFoundError(f"{run_dir}: neither rows/ (a benchmark) nor results.json (a training run) is there")
    return out
