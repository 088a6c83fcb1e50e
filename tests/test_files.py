"""hf_lowrank/files.py: atomic writes. ``atomic_directory`` keeps the old folder when the block
raises and leaves no temporary; ``write_json`` and ``write_safetensors`` keep the old file on an
error mid-write; a saved folder gets the umask's mode, not mkdtemp's 0700.

Leftovers of killed saves, the run lock and full disks in a training run: tests/test_faults.py.
"""

import os
from pathlib import Path

import pytest
import torch
from helpers_train import tiny_gpt2

import hf_lowrank.files
from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.files import atomic_directory, read_json, write_json, write_safetensors


def test_atomic_directory_keeps_the_old_contents_on_error(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("first")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("second, half")
            raise RuntimeError("crash while saving")
    assert (target / "weights").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "the temporary folder is removed"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("third")
    assert (target / "weights").read_text() == "third" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_json_and_write_safetensors_keep_the_old_file_on_error(tmp_path, monkeypatch):
    write_json(tmp_path / "state.json", {"step": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "state.json", {"step": object()})  # not serialisable
    assert read_json(tmp_path / "state.json") == {"step": 1}

    write_safetensors(tmp_path / "w.safetensors", {"a": torch.ones(2)})

    def save_half(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 7)  # a truncated file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(hf_lowrank.files, "save_file", save_half)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(hf_lowrank.files.read_safetensors(tmp_path / "w.safetensors")["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "w.safetensors"], "no temporary file left"


def test_saved_folders_follow_the_umask(tmp_path):
    """atomic_directory's temporary is made 0700 by mkdtemp; the saved folder gets the umask's mode like any mkdir."""
    previous = os.umask(0o027)
    try:
        get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4)).save_pretrained(tmp_path / "m")
    finally:
        os.umask(previous)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750


def test_atomic_directory_nests_and_refuses_its_own_names(tmp_path):
    """A save inside a save (fsdp.save_checkpoint calls save_pretrained into its staging folder) keeps the outer
    container marked and leaves nothing hidden behind; an atomic write that fails leaves the old contents."""
    from hf_lowrank.files import ASIDE_NAME, TEMP_MARKER, atomic_directory, is_marked

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_directory(tmp_path / "out") as outer:
        (outer / "a.txt").write_text("a")
        with atomic_directory(outer) as inner:
            (inner / "b.txt").write_text("b")
        assert is_marked(outer.parent), "the outer container is still hf_lowrank's after the inner rename"
        assert (outer / "b.txt").is_file() and not (outer / "a.txt").exists(), "the inner save replaced the folder whole"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.txt", "out"]
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(tmp_path / "out") as new:
        (new / "c.txt").write_text("c")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.txt", "out"]
    for name in (TEMP_MARKER, ASIDE_NAME):
        with pytest.raises(ValueError, match="hf_lowrank's own temporary names; choose another"):
            with atomic_directory(tmp_path / name):
                pass
