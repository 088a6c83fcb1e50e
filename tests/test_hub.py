"""The Hub (upload and download intercepted, nothing reaches the network), the model card, PEFT export and import."""

import fnmatch
import json
import math
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
import yaml
from conftest import build, logits, randomize_adapters, sample_ids
from safetensors.torch import load_file, save_file

from hf_lowrank import LowRankConfig, LowRankModel, get_lowrank_model
from hf_lowrank.card import card_parameter_counts, model_card
from hf_lowrank.peft_interop import export_base_model, export_peft_adapter, import_peft_adapter

ATOL = 1e-5
MODEL_FILES = ["README.md", "config.json", "generation_config.json", "lowrank_config.json", "model.safetensors"]


class FakeHub:
    """Repos as ``{repo_id: {path: bytes}}`` behind the huggingface_hub calls hf_lowrank makes."""

    def __init__(self, root: Path):
        self.root, self.repos, self.commits, self.patterns = root, {}, [], []

    def create_repo(self, api, repo_id, **kw):
        self.repos.setdefault(repo_id, {})
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, repo_id, folder_path, commit_message, **kw):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        self.commits.append((repo_id, commit_message, sorted(files)))
        self.repos[repo_id].update(files)
        return "commit-info"

    def snapshot_download(self, repo_id, allow_patterns=None, **kw):
        if repo_id not in self.repos:
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id} is not cached")
        self.patterns.append(allow_patterns)
        folder = self.root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / f"rev{len(self.patterns)}"
        for name, data in self.repos[repo_id].items():
            if allow_patterns is None or any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def hf_hub_download(self, repo_id, filename, **kw):
        folder = Path(self.snapshot_download(repo_id, allow_patterns=[filename]))
        if not (folder / filename).is_file():
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id}/{filename} is not cached")
        return str(folder / filename)

    def add_folder(self, repo_id: str, folder: Path) -> None:
        self.repos[repo_id] = {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: fake.upload_folder(api, **kw))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    return fake


def residual_model(family="gpt2"):
    """Residual adapters (rank 4 within capacity 8, s = 2) with non-zero active factors."""
    model = get_lowrank_model(build(family), LowRankConfig(mode="residual", rank=4, capacity=8, alpha=8.0)).eval()
    randomize_adapters(model)
    return model


def card_header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


# -- push and the model card ------------------------------------------------------------------


def test_push_uploads_exactly_the_model_files_in_one_commit(hub):
    model = residual_model()
    model.push_to_hub("user/tiny", metrics={"eval_loss": 3.2, "perplexity": 24.53, "steps": 100})
    assert hub.commits == [("user/tiny", "Upload with hf_lowrank", MODEL_FILES)]
    files = hub.repos["user/tiny"]
    pattern = json.loads(files["lowrank_config.json"])["rank_pattern"]
    assert pattern["transformer.h.0.mlp.c_fc"] == {"mode": "residual", "rank": 4, "capacity": 4, "scaling": 2.0}  # trimmed
    card = files["README.md"].decode()
    assert card_header(card) == {"library_name": "hf_lowrank", "tags": ["low-rank", "fixed"]}  # base unknown: no base_model
    assert "A `GPT2LMHeadModel` (model_type `gpt2`, 2 layers, hidden size 32, vocabulary 96)" in card
    assert "| strategy | `fixed` |" in card and "| starting mode | `residual` |" in card
    assert "| `transformer.h.0.mlp.c_fc` | residual | 4 | 32 | 128x32 |" in card
    assert "| eval_loss | 3.2 |" in card and "| perplexity | 24.53 |" in card and "| steps | 100 |" in card
    assert 'LowRankModel.from_pretrained("user/tiny")' in card and "model.merge_and_unload()" in card


def test_push_of_a_model_that_does_not_generate(hub):
    model = get_lowrank_model(build("bert"), LowRankConfig(rank=4))
    model.push_to_hub("user/bert", commit_message="first")
    assert hub.commits == [("user/bert", "first", [f for f in MODEL_FILES if f != "generation_config.json"])]
    card = hub.repos["user/bert"]["README.md"].decode()
    assert "## Training figures" not in card and "transformers.BertForMaskedLM.from_pretrained" in card


def test_push_config_uploads_only_the_config(hub):
    LowRankConfig(rank=8, strategy="inrank").push_to_hub("user/cfg")
    assert hub.commits == [("user/cfg", "Upload with hf_lowrank", ["lowrank_config.json"])]
    assert LowRankConfig.from_pretrained("user/cfg") == LowRankConfig(rank=8, strategy="inrank")


def test_card_parameters_and_base_model(tmp_path):
    plain = build("gpt2")
    dense = sum(p.numel() for p in {id(p): p for p in plain.parameters()}.values())
    model = residual_model()
    counts = card_parameter_counts(model)
    factors = sum(4 * (layer.in_features + layer.out_features) for layer in model.lowrank_layers().values())
    assert counts == {"total": dense + factors, "trainable": model.parameter_counts()["trainable"] - factors, "dense": dense}
    card = model_card(model)
    assert f"| total | {dense + factors:,} | {dense:,} | {(dense + factors) / dense:.3f} |" in card
    assert f"| trainable | {counts['trainable']:,} | {dense:,} |" in card
    model.lowrank_config.base_model_name_or_path = "openai-community/gpt2"
    card = model_card(model)
    assert card_header(card)["base_model"] == "openai-community/gpt2" and "starting from `openai-community/gpt2`" in card
    model.lowrank_config.base_model_name_or_path = str(tmp_path)  # a local folder is no Hub base_model
    card = model_card(model)
    assert "base_model" not in card_header(card) and f"starting from `{tmp_path}`" in card


def test_card_reads_training_summary_of_the_loaded_folder(tmp_path, hub):
    residual_model().save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "training_summary.json").write_text(json.dumps({"eval_loss": 2.5, "steps": 40}))
    model = LowRankModel.from_pretrained(tmp_path / "run")
    assert "| eval_loss | 2.5 |" in model_card(model) and "| steps | 40 |" in model_card(model)
    assert "| eval_loss | 9 |" in model_card(model, {"eval_loss": 9.0})  # explicit metrics win
    model.push_to_hub("user/run")
    assert "| steps | 40 |" in hub.repos["user/run"]["README.md"].decode()
    assert sorted(hub.repos["user/run"]) == MODEL_FILES


# -- loading from the Hub ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_card_instructions_load_merge_and_generate(family, hub, tmp_path, monkeypatch):
    """Push, then run the card's own code: load by repo id, generate unmerged, merge, reload with transformers."""
    model = residual_model(family)
    ids = sample_ids()
    reference = logits(model, ids)
    model.push_to_hub("user/tiny")
    hub.repos["user/tiny"]["pytorch_model.bin"] = b"pickle: never downloaded"
    load, merge = python_blocks(hub.repos["user/tiny"]["README.md"].decode())
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(load, ns)
    assert all(not any(p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for p in ps) for ps in hub.patterns)
    assert not any(p.name == "pytorch_model.bin" for p in hub.root.rglob("*"))
    loaded = ns["model"].eval()
    torch.testing.assert_close(logits(loaded, ids), reference, atol=ATOL, rtol=0)
    prompt, kwargs = ids[:1, :4], dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = loaded.generate(prompt, **kwargs)
    exec(merge, ns)
    plain = ns["plain"].eval()
    assert type(plain) is type(build(family)) and (tmp_path / "merged" / "config.json").is_file()
    torch.testing.assert_close(logits(plain, ids), reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(plain.generate(prompt, **kwargs), generated)


def test_load_from_the_hub_cache_layout(tmp_path):
    """The real snapshot_download / hf_hub_download, offline, on a cache laid out as the Hub writes it."""
    model = residual_model("llama")
    ids = sample_ids()
    repo = tmp_path / "cache" / "models--user--tiny"
    model.save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    loaded = LowRankModel.from_pretrained("user/tiny", cache_dir=tmp_path / "cache").eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=ATOL, rtol=0)
    assert loaded.rank_pattern() == model.rank_pattern(trim=True)
    config = LowRankConfig.from_pretrained("user/tiny", cache_dir=tmp_path / "cache")
    assert config.rank_pattern == model.rank_pattern(trim=True)


def test_load_from_a_subfolder_of_a_repo(hub, tmp_path):
    model = residual_model()
    model.save_pretrained(tmp_path / "saved")
    hub.repos["user/many"] = {f"gpt2/{p.name}": p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    loaded = LowRankModel.from_pretrained("user/many", subfolder="gpt2")
    assert hub.patterns[-1] == ["gpt2/*.json", "gpt2/*.safetensors", "gpt2/*.md"]
    torch.testing.assert_close(logits(loaded, sample_ids()), logits(model, sample_ids()), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"import_peft_adapter keyword argument\(s\)=\['revisoin'\] is not allowed"):
        import_peft_adapter(build("gpt2"), "user/many", revisoin="main")


def test_bad_snapshots_fail_naming_the_file(hub, tmp_path):
    model = residual_model()
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "lowrank_config.json").read_text())

    bad = json.loads(json.dumps(config))
    bad["rank_pattern"]["transformer.h.1.mlp.c_proj"].update(rank=3, capacity=3)  # tensors hold rank 4
    hub.add_folder("user/pattern", tmp_path / "saved")
    hub.repos["user/pattern"]["lowrank_config.json"] = json.dumps(bad).encode()
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the rank pattern.*h\.1\.mlp\.c_proj"):
        LowRankModel.from_pretrained("user/pattern")

    hub.add_folder("user/pickled", tmp_path / "saved")
    hub.repos["user/pickled"]["pytorch_model.bin"] = hub.repos["user/pickled"].pop("model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: missing"):
        LowRankModel.from_pretrained("user/pickled")

    hub.add_folder("user/future", tmp_path / "saved")
    hub.repos["user/future"]["lowrank_config.json"] = json.dumps({**config, "hf_lowrank_version": "9.0.0"}).encode()
    with pytest.raises(ValueError, match="'9.0.0' was written by an incompatible hf_lowrank"):
        LowRankModel.from_pretrained("user/future")

    with pytest.raises(FileNotFoundError, match="user/absent"):
        LowRankModel.from_pretrained("user/absent")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        LowRankModel.from_pretrained(tmp_path / "not-there")
    with pytest.raises(FileNotFoundError, match="user/cfg-absent/lowrank_config.json"):
        hub.repos["user/cfg-absent"] = {}
        LowRankConfig.from_pretrained("user/cfg-absent")


# -- PEFT export ------------------------------------------------------------------------------


def peft_logits(base, adapter_dir, ids):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_export_reproduces_the_model(family, tmp_path):
    model = residual_model(family)
    names = sorted(model.lowrank_layers())
    first, second = model.lowrank_layers()[names[0]], model.lowrank_layers()[names[1]]
    first.grow(6)  # per-layer ranks differ: rank_pattern carries them
    with torch.no_grad():
        first.B[:, 4:6] = 0.05
    second.scaling = 0.5  # per-layer scales differ: alpha_pattern carries them
    ids = sample_ids()
    reference = logits(model, ids)
    export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="org/base")

    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == names and cfg["r"] == 6 and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] is (family == "gpt2") and cfg["base_model_name_or_path"] == "org/base"
    assert cfg["rank_pattern"] == {n: 4 for n in names[1:]}
    for name, layer in model.lowrank_layers().items():
        assert cfg["alpha_pattern"][name] / cfg["rank_pattern"].get(name, cfg["r"]) == pytest.approx(layer.scaling)
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(names)
    for name, layer in model.lowrank_layers().items():
        A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape == (layer.rank, layer.in_features) and B.shape == (layer.out_features, layer.rank)

    torch.testing.assert_close(peft_logits(export_base_model(model).eval(), tmp_path / "adapter", ids), reference, atol=ATOL, rtol=0)
    # only the adapters trained, so the original pretrained model is the base
    torch.testing.assert_close(peft_logits(build(family), tmp_path / "adapter", ids), reference, atol=ATOL, rtol=0)
    export_peft_adapter(model, tmp_path / "checked", base_model=build(family))  # and the check agrees


def test_peft_export_mixed_conv1d_and_linear(tmp_path):
    torch.manual_seed(0)
    untied = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96, n_positions=32, tie_word_embeddings=False)
    ).eval()
    model = get_lowrank_model(untied, LowRankConfig(target_modules=["c_fc", "lm_head"], mode="residual", rank=4)).eval()
    randomize_adapters(model)
    ids = sample_ids()
    export_peft_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT sets the flag per layer type
        out = peft_logits(export_base_model(model).eval(), tmp_path, ids)
    torch.testing.assert_close(out, logits(model, ids), atol=ATOL, rtol=0)


def test_peft_export_refuses_what_lora_cannot_express(tmp_path):
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn' is in mode 'factorized'"):
        export_peft_adapter(get_lowrank_model(build("gpt2"), LowRankConfig(rank=4)), tmp_path)
    with pytest.raises(ValueError, match="is factorized"):
        export_base_model(get_lowrank_model(build("gpt2"), LowRankConfig(rank=4)))

    model = residual_model()
    layer = model.lowrank_layers()["transformer.h.0.mlp.c_fc"]
    layer.to_dense()  # its weight now equals W0 + s B A: a trained dense layer
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc' is in mode 'dense'.*pass base_model="):
        export_peft_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.c_fc W \(dense, trainable\)"):
        export_peft_adapter(model, tmp_path, base_model=build("gpt2"))

    # an untouched dense layer is checked against the base and left out
    model = residual_model()
    layer = model.lowrank_layers()["transformer.h.0.mlp.c_fc"]
    with torch.no_grad():
        layer.B.zero_()
    layer.to_dense()
    ids = sample_ids()
    config = export_peft_adapter(model, tmp_path / "skip", base_model=build("gpt2"))
    assert "transformer.h.0.mlp.c_fc" not in config.target_modules and len(config.target_modules) == 7
    torch.testing.assert_close(peft_logits(build("gpt2"), tmp_path / "skip", ids), logits(model, ids), atol=ATOL, rtol=0)

    # W0 re-based by a transition (inflate/deflate): the adapter applies to export_base_model only
    model = residual_model()
    layer = model.lowrank_layers()["transformer.h.1.attn.c_proj"]
    layer.to_dense()
    layer.to_residual(4, 8, alpha=8.0)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_proj frozen base W0"):
        export_peft_adapter(model, tmp_path, base_model=build("gpt2"))
    export_peft_adapter(model, tmp_path / "rebased")
    torch.testing.assert_close(peft_logits(export_base_model(model).eval(), tmp_path / "rebased", ids), logits(model, ids), atol=ATOL, rtol=0)

    # a trained tensor outside the adapters
    model = residual_model()
    with torch.no_grad():
        model.base_model.transformer.ln_f.weight.add_(0.1)
    with pytest.raises(ValueError, match=r"outside its residual adapters.*transformer\.ln_f\.weight"):
        export_peft_adapter(model, tmp_path, base_model=build("gpt2"))


def t5():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1
    )
    return transformers.T5ForConditionalGeneration(config).eval()


def bert_config(**extra):
    return transformers.BertConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, pad_token_id=0, **extra,
    )


def bert_classifier():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(bert_config(num_labels=3)).eval()


def model_logits(model, ids):
    """Logits of a causal LM, a classifier or (with the first tokens as decoder input) a seq2seq model."""
    extra = {"decoder_input_ids": ids[:, :5]} if model.config.model_type == "t5" else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


@pytest.mark.parametrize(
    "make,task,heads",
    [(lambda: build("gpt2"), "CAUSAL_LM", None), (t5, "SEQ_2_SEQ_LM", None), (bert_classifier, "SEQ_CLS", ["classifier"])],
    ids=["gpt2", "t5", "bert-classifier"],
)
def test_peft_export_task_type_and_trained_head(make, task, heads, tmp_path):
    """The adapter carries the trained modules_to_save; PEFT's own loader on the untouched base gives the model's logits."""
    model = get_lowrank_model(make(), LowRankConfig(mode="residual", rank=4)).eval()
    randomize_adapters(model)
    with torch.no_grad():
        for name in model.modules_to_save():
            for p in model.base_model.get_submodule(name).parameters():
                p.add_(0.5)  # the head trained
    ids = sample_ids()
    config = export_peft_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == task == config.task_type and cfg["modules_to_save"] == heads
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    extra = sorted(k for k in tensors if ".lora_" not in k)
    assert extra == ([] if heads is None else ["base_model.model.classifier.bias", "base_model.model.classifier.weight"])
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(model_logits(peft_model, ids), model_logits(model, ids), atol=ATOL, rtol=0)


def test_peft_task_types_follow_the_model_class():
    from hf_lowrank.peft_interop import peft_task_type

    torch.manual_seed(0)
    classes = {
        transformers.BertForTokenClassification: "TOKEN_CLS",
        transformers.BertForQuestionAnswering: "QUESTION_ANS",
        transformers.BertModel: "FEATURE_EXTRACTION",
        transformers.BertForMaskedLM: None,  # PEFT has no masked-LM task
    }
    assert {cls: peft_task_type(cls(bert_config())) for cls in classes} == classes


def test_peft_export_refuses_trainable_parameters_it_would_leave_out(tmp_path):
    model = residual_model()
    model.base_model.transformer.ln_f.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"outside the adapters and modules_to_save \[\] are trainable: \['transformer\.ln_f\.weight'\]"):
        export_peft_adapter(model, tmp_path / "a")
    export_peft_adapter(model, tmp_path / "b", base_model=build("gpt2"))  # checked unchanged against the base: exported
    with torch.no_grad():
        model.base_model.transformer.ln_f.weight.add_(0.1)
    with pytest.raises(ValueError, match=r"outside its residual adapters and modules_to_save.*transformer\.ln_f\.weight"):
        export_peft_adapter(model, tmp_path / "c", base_model=build("gpt2"))


# -- PEFT import ------------------------------------------------------------------------------


def peft_adapter(family, folder, **lora):
    """A PEFT LoRA adapter with random non-zero factors, saved to ``folder``; returns the PeftModel's logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    targets = ["c_fc", "c_proj"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    settings = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=family == "gpt2") | lora
    peft_model = get_peft_model(build(family), LoraConfig(**settings)).eval()
    peft_model.save_pretrained(folder)
    return logits(peft_model, sample_ids())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_import_starts_rank_growth_from_an_adapter(family, tmp_path):
    special = "transformer.h.1.mlp.c_fc" if family == "gpt2" else "model.layers.1.self_attn.v_proj"
    reference = peft_adapter(family, tmp_path / "adapter", rank_pattern={special: 2}, alpha_pattern={special: 3.0})
    ids = sample_ids()
    config = LowRankConfig(mode="residual", capacity=8, frobenius_decay=1e-4)
    model = import_peft_adapter(build(family), tmp_path / "adapter", config).eval()
    torch.testing.assert_close(logits(model, ids), reference, atol=ATOL, rtol=0)
    assert model.lowrank_config.frobenius_decay == 1e-4 and model.lowrank_config.mode == "residual"
    for name, layer in model.lowrank_layers().items():
        r, scaling = (2, 1.5) if name == special else (4, 2.0)
        assert (layer.mode, layer.rank, layer.capacity, layer.scaling) == ("residual", r, 8, scaling)
        layer.grow(8)  # room to grow, exactly
    torch.testing.assert_close(logits(model, ids), reference, atol=ATOL, rtol=0)

    plain = import_peft_adapter(build(family), tmp_path / "adapter")  # no config: capacity = the adapter's rank
    assert all(layer.capacity == layer.rank for layer in plain.lowrank_layers().values())
    export_peft_adapter(plain, tmp_path / "again")  # and back to PEFT, the same tensors
    before, after = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_peft_import_of_a_classifier_with_its_head(tmp_path):
    """A PEFT sequence-classification adapter carries the trained head in modules_to_save; it comes back, and trains."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS")
    peft_model = get_peft_model(bert_classifier(), lora).eval()
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)  # the head trained
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = sample_ids()
    model = import_peft_adapter(bert_classifier(), tmp_path / "adapter").eval()
    torch.testing.assert_close(model_logits(model, ids), model_logits(peft_model, ids), atol=ATOL, rtol=0)
    assert model.lowrank_config.modules_to_save == ["classifier"] and model.modules_to_save() == ["classifier"]
    assert model.base_model.classifier.weight.requires_grad and not model.base_model.bert.embeddings.word_embeddings.weight.requires_grad

    export_peft_adapter(model, tmp_path / "again")  # and back: PEFT's own keys for the head
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    torch.testing.assert_close(again["base_model.model.classifier.weight"], model.base_model.classifier.weight)


def test_peft_import_rslora_and_from_a_repo_id(tmp_path, hub):
    reference = peft_adapter("llama", tmp_path / "adapter", use_rslora=True)
    hub.add_folder("user/adapter", tmp_path / "adapter")
    model = import_peft_adapter(build("llama"), "user/adapter").eval()
    torch.testing.assert_close(logits(model, sample_ids()), reference, atol=ATOL, rtol=0)
    assert {layer.scaling for layer in model.lowrank_layers().values()} == {8 / math.sqrt(4)}


def test_peft_import_refusals(tmp_path):
    peft_adapter("gpt2", tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())

    def variant(name, config=None, tensors=None, pickle=False):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "ok", folder)
        if config is not None:
            (folder / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
        if tensors is not None:
            save_file(tensors, str(folder / "adapter_model.safetensors"))
        if pickle:
            (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
        return folder

    with pytest.raises(ValueError, match=r"adapter_model\.bin: pickle files are not loaded"):
        import_peft_adapter(build("gpt2"), variant("bin", pickle=True))
    with pytest.raises(ValueError, match=r"use_dora=True cannot be imported \(DoRA"):
        import_peft_adapter(build("gpt2"), variant("dora", {"use_dora": True}))
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' changes the base weights"):
        import_peft_adapter(build("gpt2"), variant("pissa", {"init_lora_weights": "pissa"}))
    with pytest.raises(ValueError, match=r"bias='all'"):
        import_peft_adapter(build("gpt2"), variant("bias", {"bias": "all"}))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: transformer\.h\.0\.mlp\.c_fc holds lora_A \(4, 32\).*gives rank 3"):
        import_peft_adapter(build("gpt2"), variant("rank", {"rank_pattern": {"transformer.h.0.mlp.c_fc": 3}}))
    stray = {"base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": torch.zeros(4, 32), "base_model.model.lm_head.weight": torch.zeros(96, 32)}
    with pytest.raises(ValueError, match=r"unexpected tensor 'base_model\.model\.lm_head\.weight'"):
        import_peft_adapter(build("gpt2"), variant("stray", tensors=stray))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: the base model has no module 'transformer\.h\.0\."):
        import_peft_adapter(build("llama"), tmp_path / "ok")
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        import_peft_adapter(build("gpt2"), variant("ia3", {"peft_type": "IA3"}))
