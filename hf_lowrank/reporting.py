"""A LowRankModel's parameter counts, per-layer table and summary text.

Functions of the model, which ``LowRankModel.parameter_counts`` / ``layer_report`` /
``rank_fraction`` / ``summary`` / ``print_trainable_parameters`` delegate to; they read it only
through ``parameters()`` and ``lowrank_layers()``, so this module sits below ``model.py``.
(``report.py``, in the application layer, reports benchmark runs, not a model.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .model import LowRankModel


def parameter_counts(model: "LowRankModel") -> dict[str, int]:
    """``LowRankModel.parameter_counts``: trainable, total, active and capacity (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    spare = sum(
        (layer.capacity - layer.rank) * (layer.in_features + layer.out_features)
        for layer in model.lowrank_layers().values()
        if layer.mode != "dense" and layer.B is not None and layer.B.requires_grad
    )
    return {"trainable": trainable, "total": total, "active": trainable - spare, "capacity": spare}


def layer_report(model: "LowRankModel") -> list[dict[str, Any]]:
    """One row per low-rank layer: name, mode, rank, capacity, full rank, parameters."""
    rows = []
    for name, layer in model.lowrank_layers().items():
        counts = layer.num_parameters()
        rows.append(
            {
                "layer": name,
                "mode": layer.mode,
                "rank": layer.rank if layer.mode != "dense" else layer.full_rank,
                "capacity": layer.capacity,
                "full_rank": layer.full_rank,
                "shape": f"{layer.out_features}x{layer.in_features}",
                "trainable": counts["trainable"],
                "total": counts["total"],
            }
        )
    return rows


def rank_fraction(model: "LowRankModel") -> float:
    """Sum of active ranks over the sum of full ranks of the low-rank layers (dense counts as full)."""
    rows = layer_report(model)
    return sum(r["rank"] for r in rows) / max(1, sum(r["full_rank"] for r in rows))


def counts_line(model: "LowRankModel", digits: int) -> str:
    """The one line of parameter counts (PEFT's ``print_trainable_parameters``), percentages to ``digits``."""
    counts = parameter_counts(model)
    spare = f" || allocated for growth: {counts['capacity']:,}" if counts["capacity"] else ""
    return (
        f"trainable params: {counts['active']:,}{spare} || all params: {counts['total']:,} || "
        f"trainable%: {100 * counts['active'] / max(1, counts['total']):.{digits}f} || rank fraction: {rank_fraction(model):.3f}"
    )


def summary(model: "LowRankModel") -> str:
    """A readable table of the layers and the parameter counts."""
    rows = layer_report(model)
    width = max([len(r["layer"]) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'mode':<10} {'rank':>5} {'cap':>5} {'full':>5}  {'shape':>11} {'params':>10}"]
    for r in rows:
        cap = "-" if r["capacity"] is None else r["capacity"]
        lines.append(
            f"{r['layer']:<{width}}  {r['mode']:<10} {r['rank']:>5} {cap:>5} {r['full_rank']:>5}  "
            f"{r['shape']:>11} {r['total']:>10,}"
        )
    lines.append(counts_line(model, 2))
    return "\n".join(lines)
