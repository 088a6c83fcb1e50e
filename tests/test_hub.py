"""Hub upload (intercepted), loading from a snapshot-shaped folder, PEFT adapter export and import."""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import build, sample_ids
from test_model import logits, randomize_adapters

from hf_lowrank import LowRankConfig, LowRankModel, get_lowrank_model
from hf_lowrank.hub import base_model_for_adapter, export_peft_adapter, import_peft_adapter, model_card


@pytest.fixture
def uploads(monkeypatch):
    """Capture what would be uploaded: {repo_id: {filename: bytes}}."""
    captured = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: repo_id)

    def upload_folder(self, repo_id, folder_path, commit_message, **kw):
        captured[repo_id] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return captured


def residual_model(family="gpt2"):
    model = get_lowrank_model(build(family), LowRankConfig(mode="residual", rank=4, capacity=8, alpha=8.0)).eval()
    randomize_adapters(model)
    return model


def test_push_model_uploads_exactly_these_files(uploads):
    model = residual_model()
    model.push_to_hub("user/tiny", metrics={"eval_loss": 3.2, "steps": 100})
    files = uploads["user/tiny"]
    assert sorted(files) == ["README.md", "config.json", "generation_config.json", "lowrank_config.json", "model.safetensors"]
    card = files["README.md"].decode()
    assert "library_name: hf_lowrank" in card and "| `transformer.h.0.mlp.c_fc` | residual | 4 | 32 | 128x32 |" in card
    assert "| eval_loss | 3.2 |" in card and "LowRankModel.from_pretrained" in card


def test_push_config_uploads_only_the_config(uploads):
    LowRankConfig(rank=8).push_to_hub("user/cfg")
    assert sorted(uploads["user/cfg"]) == ["lowrank_config.json"]


def test_load_from_a_hub_snapshot(tmp_path, monkeypatch):
    model = residual_model()
    ids = sample_ids()
    reference = logits(model, ids)
    model.save_pretrained(tmp_path / "saved")
    snapshot = tmp_path / "hub" / "models--user--tiny" / "snapshots" / "abc123"
    shutil.copytree(tmp_path / "saved", snapshot)
    seen = {}

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = LowRankModel.from_pretrained("user/tiny").eval()
    assert seen["repo_id"] == "user/tiny"
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl")) for p in seen["allow_patterns"])
    torch.testing.assert_close(logits(loaded, ids), reference, atol=1e-5, rtol=0)


def test_model_card_counts():
    model = get_lowrank_model(build("gpt2"), LowRankConfig(rank=4))
    card = model_card(model)
    dense = sum(p.numel() for p in {id(p): p for p in build("gpt2").parameters()}.values())
    assert f"| the same model dense | {dense:,} |" in card


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_export_loads_in_peft_with_the_same_outputs(family, tmp_path):
    from peft import PeftModel

    model = residual_model(family)
    layers = model.lowrank_layers()
    first = next(iter(layers.values()))
    first.grow(6)  # per-layer ranks differ: rank_pattern must carry them
    with torch.no_grad():
        first.B[:, 4:6] = 0.05
    ids = sample_ids()
    reference = logits(model, ids)
    export_peft_adapter(model, tmp_path / "adapter")
    base = base_model_for_adapter(model).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, ids), reference, atol=1e-5, rtol=0)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_import_starts_growth_from_an_adapter(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    targets = ["c_fc", "c_proj"] if family == "gpt2" else ["q_proj", "v_proj"]
    peft_model = get_peft_model(build(family), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()
    ids = sample_ids()
    reference = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = import_peft_adapter(build(family), tmp_path / "adapter", capacity=8).eval()
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=0)
    for layer in model.lowrank_layers().values():
        assert (layer.mode, layer.rank, layer.capacity, layer.scaling) == ("residual", 4, 8, 2.0)
        layer.grow(8)  # room to grow, exactly
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=0)


def test_export_refuses_factorized_layers(tmp_path):
    model = get_lowrank_model(build("gpt2"), LowRankConfig(rank=4))
    with pytest.raises(ValueError, match="can only express residual layers"):
        export_peft_adapter(model, tmp_path)


def test_import_refuses_pickle(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8, "peft_type": "LORA"}')
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle files are not loaded"):
        import_peft_adapter(build("gpt2"), tmp_path)
