"""Putting low-rank layers into a model: injection, their first spec, and freezing for adapters.

:class:`~hf_lowrank.model.LowRankModel` calls these once when it wraps a model: :func:`inject`
replaces the layers a config selects (:mod:`hf_lowrank.targets`) or a saved rank pattern names
by :class:`~hf_lowrank.layer.LowRankLinear` in their first spec, and :func:`freeze_for_adapters`
leaves only the adapters and ``modules_to_save`` trainable when that is fine-tuning. They read
the model, never import it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from . import optim
from .config import LowRankConfig
from .layer import SUPPORTED_TYPES, LayerSpec, LowRankLinear
from .strategies import RankStrategy
from .targets import check_not_tied, find_target_modules


def inject(
    model: nn.Module, config: LowRankConfig, strategy: RankStrategy, *, weights_follow: bool = False
) -> dict[str, float]:
    """Replace the target layers of ``model`` by LowRankLinear, in place; returns the init report.

    The layers are ``config.rank_pattern``'s (a saved layout) or those the config selects, each
    in the strategy's initial spec. The report maps a layer to the relative change of its weight
    when pretrained weights were factorized; a change above 1e-3 is warned about.
    ``weights_follow``: see :class:`~hf_lowrank.model.LowRankModel`.
    """
    report: dict[str, float] = {}
    if config.rank_pattern:
        names = list(config.rank_pattern)
        modules = dict(model.named_modules())
        missing = [n for n in names if not isinstance(modules.get(n), (SUPPORTED_TYPES, LowRankLinear))]
        if missing:
            raise ValueError(
                f"LowRankConfig.rank_pattern names {missing[:5]} which are not linear layers of "
                f"{type(model).__name__}; the checkpoint belongs to another architecture."
            )
    else:
        names = find_target_modules(model, config)
    check_not_tied(model, [n for n in names if not isinstance(model.get_submodule(n), LowRankLinear)])
    for name in names:
        module = model.get_submodule(name)
        layer = module if isinstance(module, LowRankLinear) else LowRankLinear(module)
        if config.rank_pattern:
            spec = LayerSpec(**config.rank_pattern[name])
            if spec.mode == "factorized" and layer.mode == "dense" and not weights_follow:
                report[name] = factorize_keeping(layer, spec, strategy)  # set_spec would zero B: the layer's function lost
            else:
                layer.set_spec(spec)
        else:
            change = initialise(name, layer, config, strategy)
            if change is not None:
                report[name] = change
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    warn_init_change(report)
    return report


def init_kind(config: LowRankConfig) -> str:
    """``init`` with ``"auto"`` resolved: the SVD split of pretrained weights, Kaiming for a model built from a config."""
    if config.init != "auto":
        return config.init
    return "spectral" if config.base_model_name_or_path else "kaiming"


def _relative_change(layer: LowRankLinear, before: torch.Tensor) -> float:
    change = torch.linalg.matrix_norm(layer.dense_weight() - before) / torch.linalg.matrix_norm(before).clamp_min(1e-12)
    return float(change)


def initialise(name: str, layer: LowRankLinear, config: LowRankConfig, strategy: RankStrategy) -> float | None:
    """Put ``layer`` in the strategy's initial spec; the relative weight change when pretrained weights were factorized."""
    spec = strategy.initial_spec(name, layer)
    if spec.mode == "factorized":
        before = layer.dense_weight() if config.base_model_name_or_path else None
        layer.init_factorized(
            spec.rank, spec.capacity, init=init_kind(config), init_scale=config.init_scale,
            zero_inactive=strategy.zero_inactive,
        )
        if before is not None:
            return _relative_change(layer, before)
    elif spec.mode == "residual":
        layer.to_residual(spec.rank, spec.capacity, base=config.residual_base, init_scale=config.init_scale)
        layer.scaling = spec.scaling
    return None


def factorize_keeping(layer: LowRankLinear, spec: LayerSpec, strategy: RankStrategy) -> float:
    """A saved layout on a model's own weights: the SVD split of the weight at the saved rank; returns the change."""
    before = layer.dense_weight()
    layer.init_factorized(spec.rank, spec.capacity, init="spectral", zero_inactive=strategy.zero_inactive)
    return _relative_change(layer, before)


def warn_init_change(report: dict[str, float]) -> None:
    """Warn when factorizing pretrained weights changed the model's function (a truncation cannot keep it).

    The warning points at the code that built the LowRankModel (this function, :func:`inject`,
    ``LowRankModel.__init__``, then its caller).
    """
    if not report:
        return
    worst = max(report, key=report.get)
    if report[worst] > 1e-3:
        mean = sum(report.values()) / len(report)
        warnings.warn(
            f"factorizing {len(report)} pretrained layers changed their weights by {100 * mean:.1f}% on "
            f"average (relative Frobenius norm; worst {worst!r}: {100 * report[worst]:.1f}%), so the "
            "model's outputs change before training. To fine-tune with the pretrained function kept exactly, use "
            "mode='residual' (frozen W plus a low-rank adapter); see LowRankModel.init_report per layer.",
            stacklevel=4,
        )


def modules_to_save(model: nn.Module, wanted: list[str] | None) -> list[str]:
    """Full names of the modules of ``model`` that train beside the adapters in residual mode.

    ``wanted`` (``LowRankConfig.modules_to_save``) entries match a module name or its last
    parts; None means the model's classification head (PEFT's head names), if it has one.
    """
    names = [n for n, _ in model.named_modules() if n]
    if wanted is None:
        from peft.utils.constants import SEQ_CLS_HEAD_NAMES  # imported here: peft is slow to import

        heads = set(SEQ_CLS_HEAD_NAMES) | {"qa_outputs"}
        return [n for n in names if n in heads]
    found = [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
    if missing:
        raise ValueError(
            f"LowRankConfig.modules_to_save={wanted!r}: {missing} name no module of {type(model).__name__}; "
            f"top-level modules are {sorted({n.split('.')[0] for n in names})}."
        )
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def freeze_for_adapters(lowrank: Any) -> None:
    """Residual mode over the wrapped weights is fine-tuning: only adapters and ``modules_to_save`` train.

    ``lowrank`` is a LowRankModel. Training from scratch (dense, factorized, or residual over a
    fresh orthogonal base) trains the whole model.
    """
    c = lowrank.lowrank_config
    layers = lowrank.lowrank_layers()
    if c.residual_base != "model" or not layers or any(layer.mode != "residual" for layer in layers.values()):
        return
    keep = lowrank.modules_to_save()
    for name, p in lowrank.base_model.named_parameters():
        owner = name.rpartition(".")[0]
        in_kept = any(owner == k or owner.startswith(k + ".") for k in keep)
        adapter = owner in layers and optim.is_factor(name)
        p.requires_grad_(adapter or in_kept)
