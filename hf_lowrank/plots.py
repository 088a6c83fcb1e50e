"""The PNG plots of a report: eval loss, rank per layer over training, final ranks, a run's loss.

Each function takes the rows :mod:`hf_lowrank.report` builds from a benchmark or a training run and
writes one file with matplotlib (imported on first use); :func:`use_files_backend` selects the
Agg backend first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _short(layer: str) -> str:
    for prefix in ("base_model.", "transformer.", "model."):
        layer = layer.removeprefix(prefix)
    return layer.replace("layers.", "h.")


def _colors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {r["name"]: cmap(i % 10) for i, r in enumerate(rows)}


def plot_eval_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """Eval loss against optimizer step and against training time (evaluation excluded), every row."""
    import matplotlib.pyplot as plt

    colors = _colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for r in rows:
        evals = [e for e in r["history"] if "eval_loss" in e]
        if not evals:
            continue
        style = dict(color=colors[r["name"]], marker="o", markersize=3.5, linewidth=1.6, label=r["label"])
        if r.get("family") != "gpt2":
            style["linestyle"] = "--"
        axes[0].plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], **style)
        axes[1].plot([e["train_seconds"] for e in evals], [e["eval_loss"] for e in evals], **style)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training time, s (evaluation excluded)")
    axes[0].set_ylabel("eval loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_title("Eval loss vs step")
    axes[1].set_title("Eval loss vs training time")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 4 else 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rank_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose layers changed mode or rank during training."""
    out = []
    for r in rows:
        seen = {repr(sorted(e["layers"].items())) for e in r["history"] if e.get("layers")}
        if r.get("changes_rank") or len(seen) > 1:
            if any(e.get("layers") for e in r["history"]):
                out.append(r)
    return out


PHASES = {  # mode -> (label, shading); factorized is the plain background
    "dense": ("dense W (full rank)", "0.85"),
    "factorized": ("factorized W = B A", None),
    "residual": ("frozen W0 + adapter (the curve: adapter rank)", "#cfe3f7"),
}


def _group_layers(entries: list[dict[str, Any]], layers: list[str]) -> list[list[str]]:
    """Layers whose (step, mode, rank) curves are identical, together, in first-seen order."""
    groups: dict[tuple, list[str]] = {}
    for n in layers:
        key = tuple((e["step"], tuple(e["layers"][n])) for e in entries if n in e["layers"])
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _group_label(names: list[str], layers: list[str]) -> str:
    if len(names) == 1:
        return _short(names[0])
    if len(names) == len(layers):
        return f"all {len(names)} layers"
    kinds: dict[str, int] = {}
    for n in names:
        kinds[_short(n).rsplit(".", 1)[-1]] = kinds.get(_short(n).rsplit(".", 1)[-1], 0) + 1
    return f"{len(names)} layers: " + ", ".join(k if c == 1 else f"{k} x{c}" for k, c in kinds.items())


def _phases(entries: list[dict[str, Any]], end: float) -> list[tuple[float, float, str]]:
    """(start, end, mode) spans in which every layer is in one mode ("mixed" when they differ)."""
    spans: list[tuple[float, float, str]] = []
    for i, e in enumerate(entries):
        modes = {v[0] for v in e["layers"].values()}
        mode = modes.pop() if len(modes) == 1 else "mixed"
        stop = entries[i + 1]["step"] if i + 1 < len(entries) else end
        if spans and spans[-1][2] == mode:
            spans[-1] = (spans[-1][0], stop, mode)
        else:
            spans.append((e["step"], stop, mode))
    return [s for s in spans if s[1] > s[0]]


def plot_ranks(rows: list[dict[str, Any]], path: Path) -> bool:
    """Active rank vs step from step 0, one panel per strategy that changes ranks; False when none does.

    Layers whose curves are identical are drawn once (``all 16 layers``); the background shows
    the phase every layer is in: dense (full rank), factorized ``B A``, or a frozen ``W0`` plus
    an adapter, whose rank is what the curve shows.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = _rank_rows(rows)
    if not panels:
        return False
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 3.9 * nrows), squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for ax, r in zip(axes.flat, panels):
        entries = [e for e in r["history"] if e.get("layers")]
        layers = list(dict.fromkeys(n for e in entries for n in e["layers"]))
        end = max([e["step"] for e in r["history"]] + [p["step"] for p in r.get("plans", [])] + [1])
        top = max([p["full_rank"] for p in r["pattern"].values()] + [v[1] for e in entries for v in e["layers"].values()])
        shown: dict[str, Any] = {}
        for start, stop, mode in _phases(entries, end):
            label, shade = PHASES.get(mode, ("layers in several modes", "0.93"))
            if shade is not None:
                ax.axvspan(start, stop, color=shade, alpha=0.6, linewidth=0, zorder=0)
            shown.setdefault(label, Patch(facecolor=shade or "white", edgecolor="0.6", alpha=0.6 if shade else 1.0, label=label))
        groups = _group_layers(entries, layers)
        for i, names in enumerate(groups):
            n = names[0]
            xs = [e["step"] for e in entries if n in e["layers"]] + [end]
            ys = [e["layers"][n][1] for e in entries if n in e["layers"]]
            ys.append(ys[-1])
            color = cmap(i / max(1, len(groups) - 1) * 0.9)
            ax.step(xs, ys, where="post", color=color, linewidth=1.6 if len(names) > 1 else 1.2, label=_group_label(names, layers))
        full = max(p["full_rank"] for p in r["pattern"].values()) if r["pattern"] else None
        if full:
            ax.axhline(full, color="grey", linewidth=0.8, linestyle=":")
            ax.text(0.99, full, "full rank", ha="right", va="top", fontsize=8, color="grey", transform=ax.get_yaxis_transform())
        for plan in r.get("plans", []):
            ax.axvline(plan["step"], color="red", alpha=0.35, linewidth=1)
        ax.set_title(f"{r['label']}: active rank per layer", fontsize=10)
        ax.set_ylabel("active rank (dense = full)")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, top * 1.08)
        ax.set_xlim(0, end)
        lines, _ = ax.get_legend_handles_labels()
        ax.legend(handles=[*shown.values(), *lines], fontsize=6.5, ncol=2 if len(groups) > 6 else 1, loc="center right")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step (red lines: rank decisions applied)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_final_ranks(rows: list[dict[str, Any]], path: Path) -> bool:
    """Heat map of final rank / full rank per layer, one line per low-rank row (not the references); False when none."""
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["pattern"] and r["name"] != r.get("reference")]
    if not shown:
        return False
    layers = list(dict.fromkeys(n for r in shown for n in r["pattern"]))
    grid, text = [], []
    for r in shown:
        grid.append([r["pattern"][n]["rank"] / r["pattern"][n]["full_rank"] if n in r["pattern"] else math.nan for n in layers])
        labels = []
        for n in layers:
            p = r["pattern"].get(n)
            if p is None:
                labels.append("")
            elif p["mode"] == "dense":
                labels.append("dense")
            else:
                labels.append(f"{p['rank']}" + ("\n+W0" if p["mode"] == "residual" else ""))
        text.append(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(layers) + 3), 0.6 * len(shown) + 2.4))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(layers)), [_short(n) for n in layers], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(shown)), [r["label"] for r in shown], fontsize=9)
    for i, labels in enumerate(text):
        for j, label in enumerate(labels):
            value = grid[i][j]
            ax.text(j, i, label, ha="center", va="center", fontsize=7, color="black" if value > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="final rank / full rank")
    ax.set_title("Final rank per layer (cell: rank; +W0: adapter over a frozen base)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True




def plot_run_loss(rows: list[dict[str, Any]], path: Path) -> bool:
    """Training loss and eval loss against optimizer step, per run; False when nothing was logged."""
    import matplotlib.pyplot as plt

    colors = _colors(rows)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn = False
    for r in rows:
        train = [e for e in r["history"] if "loss" in e]
        evals = [e for e in r["history"] if "eval_loss" in e]
        if train:
            ax.plot([e["step"] for e in train], [e["loss"] for e in train], color=colors[r["name"]], linewidth=1.4,
                    label=f"{r['label']}: training loss")
        if evals:
            ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], color=colors[r["name"]], marker="o",
                    markersize=4, linestyle="--", linewidth=1.2, label=f"{r['label']}: eval loss")
        drawn = drawn or bool(train or evals)
        for plan in r.get("plans", []):
            ax.axvline(plan["step"], color="red", alpha=0.3, linewidth=1)
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlim(left=0)
    ax.set_xlabel("optimizer step (red lines: rank decisions applied)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss vs step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def use_files_backend() -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
