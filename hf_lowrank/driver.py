"""TrainingDriver: runs a LowRankModel's strategy from any training loop.

What ``LowRankModel.bind_training`` / ``update_ranks`` / ``apply_plan`` / ``check_run`` do, and
the state they keep between steps: the run length, the optimizers carrying the model's gradient
hooks (Frobenius decay, the preconditioner), the learning-rate factor and re-warm, the plans
applied and the time spent on them, and whether a DDP wrapper must be checked after a shape
change. ``LowRankModel`` owns one (``model._driver``) and delegates to it; the driver reads the
model through its public methods (``strategy``, ``lowrank_config``, ``lowrank_layers()``,
``named_parameters()``) and never imports ``model.py``. It is a plain object, not an
``nn.Module``, so it stays out of the module tree and of ``state_dict``.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import torch

from . import distributed, fsdp, optim, private_torch
from .checks import check_int, is_number
from .config import REBALANCE_EVERY
from .layer import LowRankLinear
from .strategies import LayerChange, Plan, StateContext, TrainContext, UnavailableStrategy
from .strategies.base import TOKENS_PER_BATCH

if TYPE_CHECKING:
    from .model import LowRankModel


def apply_change(layer: LowRankLinear, change: LayerChange) -> None:
    """Carry out one layer change of a plan."""
    if change.op == "grow":
        layer.grow(change.rank)
    elif change.op == "truncate":
        layer.truncate(change.rank, change.capacity)
    elif change.op == "to_factorized":
        layer.to_factorized(change.rank, change.capacity, ones=change.ones)
    elif change.op == "to_dense":
        layer.to_dense()
    else:
        layer.to_residual(change.rank, change.capacity, alpha=change.alpha)


def rebalance_period(config: Any) -> int:
    """Steps between re-balances (0: never) where training is driven: ``rebalance_every``, or its default where it is None."""
    every = config.rebalance_every
    return REBALANCE_EVERY if every is None else every


class TrainingDriver:
    """The training state of one :class:`~hf_lowrank.model.LowRankModel` and the steps that change it.

    Documented on the model's methods, which delegate here: ``bind_training`` (:meth:`bind`),
    ``check_run``, ``update_ranks``, ``apply_plan``, ``lowrank_state_dict`` (:meth:`state_dict`)
    and ``load_lowrank_state_dict`` (:meth:`load_state_dict`).
    """

    def __init__(self, model: "LowRankModel"):
        self.model = model
        self.lr_adjust = optim.LrAdjust()
        self.plan_history: list[dict[str, Any]] = []
        self.decision_seconds = 0.0
        self.bound = False
        self.max_steps: int | None = None  # the run length bind was given
        self.ddp_check = False  # parameters were replaced: check once that a DDP wrapper was rebuilt
        self.hooked_optimizers: set[int] = set()  # optimizers that carry this model's gradient hooks

    # -- the forward's checks ------------------------------------------------------------------

    def needs_driver(self) -> bool:
        """Whether training without bind_training would silently skip something the config asks for."""
        c, strategy = self.model.lowrank_config, self.model.strategy
        return not strategy.is_final() or c.frobenius_decay > 0 or c.precondition is True or bool(c.rebalance_every)

    def refuse_undriven(self) -> None:
        """A training forward before :meth:`bind`: raise if the strategy is missing or the config acts during training."""
        strategy = self.model.strategy
        if isinstance(strategy, UnavailableStrategy):
            raise ValueError(strategy.message)
        if self.needs_driver():
            c = self.model.lowrank_config
            acting = [f"strategy={c.strategy!r}"] if not strategy.is_final() else []
            acting += [f"{k}={v!r}" for k, v, on in (
                ("frobenius_decay", c.frobenius_decay, c.frobenius_decay > 0),
                ("precondition", c.precondition, c.precondition is True),
                ("rebalance_every", c.rebalance_every, bool(c.rebalance_every)),
            ) if on]
            raise RuntimeError(
                f"LowRankConfig({', '.join(acting)}) acts during training, but nothing drives it: train with "
                "hf_lowrank.LowRankTrainer, add hf_lowrank.LowRankCallback() to a transformers.Trainer, or in your own "
                "loop call model.bind_training(max_steps, optimizer, lr_scheduler) once and "
                "model.update_ranks(step, optimizer, lr_scheduler) after every optimizer step."
            )

    def check_ddp_rebuilt(self) -> None:
        """After a shape change, refuse a forward through a DDP wrapper still holding the replaced parameters."""
        stale = distributed.stale_ddp(self.model)
        if stale is not None:
            raise RuntimeError(
                "the DistributedDataParallel wrapper running this forward still holds the parameters a rank change "
                "replaced (the last plan had changes_shapes), so the new ones would train unsynchronised and DDP's "
                "reducer would fail at the next step; rebuild it after update_ranks: "
                "`if plan is not None and plan.changes_shapes: model = hf_lowrank.distributed.rewrap_ddp(model)` "
                "(LowRankTrainer does this itself)."
            )
        if private_torch.active_ddp_module() is not None or distributed.world()[1] == 1:
            self.ddp_check = False  # passed under a rebuilt DDP, or no DDP can hold this model (one process)

    # -- binding -------------------------------------------------------------------------------

    def bind(
        self,
        max_steps: int,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        *,
        warn: Any = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        tokens_per_batch: int = TOKENS_PER_BATCH,
    ) -> None:
        """``LowRankModel.bind_training``."""
        model = self.model
        check_int("max_steps", max_steps, 1)
        sched = optim.inner_scheduler(lr_scheduler)
        base = list(getattr(sched, "base_lrs", None) or [1.0])
        lambdas = getattr(sched, "lr_lambdas", None)

        def lr_at(step: int) -> float:
            return base[0] * lambdas[0](step) if lambdas else base[0]

        rank, _ = distributed.world()

        def warn_once(message: str) -> None:
            if rank == 0:
                warnings.warn(message, stacklevel=3)

        if device is None:
            device = str(next(model.parameters()).device)
        model.strategy.bind(
            TrainContext(
                max_steps=max_steps, lr_at=lr_at, warn=warn or warn_once, device=device, dtype=dtype,
                tokens_per_batch=tokens_per_batch,
            )
        )
        c = model.lowrank_config
        if model.strategy.changes_shapes and fsdp.is_sharded(model):
            fsdp.check_reshardable(model)
        if optimizer is not None:
            inner = optim.inner_optimizer(optimizer)
            if id(inner) not in self.hooked_optimizers:  # a second bind (a resume) hooks nothing twice
                if c.frobenius_decay > 0:
                    optim.add_frobenius_decay(inner, model.lowrank_layers, c.frobenius_decay)
                if c.precondition is not False:
                    optim.add_preconditioner(inner, model.lowrank_layers, c.precondition_damping)
                self.hooked_optimizers.add(id(inner))
        elif c.frobenius_decay > 0:
            raise ValueError(
                f"LowRankConfig.frobenius_decay={c.frobenius_decay} needs the optimizer: call "
                "bind_training(max_steps, optimizer, lr_scheduler) so the decay is applied at every step."
            )
        elif c.precondition is True:
            raise ValueError(
                "LowRankConfig.precondition=True needs the optimizer: call bind_training(max_steps, optimizer, lr_scheduler) "
                "so the factor gradients are preconditioned at every step."
            )
        if self.rebalance_period() and c.rebalance_moments == "reset" and optimizer is None:
            raise ValueError(
                "LowRankConfig.rebalance_moments='reset' needs the optimizer: call bind_training(max_steps, optimizer, "
                "lr_scheduler) and pass it to update_ranks, or use rebalance_moments='keep'."
            )
        needs_groups = [
            f"{name}={value}" for name, value, default in
            (("factor_lr_scale", c.factor_lr_scale, 1.0), ("factor_weight_decay", c.factor_weight_decay, None))
            if value != default
        ]
        if optimizer is not None and needs_groups and not any(
            g.get("lowrank_factors") for g in optim.inner_optimizer(optimizer).param_groups
        ):
            raise ValueError(
                f"LowRankConfig.{', '.join(needs_groups)} needs factor parameter groups: build the optimizer "
                "from hf_lowrank.optim.param_groups(model, lr, weight_decay), or train with LowRankTrainer."
            )
        self.max_steps = max_steps
        self.bound = True

    def rebalance_period(self) -> int:
        """Steps between re-balances (0: never) of the driven model: :func:`rebalance_period` of its config."""
        return rebalance_period(self.model.lowrank_config)

    def check_run(self, max_steps: int) -> None:
        """``LowRankModel.check_run``: a fresh strategy of the same kind is bound to ``max_steps``, then dropped."""
        check_int("max_steps", max_steps, 1)
        probe = type(self.model.strategy)(self.model.lowrank_config)
        probe.bind(TrainContext(max_steps=max_steps, warn=lambda message: None))

    # -- the rank step -------------------------------------------------------------------------

    def update_ranks(self, step: int, optimizer: Any = None, lr_scheduler: Any = None) -> Plan | None:
        """``LowRankModel.update_ranks``."""
        model = self.model
        if not self.bound:
            raise RuntimeError("call model.bind_training(max_steps, optimizer, lr_scheduler) before update_ranks.")
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= self.max_steps:
            raise ValueError(
                f"update_ranks(step={step!r}): steps run from 1 to max_steps={self.max_steps}, the length "
                "bind_training was given (the strategy's schedule and the learning-rate schedule end there); stop the "
                "loop at max_steps (e.g. itertools.islice(loader, max_steps)) or bind again with the run's real length."
            )
        plan = None
        strategy = model.strategy
        if strategy.due(step):
            start = time.perf_counter()
            layers = model.lowrank_layers()

            def decide() -> dict[str, Any] | None:
                plan = strategy.step(step, layers)
                return plan.to_dict() if plan else None

            with fsdp.gathered_layers(model):  # FSDP2: the strategy reads full tensors, not shards
                payload, state = distributed.decide_on_rank0(decide, strategy.state_dict)
            if distributed.world()[0] != 0:
                strategy.load_state_dict(state)
            plan = Plan.from_dict(payload) if payload else None
            if plan:
                # FSDP2: the units of replaced layers are re-sharded, the optimizer moved onto the new shards
                with fsdp.resharding(model, [c.layer for c in plan.changes if c.op != "grow"], optimizer):
                    self.apply_plan(plan, step=step, optimizer=optimizer, lr_scheduler=lr_scheduler)
            self.decision_seconds += time.perf_counter() - start
        every = self.rebalance_period()
        if every and step % every == 0:  # the run's step is the clock, so a resume re-balances at the same steps
            start = time.perf_counter()
            optim.rebalance(model.lowrank_layers(), optimizer, model.lowrank_config.rebalance_moments)
            self.decision_seconds += time.perf_counter() - start  # counted with the decisions: library time outside the step
        self.lr_adjust.apply_rewarm(optimizer, step, lr_scheduler)
        return plan

    def apply_plan(
        self, plan: Plan, step: int | None = None, optimizer: Any = None, lr_scheduler: Any = None
    ) -> list[str]:
        """``LowRankModel.apply_plan``: returns the skipped changes' warnings."""
        model = self.model
        layers = model.lowrank_layers()
        before = dict(model.named_parameters())
        skipped = []
        for change in plan.changes:
            try:
                apply_change(layers[change.layer], change)
            except torch.linalg.LinAlgError as e:
                skipped.append(f"{change.op} of {change.layer} skipped: its SVD failed ({e}); the layer is left as it was.")
        after = dict(model.named_parameters())
        replaced = before.keys() != after.keys() or any(before[n] is not after[n] for n in after)
        self.ddp_check = self.ddp_check or replaced
        if replaced and optimizer is not None:
            frob = model.lowrank_config.frobenius_decay > 0
            optim.regroup(optimizer, after.items(), before, decays=lambda n, p: optim.decays(n, p, frob))
        # The learning-rate change goes with the layer changes: when all of them were skipped the
        # model is the one the schedule was set for (a failed Cuttlefish switch stays dense).
        retune = not plan.changes or len(skipped) < len(plan.changes)
        if retune and plan.lr_factor != 1.0:
            self.lr_adjust.scale(optimizer, lr_scheduler, plan.lr_factor)
        if retune and plan.rewarm_steps > 0 and step is not None:
            self.lr_adjust.start_rewarm(step, plan.rewarm_steps)
        self.plan_history.append({"step": step, **plan.to_dict(), "skipped": skipped})
        if distributed.world()[0] == 0:  # every process skips the same change; one warns
            for message in skipped:
                warnings.warn(message, stacklevel=3)  # the caller of LowRankModel.apply_plan
        return skipped

    # -- resuming ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Strategy state, lr adjustments, plan history and decision time (``lowrank_state_dict`` adds the layout)."""
        return {
            "strategy": self.model.lowrank_config.strategy,
            "strategy_state": self.model.strategy.state_dict(),
            **self.lr_adjust.state_dict(),
            "plan_history": self.plan_history,
            "decision_seconds": self.decision_seconds,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "state") -> None:
        """``LowRankModel.load_lowrank_state_dict``."""
        model = self.model
        keys = ("strategy", "strategy_state", "lr_factor", "rewarm", "plan_history", "decision_seconds")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{source}: not a low-rank training state (needs keys {list(keys)}, has {have}); "
                "it is written with every LowRankTrainer checkpoint, so the checkpoint is incomplete or edited."
            )
        if state["strategy"] != model.lowrank_config.strategy:
            raise ValueError(
                f"{source}: checkpoint was trained with strategy {state['strategy']!r}, "
                f"this run uses {model.lowrank_config.strategy!r}."
            )
        steps = [h.get("step") for h in state["plan_history"] if isinstance(h, dict)] if isinstance(state["plan_history"], list) else []
        step = state.get("global_step")
        ctx = StateContext(model.lowrank_layers(), step if isinstance(step, int) else None, frozenset(s for s in steps if isinstance(s, int)))
        try:
            model.strategy.check_state(state["strategy_state"], ctx)  # names, sizes and steps against this model
            model.strategy.load_state_dict(state["strategy_state"])
            self.lr_adjust.load_state_dict(state)
            if not (isinstance(state["plan_history"], list) and all(isinstance(h, dict) for h in state["plan_history"])):
                raise ValueError(f"plan_history={str(state['plan_history'])[:80]!r} is not a list of plans")
            if not is_number(state["decision_seconds"], 0.0, inclusive=True):
                raise ValueError(f"decision_seconds={state['decision_seconds']!r} is not a number >= 0")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed strategy_state or lr adjustment ({type(e).__name__}: {e}).") from e
        self.plan_history = list(state["plan_history"])
        self.decision_seconds = float(state["decision_seconds"])
