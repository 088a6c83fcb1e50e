"""Optimizer surgery for low-rank layers, torch only (no Trainer, no Accelerate needed).

- :func:`param_groups`: AdamW-style groups for a plain loop (decay / no decay), with the
  factors A and B in groups of their own (``lowrank_factors=True``, lr times
  ``factor_lr_scale``); :func:`split_factor_groups` does the same to an existing optimizer.
- :func:`add_frobenius_decay`: the gradient of ``(lambda/2) ||B A||_F^2`` before each step.
- :func:`add_preconditioner`: scaled gradient descent on factor pairs before each step.
- :func:`rebalance`: re-split each factorized layer's ``B A`` into balanced factors (same
  product), keeping or resetting the factors' optimizer moments.
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

from . import private_torch
from .config import FACTOR_WEIGHT_DECAY, PRECONDITION_DAMPING, REBALANCE_MOMENTS
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


def factor_decay(config: Any) -> float:
    """The factors' plain weight decay in groups the library builds: ``config.factor_weight_decay``, 0 where None."""
    value = getattr(config, "factor_weight_decay", None)
    return FACTOR_WEIGHT_DECAY if value is None else value


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    factor_lr_scale: float | None = None,
    frobenius_decay: float | None = None,
    factor_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW(param_groups(model, lr, wd))`` in a plain loop.

    Four groups at most, in a fixed order: (decay, no decay) x (other, factors). Factor groups
    carry ``lowrank_factors=True`` and ``lr * factor_lr_scale``; the decaying one takes
    ``factor_weight_decay``. ``factor_lr_scale``, ``frobenius_decay`` and ``factor_weight_decay``
    default to the model's ``LowRankConfig`` (``factor_weight_decay=None`` there: 0).
    """
    config = getattr(model, "lowrank_config", None)
    scale = factor_lr_scale if factor_lr_scale is not None else getattr(config, "factor_lr_scale", 1.0)
    frob = (frobenius_decay if frobenius_decay is not None else getattr(config, "frobenius_decay", 0.0)) > 0
    if factor_weight_decay is None:
        factor_weight_decay = factor_decay(config)
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
                if decay:
                    group["weight_decay"] = factor_weight_decay
            groups.append(group)
    return groups


def split_factor_groups(
    optimizer: Any, factor_ids: set[int], scale: float, weight_decay: float | None = None
) -> None:
    """Move the factors of every group into a sibling group with ``lowrank_factors=True`` and ``lr * scale``.

    Factors leaving a group that decays take ``weight_decay`` instead of the group's (None:
    the group's). The split is made even at scale 1, so that the group structure (and with it
    a checkpoint's optimizer state) never depends on the setting.
    """
    opt = inner_optimizer(optimizer)
    for group in list(opt.param_groups):
        moved = [p for p in group["params"] if id(p) in factor_ids]
        group["params"] = [p for p in group["params"] if id(p) not in factor_ids]
        extra = {k: v for k, v in group.items() if k != "params"}
        if weight_decay is not None and extra.get("weight_decay", 0.0) > 0:
            extra["weight_decay"] = weight_decay
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


def precondition_factors(layer: LowRankLinear, damping: float = PRECONDITION_DAMPING) -> None:
    """Replace ``grad_B`` by ``grad_B (A A^T)^-1`` and ``grad_A`` by ``(B^T B)^-1 grad_A`` over the active components.

    Each Gram matrix is divided by its mean diagonal and damped by ``damping`` (times the identity),
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
        system = gram / torch.where(usable, scale, torch.ones_like(scale)) + damping * eye
        whole = _whole(grad)
        g = whole[:k] if left else whole[:, :k]
        solved = torch.linalg.solve(system, g.float()) if left else torch.linalg.solve(system, g.float().T).T
        g.copy_(torch.where(usable, solved, g.float()).to(g.dtype))
        _write_back(grad, whole)


def add_preconditioner(
    optimizer: Any, layers: Callable[[], dict[str, LowRankLinear]], damping: float = PRECONDITION_DAMPING
):
    """Precondition every factorized or residual layer's factor gradients before each optimizer step.

    ``layers`` is called at every step (modes and ranks change during training). Returns the
    hook's removable handle. Under FSDP2 every process must run it (it gathers the factors).
    """

    @torch.no_grad()
    def hook(opt, args, kwargs) -> None:
        for layer in layers().values():
            if layer.mode != "dense" and layer.A.grad is not None and layer.B.grad is not None:
                precondition_factors(layer, damping)

    return inner_optimizer(optimizer).register_step_pre_hook(hook)


REBALANCE_TOLERANCE = 1e-6  # a pair whose smallest singular value is below this share of its largest is left as it is


@torch.no_grad()
def rebalance_factors(layer: LowRankLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Re-split the active product ``B A`` of a factorized layer into ``B' = Q_B U S^1/2``, ``A' = S^1/2 V^T Q_A^T``.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR) and ``R_B R_A^T = U S V^T`` (an (r, r)
    SVD), so ``B' A' = B A`` up to float32 rounding, and both factors then have Gram matrix
    ``S``: the balance that gradient steps on a factor pair drift away from. In float32 whatever
    the parameters' dtype. Returns the change of basis ``(M, N)``, ``B' = B M`` and ``A' = N A``
    with ``M N = I`` (float32, (r, r)), or None, changing nothing, when the pair is
    rank-deficient (a singular value below ``REBALANCE_TOLERANCE`` of the largest, e.g.
    components InRank has just grown with ``B = 0``, which a re-split would zero in both
    factors) or the result is not finite. FSDP2 shards are gathered, re-split whole (the same
    on every process) and written back as shards.
    """
    k = layer.rank
    B_whole, A_whole = _whole(layer.B), _whole(layer.A)
    B, A = B_whole[:, :k].float(), A_whole[:k].float()
    q_b, r_b = torch.linalg.qr(B)  # (out, k), (k, k)
    q_a, r_a = torch.linalg.qr(A.T)  # (in, k), (k, k)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    root = s.clamp_min(0).sqrt()
    new_b, new_a = q_b @ (u * root), (root[:, None] * vh) @ q_a.T
    # B' = Q_B U S^1/2 = B R_B^-1 U S^1/2 and A' = S^-1/2 U^T R_B A: R_B is invertible when S is not singular
    m = torch.linalg.solve_triangular(r_b, u * root, upper=True)
    n = (u / root).T @ r_b
    usable = s[-1] > REBALANCE_TOLERANCE * s[0]
    for t in (s, new_b, new_a, m, n):
        usable = usable & torch.isfinite(t).all()
    if not bool(usable):  # one host sync per layer
        return None
    B_whole[:, :k].copy_(new_b.to(B_whole.dtype))
    A_whole[:k].copy_(new_a.to(A_whole.dtype))
    _write_back(layer.B, B_whole)
    _write_back(layer.A, A_whole)
    return m, n


def _rotate_moments(state: dict[str, Any], left: bool, k: int, t: torch.Tensor) -> None:
    """Carry one factor's Adam moments into the new basis: first moments exactly, second moments diagonally.

    A gradient of ``B`` becomes ``g N^T`` and one of ``A`` becomes ``M^T g``; ``t`` is that (r, r)
    map (``N^T`` for ``B``, ``M^T`` for ``A``). Second moments take the map's squares (the
    variance of a sum of independent coordinates), which keeps them non-negative.
    """
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key not in state or not torch.is_tensor(state[key]) or state[key].dim() != 2:
            continue
        target = state[key]
        whole = _whole(target)
        part = whole[:k] if left else whole[:, :k]
        mapping = t if key == "exp_avg" else t * t
        moved = mapping @ part.float() if left else part.float() @ mapping
        part.copy_(moved.to(part.dtype))
        _write_back(target, whole)


def rebalance(layers: dict[str, LowRankLinear], optimizer: Any = None, moments: str = "rotate") -> list[str]:
    """Re-balance every factorized layer (:func:`rebalance_factors`); returns the names of those re-split.

    ``moments`` says what happens to the optimizer's state of ``A`` and ``B``: ``"keep"`` leaves
    it as it is (in the old basis); ``"rotate"`` carries Adam's moments into the new basis (first
    moments exactly, as the gradients of the new factors would have been; second moments through
    the squared map, a diagonal approximation); ``"reset"`` drops it, so the next step starts
    those factors' moments and bias correction afresh (what LORO does at its exact steps).
    Residual adapters and dense layers are left alone.
    """
    if moments not in REBALANCE_MOMENTS:
        raise ValueError(f"rebalance moments={moments!r} is not allowed; give one of {REBALANCE_MOMENTS}.")
    done = []
    state = inner_optimizer(optimizer).state if optimizer is not None else {}
    for name, layer in layers.items():
        if layer.mode != "factorized":
            continue
        change = rebalance_factors(layer)
        if change is None:
            continue
        done.append(name)
        m, n = change
        if moments == "reset":
            for p in (layer.A, layer.B):
                state.pop(p, None)
        elif moments == "rotate":
            if layer.B in state:
                _rotate_moments(state[layer.B], left=False, k=layer.rank, t=n.T)
            if layer.A in state:
                _rotate_moments(state[layer.A], left=True, k=layer.rank, t=m.T)
    return done


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
        if optimizer is not None and sched is not None:
            private_torch.set_last_lr(sched, inner_optimizer(optimizer))  # what the Trainer logs for this step
        self.factor *= factor

    def start_rewarm(self, step: int, length: int) -> None:
        self.rewarm = (step, length)

    def apply_rewarm(self, optimizer: Any, step: int, scheduler: Any = None) -> None:
        """Scale the learning rate set for the step after ``step`` by the re-warm ramp (and what ``scheduler`` reports)."""
        if self.rewarm is None or optimizer is None:
            return
        start, length = self.rewarm
        ramp = (step - start + 1) / (length + 1)
        if ramp >= 1.0:
            self.rewarm = None
            return
        for group in inner_optimizer(optimizer).param_groups:
            group["lr"] *= ramp
        if scheduler is not None:
            private_torch.set_last_lr(inner_scheduler(scheduler), inner_optimizer(optimizer))

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
