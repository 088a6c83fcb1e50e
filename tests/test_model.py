"""The matrix: model families x starting modes x transitions; merge; parameter counts; targets.

Saving and loading these starts, and damaged saved folders: tests/test_saving.py.
"""

import pytest
import torch
import transformers
from conftest import AUTO_CLASSES, FAMILIES, GENERATIVE, build, logits, randomize_adapters, sample_ids

from hf_lowrank import LowRankConfig, LowRankLinear, LowRankModel, get_lowrank_model

ATOL = 1e-5

# -- starting points --------------------------------------------------------------------------
#
# dense:          every target layer wrapped, still dense (the plain model's function)
# factorized:     dense layers split by SVD at full rank, to_factorized (the plain model's function)
# factorized_cap: factorized from the config, Kaiming factors at rank 4 within capacity 8
# residual:       W0 = the model's weight, adapters at rank 4 within capacity 8, s = 2, B randomised
# mixed:          the layers cycle through dense, factorized at full rank, rank 4 of 8, and residual

STARTS = ["dense", "factorized", "factorized_cap", "residual", "mixed"]


def start(family: str, mode: str) -> LowRankModel:
    """A wrapped tiny model of ``family`` whose layers start as ``mode`` describes."""
    config = {
        "factorized_cap": LowRankConfig(mode="factorized", rank=4, capacity=8),
        "residual": LowRankConfig(mode="residual", rank=4, capacity=8, alpha=8.0),
    }.get(mode, LowRankConfig(mode="dense"))
    model = get_lowrank_model(build(family), config).eval()
    layers = list(model.lowrank_layers().values())
    if mode == "factorized":
        for layer in layers:
            layer.to_factorized(layer.full_rank)
    elif mode == "mixed":
        for i, layer in enumerate(layers):
            if i % 4 == 1:
                layer.to_factorized(layer.full_rank)
            elif i % 4 == 2:
                layer.to_factorized(4, 8)
            elif i % 4 == 3:
                layer.to_residual(4, 8, alpha=8.0)
        assert {layer.mode for layer in layers} == {"dense", "factorized", "residual"}
    randomize_adapters(model)
    return model


def test_starts_keep_the_plain_function(family):
    """Wrapping (dense, residual with B = 0) and the SVD split at full rank change nothing."""
    ids = sample_ids()
    reference = logits(build(family), ids)
    for mode in ("dense", "factorized"):
        torch.testing.assert_close(logits(start(family, mode), ids), reference, atol=ATOL, rtol=0)
    fresh = get_lowrank_model(build(family), LowRankConfig(mode="residual", rank=4)).eval()
    torch.testing.assert_close(logits(fresh, ids), reference, atol=ATOL, rtol=0)


# -- exact transitions ------------------------------------------------------------------------


def transition(layer: LowRankLinear, name: str) -> None:
    if name == "to_factorized_full":
        layer.to_factorized(layer.full_rank)
    elif name == "to_factorized_same":  # re-split at the current rank, which covers B A's spectrum
        layer.to_factorized(layer.rank, capacity=layer.capacity)
    elif name == "truncate_same":
        layer.truncate(layer.rank, capacity=layer.capacity)
    elif name == "to_residual":
        layer.to_residual(min(4, layer.full_rank), min(8, layer.full_rank), alpha=8.0)
    elif name == "grow":
        layer.grow(layer.capacity)
    else:
        getattr(layer, name)()


EXACT = {
    "dense": ["to_factorized_full", "to_residual", "to_dense"],
    "factorized": ["to_dense", "to_residual", "to_factorized_same", "truncate_same", "grow"],
    "factorized_cap": ["grow", "to_dense", "to_residual", "to_factorized_same", "truncate_same", "to_factorized_full"],
    "residual": ["grow", "to_dense", "to_residual", "to_factorized_full", "truncate_same"],
}
CASES = [(mode, t) for mode, ts in EXACT.items() for t in ts]


@pytest.mark.parametrize("mode,name", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_exact_transitions_keep_the_function(family, mode, name):
    model = start(family, mode)
    ids = sample_ids()
    reference = logits(model, ids)
    for layer in model.lowrank_layers().values():
        transition(layer, name)
    torch.testing.assert_close(logits(model, ids), reference, atol=ATOL, rtol=0)


CHAIN = ["to_factorized_full", "to_residual", "grow", "to_dense", "to_residual", "truncate_same", "to_factorized_full", "to_dense"]


def test_chain_of_transitions_keeps_the_function(family):
    """One model through every kind of exact move in turn, checked after each; adapters made non-zero on the way."""
    model = start(family, "dense")
    ids = sample_ids()
    reference = logits(build(family), ids)
    for name in CHAIN:
        for layer in model.lowrank_layers().values():
            transition(layer, name)
        torch.testing.assert_close(logits(model, ids), reference, atol=ATOL, rtol=0, msg=lambda m: f"after {name}: {m}")
        if name == "to_residual":
            randomize_adapters(model)
            reference = logits(model, ids)
    assert all(layer.mode == "dense" for layer in model.lowrank_layers().values())


def test_truncate_is_the_best_approximation(family):
    model = start(family, "factorized")
    for layer in list(model.lowrank_layers().values())[:3]:
        before = layer.dense_weight()
        layer.truncate(2)
        s = torch.linalg.svdvals(before)
        err = torch.linalg.matrix_norm(layer.dense_weight() - before)
        assert float(err) == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-4, abs=1e-6)
        assert layer.capacity == layer.rank == 2


# -- merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "factorized_cap", "residual", "mixed"])
def test_merge_and_unload(family, mode, tmp_path):
    model = start(family, mode)
    plain = build(family)
    ids = sample_ids()
    reference = logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged) is type(plain)
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    assert [(n, type(m)) for n, m in merged.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits(merged, ids), reference, atol=ATOL, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = AUTO_CLASSES[family].from_pretrained(tmp_path)
    assert type(reloaded) is type(plain)
    torch.testing.assert_close(logits(reloaded, ids), reference, atol=ATOL, rtol=0)


def test_merge_of_a_reloaded_model(family, tmp_path):
    model = start(family, "residual")
    ids = sample_ids()
    reference = logits(model, ids)
    model.save_pretrained(tmp_path)
    merged = LowRankModel.from_pretrained(tmp_path).merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), reference, atol=ATOL, rtol=0)


# -- parameter counts -------------------------------------------------------------------------


def layer_formula(layer: LowRankLinear, bias: int) -> tuple[int, int]:
    """(trainable, total) of one layer from its mode and sizes."""
    i, o = layer.in_features, layer.out_features
    if layer.mode == "dense":
        return o * i + bias, o * i + bias
    factors = layer.capacity * (i + o)
    if layer.mode == "factorized":
        return factors + bias, factors + bias
    return factors, factors + o * i + bias


@pytest.mark.parametrize("mode", ["dense", "factorized", "factorized_cap", "residual", "mixed"])
def test_parameter_counts_follow_the_formula(family, mode):
    plain = build(family)
    model = start(family, mode)
    untouched = sum(p.numel() for p in {id(p): p for p in plain.parameters()}.values())
    expected_trainable = expected_total = spare = 0
    for name, layer in model.lowrank_layers().items():
        original = plain.get_submodule(name)
        bias = 0 if original.bias is None else original.bias.numel()
        untouched -= original.weight.numel() + bias
        trainable, total = layer_formula(layer, bias)
        expected_trainable += trainable
        expected_total += total
        if layer.mode != "dense":  # components allocated beyond the active rank
            spare += (layer.capacity - layer.rank) * (layer.in_features + layer.out_features)
    # Residual mode over the model's weights is fine-tuning: everything but the adapters is frozen.
    frozen = mode == "residual"
    trainable = (0 if frozen else untouched) + expected_trainable
    assert model.parameter_counts() == {
        "trainable": trainable, "total": untouched + expected_total, "active": trainable - spare, "capacity": spare,
    }
    assert (spare > 0) == (mode in ("factorized_cap", "residual", "mixed")), "rank 4 within capacity 8 leaves room to grow"
    if mode == "factorized_cap":  # concretely: every layer holds 8 * (in + out) + bias
        assert all(layer.capacity == 8 for layer in model.lowrank_layers().values())
    report = model.layer_report()
    assert [r["layer"] for r in report] == list(model.lowrank_layers())
    assert "trainable params" in model.summary()


# -- target matching --------------------------------------------------------------------------


def names(family: str, config: LowRankConfig) -> list[str]:
    return sorted(get_lowrank_model(build(family), config).lowrank_layers())


def test_targets_by_suffix_list_and_regex():
    assert names("gpt2", LowRankConfig(target_modules=["c_fc"])) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert names("gpt2", LowRankConfig(target_modules=["mlp.c_proj"])) == [
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
    ], "a dotted suffix: attention's c_proj is not an mlp.c_proj"
    assert names("gpt2", LowRankConfig(target_modules=r".*\.1\.mlp\.c_proj")) == ["transformer.h.1.mlp.c_proj"]
    assert names("llama", LowRankConfig(target_modules=["q_proj", "v_proj"])) == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]


@pytest.mark.parametrize(
    "family,expected",
    [("gpt2", 8), ("llama", 14), ("bert", 13), ("opt", 12), ("gpt_neox", 8)],
)
def test_all_linear_takes_every_linear_but_the_output_embedding(family, expected):
    chosen = names(family, LowRankConfig(target_modules="all-linear"))
    plain = build(family)
    head = plain.get_output_embeddings()
    head_name = next(n for n, m in plain.named_modules() if m is head)
    assert head_name not in chosen
    assert len(chosen) == expected
    linear = [n for n, m in plain.named_modules() if isinstance(m, (torch.nn.Linear, transformers.pytorch_utils.Conv1D))]
    assert sorted(set(linear) - set(chosen)) == [head_name]


def test_all_linear_skips_classification_heads():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_labels=3)
    model = get_lowrank_model(transformers.BertForSequenceClassification(cfg), LowRankConfig(target_modules="all-linear"))
    chosen = model.lowrank_layers()
    assert not any(n.startswith("classifier") for n in chosen) and "bert.pooler.dense" in chosen
    torch.manual_seed(0)
    gcfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=32, num_labels=2, pad_token_id=0)
    gpt = get_lowrank_model(transformers.GPT2ForSequenceClassification(gcfg), LowRankConfig(target_modules="all-linear"))
    assert "score" not in gpt.lowrank_layers() and len(gpt.lowrank_layers()) == 4


def test_exclude_modules():
    everything = names("gpt2", LowRankConfig())
    without = names("gpt2", LowRankConfig(exclude_modules=["c_attn"]))
    assert sorted(set(everything) - set(without)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    regex = names("gpt2", LowRankConfig(target_modules=["c_fc", "c_proj"], exclude_modules=r".*attn.*"))
    assert regex == [f"transformer.h.{i}.mlp.{p}" for i in (0, 1) for p in ("c_fc", "c_proj")]


def test_a_tied_output_embedding_is_refused_and_an_untied_one_wrapped(family):
    plain = build(family)
    head = plain.get_output_embeddings()
    head_name = next(n for n, m in plain.named_modules() if m is head)
    tied = head.weight is plain.get_input_embeddings().weight
    assert tied == (family in ("gpt2", "bert", "opt")), "the tiny configs cover both cases"
    config = LowRankConfig(target_modules=[head_name], rank=4)
    if tied:
        with pytest.raises(ValueError, match=rf"{head_name}.*tied weights.*exclude_modules"):
            names(family, config)
    else:
        assert names(family, config) == [head_name]


def test_fraction_ranks_resolve_per_layer():
    model = get_lowrank_model(build("gpt2"), LowRankConfig(rank=0.25, capacity=0.5))
    for layer in model.lowrank_layers().values():
        assert layer.rank == round(0.25 * layer.full_rank) and layer.capacity == round(0.5 * layer.full_rank)


def test_wrapping_twice_is_refused():
    model = get_lowrank_model(build("gpt2"))
    with pytest.raises(ValueError, match="already a LowRankModel"):
        get_lowrank_model(model)


# -- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", GENERATIVE)
def test_generate_without_merging(family):
    model = start(family, "residual")
    ids = sample_ids(1, 4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], ids)
    torch.testing.assert_close(model.merge_and_unload().generate(ids, **kwargs), out, atol=0, rtol=0)


# -- wrapping a model loaded from disk --------------------------------------------------------


def test_wraps_a_from_pretrained_model_exactly(family, tmp_path):
    build(family).save_pretrained(tmp_path)
    base = AUTO_CLASSES[family].from_pretrained(tmp_path)
    ids = sample_ids()
    reference = logits(base, ids)
    model = get_lowrank_model(base, LowRankConfig(mode="residual", rank=4))
    torch.testing.assert_close(logits(model, ids), reference, atol=0, rtol=0)
    assert model.lowrank_config.base_model_name_or_path == str(tmp_path)
    assert all(layer.mode == "residual" for layer in model.lowrank_layers().values())


def test_families_cover_the_issue():
    assert set(FAMILIES) == {"gpt2", "llama", "bert", "opt", "gpt_neox"}
