"""Optimizer surgery for low-rank layers, torch only (no Trainer, no Accelerate needed).

- :func:`param_groups`: AdamW-style groups for a plain loop (decay / no decay), with the
  factors A and B in groups of their own (``lowrank_factors=True``, lr times
  ``factor_lr_scale``); :func:`split_factor_groups` does the same to an existing optimizer.
- :func:`add_frobenius_decay`: the gradient of ``(lambda/2) ||B A||_F^2`` before each step.
- :func:`add_preconditioner`: scaled gradient descent on factor pairs before each step.
- :func:`regroup`: after a plan replaced parameters, point the optimizer at the model's
  current ones, keeping the state of survivors.
- :class:`LrAdjust`: a plan's learning-rate factor and re-warm ramp on top of any schedule.

Optimizers and schedulers wrapped by Accelerate are unwrapped (``.optimizer`` / ``.scheduler``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .layer import LowRankLinear

FACTORS = ("A", "B")


def is_factor(name: str) -> bool:
    """Whether a parameter name is a low-rank factor (``....A`` / ``....B``)."""
    return name.rpartition(".")[2] in FACTORS


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def inner_scheduler(scheduler: Any) -> Any:
    return getattr(scheduler, "scheduler", scheduler)


def decays(name: str, p: nn.Parameter, frobenius: bool) -> bool:
    """Whether a parameter takes plain weight decay: matrices do, vectors (biases, norms) do not (nanoGPT's rule).

    Factors under Frobenius decay get that penalty instead.
    """
    return p.dim() >= 2 and not (frobenius and is_factor(name))


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    factor_lr_scale: float | None = None,
    frobenius_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW(param_groups(model, lr, wd))`` in a plain loop.

    Four groups at most, in a fixed order: (decay, no decay) x (other, factors). Factor groups
    carry ``lowrank_factors=True`` and ``lr * factor_lr_scale``. ``factor_lr_scale`` and
    ``frobenius_decay`` default to the model's ``LowRankConfig``.
    """
    config = getattr(model, "lowrank_config", None)
    scale = factor_lr_scale if factor_lr_scale is not None else getattr(config, "factor_lr_scale", 1.0)
    frob = (frobenius_decay if frobenius_decay is not None else getattr(config, "frobenius_decay", 0.0)) > 0
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(d, f): [] for d in (True, False) for f in (False, True)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[(decays(name, p, frob), is_factor(name))].append(p)
    groups = []
    for (decay, factor), params in buckets.items():
        if params:
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * (scale if factor else 1.0)}
            if factor:
                group["lowrank_factors"] = True
            groups.append(group)
    return groups


def split_factor_groups(optimizer: Any, factor_ids: set[int], scale: float) -> None:
    """Move the factors of every group into a sibling group with ``lowrank_factors=True`` and ``lr * scale``.

    The split is made even at scale 1, so that the group structure (and with it a
    checkpoint's optimizer state) never depends on the setting.
    """
    opt = inner_optimizer(optimizer)
    for group in list(opt.param_groups):
        moved = [p for p in group["params"] if id(p) in factor_ids]
        group["params"] = [p for p in group["params"] if id(p) not in factor_ids]
        extra = {k: v for k, v in group.items() if k != "params"}
        opt.add_param_group({**extra, "params": moved, "lr": group["lr"] * scale, "lowrank_factors": True})


def add_frobenius_decay(optimizer: Any, layers: Callable[[], dict[str, LowRankLinear]], lam: float):
    """Before each step add ``lam * B (A A^T)`` to ``grad_B`` and ``lam * (B^T B) A`` to ``grad_A``.

    That is the gradient of ``(lam/2) ||B A||_F^2`` over the active components, in
    O((out + in) r^2), never forming ``B A``. ``layers`` is called at every step, so layers
    that changed mode since are handled. Returns the hook's removable handle.
    """

    @torch.no_grad()
    def hook(opt, args, kwargs) -> None:
        for layer in layers().values():
            if layer.mode == "dense" or layer.A.grad is None or layer.B.grad is None:
                continue
            B, A = layer.active_factors()  # (out, r), (r, in)
            k = layer.rank
            layer.B.grad[:, :k].add_(B @ (A @ A.T), alpha=lam)
            layer.A.grad[:k].add_((B.T @ B) @ A, alpha=lam)

    return inner_optimizer(optimizer).register_step_pre_hook(hook)


PRECONDITION_DAMPING = 1e-6  # added to each Gram matrix over its mean diagonal: keeps zero (inactive) columns finite


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; gathers), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _write_back(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Store ``whole`` into ``target``: in place, or this process's shard of it for a DTensor.

    Every process holds the same ``whole``, so each cuts its own shard (``src_data_rank=None``:
    no broadcast).
    """
    if whole is target:
        return
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None).to_local()
    target.to_local().copy_(local)


def precondition_factors(layer: LowRankLinear) -> None:
    """Replace ``grad_B`` by ``grad_B (A A^T)^-1`` and ``grad_A`` by ``(B^T B)^-1 grad_A`` over the active components.

    Each Gram matrix is divided by its mean diagonal and damped by ``PRECONDITION_DAMPING``,
    so the step changes direction, not overall size. A factor that is all zero (a fresh
    residual adapter's ``B``) leaves the other factor's gradient as it is; that choice is made
    on the device (``torch.where``), so a step never waits on the host. FSDP2 shards are
    gathered, preconditioned whole (the same on every process) and written back as shards.
    """
    k = layer.rank
    B, A = _whole(layer.B)[:, :k].float(), _whole(layer.A)[:k].float()
    eye = torch.eye(k, device=A.device, dtype=torch.float32)
    for grad, gram, left in ((layer.B.grad, A @ A.T, False), (layer.A.grad, B.T @ B, True)):
        scale = gram.diagonal().mean()
        usable = torch.isfinite(scale) & (scale > 0)
        system = gram / torch.where(usable, scale, torch.ones_like(scale)) + PRECONDITION_DAMPING * eye
        whole = _whole(grad)
        g = whole[:k] if left else whole[:, :k]
        solved = torch.linalg.solve(system, g.float()) if left else torch.linalg.solve(system, g.float().T).T
        g.copy_(torch.where(usable, solved, g.float()).to(g.dtype))
        _write_back(grad, whole)


def add_preconditioner(optimizer: Any, layers: Callable[[], dict[str, LowRankLinear]]):
    """Precondition every factorized or residual layer's factor gradients before each optimizer step.

    ``layers`` is called at every step (modes and ranks change during training). Returns the
    hook's removable handle. Under FSDP2 every process must run it (it gathers the factors).
    """

    @torch.no_grad()
    def hook(opt, args, kwargs) -> None:
        for layer in layers().values():
            if layer.mode != "dense" and layer.A.grad is not None and layer.B.grad is not None:
                precondition_factors(layer)

    return inner_optimizer(optimizer).register_step_pre_hook(hook)


def regroup(
    optimizer: Any,
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    before: dict[str, nn.Parameter],
    decays: Callable[[str, nn.Parameter], bool] | None = None,
) -> None:
    """Point the optimizer at the model's current trainable parameters, in model order.

    Parameters that survived a transition keep their group and state; new ones (new factors,
    a merged dense weight) join the group that matches them (weight decay or not, factor or
    not; ``decays(name, p)`` defaults to "matrices decay") with empty state; parameters that
    left the model or stopped training are dropped with their state. Model order is the order
    a fresh optimizer would have, so a checkpoint resumes into the right slots.
    """
    opt = inner_optimizer(optimizer)
    decays = decays or (lambda name, p: p.dim() >= 2)
    group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}

    def group_for_new(name: str, p: nn.Parameter) -> int:
        factor, decay = is_factor(name), decays(name, p)
        match = [i for i, g in enumerate(opt.param_groups) if bool(g.get("lowrank_factors", False)) == factor]
        exact = [i for i in match if (opt.param_groups[i].get("weight_decay", 0.0) > 0) == decay]
        return (exact or match or [0])[0]

    lists: list[list[nn.Parameter]] = [[] for _ in opt.param_groups]
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        kept = name in before and before[name] is p and id(p) in group_of
        lists[group_of[id(p)] if kept else group_for_new(name, p)].append(p)
    alive = {id(p) for ps in lists for p in ps}
    for p in [p for p in opt.state if id(p) not in alive]:
        del opt.state[p]
    for group, params in zip(opt.param_groups, lists):
        group["params"] = params


@dataclass
class LrAdjust:
    """A plan's learning-rate changes on top of the schedule: a lasting factor and a re-warm ramp."""

    factor: float = 1.0
    rewarm: tuple[int, int] | None = None  # (start step, length)

    def scale(self, optimizer: Any, scheduler: Any, factor: float) -> None:
        """Multiply the whole schedule, from now on, by ``factor``."""
        if optimizer is not None:
            for group in inner_optimizer(optimizer).param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
        sched = inner_scheduler(scheduler)
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        self.factor *= factor

    def start_rewarm(self, step: int, length: int) -> None:
        self.rewarm = (step, length)

    def apply_rewarm(self, optimizer: Any, step: int) -> None:
        """Scale the learning rate set for the step after ``step`` by the re-warm ramp."""
        if self.rewarm is None or optimizer is None:
            return
        start, length = self.rewarm
        ramp = (step - start + 1) / (length + 1)
        if ramp >= 1.0:
            self.rewarm = None
            return
        for group in inner_optimizer(optimizer).param_groups:
            group["lr"] *= ramp

    def state_dict(self) -> dict[str, Any]:
        return {"lr_factor": self.factor, "rewarm": list(self.rewarm) if self.rewarm else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        factor, rewarm = state["lr_factor"], state["rewarm"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
            raise ValueError(f"lr_factor={factor!r} is not a finite number > 0")
        if rewarm is not None and not (
            isinstance(rewarm, list) and len(rewarm) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rewarm)
        ):
            raise ValueError(f"rewarm={rewarm!r} is not null or [start step, length]")
        self.factor = float(factor)
        self.rewarm = tuple(rewarm) if rewarm else None


def nonfinite_gradients(optimizer: Any) -> bool:
    """Whether any gradient the optimizer would apply holds NaN or Inf (agreed across processes)."""
    grads = [p.grad for g in inner_optimizer(optimizer).param_groups for p in g["params"] if p.grad is not None]
    # DTensor (FSDP2): this process's shard. One flag for all tensors, so one device sync per step.
    finite = [torch.isfinite(g.to_local() if hasattr(g, "to_local") else g).all() for g in grads]
    device = finite[0].device if finite else "cpu"
    bad = (~torch.stack(finite).all()).float() if finite else torch.zeros((), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bool(bad.item() > 0)


def drop_gradients(optimizer: Any) -> None:
    """Set every gradient to None: the coming step then changes no parameter and no state."""
    for group in inner_optimizer(optimizer).param_groups:
        for p in group["params"]:
            p.grad = None
