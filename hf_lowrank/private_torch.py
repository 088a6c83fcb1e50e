"""Every private torch name hf_lowrank touches, in one place.

FSDP2 has no public API to re-shard a unit whose parameters changed shape (a rank change
replaces a layer's factors), so :mod:`hf_lowrank.fsdp` rebuilds the unit's parameter group
with FSDP2's own constructor and moves parameters between their full and sharded forms
through FSDP2's internals. The functions here are the private imports; the tuples name the
private attributes the code reads or sets on live objects. ``tests/test_private_names.py``
checks every one against the installed torch (building a real FSDP2 unit for the
attributes), so an upgrade that renames one fails there with the name, not deep in a rank
change. ``torch 2.13`` is the version tested.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# fsdp._fully_shard._fsdp_state.FSDPState
FSDP_STATE_ATTRIBUTES = ("_fsdp_param_groups", "_modules", "_is_root")
# FSDPParamGroup settings a user may have changed after fully_shard (set_reshard_after_backward,
# set_requires_gradient_sync, set_unshard_in_backward, ...) and its place in the root's shared
# communication context: a rebuilt group takes them over (those this torch has).
FSDP_GROUP_SETTINGS = (
    "reduce_grads", "all_reduce_grads", "reshard_after_backward", "reduce_scatter_max_input_buffers",
    "gradient_divide_factor", "reduce_scatter_unused_params", "force_sum_reduction_for_comms",
    "unshard_async_op", "unshard_in_backward", "_all_reduce_hook", "_all_reduce_hook_stream",
    "_all_gather_comm", "_reduce_scatter_comm", "comm_ctx", "_module_fqn", "_param_group_index",
    "_num_param_groups",
)
# fsdp._fully_shard._fsdp_param_group.FSDPParamGroup: what a rebuild reads from the old group
FSDP_GROUP_ATTRIBUTES = (
    "fsdp_params", "mesh_info", "post_forward_mesh_info", "device", "mp_policy", "offload_policy",
    "_module_to_pre_save_state_dict_hook_handle", "_module_to_pre_load_state_dict_hook_handle", "lazy_init",
)
# fsdp._fully_shard._fsdp_param.FSDPParam
FSDP_PARAM_ATTRIBUTES = (
    "_module_info", "_setattr_on_modules", "_post_load_hook_handle", "_param_fqn", "sharded_param",
    "reset_sharded_param",
)
# torch._dynamo's compiled wrapper: the module it compiled
COMPILED_MODULE_ATTRIBUTES = ("_orig_mod",)
# nn.Module's own registry, read to tell a full parameter from its shard
MODULE_ATTRIBUTES = ("_parameters",)
# DistributedDataParallel: the wrapper running a forward right now (a class attribute set during
# forward), and the parameters an instance reduces; read to name a DDP wrapper left stale by a rank change
DDP_CLASS_ATTRIBUTES = ("_active_ddp_module",)
DDP_ATTRIBUTES = ("_module_parameters",)
# LRScheduler: the rates get_last_lr() reports (and the Trainer logs); set after a plan rescales them
LR_SCHEDULER_ATTRIBUTES = ("_last_lr",)


def active_ddp_module() -> Any:
    """The DistributedDataParallel wrapper whose forward is running now, or None."""
    return getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)


def ddp_parameters(ddp: Any) -> list[nn.Parameter]:
    """The parameters a DistributedDataParallel wrapper was built over (and reduces)."""
    return list(getattr(ddp, "_module_parameters", ()))


def set_last_lr(scheduler: Any, optimizer: Any) -> None:
    """Make ``scheduler.get_last_lr()`` report the rates ``optimizer``'s groups hold now."""
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def get_module_fsdp_state(module: nn.Module) -> Any:
    """The FSDP2 state of ``module`` (None if ``fully_shard`` was not applied to it)."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    return _get_module_fsdp_state(module)


def managed_modules(modules: Any) -> list[nn.Module]:
    """The modules whose own parameters an FSDP2 unit over ``modules`` manages."""
    from torch.distributed.fsdp._fully_shard._fsdp_init import _get_managed_modules

    return _get_managed_modules(modules)


def managed_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The parameters an FSDP2 unit manages on ``modules``, in FSDP2's order."""
    from torch.distributed.fsdp._fully_shard._fsdp_init import _get_managed_states

    return _get_managed_states(modules)[0]


def fsdp_param_group_class() -> type:
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    return FSDPParamGroup


def compiled_module_class() -> type:
    """The class ``torch.compile`` wraps an ``nn.Module`` in."""
    return torch._dynamo.eval_frame.OptimizedModule


def missing() -> list[str]:
    """The private imports above that this torch lacks (empty when all are there)."""
    out = []
    for name, get in (
        ("torch.distributed.fsdp._fully_shard._fsdp_state._get_module_fsdp_state", lambda: get_module_fsdp_state),
        ("torch.distributed.fsdp._fully_shard._fsdp_init._get_managed_modules", None),
        ("torch.distributed.fsdp._fully_shard._fsdp_init._get_managed_states", None),
        ("torch.distributed.fsdp._fully_shard._fsdp_param_group.FSDPParamGroup", None),
        ("torch._dynamo.eval_frame.OptimizedModule", None),
    ):
        module, _, attr = name.rpartition(".")
        try:
            if not hasattr(__import__(module, fromlist=[attr]), attr):
                out.append(name)
        except ImportError:
            out.append(name)
    return out


def missing_on_ddp(ddp: Any) -> list[str]:
    """The DDP attributes above that this torch's class, or a live wrapper ``ddp``, lacks."""
    out = [f"DistributedDataParallel.{a}" for a in DDP_CLASS_ATTRIBUTES if not hasattr(nn.parallel.DistributedDataParallel, a)]
    return out + [f"DistributedDataParallel.{a}" for a in DDP_ATTRIBUTES if not hasattr(ddp, a)]


def missing_on_scheduler(scheduler: Any) -> list[str]:
    """The attributes above that a live learning-rate scheduler lacks."""
    return [f"{type(scheduler).__name__}.{a}" for a in LR_SCHEDULER_ATTRIBUTES if not hasattr(scheduler, a)]


def missing_on_unit(state: Any) -> list[str]:
    """The attributes above that a live FSDP2 unit (its state, group and first parameter) lacks."""
    out = [f"FSDPState.{a}" for a in FSDP_STATE_ATTRIBUTES if not hasattr(state, a)]
    groups = getattr(state, "_fsdp_param_groups", None) or []
    for group in groups[:1]:
        out += [f"FSDPParamGroup.{a}" for a in FSDP_GROUP_ATTRIBUTES if not hasattr(group, a)]
        for fp in group.fsdp_params[:1]:
            out += [f"FSDPParam.{a}" for a in FSDP_PARAM_ATTRIBUTES if not hasattr(fp, a)]
    return out
