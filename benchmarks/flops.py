"""Matmul FLOPs per token of one training step (forward + backward), from a model's layer report.

The count is the usual one (Kaplan et al. 2020): a weight of ``n`` entries used in a matmul
costs ``2 n`` FLOPs per token forward and ``4 n`` backward (input gradient and weight
gradient), so ``6 n``; causal self-attention adds ``QK^T`` and ``AV``, ``4 T d`` forward per
token and layer, so ``12 T d``. Element-wise work (norms, activations, softmax, the optimizer)
is not counted: it is what makes a measured speedup fall short of the predicted one.

Per low-rank layer of shape (out, in) at rank ``r``:

| mode | FLOPs per token |
| --- | --- |
| dense | ``6 out in`` |
| factorized | ``6 r (out + in)`` |
| residual | ``4 out in + 6 r (out + in)`` (``W0`` is frozen: no weight gradient) |
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_lowrank.layer import LowRankLinear

Layout = dict[str, list]  # layer name -> [mode, rank, in_features, out_features]


def layout(model) -> Layout:
    """Mode and active rank of every low-rank layer of a LowRankModel (rank = full rank when dense).

    Mode and rank come from the model's own ``layer_report()``; the layer's two sizes from the layer.
    A plain transformers model (a peer's row) has none: its linear layers are in ``other_flops``.
    """
    if not hasattr(model, "lowrank_layers"):
        return {}
    layers = model.lowrank_layers()
    return {
        r["layer"]: [r["mode"], r["rank"], layers[r["layer"]].in_features, layers[r["layer"]].out_features]
        for r in model.layer_report()
    }


def layer_flops(mode: str, rank: int, in_features: int, out_features: int) -> float:
    """FLOPs per token of forward + backward through one low-rank layer."""
    dense, low = in_features * out_features, rank * (in_features + out_features)
    if mode == "dense":
        return 6.0 * dense
    if mode == "factorized":
        return 6.0 * low
    return 4.0 * dense + 6.0 * low


def other_flops(model: nn.Module, seq_len: int) -> float:
    """FLOPs per token outside the low-rank layers: plain linear layers (LM head included) and attention scores."""
    flops = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear) and not isinstance(m, LowRankLinear):
            flops += 6.0 * m.in_features * m.out_features
        elif isinstance(m, Conv1D):
            flops += 6.0 * m.weight.numel()
    config = model.config
    n_layer = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return flops + 12.0 * n_layer * seq_len * hidden


def layout_flops(lay: Layout, other: float) -> float:
    """FLOPs per token of a whole model whose low-rank layers are in layout ``lay``."""
    return other + sum(layer_flops(mode, rank, i, o) for mode, rank, i, o in lay.values())


def dense_flops(lay: Layout, other: float) -> float:
    """FLOPs per token of the same model with every low-rank layer dense."""
    return other + sum(layer_flops("dense", 0, i, o) for _, _, i, o in lay.values())


def average_flops(changes: list[dict[str, Any]], other: float, start: int, stop: int) -> float:
    """FLOPs per token averaged over optimizer steps ``start <= s < stop``.

    ``changes`` lists ``{"step": s, "layout": ...}`` in order: the layout that steps ``s`` (0-based)
    and later ran with, until the next change.
    """
    if not changes or stop <= start:
        return other if not changes else layout_flops(changes[-1]["layout"], other)
    total = 0.0
    for i, change in enumerate(changes):
        end = changes[i + 1]["step"] if i + 1 < len(changes) else stop
        span = max(0, min(end, stop) - max(change["step"], start))
        total += span * layout_flops(change["layout"], other)
    return total / (stop - start)


def total_flops(changes: list[dict[str, Any]], other: float, stop: int, tokens_per_step: int) -> float:
    """Training FLOPs of optimizer steps ``0 <= s < stop``: their average FLOPs per token times their tokens."""
    return average_flops(changes, other, 0, stop) * stop * tokens_per_step
