"""Which layers of a model a LowRankConfig selects: target / exclude matching and the tied-weight check.

``target_modules`` and ``exclude_modules`` are matched by PEFT's ``check_target_module_exists``;
``"all-linear"`` is every ``nn.Linear`` / ``Conv1D`` but the output embedding and a
classification head. ``LowRankModel`` injects its layers where these functions point.
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from .config import LowRankConfig
from .layer import SUPPORTED_TYPES, LowRankLinear


def _all_linear(model: nn.Module) -> list[str]:
    """Every nn.Linear / Conv1D except the output embedding and a classification head."""
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    skip: set[int] = set()
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        skip.add(id(model.get_output_embeddings()))
    for head in SEQ_CLS_HEAD_NAMES + ["qa_outputs"]:
        module = getattr(model, head, None)
        if isinstance(module, nn.Module):
            skip.update(id(m) for m in module.modules())
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES) and id(m) not in skip]


def find_target_modules(model: nn.Module, config: LowRankConfig) -> list[str]:
    """Names of the modules ``config`` selects, matched with PEFT's ``check_target_module_exists``."""
    from peft.tuners.tuners_utils import check_target_module_exists  # imported here: peft is slow to import

    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model)
    matcher = SimpleNamespace(
        target_modules=targets, exclude_modules=config.exclude_modules, target_parameters=None, modules_to_save=None
    )
    names = []
    for name, module in model.named_modules():
        hit = check_target_module_exists(matcher, name)
        if hit and type(hit).__name__ != "_ExcludedModule" and isinstance(module, (SUPPORTED_TYPES, LowRankLinear)):
            names.append(name)
    if not names:
        candidates = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)})
        raise ValueError(
            f"LowRankConfig.target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matches no nn.Linear / Conv1D layer of {type(model).__name__}; its linear layers are named {candidates}."
        )
    return names


def check_not_tied(model: nn.Module, names: list[str]) -> None:
    """Refuse a selected layer whose weight is shared with another parameter (tied weights)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    modules = dict(model.named_modules())
    for name in names:
        shared = owners.get(id(modules[name].weight), [])
        if len(shared) > 1:
            raise ValueError(
                f"layer {name!r} shares its weight with {[s for s in shared if not s.startswith(name + '.')]} "
                "(tied weights); add it to LowRankConfig.exclude_modules."
            )
