"""What a recipe's run is built from: the model, the tokenizer and data, the TrainingArguments.

Plain functions of :class:`~hf_lowrank.options.RecipeOptions`; :mod:`hf_lowrank.recipe` checks
the recipe with them before any data is read, then trains (:func:`~hf_lowrank.recipe.train_one`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME, LowRankConfig
from .files import TOKENIZER_MAIN_FILES
from .options import RecipeOptions


def is_lowrank_folder(path: str | None) -> bool:
    return bool(path) and (Path(path) / CONFIG_NAME).is_file()


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and Path(path).is_dir() and any(
        (Path(path) / name).is_file() for name in TOKENIZER_MAIN_FILES
    )


def load_pretrained(opts: RecipeOptions, num_labels: int | None = None):
    """The model of ``model_name_or_path``, with the head of ``opts.task``.

    A folder written by hf_lowrank (``lowrank_config.json``) is loaded as a LowRankModel and
    merged to a plain dense model first, so any low-rank config can be applied on top.
    """
    import transformers

    auto = transformers.AutoModelForSequenceClassification if opts.task == "classification" else transformers.AutoModelForCausalLM
    kwargs = {"num_labels": num_labels} if num_labels else {}
    if not is_lowrank_folder(opts.model_name_or_path):
        return auto.from_pretrained(opts.model_name_or_path, **kwargs)
    from .model import LowRankModel

    merged = LowRankModel.from_pretrained(opts.model_name_or_path).merge_and_unload()
    if opts.task == "clm" and merged.can_generate():
        return merged
    with tempfile.TemporaryDirectory(prefix="hf_lowrank_merged_") as tmp:
        merged.save_pretrained(tmp)
        return auto.from_pretrained(tmp, **kwargs)


def build_model(opts: RecipeOptions, tokenizer, num_labels: int | None = None):
    """A transformers model: loaded from ``model_name_or_path``, or built from the size options (seeded).

    ``tokenizer`` sizes the embeddings of a model built from scratch and gives its special
    tokens; None (the layout check of :func:`check`, before any tokenizer exists) builds it
    with ``vocab_size`` embeddings instead.
    """
    import transformers

    torch.manual_seed(opts.seed)
    if opts.model_name_or_path:
        model = load_pretrained(opts, num_labels)
        vocab = model.get_input_embeddings().num_embeddings
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"model_name_or_path={opts.model_name_or_path!r} has {vocab} token embeddings but the tokenizer has "
                f"{len(tokenizer)} tokens; save the tokenizer with the model (train_clm does) or lower vocab_size."
            )
    else:
        if tokenizer is None:
            vocab, special = opts.vocab_size, dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
        else:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            vocab = len(tokenizer)
            special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        if opts.architecture == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=vocab, n_positions=opts.block_size, n_embd=opts.n_embd, n_layer=opts.n_layer,
                n_head=opts.n_head, **special,
            )
            head = transformers.GPT2ForSequenceClassification if opts.task == "classification" else transformers.GPT2LMHeadModel
        else:
            config = transformers.LlamaConfig(
                vocab_size=vocab, hidden_size=opts.n_embd, intermediate_size=opts.n_embd * 4,
                num_hidden_layers=opts.n_layer, num_attention_heads=opts.n_head, num_key_value_heads=opts.n_head,
                max_position_embeddings=opts.block_size, tie_word_embeddings=True, **special,
            )
            head = transformers.LlamaForSequenceClassification if opts.task == "classification" else transformers.LlamaForCausalLM
        if num_labels:
            config.num_labels = num_labels
        model = head(config)
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification finds the last token by it
    return model


def _tokenizer_cache(opts: RecipeOptions, corpus_name: str) -> Path:
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


def dense_config(config: LowRankConfig) -> LowRankConfig:
    """The dense comparison's config: the same layers, mode 'dense', strategy 'fixed'."""
    return LowRankConfig(
        target_modules=config.target_modules, exclude_modules=config.exclude_modules, mode="dense", strategy="fixed"
    )


def training_arguments(opts: RecipeOptions, output_dir: str):
    """The ``transformers.TrainingArguments`` of a run of ``opts`` writing to ``output_dir``.

    The recipe's options first, then every field of ``opts.training`` (which replaces what
    the recipe derives, e.g. ``eval_strategy`` from ``eval_steps``).
    """
    import transformers

    return transformers.TrainingArguments(output_dir, **{**derived_arguments(opts), **opts.training})


def derived_arguments(opts: RecipeOptions) -> dict[str, Any]:
    """The TrainingArguments fields the recipe's own options set."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = opts.use_cpu or not torch.cuda.is_available()
    return dict(
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
