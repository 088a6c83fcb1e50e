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


def rewrap_ddp(ddp: nn.parallel.DistributedDataParallel, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """A new DDP around ``ddp.module`` after its parameters changed (DDP's buckets hold the old ones).

    ``ddp_kwargs`` are DDP's options (e.g. Accelerate's ``ddp_handler.to_kwargs()``); the
    device comes from the module's parameters.
    """
    module = ddp.module
    device = next(module.parameters()).device
    device_ids = None if device.type == "cpu" else [device.index]
    return nn.parallel.DistributedDataParallel(
        module, device_ids=device_ids, output_device=device_ids[0] if device_ids else None, **ddp_kwargs
    )


def is_ddp(module: nn.Module) -> bool:
    return isinstance(module, torch.nn.parallel.DistributedDataParallel)
