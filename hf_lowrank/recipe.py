"""The training run behind ``recipes/`` and ``hf-lowrank train``: options, model, data, result."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from .config import LowRankConfig
from .files import write_json

TASKS = ("clm", "classification")
ARCHITECTURES = ("gpt2", "llama")


@dataclass
class RecipeOptions:
    """One training run. Every field can be set in the YAML file or as ``--name value``."""

    task: str = field(default="clm", metadata={"help": "'clm' (causal language model) or 'classification' (Wikipedia topics)."})
    model_name_or_path: Union[str, None] = field(
        default=None, metadata={"help": "Local folder of a saved transformers model to start from; None builds one from the sizes below."}
    )
    architecture: str = field(default="gpt2", metadata={"help": "Model family built from scratch: 'gpt2' or 'llama'."})
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks (from scratch)."})
    n_embd: int = field(default=256, metadata={"help": "Hidden size (from scratch)."})
    n_head: int = field(default=4, metadata={"help": "Attention heads (from scratch)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    vocab_size: int = field(default=4096, metadata={"help": "Byte-level BPE vocabulary trained on the train split."})
    dataset: str = field(default="sotu", metadata={"help": "'sotu', 'wiki', 'synthetic' (tests), 'text'/'json' with data_files, or a datasets name."})
    data_files: Union[list[str], str, None] = field(default=None, metadata={"help": "Local files for dataset 'text' or 'json'."})
    max_train_tokens: Union[int, None] = field(default=None, metadata={"help": "Cap on training tokens (None: all)."})
    max_eval_tokens: Union[int, None] = field(default=131072, metadata={"help": "Cap on validation tokens."})
    num_labels: Union[int, None] = field(default=6, metadata={"help": "Classification: keep the most frequent topics."})
    max_examples: Union[int, None] = field(default=None, metadata={"help": "Classification: cap on examples."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Sequences per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "A transformers scheduler name."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CPU or GPU); SVDs stay float32."})
    fp16: bool = field(default=False, metadata={"help": "fp16 with a gradient scaler (GPU only)."})
    seed: int = field(default=0, metadata={"help": "Seed for model init and data order."})
    eval_steps: Union[int, None] = field(default=None, metadata={"help": "Evaluate every N steps (None: at the end only)."})
    save_steps: Union[int, None] = field(default=None, metadata={"help": "Checkpoint every N steps (None: no checkpoints)."})
    logging_steps: int = field(default=25, metadata={"help": "Log loss and ranks every N steps."})
    output_dir: str = field(default="runs/lowrank", metadata={"help": "Where checkpoints, the final model and results.json go."})
    report_to: Union[list[str], str] = field(default="none", metadata={"help": "Trainer integrations, e.g. tensorboard."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present (needed for gloo DDP on CPU)."})
    lowrank: dict[str, Any] = field(default_factory=dict, metadata={"help": "LowRankConfig fields (strategy, strategy_args, rank, ...)."})
    compare_full_rank: bool = field(default=False, metadata={"help": "Also train the same model dense and print both side by side."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is not allowed; choose one of {TASKS}.")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} is not allowed; choose one of {ARCHITECTURES}.")
        for name in ("n_layer", "n_embd", "n_head", "block_size", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name}={value!r} is not allowed; give an int >= 1.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick sizes that divide.")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate!r} is not allowed; give a number > 0.")
        LowRankConfig.from_dict(self.lowrank, source="lowrank")  # validate now, not after data loading

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "RecipeOptions":
        """Read a YAML config, apply ``overrides`` (dotted keys reach into ``lowrank``), validate."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of options at the top level.")
        for key, value in (overrides or {}).items():
            target, *rest = key.split(".")
            if rest:
                node = data.setdefault(target, {})
                for part in rest[:-1]:
                    node = node.setdefault(part, {})
                node[rest[-1]] = value
            else:
                data[target] = value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown option(s) {unknown}; known options are {sorted(known)}.")
        return cls(**data)


def build_model(opts: RecipeOptions, vocab_size: int, num_labels: int | None = None):
    """A transformers model: loaded from ``model_name_or_path``, or built from the size options."""
    import transformers

    torch.manual_seed(opts.seed)
    if opts.model_name_or_path:
        auto = transformers.AutoModelForSequenceClassification if opts.task == "classification" else transformers.AutoModelForCausalLM
        kwargs = {"num_labels": num_labels} if num_labels else {}
        return auto.from_pretrained(opts.model_name_or_path, **kwargs)
    if opts.architecture == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=opts.block_size, n_embd=opts.n_embd, n_layer=opts.n_layer,
            n_head=opts.n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        head = transformers.GPT2ForSequenceClassification if opts.task == "classification" else transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=opts.n_embd, intermediate_size=opts.n_embd * 4, num_hidden_layers=opts.n_layer,
            num_attention_heads=opts.n_head, num_key_value_heads=opts.n_head, max_position_embeddings=opts.block_size,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True,
        )
        head = transformers.LlamaForSequenceClassification if opts.task == "classification" else transformers.LlamaForCausalLM
    if num_labels:
        config.num_labels = num_labels
    return head(config)


def load_data(opts: RecipeOptions):
    """``(tokenizer, datasets, label names or None)`` for the options' task and corpus."""
    from .data import build_classification_datasets, build_lm_datasets, get_tokenizer, load_text_corpus

    corpus = load_text_corpus(opts.dataset if opts.task == "clm" else "wiki", seed=opts.seed, data_files=opts.data_files)
    cache = Path(os.environ.get("HF_LOWRANK_CACHE", Path.home() / ".cache" / "hf_lowrank")) / "tokenizers" / f"{opts.dataset}-{opts.vocab_size}"
    tokenizer = get_tokenizer(corpus, opts.vocab_size, cache_dir=cache)
    if opts.task == "clm":
        return tokenizer, build_lm_datasets(corpus, tokenizer, opts.block_size, opts.max_train_tokens, opts.max_eval_tokens), None
    data, labels = build_classification_datasets(tokenizer, opts.block_size, opts.num_labels, seed=opts.seed, max_examples=opts.max_examples)
    return tokenizer, data, labels


def train_one(
    opts: RecipeOptions, lowrank: dict[str, Any], output_dir: str, tokenizer, data, labels, callbacks: tuple = ()
) -> dict[str, Any]:
    """Train one model with ``lowrank`` settings and return its result dict (also ``result["trainer"]``)."""
    import transformers

    from .metrics import load_metric, perplexity
    from .model import get_lowrank_model
    from .trainer import LowRankTrainer

    model = get_lowrank_model(build_model(opts, len(tokenizer), len(labels) if labels else None), LowRankConfig.from_dict(lowrank))
    args = transformers.TrainingArguments(
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
        logging_steps=opts.logging_steps,
        report_to=opts.report_to,
        use_cpu=opts.use_cpu,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
    )
    compute_metrics = None
    if opts.task == "classification":
        accuracy, f1 = load_metric("accuracy"), load_metric("f1")

        def compute_metrics(pred):
            predictions = pred.predictions.argmax(-1)
            return {
                **accuracy.compute(predictions=predictions, references=pred.label_ids),
                **f1.compute(predictions=predictions, references=pred.label_ids),
            }

    trainer = LowRankTrainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=list(callbacks),
    )
    start = time.perf_counter()
    train_out = trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(output_dir, "final"))
    counts = model.parameter_counts()
    tokens = opts.max_steps * opts.per_device_train_batch_size * opts.gradient_accumulation_steps * opts.block_size * args.world_size
    result = {
        "strategy": model.lowrank_config.strategy,
        "eval_loss": metrics["eval_loss"],
        "train_loss": train_out.training_loss,
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "rank_fraction": model.rank_fraction(),
        "tokens_per_second": tokens / train_seconds,
        "train_seconds": train_seconds,
        "decision_seconds": trainer.decision_seconds,
        "ranks": {r["layer"]: r["rank"] for r in model.layer_report()},
        "summary": model.summary(),
    }
    if opts.task == "clm":
        result["perplexity"] = perplexity(metrics["eval_loss"])
    else:
        result.update(accuracy=metrics["eval_accuracy"], f1=metrics["eval_f1"])
    result["trainer"] = trainer
    return result


def run(opts: RecipeOptions) -> dict[str, Any]:
    """Train (and optionally the dense comparison), print the result block, write ``results.json``."""
    tokenizer, data, labels = load_data(opts)
    results = {"lowrank": train_one(opts, opts.lowrank, opts.output_dir, tokenizer, data, labels)}
    if opts.compare_full_rank:
        dense = {k: v for k, v in opts.lowrank.items() if k in ("target_modules", "exclude_modules")}
        dense.update(mode="dense", strategy="fixed")
        results["full_rank"] = train_one(opts, dense, os.path.join(opts.output_dir, "full_rank"), tokenizer, data, labels)
    for result in results.values():
        result.pop("trainer")
    results["options"] = dataclasses.asdict(opts)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(Path(opts.output_dir) / "results.json", results)
        print(format_results(results))
    return results


def format_results(results: dict[str, Any]) -> str:
    """The result block printed at the end of a run."""
    low, full = results["lowrank"], results.get("full_rank")
    quality = "perplexity" if "perplexity" in low else "accuracy"
    lines = ["", low["summary"], "", f"{'':<22}{'low-rank':>14}" + (f"{'full rank':>14}{'ratio':>10}" if full else "")]
    rows = [
        (f"eval {quality}", quality, "{:.3f}"),
        ("eval loss", "eval_loss", "{:.4f}"),
        ("trainable params", "trainable_params", "{:,}"),
        ("total params", "total_params", "{:,}"),
        ("tokens / s", "tokens_per_second", "{:,.0f}"),
        ("rank decisions (s)", "decision_seconds", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        line = f"{label:<22}{fmt.format(low[key]):>14}"
        if full:
            ratio = low[key] / full[key] if full[key] else math.nan
            line += f"{fmt.format(full[key]):>14}{ratio:>10.3f}"
        lines.append(line)
    lines.append(f"final ranks ({low['strategy']}): " + ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in low["ranks"].items()))
    return "\n".join(lines)
