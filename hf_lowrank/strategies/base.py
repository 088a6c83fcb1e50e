"""The interface every rank strategy implements, and the plan it returns.

A strategy observes the layers and returns a :class:`Plan` (which layer goes to which mode
and rank, and whether the learning rate changes). It never touches the optimizer, the
scheduler or the model's wrappers: the trainer applies plans and keeps those in step.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..checks import check_fraction, check_int, check_number, fail, resolve_size
from ..layer import LayerSpec, LowRankLinear

if TYPE_CHECKING:
    from ..config import LowRankConfig

OPS = ("grow", "truncate", "to_factorized", "to_dense", "to_residual")


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
    tokens_per_batch: int = 2048  # tokens in one micro-batch on one process, for profiling


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


def get_strategy(name: Any) -> type["RankStrategy"]:
    """The strategy class registered under ``name``.

    ``name`` may also be ``"package.module:Class"``: the module is imported (which registers
    the class) and the class is returned, so a recipe can use a strategy from the user's code.
    """
    if isinstance(name, str) and ":" in name and name not in REGISTRY:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            fail("LowRankConfig.strategy", name, f"'module:Class' must name an importable RankStrategy subclass ({e})")
        if not (isinstance(cls, type) and issubclass(cls, RankStrategy)):
            fail("LowRankConfig.strategy", name, "'module:Class' must name a RankStrategy subclass")
        return cls
    if not isinstance(name, str) or name not in REGISTRY:
        fail(
            "LowRankConfig.strategy",
            name,
            f"choose one of {sorted(REGISTRY)}, or 'module:Class' for a RankStrategy defined in your own code",
        )
    return REGISTRY[name]


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
        self.args = config.strategy_settings
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
        """The layout a layer starts in, before training."""
        c = self.config
        if c.mode == "dense":
            return LayerSpec("dense")
        rank = resolve_size(c.rank, layer.in_features, layer.out_features, "rank", name)
        capacity = rank if c.capacity is None else resolve_size(c.capacity, layer.in_features, layer.out_features, "capacity", name)
        if capacity < rank:
            raise ValueError(
                f"LowRankConfig.capacity resolves to {capacity} < rank {rank} for layer {name!r}; raise capacity."
            )
        scaling = 1.0 if (c.mode == "factorized" or c.alpha is None) else c.alpha / rank
        return LayerSpec(c.mode, rank, capacity, scaling)

    # training

    def bind(self, context: TrainContext) -> None:
        """Called once when training starts (or resumes), with the run's length and schedule."""
        self.context = context

    def due(self, step: int) -> bool:
        """Whether ``step`` must be called after optimizer step ``step``.

        Depends only on the step, the settings and the strategy state (which the trainer keeps
        identical on every process), so all processes agree without communicating.
        """
        return not self.is_final()

    def step(self, step: int, layers: dict[str, LowRankLinear]) -> Plan | None:
        """Called after optimizer step ``step`` (1-based) when ``due(step)``; returns a plan or None."""
        return None

    def is_final(self) -> bool:
        """True once the strategy will make no more changes (checks can stop)."""
        return True

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
