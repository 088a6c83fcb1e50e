"""The matrix: model families x starting modes x transitions; save/load; merge; parameter counts."""

import json

import pytest
import torch
import transformers
from conftest import FAMILIES, build, sample_ids

from hf_lowrank import LowRankConfig, LowRankLinear, LowRankModel, get_lowrank_model

ATOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_adapters(model):
    """Give residual adapters non-zero active factors so transitions have something to preserve."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.lowrank_layers().values():
            if layer.mode == "residual":
                layer.B[:, : layer.rank] = torch.randn(layer.out_features, layer.rank, generator=g) * 0.05


def start(family: str, mode: str) -> LowRankModel:
    """A wrapped tiny model whose layers start in ``mode`` (factorized: rank 4 within capacity 8)."""
    config = {
        "dense": LowRankConfig(mode="dense"),
        "factorized": LowRankConfig(mode="factorized", rank=4, capacity=8),
        "residual": LowRankConfig(mode="residual", rank=4, capacity=8, alpha=8.0),
    }[mode]
    model = get_lowrank_model(build(family), config).eval()
    randomize_adapters(model)
    return model


EXACT = {
    "dense": ["to_factorized_full", "to_residual"],
    "factorized": ["grow", "to_dense", "to_residual", "to_factorized_same"],
    "residual": ["grow", "to_dense", "to_factorized_full"],
}
CASES = [(mode, t) for mode, ts in EXACT.items() for t in ts]


def transition(layer: LowRankLinear, name: str) -> None:
    if name == "to_factorized_full":
        layer.to_factorized(layer.full_rank)
    elif name == "to_factorized_same":
        layer.to_factorized(layer.rank, capacity=layer.capacity)
    elif name == "to_residual":
        layer.to_residual(4, 8, alpha=8.0)
    elif name == "grow":
        layer.grow(layer.capacity)
    else:
        getattr(layer, name)()


@pytest.mark.parametrize("mode,name", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_exact_transitions_keep_the_function(family, mode, name):
    model = start(family, mode)
    ids = sample_ids()
    reference = logits(model, ids)
    for layer in model.lowrank_layers().values():
        transition(layer, name)
    torch.testing.assert_close(logits(model, ids), reference, atol=ATOL, rtol=0)


def test_truncate_is_best_approximation(family):
    model = start(family, "factorized")
    layer = next(iter(model.lowrank_layers().values()))
    before = layer.dense_weight()
    layer.truncate(2)
    s = torch.linalg.svdvals(before)
    err = torch.linalg.matrix_norm(layer.dense_weight() - before)
    assert err == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-4, abs=1e-6)
    assert layer.capacity == layer.rank == 2


@pytest.mark.parametrize("mode", sorted(EXACT))
@pytest.mark.parametrize("trim", [True, False])
def test_save_load_round_trip(family, mode, trim, tmp_path):
    model = start(family, mode)
    ids = sample_ids()
    reference = logits(model, ids)
    model.save_pretrained(tmp_path, trim=trim)
    saved = json.loads((tmp_path / "lowrank_config.json").read_text())["rank_pattern"]
    assert saved == model.rank_pattern(trim=trim)
    loaded = LowRankModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), reference, atol=ATOL, rtol=0)
    assert loaded.rank_pattern() == model.rank_pattern(trim=trim)


@pytest.mark.parametrize("mode", sorted(EXACT))
def test_merge_and_unload(family, mode, tmp_path):
    model = start(family, mode)
    ids = sample_ids()
    reference = logits(model, ids)
    types = {type(m) for m in build(family).modules()}
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LowRankLinear) for m in merged.modules())
    assert {type(m) for m in merged.modules()} == types
    torch.testing.assert_close(logits(merged, ids), reference, atol=ATOL, rtol=0)
    merged.save_pretrained(tmp_path)
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    torch.testing.assert_close(logits(auto.from_pretrained(tmp_path).eval(), ids), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", sorted(EXACT))
def test_parameter_counts_follow_the_formula(family, mode):
    plain = build(family)
    model = start(family, mode)
    unique = {id(p): p for p in plain.parameters()}
    untouched = sum(p.numel() for p in unique.values())
    expected_total = expected_trainable = 0
    for name, layer in model.lowrank_layers().items():
        original = plain.get_submodule(name)
        untouched -= original.weight.numel() + (original.bias.numel() if original.bias is not None else 0)
        bias = original.bias.numel() if original.bias is not None else 0
        i, o = layer.in_features, layer.out_features
        if mode == "dense":
            expected_total += o * i + bias
            expected_trainable += o * i + bias
        else:
            expected_total += 8 * (i + o) + bias + (o * i if mode == "residual" else 0)
            expected_trainable += 8 * (i + o) + (bias if mode == "factorized" else 0)
    counts = model.parameter_counts()
    assert counts["total"] == untouched + expected_total
    assert counts["trainable"] == untouched + expected_trainable


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if f != "bert"])  # BERT's MLM head does not generate
def test_generate_without_merging(family):
    model = start(family, "residual")
    ids = sample_ids(1, 4)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs)
    assert out.shape == (1, 9)
    torch.testing.assert_close(model.merge_and_unload().generate(ids, **kwargs), out)


def test_target_matching():
    names = lambda cfg: sorted(get_lowrank_model(build("gpt2"), cfg).lowrank_layers())  # noqa: E731
    assert names(LowRankConfig(target_modules=["c_fc"])) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert names(LowRankConfig(target_modules=r".*\.1\.mlp\.c_proj")) == ["transformer.h.1.mlp.c_proj"]
    everything = names(LowRankConfig(target_modules="all-linear"))
    assert len(everything) == 8 and "lm_head" not in everything
    assert "transformer.h.0.attn.c_attn" not in names(LowRankConfig(exclude_modules=["c_attn"]))
    with pytest.raises(ValueError, match="target_modules.*matches no"):
        names(LowRankConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="tied weights"):
        names(LowRankConfig(target_modules=["lm_head"]))


def test_all_linear_skips_classification_head():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_labels=3)
    model = get_lowrank_model(transformers.BertForSequenceClassification(cfg), LowRankConfig(target_modules="all-linear"))
    assert not any(n.startswith("classifier") for n in model.lowrank_layers())


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match="rank=64 is larger than"):
        get_lowrank_model(build("gpt2"), LowRankConfig(rank=64))


def test_wraps_from_pretrained_model_exactly(tmp_path):
    build("llama").save_pretrained(tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = sample_ids()
    reference = logits(base, ids)
    model = get_lowrank_model(base, LowRankConfig(mode="residual", rank=4))
    torch.testing.assert_close(logits(model, ids), reference, atol=0, rtol=0)
    assert model.lowrank_config.base_model_name_or_path == str(tmp_path)


def test_corrupt_checkpoints_fail_clearly(tmp_path):
    model = start("gpt2", "factorized")
    model.save_pretrained(tmp_path / "ok")
    config_path = tmp_path / "ok" / "lowrank_config.json"
    config = json.loads(config_path.read_text())
    # the rank pattern disagrees with the tensors
    config["rank_pattern"]["transformer.h.0.mlp.c_fc"]["rank"] = 3
    config["rank_pattern"]["transformer.h.0.mlp.c_fc"]["capacity"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the rank pattern.*c_fc"):
        LowRankModel.from_pretrained(tmp_path / "ok")
    config["hf_lowrank_version"] = "9.0.0"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="incompatible hf_lowrank"):
        LowRankModel.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LowRankModel.from_pretrained(tmp_path / "ok")


def test_families_cover_the_issue():
    assert set(FAMILIES) == {"gpt2", "llama", "bert", "opt", "gpt_neox"}
