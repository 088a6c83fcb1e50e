"""hf_lowrank: low-rank training of transformers models with ranks chosen during training."""

from .version import __version__  # noqa: F401 (re-exported)

from .config import LowRankConfig  # noqa: E402
from .layer import LayerSpec, LowRankLinear  # noqa: E402
from .model import LowRankModel, get_lowrank_model  # noqa: E402
from .strategies import LayerChange, Plan, RankStrategy, StrategyArgs, TrainContext, register_strategy  # noqa: E402

_LAZY = {"LowRankTrainer", "LowRankCallback"}


def __getattr__(name):
    # The Trainer glue imports transformers.Trainer and accelerate: load it only when asked for.
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_lowrank' has no attribute {name!r}")


__all__ = [
    "LayerChange",
    "LowRankCallback",
    "LayerSpec",
    "LowRankConfig",
    "LowRankLinear",
    "LowRankModel",
    "LowRankTrainer",
    "Plan",
    "RankStrategy",
    "StrategyArgs",
    "TrainContext",
    "get_lowrank_model",
    "register_strategy",
]
