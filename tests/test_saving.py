"""hf_lowrank/saving.py and loading.py: save_pretrained / from_pretrained as transformers and PEFT users expect:
every family and starting layout of tests/test_model.py saved and loaded, dtype, keyword checks,
sharding, adapter-only saves onto a base, transformers' loaders refusing a low-rank folder, and
checkpoints edited by hand or damaged."""

import json
import shutil

import pytest
import torch
import transformers
from conftest import GENERATIVE, build, logits, randomize_adapters, sample_ids
from safetensors.torch import load_file, save_file
from test_model import start

from hf_lowrank import LowRankConfig, LowRankModel, get_lowrank_model

ATOL = 1e-5
C_FC = "transformer.h.0.mlp.c_fc"


def residual(base=None, **settings):
    """A residual GPT-2 (rank 4 within capacity 8) with non-zero adapters."""
    config = LowRankConfig(mode="residual", rank=4, capacity=8, alpha=8.0, **settings)
    model = get_lowrank_model(base if base is not None else build("gpt2"), config).eval()
    randomize_adapters(model)
    return model


def floating_dtypes(model):
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


@pytest.fixture
def pretrained(tmp_path):
    """A tiny GPT-2 saved as a pretrained checkpoint, and the folder."""
    folder = tmp_path / "base"
    build("gpt2").save_pretrained(folder)
    return folder


# -- every family and start, saved and loaded -------------------------------------------------


@pytest.mark.parametrize("mode", ["factorized_cap", "residual", "mixed"])
@pytest.mark.parametrize("trim", [True, False])
def test_save_load_round_trip(family, mode, trim, tmp_path):
    model = start(family, mode)
    ids = sample_ids()
    reference = logits(model, ids)
    model.save_pretrained(tmp_path, trim=trim)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["config.json", "lowrank_config.json", "model.safetensors"] + (["generation_config.json"] if family in GENERATIVE else [])
    )
    saved = json.loads((tmp_path / "lowrank_config.json").read_text())["rank_pattern"]
    assert saved == model.rank_pattern(trim=trim)
    loaded = LowRankModel.from_pretrained(tmp_path)
    assert not loaded.training, "loaded for inference, as transformers' from_pretrained"
    torch.testing.assert_close(logits(loaded, ids), reference, atol=ATOL, rtol=0)
    assert loaded.rank_pattern() == model.rank_pattern(trim=trim)
    if trim:
        assert all(spec["capacity"] == spec["rank"] for spec in loaded.rank_pattern().values())
    elif mode != "mixed":
        assert all(spec["capacity"] == 8 for spec in loaded.rank_pattern().values())
    frozen = lambda m: sorted(n for n, p in m.named_parameters() if not p.requires_grad)  # noqa: E731
    assert frozen(loaded) == frozen(model), "residual bases and their biases stay frozen"


def test_save_round_trip_of_a_wrapped_checkpoint_twice(tmp_path):
    """Loading, saving again into the same folder and loading again changes nothing."""
    model = start("gpt2", "mixed")
    ids = sample_ids()
    reference = logits(model, ids)
    model.save_pretrained(tmp_path / "m", trim=False)
    (tmp_path / "m" / "trainer_state.json").write_text("{}")  # a file someone else wrote there survives
    LowRankModel.from_pretrained(tmp_path / "m").save_pretrained(tmp_path / "m", trim=False)
    assert (tmp_path / "m" / "trainer_state.json").is_file()
    torch.testing.assert_close(logits(LowRankModel.from_pretrained(tmp_path / "m"), ids), reference, atol=ATOL, rtol=0)


# -- from_pretrained arguments ----------------------------------------------------------------


def test_dtype_and_its_old_name_torch_dtype(tmp_path):
    model = residual()
    ids = sample_ids()
    model.save_pretrained(tmp_path)
    for kwargs, dtype in [({"dtype": torch.bfloat16}, torch.bfloat16), ({"dtype": "float16"}, torch.float16), ({"torch_dtype": torch.bfloat16}, torch.bfloat16)]:
        loaded = LowRankModel.from_pretrained(tmp_path, **kwargs)
        assert floating_dtypes(loaded) == {dtype}, kwargs
    loaded = LowRankModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    torch.testing.assert_close(logits(loaded, ids).float(), logits(model, ids), atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match=r"torch_dtype=torch\.float16 is not allowed; it is the old name of dtype"):
        LowRankModel.from_pretrained(tmp_path, dtype=torch.bfloat16, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"from_pretrained\.dtype=torch\.int8 is not allowed; give a floating torch dtype"):
        LowRankModel.from_pretrained(tmp_path, dtype=torch.int8)


def test_unknown_keyword_arguments_are_refused_by_name(tmp_path):
    residual().save_pretrained(tmp_path / "sub")
    allowed = "revision, cache_dir, token, force_download, local_files_only, subfolder"
    with pytest.raises(ValueError, match=rf"from_pretrained keyword argument\(s\)=\['revison'\] is not allowed; .*{allowed}"):
        LowRankModel.from_pretrained(tmp_path / "sub", revison="main")
    with pytest.raises(ValueError, match=r"\['low_cpu_mem_usage'\]"):
        LowRankModel.from_pretrained(tmp_path / "sub", low_cpu_mem_usage=True)
    assert LowRankModel.from_pretrained(tmp_path, subfolder="sub", local_files_only=True).lowrank_layers()


# -- sharding and serialization ---------------------------------------------------------------


def test_sharded_save_loads_and_is_laid_out_as_transformers_writes_it(tmp_path):
    model = residual()
    ids = sample_ids()
    folder = tmp_path / "m"
    model.save_pretrained(folder, max_shard_size="20KB", trim=False)  # as checkpoints are, so load_weights fits
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    held = {k for s in shards for k in load_file(folder / s)}
    assert held == set(index["weight_map"]) and index["metadata"]["total_size"] > 0
    torch.testing.assert_close(logits(LowRankModel.from_pretrained(folder), ids), logits(model, ids), atol=ATOL, rtol=0)
    model.load_weights(folder / "model.safetensors")  # the path a resuming trainer passes

    model.save_pretrained(folder)  # one file again: the old shards and index go
    assert sorted(p.name for p in folder.iterdir() if "safetensors" in p.name) == ["model.safetensors"]


def test_save_arguments_are_checked_before_writing(tmp_path):
    model = residual()
    with pytest.raises(ValueError, match=r"safe_serialization=False is not allowed; .*never pickles"):
        model.save_pretrained(tmp_path / "m", safe_serialization=False)
    with pytest.raises(ValueError, match=r"max_shard_size='20 parsecs' is not allowed; give a number of bytes or a size such as '5GB'"):
        model.save_pretrained(tmp_path / "m", max_shard_size="20 parsecs")
    with pytest.raises(ValueError, match=r"adapter_only='yes' is not allowed"):
        model.save_pretrained(tmp_path / "m", adapter_only="yes")
    assert not (tmp_path / "m").exists()


def test_a_damaged_shard_index_names_the_file(tmp_path):
    residual().save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][C_FC + ".A"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map names \['\.\./elsewhere\.safetensors'\]"):
        LowRankModel.from_pretrained(tmp_path)


# -- transformers' loaders --------------------------------------------------------------------


@pytest.mark.parametrize("auto", [transformers.AutoModelForCausalLM, transformers.AutoModel], ids=lambda a: a.__name__)
@pytest.mark.parametrize("adapter_only", [False, True])
def test_transformers_refuses_a_lowrank_folder(auto, adapter_only, tmp_path, pretrained):
    model = residual(transformers.AutoModelForCausalLM.from_pretrained(pretrained))
    model.save_pretrained(tmp_path / "m", adapter_only=adapter_only)
    with pytest.raises(ValueError, match=r"LowRankModel, whose low-rank layers transformers cannot load: .*LowRankModel\.from_pretrained\(folder\).*merge_and_unload"):
        auto.from_pretrained(tmp_path / "m")
    loaded = LowRankModel.from_pretrained(tmp_path / "m")
    assert "transformers_weights" not in loaded.config.to_dict()
    loaded.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert "transformers_weights" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert auto.from_pretrained(tmp_path / "merged") is not None  # merged, it is a plain checkpoint again


# -- adapter-only saves -----------------------------------------------------------------------


def test_adapter_only_save_loads_onto_its_base(tmp_path, pretrained):
    model = residual(transformers.AutoModelForCausalLM.from_pretrained(pretrained))
    ids = sample_ids()
    reference = logits(model, ids)
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "adapter", adapter_only=True)
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["config.json", "generation_config.json", "lowrank_adapter.safetensors", "lowrank_base.json", "lowrank_config.json"]
    saved = load_file(tmp_path / "adapter" / "lowrank_adapter.safetensors")
    assert {k.rpartition(".")[2] for k in saved} == {"A", "B"} and len(saved) == 2 * len(model.lowrank_layers())
    size = lambda p: p.stat().st_size  # noqa: E731
    assert size(tmp_path / "adapter" / "lowrank_adapter.safetensors") < size(tmp_path / "full" / "model.safetensors") / 5
    config = json.loads((tmp_path / "adapter" / "lowrank_config.json").read_text())
    assert config["base_model_name_or_path"] == str(pretrained) and config["rank_pattern"][C_FC]["rank"] == 4

    loaded = LowRankModel.from_pretrained(tmp_path / "adapter")  # the base comes from base_model_name_or_path
    torch.testing.assert_close(logits(loaded, ids), reference, atol=ATOL, rtol=0)
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(loaded) == trainable(model)
    given = LowRankModel.from_pretrained(tmp_path / "adapter", base_model=build("gpt2"))
    torch.testing.assert_close(logits(given, ids), reference, atol=ATOL, rtol=0)
    assert floating_dtypes(LowRankModel.from_pretrained(tmp_path / "adapter", dtype=torch.bfloat16)) == {torch.bfloat16}
    model.save_pretrained(tmp_path / "adapter")  # a full save over it replaces the adapter's files
    assert not any(p.name.startswith("lowrank_adapter") or p.name == "lowrank_base.json" for p in (tmp_path / "adapter").iterdir())


def test_adapter_only_save_records_a_relative_base_folder_so_it_loads_from_anywhere(tmp_path, pretrained, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = residual(transformers.AutoModelForCausalLM.from_pretrained("base"))  # typed relative, as a user does
    assert model.lowrank_config.base_model_name_or_path == "base"
    model.save_pretrained("adapter", adapter_only=True)
    config = json.loads((tmp_path / "adapter" / "lowrank_config.json").read_text())
    assert config["base_model_name_or_path"] == str(pretrained.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = LowRankModel.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, sample_ids()), logits(model, sample_ids()), atol=ATOL, rtol=0)
    pretrained.rename(tmp_path / "moved")  # the base is gone: the error says how to give it
    with pytest.raises(ValueError, match=r"base_model_name_or_path='.*base' is not a local folder; load the base yourself and pass it"):
        LowRankModel.from_pretrained(tmp_path / "adapter")


def test_adapter_only_save_carries_modules_to_save(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, pad_token_id=0, num_labels=3,
    )
    base = transformers.BertForSequenceClassification(config).eval()
    model = get_lowrank_model(base, LowRankConfig(mode="residual", rank=4)).eval()
    randomize_adapters(model)
    with torch.no_grad():
        model.base_model.classifier.weight.add_(0.5)  # the head trained
    ids = sample_ids()
    model.save_pretrained(tmp_path, adapter_only=True)
    saved = load_file(tmp_path / "lowrank_adapter.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(saved)
    assert not any(k.startswith("bert.embeddings") for k in saved)
    torch.manual_seed(0)
    fresh = transformers.BertForSequenceClassification(config).eval()
    loaded = LowRankModel.from_pretrained(tmp_path, base_model=fresh)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=ATOL, rtol=0)


def test_adapter_only_load_refuses_another_base(tmp_path, pretrained):
    model = residual(transformers.AutoModelForCausalLM.from_pretrained(pretrained))
    model.save_pretrained(tmp_path / "adapter", adapter_only=True)

    other = build("gpt2")
    with torch.no_grad():
        other.transformer.h[1].attn.c_proj.weight[0, 0] += 1e-3  # one weight of one layer differs
    before = logits(other, sample_ids())
    with pytest.raises(ValueError, match=r"lowrank_base\.json: the base model is not the one this adapter was trained on; .*layer 'transformer\.h\.1\.attn\.c_proj' \(frozen W0\)"):
        LowRankModel.from_pretrained(tmp_path / "adapter", base_model=other)
    assert type(other.transformer.h[0].attn.c_attn) is transformers.pytorch_utils.Conv1D  # the refused base is left as given
    assert all(p.requires_grad for p in other.parameters())
    torch.testing.assert_close(logits(other, sample_ids()), before, atol=0, rtol=0)
    other = build("gpt2")
    with torch.no_grad():
        other.transformer.ln_f.bias += 1e-3
    with pytest.raises(ValueError, match=r"'transformer\.ln_f\.bias'"):
        LowRankModel.from_pretrained(tmp_path / "adapter", base_model=other)
    with pytest.raises(ValueError, match=r"\(here bfloat16, saved in float32\)"):
        LowRankModel.from_pretrained(tmp_path / "adapter", base_model=build("gpt2").to(torch.bfloat16))
    wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32))
    with pytest.raises(ValueError, match=r"does not match the rank pattern .*shape mismatches"):
        LowRankModel.from_pretrained(tmp_path / "adapter", base_model=wider)
    with pytest.raises(ValueError, match=r"base_model is a BertForMaskedLM, but .*config\.json was saved from a GPT2LMHeadModel"):
        LowRankModel.from_pretrained(tmp_path / "adapter", base_model=build("bert"))
    model.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match=r"base_model= is for adapter-only saves"):
        LowRankModel.from_pretrained(tmp_path / "full", base_model=build("gpt2"))


def test_adapter_only_needs_a_known_base(tmp_path):
    model = residual()  # built from a config: no base_model_name_or_path
    model.save_pretrained(tmp_path / "a", adapter_only=True)
    with pytest.raises(ValueError, match=r"lowrank_config\.json: base_model_name_or_path is not recorded.*base_model=model"):
        LowRankModel.from_pretrained(tmp_path / "a")
    model.lowrank_config.base_model_name_or_path = "org/gpt2"
    model.save_pretrained(tmp_path / "b", adapter_only=True)
    with pytest.raises(ValueError, match=r"base_model_name_or_path='org/gpt2' is not a local folder"):
        LowRankModel.from_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match=r"residual_base='orthogonal' made the frozen W0"):
        residual(residual_base="orthogonal").save_pretrained(tmp_path / "c", adapter_only=True)


# -- checkpoints edited by hand ---------------------------------------------------------------


def edit_pattern(folder, layer, **values):
    path = folder / "lowrank_config.json"
    config = json.loads(path.read_text())
    config["rank_pattern"][layer].update(values)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("trim", [True, False])
def test_a_rank_shrunk_by_hand_is_refused(trim, tmp_path):
    """Shrinking a rank within the capacity keeps every shape; only B past the rank shows the edit."""
    residual().save_pretrained(tmp_path, trim=trim)
    edit_pattern(tmp_path, C_FC, rank=3)
    with pytest.raises(ValueError, match=rf"model\.safetensors: layer '{C_FC}' has non-zero B\[:, 3:\], past the rank 3 .*Restore the rank"):
        LowRankModel.from_pretrained(tmp_path)


def test_a_capacity_edited_below_the_rank_names_the_file_and_layer(tmp_path):
    residual().save_pretrained(tmp_path, trim=False)
    edit_pattern(tmp_path, C_FC, rank=17, capacity=16)
    with pytest.raises(ValueError, match=rf"lowrank_config\.json: rank_pattern\['{C_FC}'\] has rank=17, capacity=16, not allowed for this 128x32 layer"):
        LowRankModel.from_pretrained(tmp_path)


def test_malformed_aliases_metadata_names_the_file_and_field(tmp_path):
    residual().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": "{lm_head.weight: wte}"})
    with pytest.raises(ValueError, match=r"model\.safetensors: metadata field 'aliases' is not valid JSON"):
        LowRankModel.from_pretrained(tmp_path)
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": "[1, 2]"})
    with pytest.raises(ValueError, match=r"model\.safetensors: metadata field 'aliases' is not an object of tensor names"):
        LowRankModel.from_pretrained(tmp_path)


# -- corrupt checkpoints ----------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A saved factorized GPT-2 (Conv1D) and a function editing its lowrank_config.json."""
    folder = tmp_path / "ok"
    start("gpt2", "factorized_cap").save_pretrained(folder)
    path = folder / "lowrank_config.json"
    original = json.loads(path.read_text())

    def edit(change):
        config = json.loads(json.dumps(original))
        change(config)
        path.write_text(json.dumps(config))

    return folder, edit


def _set(config, layer, **values):
    config["rank_pattern"][layer].update(values)


def test_a_rank_pattern_that_disagrees_with_the_tensors(saved):
    folder, edit = saved
    edit(lambda c: _set(c, "transformer.h.0.mlp.c_fc", rank=3, capacity=3))
    with pytest.raises(ValueError, match=r"ok/model\.safetensors does not match the rank pattern.*c_fc\.A"):
        LowRankModel.from_pretrained(folder)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.update(hf_lowrank_version="9.0.0"), "incompatible hf_lowrank"),
        (lambda c: c.update(rank="big"), r"LowRankConfig\.rank="),
        (lambda c: c.update(colour="red"), r"unknown LowRankConfig field\(s\) \['colour'\]"),
        (lambda c: _set(c, "transformer.h.0.mlp.c_fc", mode="lowrank"), r"rank_pattern is not allowed.*mode 'lowrank'"),
        (lambda c: c["rank_pattern"].update({"transformer.h.9.mlp.c_fc": {"mode": "dense"}}), "another architecture"),
    ],
    ids=["version", "bad-field", "unknown-field", "unknown-mode", "unknown-layer"],
)
def test_a_bad_lowrank_config_names_the_file(saved, change, message):
    folder, edit = saved
    edit(change)
    with pytest.raises(ValueError, match=rf"ok/lowrank_config\.json.*{message}"):
        LowRankModel.from_pretrained(folder)


def test_an_unreadable_lowrank_config_names_the_file(saved):
    folder, _ = saved
    (folder / "lowrank_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ok/lowrank_config\.json: not valid JSON"):
        LowRankModel.from_pretrained(folder)


@pytest.mark.parametrize("missing", ["model.safetensors", "lowrank_config.json", "config.json"])
def test_a_missing_file_is_named(saved, missing):
    folder, _ = saved
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"ok/{missing}: missing"):
        LowRankModel.from_pretrained(folder)


@pytest.mark.parametrize("content", ["truncated", "garbage"])
def test_a_damaged_safetensors_file_names_the_file(saved, content):
    folder, _ = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "truncated" else b"not a safetensors file")
    with pytest.raises(ValueError, match=r"ok/model\.safetensors: not a readable safetensors file"):
        LowRankModel.from_pretrained(folder)


def test_weights_of_another_layout_are_refused(saved, tmp_path):
    """A dense checkpoint's tensors under a factorized rank pattern: missing and unexpected keys are listed."""
    folder, _ = saved
    other = tmp_path / "dense"
    start("gpt2", "dense").save_pretrained(other)
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['transformer\.h\.0\.attn\.c_attn\.A'.*unexpected \['transformer\.h\.0\.attn\.c_attn\.weight'"):
        LowRankModel.from_pretrained(folder)
