"""LowRankConfig: the one place the options of a low-rank model live."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .version import __version__
from .checks import check_choice, check_int, check_size, fail, is_number, resolve_size  # noqa: F401  (resolve_size re-exported)
from .files import read_json, write_json
from .hub import push_folder, resolve_file
from .strategies import find_strategy, get_strategy

CONFIG_NAME = "lowrank_config.json"

MODES = ("dense", "factorized", "residual")
RESIDUAL_BASES = ("model", "orthogonal")
INITS = ("auto", "kaiming", "spectral", "spectral-ones", "zero_b")
REBALANCE_MOMENTS = ("keep", "rotate", "reset")
REBALANCE_EVERY = 10  # the period of rebalance_every=None (measured on cpu-long: docs/benchmarks.md)
FACTOR_WEIGHT_DECAY = 0.0  # factor_weight_decay=None in the factor groups the library builds
# precondition_damping's default: at 1e-6 the full-rank pair ended 1.053x dense on cpu-long (3 seeds), at 1e-4 0.993x
PRECONDITION_DAMPING = 1e-4


SPEC_KEYS = ("mode", "rank", "capacity", "scaling")

# PEFT LoraConfig names a LoRA user types, and what LowRankConfig calls them (or why there is none).
LORA_NAMES = {
    "r": "rank=",
    "lora_alpha": "alpha= (the residual adapter's scale is alpha / rank)",
    "lora_dropout": "nothing: low-rank layers have no dropout of their own",
    "init_lora_weights": "init= (residual adapters always start with B = 0)",
    "use_rslora": "alpha= (the scale is alpha / rank)",
    "fan_in_fan_out": "nothing: GPT-2's Conv1D is recognised by its type",
    "layers_to_transform": "target_modules= with a regex on the full module name",
    "bias": "nothing: biases train with the layer in dense and factorized modes and stay frozen in residual mode",
    "task_type": "nothing: the wrapped model's class sets the task",
}


def unknown_fields_message(unknown: list[str], known: list[str], where: str) -> str:
    """``unknown LowRankConfig field(s) [...]`` with the LowRankConfig name of each PEFT LoRA name among them."""
    hints = [f"{name} -> {LORA_NAMES[name]}" for name in unknown if name in LORA_NAMES]
    pointer = f" (PEFT LoraConfig names; here: {'; '.join(hints)})" if hints else ""
    return f"{where}: unknown LowRankConfig field(s) {unknown}{pointer}; known fields are {sorted(known)}."


def _rank_pattern_problem(pattern: Any) -> str | None:
    """What is wrong with a rank pattern's form, or None; sizes are checked against each layer on loading."""
    if not isinstance(pattern, dict):
        return "it is not a dict"
    for name, spec in pattern.items():
        if not isinstance(name, str) or not isinstance(spec, dict):
            return f"entry {name!r} is not a layer name mapped to a dict"
        if set(spec) - set(SPEC_KEYS):
            return f"entry {name!r} has unknown key(s) {sorted(set(spec) - set(SPEC_KEYS))}"
        if spec.get("mode") not in MODES:
            return f"entry {name!r} has mode {spec.get('mode')!r}, not one of {MODES}"
        sizes = [spec.get("rank"), spec.get("capacity")]
        if spec["mode"] != "dense" and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes):
            return f"entry {name!r} needs int rank and capacity >= 1, not {sizes}"
        if "scaling" in spec and not is_number(spec["scaling"], 0.0):
            return f"entry {name!r} has scaling {spec['scaling']!r}, not a positive number"
    return None


@dataclass
class LowRankConfig:
    """Which layers become low-rank, how they start, and which strategy changes their ranks.

    Every field has a default; ``help`` in each field's metadata is the option's documentation
    (the CLI builds ``--help`` from it). Validation happens on construction.
    """

    target_modules: Union[list[str], str, None] = field(
        default="all-linear",
        metadata={
            "help": "Layers to replace: a list of module names or name suffixes (e.g. ['c_fc', 'c_proj']), a regex "
            "matched against the full module name, or 'all-linear' (every nn.Linear / Conv1D but the output "
            "embedding and classification head)."
        },
    )
    exclude_modules: Union[list[str], str, None] = field(
        default=None, metadata={"help": "Layers to leave untouched: names, suffixes or a regex, as target_modules."}
    )
    mode: str = field(
        default="factorized",
        metadata={
            "help": "Starting mode of each layer: 'dense' (W trainable), 'factorized' (W = B A) or 'residual' "
            "(W = W0 + s B A with W0 frozen). Strategies that start dense (cuttlefish, warm_start) take 'dense' or "
            "'factorized' and refuse 'residual'; inrank refuses 'dense'; dynamic needs 'factorized'."
        },
    )
    residual_base: str = field(
        default="model",
        metadata={
            "help": "W0 of residual mode: 'model' keeps the wrapped weight (pretrained or the model's own init); "
            "'orthogonal' replaces it by a fixed orthogonal matrix (original InRank, training from scratch)."
        },
    )
    modules_to_save: Union[list[str], None] = field(
        default=None,
        metadata={
            "help": "Modules outside the low-rank layers that train when every layer starts in residual mode "
            "(fine-tuning: then only the adapters train, as in PEFT). Names or name suffixes, e.g. ['score']; "
            "None trains the model's classification head, if it has one. Ignored in dense and factorized "
            "modes, where the whole model trains."
        },
    )
    init: str = field(
        default="auto",
        metadata={
            "help": "Factor init in factorized mode: 'auto' ('spectral' for a model loaded with from_pretrained, "
            "so factorizing starts from the pretrained weights; 'kaiming' for a model built from a config), "
            "'kaiming' (both factors Kaiming-uniform, like nn.Linear), 'spectral' (balanced SVD split of the "
            "layer's current weight), 'spectral-ones' (same, singular values set to 1) or 'zero_b' (B = 0). "
            "Residual adapters always start with B = 0."
        },
    )
    init_scale: float = field(default=1.0, metadata={"help": "Multiplier applied to both freshly initialised factors."})
    rank: Union[int, float] = field(
        default=0.25,
        metadata={"help": "Active rank: an int, or a float in (0, 1] meaning a fraction of min(in, out)."},
    )
    capacity: Union[int, float, None] = field(
        default=None,
        metadata={
            "help": "Allocated rank of the factors (>= rank), so rank can grow without reallocation; int, fraction "
            "or None (= rank, or the strategy's default)."
        },
    )
    alpha: Union[float, None] = field(
        default=None,
        metadata={"help": "Residual adapter scale s = alpha / rank; None means s = 1."},
    )
    strategy: str = field(
        default="fixed",
        metadata={"help": "Rank strategy: 'fixed', 'inrank', 'cuttlefish', 'warm_start' or 'dynamic'."},
    )
    strategy_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Settings of the strategy (see docs/strategies.md); unknown keys are rejected."},
    )
    frobenius_decay: float = field(
        default=0.0,
        metadata={
            "help": "Frobenius decay lambda on factor pairs, penalty (lambda/2)||B A||_F^2; when > 0 the factors "
            "are removed from plain weight decay."
        },
    )
    precondition: Union[bool, None] = field(
        default=None,
        metadata={
            "help": "Scaled gradient descent on the factor pairs (Tong, Ma and Chi 2021): before each step "
            "grad_B becomes grad_B (A A^T)^-1 and grad_A becomes (B^T B)^-1 grad_A, each Gram matrix divided by "
            "its mean diagonal, so that the product W = B A moves along the dense gradient's projection whatever "
            "the factors' balance; the optimizer (AdamW) then steps on the preconditioned gradients. Costs "
            "O((in + out) r^2 + r^3) per layer and step; under FSDP2 the factors are gathered for it. None (the "
            "default): on wherever training binds an optimizer (LowRankTrainer, LowRankCallback, "
            "bind_training(max_steps, optimizer)); True: required (a bind without an optimizer is refused); False: off."
        },
    )
    precondition_damping: float = field(
        default=PRECONDITION_DAMPING,
        metadata={
            "help": "Damping of the preconditioner: added (times the identity) to each Gram matrix after it is divided "
            "by its mean diagonal, so near-singular pairs (full rank, inactive components) stay finite. Larger "
            "values move the step towards plain AdamW on the factors."
        },
    )
    rebalance_every: Union[int, None] = field(
        default=None,
        metadata={
            "help": "Re-balance every factorized layer's factor pair every this many optimizer steps. None (the "
            "default): every 10 steps wherever training is driven (LowRankTrainer, LowRankCallback, update_ranks); "
            "0: never; an int > 0 requires a driver. "
            "B A is re-split through QR of both factors and the SVD of the (r, r) core into B' = Q_B U S^1/2, "
            "A' = S^1/2 V^T Q_A^T, the same product in float32, both factors with Gram matrix S. Gradient steps "
            "let the factors drift out of that balance (B -> B Q, A -> Q^-1 A changes no product but every "
            "later step); LORO (Mo et al. 2025) re-splits the same way at its exact steps. Runs in update_ranks "
            "(every loop), after the optimizer step of the steps it divides. On the cpu-long benchmark a "
            "factorization at full rank ended 0.993x dense's perplexity with the defaults (every 10 steps, "
            "moments rotated, the preconditioner with damping 1e-4, no factor weight decay; mean of 3 seeds, "
            "paired) against 1.52x with none of them (docs/benchmarks.md)."
        },
    )
    rebalance_moments: str = field(
        default="rotate",
        metadata={
            "help": "What a re-balance does to the factors' optimizer state: 'rotate' (the default: Adam's moments "
            "carried into the new basis, first moments exactly, second moments through the squared map), 'keep' "
            "(moments stay as they are, in the old basis) or 'reset' (dropped: the next step starts them and their "
            "bias correction afresh, as LORO does)."
        },
    )
    factor_weight_decay: Union[float, None] = field(
        default=None,
        metadata={
            "help": "Plain weight decay of the factors A and B. None (the default): 0 in the factor groups the "
            "library builds (LowRankTrainer, hf_lowrank.optim.param_groups), and the optimizer's weight_decay "
            "where the factors share a group with other matrices (an optimizer you built, e.g. the plain "
            "transformers.Trainer with LowRankCallback). A number needs factor groups. Decay on both factors acts as "
            "a nuclear-norm penalty on B A; low-rank pretraining peers (LORO, CoLA, SLTrain) use 0-0.01."
        },
    )
    factor_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Learning-rate multiplier for the factors A and B. Adam moves each factor entry by about the "
            "learning rate, so W = B A moves less than a dense W would; values > 1 compensate (see docs/trainer.md)."
        },
    )
    rank_pattern: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer {mode, rank, capacity, scaling}; filled in when saving, used to rebuild shapes "
            "on loading. Leave empty when configuring a new model."
        },
    )
    base_model_name_or_path: Union[str, None] = field(
        default=None, metadata={"help": "Where the wrapped model came from, for the model card and reloading."}
    )
    hf_lowrank_version: str = field(default=__version__, metadata={"help": "Library version that wrote the config."})

    def __new__(cls, *args: Any, **kwargs: Any) -> "LowRankConfig":
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:  # before the dataclass __init__'s bare "unexpected keyword argument"
            raise TypeError(unknown_fields_message(unknown, [f.name for f in dataclasses.fields(cls)], "LowRankConfig()"))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value, key=str)
                setattr(self, name, value)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            ):
                fail(
                    f"LowRankConfig.{name}", value,
                    f"give a list of module names, a regex string, {'or all-linear' if name == 'target_modules' else 'or None'}",
                )
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(v, str) and v for v in self.modules_to_save)
        ):
            fail("LowRankConfig.modules_to_save", self.modules_to_save, "give a list of module names or None")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() != "all-linear":
                try:
                    re.compile(value)
                except re.error as e:
                    fail(f"LowRankConfig.{name}", value, f"a string is a regex matched against full module names and this one does not compile ({e}); give a list of names to match them literally")
        if self.target_modules in (None, [], ""):
            raise ValueError("LowRankConfig.target_modules is empty; name the layers to replace or use 'all-linear'.")
        check_choice("LowRankConfig.mode", self.mode, MODES)
        check_choice("LowRankConfig.residual_base", self.residual_base, RESIDUAL_BASES)
        check_choice("LowRankConfig.init", self.init, INITS)
        if not is_number(self.init_scale, 0.0) or self.init_scale > 1e3:
            fail("LowRankConfig.init_scale", self.init_scale, "give a number in (0, 1000] (larger overflows the factors)")
        check_size("LowRankConfig.rank", self.rank)
        check_size("LowRankConfig.capacity", self.capacity, allow_none=True)
        if (
            self.capacity is not None
            and type(self.capacity) is type(self.rank)
            and self.capacity < self.rank
        ):
            raise ValueError(
                f"LowRankConfig.capacity={self.capacity!r} is smaller than rank={self.rank!r}; capacity must be >= rank."
            )
        if self.alpha is not None and not is_number(self.alpha, 0.0):
            fail("LowRankConfig.alpha", self.alpha, "give a positive number or None")
        if not is_number(self.frobenius_decay, 0.0, inclusive=True):
            fail("LowRankConfig.frobenius_decay", self.frobenius_decay, "give a number >= 0")
        if self.precondition is not None and not isinstance(self.precondition, bool):
            fail("LowRankConfig.precondition", self.precondition, "give true, false or null (on wherever an optimizer is bound)")
        if not is_number(self.precondition_damping, 0.0, inclusive=True) or self.precondition_damping > 1.0:
            fail("LowRankConfig.precondition_damping", self.precondition_damping, "give a number in [0, 1], e.g. 1e-4")
        if self.rebalance_every is not None:
            check_int("LowRankConfig.rebalance_every", self.rebalance_every, 0)
        check_choice("LowRankConfig.rebalance_moments", self.rebalance_moments, REBALANCE_MOMENTS)
        if self.factor_weight_decay is not None:
            if not is_number(self.factor_weight_decay, 0.0, inclusive=True):
                fail("LowRankConfig.factor_weight_decay", self.factor_weight_decay, "give a number >= 0, or null for the optimizer's weight_decay")
            if self.frobenius_decay > 0:
                fail(
                    "LowRankConfig.factor_weight_decay", self.factor_weight_decay,
                    f"frobenius_decay={self.frobenius_decay} already replaces plain weight decay on the factors; set one of the two",
                )
        if not is_number(self.factor_lr_scale, 0.0):
            fail("LowRankConfig.factor_lr_scale", self.factor_lr_scale, "give a number > 0")
        if not (isinstance(self.strategy_args, dict) and all(isinstance(k, str) for k in self.strategy_args)):
            fail("LowRankConfig.strategy_args", self.strategy_args, "give a dict with str keys")
        if find_strategy(self.strategy) is not None or not self.rank_pattern:
            # validates the name, the keys and the values; a saved layout (rank_pattern) loads without its strategy,
            # which is checked when training needs it (loading never imports the module a file names)
            get_strategy(self.strategy).Args.from_dict(self.strategy_args)
            get_strategy(self.strategy).check_config(self)  # a mode it cannot start from, settings it ignores
        problem = _rank_pattern_problem(self.rank_pattern)
        if problem:
            raise ValueError(
                f"LowRankConfig.rank_pattern is not allowed: {problem}. It maps layer names to {{mode, rank, "
                "capacity, scaling}} and is written by save_pretrained; leave it empty for a new model."
            )
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            fail("LowRankConfig.base_model_name_or_path", self.base_model_name_or_path, "give a str or None")
        _check_version(self.hf_lowrank_version, "LowRankConfig.hf_lowrank_version")

    @property
    def parsed_strategy_args(self):
        """The strategy's typed settings (``strategy_args`` validated, defaults filled in)."""
        return get_strategy(self.strategy).Args.from_dict(self.strategy_args)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dict") -> "LowRankConfig":
        """Build from a dict, rejecting unknown keys with the list of known ones."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: holds a {type(data).__name__}, not a mapping of LowRankConfig fields; save the model again.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(unknown_fields_message(unknown, sorted(known), source))
        try:
            return cls(**data)
        except ValueError as e:
            if source == "dict":
                raise
            raise ValueError(f"{source}: {e}") from e  # name the file a bad value came from

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``lowrank_config.json`` into ``save_directory`` (atomically)."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_json(Path(save_directory) / CONFIG_NAME, self.to_dict())

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> "LowRankConfig":
        """Read ``lowrank_config.json`` from a folder, or from a Hub repo (downloaded on demand)."""
        path = resolve_file(path_or_repo_id, CONFIG_NAME, where="LowRankConfig.from_pretrained", **hub_kwargs)
        return cls.from_dict(read_json(path), source=str(path))

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload ``lowrank_config.json`` to a Hub repo through huggingface_hub's standard upload path."""
        return push_folder(repo_id, self.save_pretrained, **kwargs)


def _check_version(version: str, where: str) -> None:
    """Configs are readable across minor versions; another major version is refused."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ValueError(f"{where}={version!r} is not a version string like '0.1.0'.") from None
    if major != int(__version__.split(".")[0]):
        raise ValueError(
            f"{where}={version!r} was written by an incompatible hf_lowrank (this is {__version__}); "
            f"install hf-lowrank=={major}.* to read it."
        )
