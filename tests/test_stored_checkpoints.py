"""Every stored version's saved models load with today's code and compute what they computed when saved.

tests/data/checkpoints/<version>/ holds what that version of hf_lowrank saved (written once per
release by tests/data/make_checkpoints.py, never regenerated): a factorized model at the ranks
InRank found, a residual fine-tune saved whole, and residual adapters saved adapter-only onto a
plain base model stored beside them. A change to saving, loading, the rank pattern's format or
a layer's forward that breaks what users have on disk fails here (PEFT's regression tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

import hf_lowrank
from hf_lowrank import LowRankModel
from hf_lowrank.files import read_json

CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints"
VERSIONS = sorted(p for p in CHECKPOINTS.iterdir() if p.is_dir())
ATOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_current_version_has_stored_checkpoints():
    assert (CHECKPOINTS / hf_lowrank.__version__).is_dir(), (
        f"no stored checkpoints of hf_lowrank {hf_lowrank.__version__}: run python tests/data/make_checkpoints.py "
        "with the release's code and commit the folder it writes"
    )


@pytest.mark.parametrize("version", VERSIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("name", ["factorized", "residual"])
def test_a_stored_model_loads_and_gives_its_stored_logits(version, name):
    stored = load_file(version / "outputs.safetensors")
    model = LowRankModel.from_pretrained(version / name)
    assert model.rank_pattern(trim=True) == read_json(version / name / "lowrank_config.json")["rank_pattern"]
    torch.testing.assert_close(logits(model, stored["input_ids"]), stored[name], rtol=0, atol=ATOL)
    merged = model.merge_and_unload()  # the plain transformers model computes the same
    assert not any(isinstance(m, hf_lowrank.LowRankLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, stored["input_ids"]), stored[name], rtol=0, atol=ATOL)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda p: p.name)
def test_a_stored_adapter_loads_onto_its_stored_base(version, monkeypatch):
    stored = load_file(version / "outputs.safetensors")
    base = transformers.AutoModelForCausalLM.from_pretrained(version / "base").eval()
    assert not torch.allclose(logits(base, stored["input_ids"]), stored["adapter"], atol=1e-3), "the adapter changes the outputs"
    onto = LowRankModel.from_pretrained(version / "adapter", base_model=base)  # PEFT's way: the caller loads the base
    torch.testing.assert_close(logits(onto, stored["input_ids"]), stored["adapter"], rtol=0, atol=ATOL)
    # without base_model=: the base named in lowrank_config.json ("base", the folder beside it) is loaded
    monkeypatch.chdir(version)
    named = LowRankModel.from_pretrained("adapter")
    torch.testing.assert_close(logits(named, stored["input_ids"]), stored["adapter"], rtol=0, atol=ATOL)


def test_stored_files_are_small_safetensors_and_json_only():
    files = [p for p in CHECKPOINTS.rglob("*") if p.is_file()]
    assert files
    for path in files:
        head = path.read_bytes()[:2]
        assert path.suffix in (".json", ".safetensors"), f"{path}: only safetensors and JSON are stored"
        assert head[:1] != b"\x80" and head != b"PK", f"{path}: a pickle (or torch.save zip) is never stored"
        if path.suffix == ".json":
            read_json(path)
        else:
            with safe_open(str(path), framework="pt") as f:
                assert list(f.keys())
    for version in VERSIONS:  # a release adds one folder of this size
        assert sum(p.stat().st_size for p in version.rglob("*") if p.is_file()) < 500 * 1024, version
