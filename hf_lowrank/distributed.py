"""Rank changes across processes: one decision broadcast to all, DDP rebuilt after shape changes.

A strategy decides on process 0 only (its SVDs need not agree bit for bit across devices);
the plan and the strategy's state are broadcast so that every process applies the same
change and keeps the same strategy state. Works with any initialised ``torch.distributed``
process group (gloo, NCCL) and is a no-op in a single process.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from . import private_torch


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def decide_on_rank0(decide: Callable[[], Any], state: Callable[[], Any]) -> tuple[Any, Any]:
    """Run ``decide()`` then ``state()`` on process 0 and return both results on every process.

    Both results must be picklable built-ins (a plan's dict, a JSON-ready state): they travel
    through ``broadcast_object_list`` between processes of one job, never from disk.
    """
    rank, size = world()
    payload = [None, None]
    if rank == 0:
        payload = [decide(), state()]
    if size > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload[0], payload[1]


def rewrap_ddp(ddp: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """A new DDP around ``ddp.module`` after its parameters changed (DDP's buckets hold the old ones).

    Call it when ``update_ranks`` returns a plan with ``changes_shapes``. ``ddp_kwargs`` are
    DDP's options (e.g. Accelerate's ``ddp_handler.to_kwargs()``); without them the old
    wrapper's ``find_unused_parameters`` and ``gradient_as_bucket_view`` are kept (a communication hook is not: register it again). The device comes from the
    module's parameters. A module that is not wrapped in DDP (one process, FSDP2) is returned
    as it is, so one loop runs with and without DDP.
    """
    if not is_ddp(ddp):
        return ddp
    for option in ("find_unused_parameters", "gradient_as_bucket_view"):
        if option not in ddp_kwargs and hasattr(ddp, option):
            ddp_kwargs[option] = getattr(ddp, option)
    module = ddp.module
    device = next(module.parameters()).device
    device_ids = None if device.type == "cpu" else [device.index]
    return nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, output_device=device_ids[0] if device_ids else None, **ddp_kwargs
    )


def stale_ddp(module: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper running ``module``'s forward right now if it holds parameters ``module`` no longer has.

    DDP records the parameters it reduces when it is built; after a shape change the module's
    new parameters would train unsynchronised and the next step would fail in DDP's reducer.
    """
    ddp = private_torch.active_ddp_module()
    if ddp is None or getattr(ddp, "module", None) is not module:
        return None
    held = {id(p) for p in private_torch.ddp_parameters(ddp)}
    ignored = getattr(ddp, "parameters_to_ignore", set())
    live = {id(p) for n, p in module.named_parameters() if n not in ignored}
    return ddp if held != live else None


def is_ddp(module: nn.Module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)
