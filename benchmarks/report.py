"""A benchmark's ``report.md``: the library's table, targets and plots, then time to quality, FLOPs and the sweep.

    python -m benchmarks.report runs/bench-cpu-long    # regenerate report.md and the plots from the JSON files
    python -m benchmarks.report --ablations runs/abl-* --reference runs/bench-cpu-long   # one table of many runs
    python -m benchmarks.report --paired runs/dense runs/abl-*    # per setting: seeds, mean, spread, ratio to full rank paired by seed
    python -m benchmarks.report --paired runs/dense runs/rank-* --price-plot price.png   # and the price of rank, plotted

``hf_lowrank.report.write_report`` writes the table, the targets and the plots; this module adds
two sections from the same ``rows/<name>/metrics.json`` files: for each row, the steps, training
time and FLOPs it took to reach its reference's final perplexity, and its training FLOPs; and,
after ``--lr-sweep``, every sweep point with the rate each row is reported at.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from hf_lowrank.files import read_json
from hf_lowrank.report import final_ranks, load_rows, placement_ratio, write_report

QUALITY_COLUMNS = ("row", "lr", "target ppl", "steps to target", "train time to target", "FLOPs to target", "train FLOPs", "train FLOPs / full")


def _flops(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def quality_table(rows: list[dict[str, Any]]) -> str:
    """Per row: steps, training time (evaluation excluded) and FLOPs to its reference's final perplexity ("-": never)."""
    done = {r["name"]: r for r in rows if "eval_loss" in r}
    lines = ["| " + " | ".join(QUALITY_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(QUALITY_COLUMNS) - 1)) + "|"]
    for r in done.values():
        q = r.get("time_to_quality") or {}
        ref = done.get(r.get("reference"))
        reached = q.get("step") is not None
        cells = [
            r["label"],
            f"{r['learning_rate']:g}",
            f"{q['target_perplexity']:.1f}" if q else "-",
            f"{q['step']:,} of {r['max_steps']:,}" if reached else "-",
            f"{q['train_seconds']:,.0f} s" if reached else "-",
            _flops(q.get("flops")),
            _flops(r["train_flops"]),
            f"{r['train_flops'] / ref['train_flops']:.2f}" if ref else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """Every sweep point of every row (losers too); the rate a row is reported at is marked."""
    lines = ["| row | lr | eval ppl | reported |", "|---|---:|---:|---|"]
    for r in rows:
        for point in r.get("sweep", []):
            best = point["learning_rate"] == r["learning_rate"]
            lines.append(f"| {r['label']} | {point['learning_rate']:g} | {point['perplexity']:.1f} | {'best' if best else ''} |")
    return "\n".join(lines)


def plateau(rows: list[dict[str, Any]]) -> str | None:
    """How much full rank's eval perplexity still fell over the last quarter of its run, or None without evaluations there."""
    full = next((r for r in rows if r["name"] == "full" and "eval_loss" in r), None)
    evals = [e for e in (full or {}).get("history", []) if "eval_loss" in e]
    if not evals:
        return None
    quarter = [e for e in evals if e["step"] <= 0.75 * full["max_steps"]]
    if not quarter:
        return None
    start, end = math.exp(quarter[-1]["eval_loss"]), full["perplexity"]
    return (
        f"Full rank's eval perplexity went from {start:.1f} at step {quarter[-1]['step']:,} to {end:.1f} at step "
        f"{full['max_steps']:,} ({end / start - 1:+.1%} over the last quarter of the run)."
    )


# -- memory counted from the tensors, and the peers (benchmarks/memory.py, docs/peers.md) ---------

MEMORY_COLUMNS = (
    "row", "eval ppl", "weights", "gradients", "optimizer state", "weights + optimizer state",
    "peak: weights", "peak: gradients", "peak: optimizer state", "peak: weights + optimizer state", "process peak RSS",
    "cuda max allocated",
)
PEER_PPL_MARGIN = 1.02  # the library's best row at no more than a peer's perplexity + 2%


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f} MiB"


def memory_table(rows: list[dict[str, Any]]) -> str:
    """Per row: bytes of weights, gradients and optimizer state at the end and at their peak, beside the process peak."""
    lines = ["| " + " | ".join(MEMORY_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(MEMORY_COLUMNS) - 1)) + "|"]
    for r in rows:
        m = r.get("memory")
        if "eval_loss" not in r or not m:
            continue
        cells = [r["label"], f"{r['perplexity']:.1f}"]
        cells += [_mib(m[f"{k}_bytes"]) for k in ("weights", "gradients", "optimizer_state", "weights_plus_optimizer")]
        cells += [_mib(m[f"{k}_peak_bytes"]) for k in ("weights", "gradients", "optimizer_state", "weights_plus_optimizer")]
        cells += [_mib(m.get("process_peak_rss_bytes")), _mib(m.get("cuda_max_allocated_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_peer(row: dict[str, Any]) -> bool:
    return not row.get("lowrank_config") and bool(row.get("optim"))


def peer_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The best strategy of this library (lowest perplexity among the low-rank rows) against each peer row.

    Met when it holds less weights + optimizer state (at their peak) than the peer, at no more than
    the peer's perplexity + 2%, at a higher measured tokens/s.
    """
    done = [r for r in rows if "eval_loss" in r and r.get("memory")]
    peers = [r for r in done if _is_peer(r)]
    low = [r for r in done if r.get("lowrank_config") and r["lowrank_config"].get("mode") != "dense" and not r.get("compiled")]
    if not peers or not low:
        return []
    best = min(low, key=lambda r: r["perplexity"])
    out = []
    for peer in peers:
        mem, peer_mem = (x["memory"]["weights_plus_optimizer_peak_bytes"] for x in (best, peer))
        ok = mem < peer_mem and best["perplexity"] <= PEER_PPL_MARGIN * peer["perplexity"] and best["tokens_per_second"] > peer["tokens_per_second"]
        out.append(
            f"- **{'met' if ok else 'missed'}**: best strategy ({best['label']}) against {peer['label']}: weights + optimizer "
            f"state {_mib(mem)} vs {_mib(peer_mem)}, perplexity {best['perplexity']:.1f} vs {peer['perplexity']:.1f} "
            f"(<= {PEER_PPL_MARGIN * peer['perplexity']:.1f}), {best['tokens_per_second']:,.0f} vs {peer['tokens_per_second']:,.0f} tokens/s"
        )
    return out


def plot_memory_perplexity(rows: list[dict[str, Any]], path: Path) -> bool:
    """Eval perplexity against weights + optimizer state (at their peak), one point per row; False when no row counted memory."""
    points = [r for r in rows if "eval_loss" in r and r.get("memory")]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for r in points:
        x, y = r["memory"]["weights_plus_optimizer_peak_bytes"] / 2**20, r["perplexity"]
        ax.scatter([x], [y], marker="s" if _is_peer(r) else "o", s=40)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("weights + optimizer state at their peak, MiB (counted from the tensors)")
    ax.set_ylabel("eval perplexity")
    ax.set_title("Perplexity vs weights + optimizer memory (squares: peers)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def memory_sections(run_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The report's memory section (table, peers' targets, plot); empty for rows measured before memory was counted."""
    if not any(r.get("memory") for r in rows):
        return []
    sections = [
        "## Memory, counted from the tensors",
        "",
        (
            "Bytes of weights (every parameter, frozen ones too), gradients (at the optimizer step) and optimizer state "
            "(every tensor the optimizer keeps, GaLore's and APOLLO's projections included) at the end of training and "
            "at their peak over the run, beside the process's peak resident set (and torch.cuda.max_memory_allocated on "
            "GPU); docs/peers.md says how they are counted."
        ),
        "",
        memory_table(rows),
        "",
    ]
    peers = peer_targets(rows)
    if peers:
        sections += ["Against the peers (the best strategy of this library, by perplexity):", "", *peers, ""]
    if plot_memory_perplexity(rows, Path(run_dir) / "memory_perplexity.png"):
        sections += ["![memory_perplexity.png](memory_perplexity.png)", ""]
    return sections


def write_benchmark_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` (and the plots) of a benchmark directory; returns its path."""
    path = write_report(run_dir)
    rows = load_rows(run_dir)
    sections = [
        "## Time to quality and training FLOPs",
        "",
        (
            "Steps, training time (evaluation excluded) and training FLOPs each row needed to reach its reference's "
            "(full rank's) final eval perplexity, at the evaluation interval's resolution; \"-\" when it never did."
        ),
        "",
        quality_table(rows),
        "",
    ]
    settled = plateau(rows)
    if settled:
        sections += [settled, ""]
    sections += memory_sections(Path(run_dir), rows)
    if any(r.get("sweep") for r in rows):
        sections += ["## Learning-rate sweep", "", "Each row is reported at its rate of lowest eval perplexity.", "", sweep_table(rows), ""]
    path.write_text(path.read_text() + "\n" + "\n".join(sections))
    return path


ABLATION_COLUMNS = (
    "run", "row", "placement", "ablation", "lr", "eval ppl", "ppl / full", "low-rank layers' params / dense",
    "trainable", "tokens/s", "final ranks",
)


def ablation_table(run_dirs: list[str | Path], reference: str | Path) -> str:
    """Every row of every benchmark directory in ``run_dirs`` (losers too), one line each.

    Perplexity ratios are against the full-rank row of ``reference`` (a benchmark directory at
    the same scale); parameter ratios are each row's own placement against it dense. Tokens/s stay absolute: runs made at different
    times, or two at once, do not give speed ratios; the side-by-side table of one run does.
    """
    ref_rows = {r["name"]: r for r in load_rows(reference)}
    if "full" not in ref_rows:
        raise FileNotFoundError(f"{reference}: no rows/full/metrics.json to take ratios against")
    full = ref_rows["full"]
    lines = ["| " + " | ".join(ABLATION_COLUMNS) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 6 + ["---"]) + "|"]
    for run_dir in run_dirs:
        meta = read_json(Path(run_dir, "benchmark.json"))
        ablation = ", ".join(f"{k}={v}" for k, v in (meta.get("ablation") or {}).items()) or "-"
        for r in load_rows(run_dir):
            if "eval_loss" not in r:
                continue
            cells = [
                Path(run_dir).name,
                r["label"],
                r.get("scale", {}).get("targets", "?"),
                "-" if r["name"] == "full" else ablation,
                f"{r['learning_rate']:g}",
                f"{r['perplexity']:.1f}",
                f"{r['perplexity'] / full['perplexity']:.3f}",
                _weights(r),
                f"{r['trainable_params']:,}",
                f"{r['tokens_per_second']:,.0f}",
                final_ranks(r),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_COLUMNS = (
    "setting", "row", "ablation", "lr", "seeds", "eval ppl by seed", "mean ppl", "spread", "ppl / full by seed",
    "mean ppl / full", "low-rank layers' params / dense", "final ranks",
)


def seed_runs(folder: str | Path) -> list[Path]:
    """The benchmark directories of one setting: ``folder/seed-<N>/`` as ``--seeds`` writes them, or ``folder`` itself."""
    folder = Path(folder)
    runs = sorted((p for p in folder.glob("seed-*") if (p / "benchmark.json").is_file()), key=lambda p: p.name)
    if runs:
        return runs
    if (folder / "benchmark.json").is_file():
        return [folder]
    raise FileNotFoundError(f"{folder}: no benchmark.json and no seed-<N>/benchmark.json below it")


def run_seed(run_dir: Path) -> int:
    """The seed a benchmark directory trained with (its settings' ``seed``)."""
    return int(read_json(run_dir / "benchmark.json")["settings"].get("seed", 0))


def _weights(row: dict[str, Any]) -> str:
    """The placement's stored weights over dense, or "-" for a row without a rank pattern (the peers)."""
    ratio = placement_ratio(row)
    return "-" if math.isnan(ratio) else f"{ratio:.2f}"


def paired_rows(settings: list[str | Path]) -> list[dict[str, Any]]:
    """Each row of each setting across its seeds, with its ratio to the full-rank row of the same seed.

    A setting is a folder of ``seed-<N>`` benchmark directories (or one directory). The
    first full-rank row given for each seed is the reference: a ratio is only taken against
    full rank trained with the same seed (init and data order). Spread is
    (max - min) / mean of the perplexities over the seeds.
    """
    full_by_seed: dict[int, dict[str, Any]] = {}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for folder in settings:
        for run_dir in seed_runs(folder):
            seed, meta = run_seed(run_dir), read_json(run_dir / "benchmark.json")
            name = Path(folder).name
            for r in load_rows(run_dir):
                if "eval_loss" not in r:
                    continue
                if r["name"] == "full":
                    full_by_seed.setdefault(seed, r)
                g = groups.setdefault((name, r["name"]), {"setting": name, "row": r, "meta": meta, "by_seed": {}})
                g["by_seed"][seed] = r
    out = []
    for g in groups.values():
        seeds = sorted(g["by_seed"])
        ppl = [g["by_seed"][s]["perplexity"] for s in seeds]
        ratios = [g["by_seed"][s]["perplexity"] / full_by_seed[s]["perplexity"] for s in seeds if s in full_by_seed]
        mean = sum(ppl) / len(ppl)
        out.append({
            **g, "seeds": seeds, "ppl": ppl, "mean": mean, "spread": (max(ppl) - min(ppl)) / mean,
            "ratios": ratios, "paired_seeds": [s for s in seeds if s in full_by_seed],
            "mean_ratio": sum(ratios) / len(ratios) if ratios else None,
        })
    return out


def paired_table(settings: list[str | Path]) -> str:
    """One line per row of each setting: perplexity by seed, mean, spread, and ratios to full rank paired by seed."""
    lines = ["| " + " | ".join(PAIRED_COLUMNS) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 6 + ["---:", "---"]) + "|"]
    for p in paired_rows(settings):
        r, meta = p["row"], p["meta"]
        ablation = ", ".join(f"{k}={v}" for k, v in (meta.get("ablation") or {}).items()) or "-"
        cells = [
            p["setting"],
            r["label"],
            "-" if r["name"] == "full" else ablation,
            f"{r['learning_rate']:g}",
            ",".join(str(s) for s in p["seeds"]),
            " / ".join(f"{v:.2f}" for v in p["ppl"]),
            f"{p['mean']:.2f}",
            f"{p['spread']:.1%}" if len(p["seeds"]) > 1 else "-",
            " / ".join(f"{v:.3f}" for v in p["ratios"]) or "-",
            f"{p['mean_ratio']:.3f}" if p["mean_ratio"] is not None else "-",
            _weights(r),
            final_ranks(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setting_beyond_defaults(ablation: dict[str, Any]) -> dict[str, Any]:
    """The ablation's settings other than the rank that differ from today's ``LowRankConfig`` defaults.

    A run that set a value which has since become the default (``precondition_damping=1e-4``,
    ``rebalance_every=10``, which ``None`` means under the Trainer) belongs to the same series as
    a run that left it out.
    """
    import dataclasses

    from hf_lowrank import LowRankConfig
    from hf_lowrank.driver import rebalance_period
    from hf_lowrank.optim import factor_decay

    defaults = {f.name: f.default for f in dataclasses.fields(LowRankConfig) if f.default is not dataclasses.MISSING}
    resolved = {"rebalance_every": rebalance_period(LowRankConfig()), "factor_weight_decay": factor_decay(LowRankConfig())}
    return {k: v for k, v in ablation.items() if k != "rank" and v not in (defaults.get(k, object()), resolved.get(k, object()))}


def plot_price(settings: list[str | Path], path: str | Path) -> Path:
    """Two panels, one point per row and setting: mean perplexity against the placement's weights
    (over dense) and against measured training time; full rank's seed mean as a line.

    Times of runs made two at a time, or on a loaded machine, are not comparable with each
    other: the time panel shows what each run took, not a speed ratio (those come from the
    side-by-side tools).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = paired_rows(settings)
    full = [p for p in rows if p["row"]["name"] == "full"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 6.0), sharey=True)
    by_label: dict[str, list[dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in rows:  # one series per strategy and setting; the rank is the x axis, not part of the series
        if p["row"]["name"] != "full":
            setting = json.dumps(setting_beyond_defaults(p["meta"].get("ablation") or {}), sort_keys=True)
            groups.setdefault((p["row"]["name"], setting), []).append(p)
    for (name, _), points in groups.items():  # labelled by the setting folders, which say what the setting is
        by_label[f"{name}: {' / '.join(sorted({p['setting'] for p in points}))}"] = points
    for label, points in sorted(by_label.items()):
        points = sorted(points, key=lambda p: placement_ratio(p["row"]))
        weights = [placement_ratio(p["row"]) for p in points]
        seconds = [sum(p["by_seed"][s]["train_seconds"] for s in p["seeds"]) / len(p["seeds"]) for p in points]
        means = [p["mean"] for p in points]
        axes[0].plot(weights, means, "o-", label=label)
        axes[1].plot(seconds, means, "o", label=label)
    for p in full:
        for ax in axes:
            ax.axhline(p["mean"], color="black", lw=1, ls="--", label=f"full rank (mean of seeds {','.join(map(str, p['seeds']))})")
    axes[0].set_xlabel("low-rank layers' weights / dense")
    axes[1].set_xlabel("training time per run (s; runs two at a time: not a speed ratio)")
    axes[0].set_ylabel("eval perplexity (mean over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(2, len(unique)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.03 * (len(unique) + 1) / 2 + 0.05, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="*", help="a benchmark directory (holds rows/)")
    parser.add_argument("--ablations", nargs="+", default=None, metavar="DIR", help="print one table of every row of these directories")
    parser.add_argument("--reference", default=None, metavar="DIR", help="with --ablations: the directory whose full-rank row ratios are taken against")
    parser.add_argument("--paired", nargs="+", default=None, metavar="DIR", help="one table of these settings (folders of seed-<N> runs) with ratios to full rank paired by seed")
    parser.add_argument("--price-plot", default=None, metavar="PNG", help="with --paired: plot perplexity against the low-rank layers' weights and training time")
    args = parser.parse_args(argv)
    if args.paired:
        print(paired_table(args.paired))
        if args.price_plot:
            print(f"plot: {plot_price(args.paired, args.price_plot)}")
        return
    if args.ablations:
        if not args.reference:
            parser.error("--ablations needs --reference DIR (a benchmark directory with a full-rank row)")
        print(ablation_table(args.ablations, args.reference))
        return
    if len(args.run_dir) != 1:
        parser.error("give one benchmark directory (or --ablations DIR ... --reference DIR)")
    print(write_benchmark_report(args.run_dir[0]).read_text())


if __name__ == "__main__":
    main()
