"""The interface every rank strategy implements, and the plan it returns.

A strategy observes the layers and returns a :class:`Plan` (which layer goes to which mode
and rank, and whether the learning rate changes). It never touches the optimizer, the
scheduler or the model's wrappers: ``LowRankModel.update_ranks`` applies plans and keeps
those in step (any loop calls it; ``LowRankTrainer`` does after each optimizer step).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..checks import check_fraction, check_int, check_number, fail, resolve_rank_and_capacity, resolve_size
from ..layer import LayerSpec, LowRankLinear

if TYPE_CHECKING:
    from ..config import LowRankConfig

OPS = ("grow", "truncate", "to_factorized", "to_dense", "to_residual")


# tokens in one micro-batch on one process when the loop does not say (Cuttlefish profiles layers at this size)
TOKENS_PER_BATCH = 2048


@dataclass
class StrategyArgs:
    """Base of each strategy's typed settings; subclasses validate in ``check``."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StrategyArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"LowRankConfig.strategy_args has unknown key(s) {unknown} for this strategy; "
                f"known keys are {sorted(known)}."
            )
        args = cls(**data)
        args.check()
        return args

    def check(self) -> None:
        """Raise ``ValueError`` naming ``strategy_args.<field>`` for a bad value."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Validators over hf_lowrank.checks, naming the field as LowRankConfig.strategy_args.<name>.

    @staticmethod
    def field_name(name: str) -> str:
        return f"LowRankConfig.strategy_args.{name}"

    @classmethod
    def fail(cls, name: str, value: Any, allowed: str) -> None:
        fail(cls.field_name(name), value, allowed)

    def require(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            self.fail(name, getattr(self, name), allowed)

    def require_fraction(self, name: str, low_open: bool = True, allow_none: bool = False) -> None:
        v = getattr(self, name)
        if not (v is None and allow_none):
            check_fraction(self.field_name(name), v, low_open)

    def require_positive_int(self, name: str, zero_ok: bool = False) -> None:
        check_int(self.field_name(name), getattr(self, name), 0 if zero_ok else 1)

    def require_positive(self, name: str, zero_ok: bool = False) -> None:
        check_number(self.field_name(name), getattr(self, name), 0.0, inclusive=zero_ok)


@dataclass
class LayerChange:
    """One transition of one layer (see ``LowRankLinear`` for what each op does)."""

    layer: str
    op: str
    rank: int | None = None
    capacity: int | None = None
    alpha: float | None = None
    ones: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"LayerChange.op={self.op!r}; expected one of {OPS}.")


@dataclass
class Plan:
    """What a strategy wants done after an optimizer step."""

    changes: list[LayerChange] = field(default_factory=list)
    lr_factor: float = 1.0  # multiplies the whole learning-rate schedule from now on
    rewarm_steps: int = 0  # ramp the learning rate linearly from 0 back to the schedule over this many steps
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.changes) or self.lr_factor != 1.0 or self.rewarm_steps > 0

    @property
    def changes_shapes(self) -> bool:
        """Whether applying it replaces parameters (every op but ``grow``, which only moves the active rank)."""
        return any(c.op != "grow" for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": [dataclasses.asdict(c) for c in self.changes],
            "lr_factor": self.lr_factor,
            "rewarm_steps": self.rewarm_steps,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return cls([LayerChange(**c) for c in data["changes"]], data["lr_factor"], data["rewarm_steps"], data["reason"])


@dataclass
class TrainContext:
    """What a strategy may know about the run: its length and learning-rate schedule."""

    max_steps: int
    lr_at: Callable[[int], float] = lambda step: 1.0  # the schedule's learning rate at an optimizer step
    warn: Callable[[str], None] = print
    device: str = "cpu"
    dtype: Any = None  # training compute dtype (bf16 under autocast), for profiling
    tokens_per_batch: int = TOKENS_PER_BATCH  # tokens in one micro-batch on one process, for profiling


@dataclass
class StateContext:
    """What a saved strategy state is checked against: the model's layers, the checkpoint's step, the plan steps."""

    layers: dict[str, LowRankLinear]
    global_step: int | None = None
    plan_steps: frozenset = frozenset()


class StateFields:
    """A strategy state read field by field; a bad value raises ``ValueError`` naming ``strategy_state.<field>``.

    A checkpoint is untrusted data: ``"false"`` must not become True, nor ``10**12`` a rank.
    """

    def __init__(self, state: Any, keys: tuple[str, ...], ctx: StateContext | None = None):
        if not isinstance(state, dict):
            fail("strategy_state", type(state).__name__, f"give the dict state_dict() writes, with keys {list(keys)}")
        missing, unknown = [k for k in keys if k not in state], sorted(set(state) - set(keys))
        if missing or unknown:
            fail("strategy_state", sorted(state), f"it needs exactly the keys {list(keys)} (missing {missing}, unknown {unknown})")
        self.state, self.ctx = state, ctx

    def bool(self, key: str) -> bool:
        value = self.state[key]
        if not isinstance(value, bool):
            fail(f"strategy_state.{key}", value, "give true or false")
        return value

    def int(self, key: str, low: int = 0, high: int | None = None, value: Any = ..., field: str | None = None) -> int:
        value = self.state[key] if value is ... else value
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)):
            fail(field or f"strategy_state.{key}", value, f"give an int in [{low}, {'any' if high is None else high}]")
        return value

    def step(self, key: str, none: bool = True) -> int | None:
        """A step of the run: None (if allowed) or an int in [0, global_step]."""
        value = self.state[key]
        if value is None and none:
            return None
        high = self.ctx.global_step if self.ctx is not None else None
        return self.int(key, 0, high)

    def number(self, value: Any, field: str, low: float = -math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            fail(field, value, f"give a finite number >= {low}")
        return float(value)

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.state[key]
        if value not in options:
            fail(f"strategy_state.{key}", value, f"give one of {list(options)}")
        return value

    def layer_names(self, key: str, names: Any) -> list[str]:
        """Names that must be low-rank layers of the model (checked when the model is known)."""
        if not (isinstance(names, (list, dict)) and all(isinstance(n, str) for n in names)):
            fail(f"strategy_state.{key}", names, "give layer names")
        if self.ctx is not None:
            unknown = sorted(set(names) - set(self.ctx.layers))
            if unknown:
                fail(f"strategy_state.{key}", unknown[:3], f"they are not low-rank layers of this model ({sorted(self.ctx.layers)[:3]}...)")
        return list(names)

    def layer_map(self, key: str) -> dict[str, Any]:
        value = self.state[key]
        if not isinstance(value, dict):
            fail(f"strategy_state.{key}", type(value).__name__, "give a dict of layer names")
        self.layer_names(key, value)
        return value


REGISTRY: dict[str, type["RankStrategy"]] = {}


def register_strategy(cls: type["RankStrategy"]) -> type["RankStrategy"]:
    """Register ``cls`` under ``cls.name`` so ``LowRankConfig(strategy=cls.name)`` finds it.

    Subclassing :class:`RankStrategy` with a ``name`` registers already; the decorator is for
    re-registering a class (e.g. after a test replaced an entry) and reads as documentation.
    A name taken by another class is refused, so two strategies never shadow each other.
    """
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__}.name={name!r} is not allowed; give the strategy a non-empty str name.")
    other = REGISTRY.get(name)
    if other is not None and other is not cls and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"strategy name {name!r} is taken by {other.__module__}.{other.__qualname__}; "
            f"give {cls.__module__}.{cls.__qualname__} another name."
        )
    REGISTRY[name] = cls
    return cls


def _registered_as(module: str, attr: str) -> type["RankStrategy"] | None:
    """The registered class defined as ``attr`` in ``module``, found without importing anything."""
    for cls in REGISTRY.values():
        if cls.__module__ == module and cls.__qualname__ == attr:
            return cls
    return None


def unavailable_message(name: Any) -> str:
    """Why ``name`` names no strategy of this process, and the ways to provide it."""
    if isinstance(name, str) and ":" in name:
        module = name.partition(":")[0]
        return (
            f"no strategy is registered as {name!r}, and hf_lowrank never imports a module that a config, a recipe or a "
            f"saved model names (that would run its code). Import it yourself first (import {module}; its RankStrategy "
            "subclass registers on import), or opt in to the import: hf_lowrank.get_strategy(name, trust_remote_code=True) "
            "before building the config, LowRankModel.from_pretrained(..., trust_remote_code=True), or "
            "hf-lowrank train --trust_remote_code (which also finds modules in the working directory; else set PYTHONPATH)"
        )
    return (
        f"choose one of {sorted(REGISTRY)}, or import the module that defines your strategy first (a RankStrategy subclass "
        "registers its name on import), or name it 'module:Class' with trust_remote_code=True"
    )


def find_strategy(name: Any) -> type["RankStrategy"] | None:
    """The strategy class ``name`` names if this process has it registered, else None; never imports.

    ``name`` is a registered name (``"inrank"``) or ``"module:Class"`` of a class already
    registered, i.e. whose module the user's own code has imported.
    """
    if not isinstance(name, str) or not name:
        fail("LowRankConfig.strategy", name, f"give a strategy name, one of {sorted(REGISTRY)}, or 'module:Class'")
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        return _registered_as(module, attr)
    return None


def get_strategy(name: Any, trust_remote_code: bool = False) -> type["RankStrategy"]:
    """The strategy class registered under ``name`` (a registered name or ``"package.module:Class"``).

    A ``"module:Class"`` strategy is found when its module is already imported (which
    registered the class). Only with ``trust_remote_code=True`` is the module imported here,
    running its code: never do that for a name read from a file you did not write.
    """
    cls = find_strategy(name)
    if cls is not None:
        return cls
    if not (trust_remote_code and ":" in name):
        fail("LowRankConfig.strategy", name, unavailable_message(name))
    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        fail("LowRankConfig.strategy", name, f"'module:Class' must name an importable RankStrategy subclass ({e}); put its folder on PYTHONPATH")
    if not (isinstance(cls, type) and issubclass(cls, RankStrategy)):
        fail("LowRankConfig.strategy", name, "'module:Class' must name a RankStrategy subclass")
    return cls


class RankStrategy:
    """Base class: a fixed layout, no changes. Subclasses override what they need.

    A subclass that sets ``name`` registers itself (see :func:`register_strategy`) and
    declares ``changes_shapes``: whether its plans replace parameters (grow within the
    capacity does not; truncate, to_factorized, to_dense and to_residual do). Trainers and
    wrappers (DDP, FSDP2, torch.compile) read that flag instead of a list of names.
    """

    name: ClassVar[str] = "base"
    Args: ClassVar[type[StrategyArgs]] = StrategyArgs
    changes_shapes: ClassVar[bool] = False
    # Factorized layers start with B = 0 beyond the active rank (growth is then exact); a strategy
    # that wants the inactive components random (InRank's authors' layout) sets it False.
    zero_inactive: bool = True
    # What the strategy does with LowRankConfig's layout settings, checked when a config is built
    # (check_config): the modes it starts from (None: any) with why, and each setting it ignores
    # mapped to what it uses instead.
    modes: ClassVar[tuple[str, ...] | None] = None
    modes_why: ClassVar[str] = ""
    ignores: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            register_strategy(cls)

    def __init__(self, config: "LowRankConfig"):
        self.config = config
        self.args = config.parsed_strategy_args
        self.context: TrainContext | None = None

    @classmethod
    def check_config(cls, config: "LowRankConfig") -> None:
        """Refuse a mode this strategy does not start from; warn about each layout setting it ignores.

        A setting counts as given when it differs from LowRankConfig's default. A config with a
        rank pattern (a saved model) is not checked: it loads as it was saved.
        """
        if config.rank_pattern:
            return
        if cls.modes is not None and config.mode not in cls.modes:
            fail(
                "LowRankConfig.mode", config.mode,
                f"strategy {cls.name!r} {cls.modes_why}; use mode={' or '.join(repr(m) for m in cls.modes)}",
            )
        ignored = dict(cls.ignores)
        if config.mode != "residual" and (cls.modes is None or "residual" in cls.modes):
            where = f"mode={config.mode!r} trains the whole model without a frozen W0 (only mode='residual' uses it)"
            for name in ("alpha", "residual_base", "modules_to_save"):
                ignored.setdefault(name, where)
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        for name, instead in ignored.items():
            value = getattr(config, name)
            if value != defaults[name]:
                warnings.warn(
                    f"LowRankConfig.{name}={value!r} is not used by strategy {cls.name!r}: {instead}. "
                    f"Leave {name} out (it changes nothing here).",
                    stacklevel=4,
                )

    # layout

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        """The spec a layer starts in, before training; called once per layer when the model is wrapped.

        Not a pure query: a strategy that tracks layers records each one's start here (InRank
        keeps the rank and buffer it gives every layer), which is why it runs once per layer.
        """
        c = self.config
        if c.mode == "dense":
            return LayerSpec("dense")
        rank, capacity = resolve_rank_and_capacity(c.rank, c.capacity, layer.in_features, layer.out_features, name)
        scaling = 1.0 if (c.mode == "factorized" or c.alpha is None) else c.alpha / rank
        return LayerSpec(c.mode, rank, capacity, scaling)

    # training

    def bind(self, context: TrainContext) -> None:
        """Called once when training starts (or resumes), with the run's length and schedule."""
        self.context = context

    def due(self, step: int) -> bool:
        """Whether ``step`` must be called after optimizer step ``step``.

        Depends only on the step, the args and the strategy state (which ``update_ranks`` keeps
        identical on every process: process 0 decides and broadcasts), so all processes agree
        without communicating.
        """
        return not self.is_final()

    def step(self, step: int, layers: dict[str, LowRankLinear]) -> Plan | None:
        """Called after optimizer step ``step`` (1-based) when ``due(step)``; returns a plan or None."""
        return None

    def is_final(self) -> bool:
        """True once the strategy will make no more changes (checks can stop)."""
        return True

    def warn_if_last_step(self, step: int | None, what: str, never: str, fix: str) -> None:
        """The one check of a schedule point that lands on the last step (or later): the phase after it never trains.

        Warns ``"<name>: <what> is at the last step (<max_steps>): <never>. <fix>."``
        """
        max_steps = self.context.max_steps
        if step is not None and step >= max_steps:
            self.warn(f"{self.name}: {what} is at the last step ({max_steps}): {never}. {fix}.")

    def warn(self, message: str) -> None:
        """Warn through the training context (process 0 only) or, outside training, ``warnings``."""
        if self.context is not None:
            self.context.warn(message)
        else:
            warnings.warn(message, stacklevel=2)

    def singular_values(self, name: str, layer: LowRankLinear) -> torch.Tensor | None:
        """The layer's spectrum, or None with a warning when the SVD fails or is not finite.

        A layer whose spectrum cannot be trusted is left out of this decision; training goes on.
        """
        try:
            s = layer.singular_values()
        except (torch.linalg.LinAlgError, RuntimeError) as e:
            self.warn(f"{self.name}: SVD of {name} failed ({e}); its rank decision is skipped this time.")
            return None
        if not bool(torch.isfinite(s).all()):
            self.warn(f"{self.name}: non-finite singular values in {name}; its rank decision is skipped this time.")
            return None
        return s

    # state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.check_state(state)

    def check_state(self, state: Any, ctx: StateContext | None = None) -> None:
        """Raise ``ValueError`` naming ``strategy_state.<field>`` for a state ``load_state_dict`` must not take.

        Types and ranges always; with ``ctx`` (as when resuming) also layer names, sizes and steps
        against the model and the checkpoint. The default accepts only the empty state of a
        strategy without state.
        """
        if type(self).state_dict is RankStrategy.state_dict:
            StateFields(state, ())

    def fraction_to_step(self, value: float | int, name: str) -> int:
        """A schedule point given as a fraction of training (float <= 1) or an absolute step (int)."""
        max_steps = self.context.max_steps
        step = round(value * max_steps) if isinstance(value, float) else int(value)
        if step > max_steps:
            raise ValueError(
                f"LowRankConfig.strategy_args.{name}={value!r} is step {step}, after the end of training "
                f"(max_steps={max_steps}); give a fraction in [0, 1] or a step <= {max_steps}."
            )
        return step


class UnavailableStrategy(RankStrategy):
    """Stands in for a strategy this process does not have, on a model loaded with its saved layout.

    Inference, ``summary``, ``merge_and_unload`` and saving need only the layout, which the
    saved rank pattern gives; training (and restoring the strategy's state) needs the
    strategy itself, and is refused with how to provide it. Not registered (no ``name``).
    """

    def __init__(self, config: "LowRankConfig"):
        self.config = config
        self.args = None
        self.context = None

    @property
    def message(self) -> str:
        return (
            f"LowRankConfig.strategy={self.config.strategy!r}: this model was trained with a strategy this process does "
            f"not have. Loading, inference, inspect and merge work without it; training or resuming needs it: "
            f"{unavailable_message(self.config.strategy)}."
        )

    def initial_spec(self, name: str, layer: LowRankLinear) -> LayerSpec:
        raise ValueError(self.message)

    def bind(self, context: TrainContext) -> None:
        raise ValueError(self.message)

    def is_final(self) -> bool:
        return False  # it cannot say; training is refused in bind

    def state_dict(self) -> dict[str, Any]:
        raise ValueError(self.message)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError(self.message)
