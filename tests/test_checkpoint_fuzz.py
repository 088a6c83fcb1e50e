"""Checkpoint fuzz: random damage to each file of a checkpoint; every outcome is an exact resume or a refusal naming the file.

A fixed seed draws a bounded number of cases. Each damages one file of a copy of a 4-step
InRank checkpoint (truncation at a random length, one flipped bit, or a value replaced by one of
another type) and resumes from it. Half the cases also rewrite the checksum manifest, as an
editor who knows the format would: then the checks behind the manifest (file formats, shapes,
types, steps) must hold on their own. Bit flips are left to the manifest (a flipped bit in a
weight is a valid float). Accepted outcomes: the resumed run's losses equal the resume from the
intact checkpoint, or an exception whose message names the damaged file, raised before the first
step. A crash inside torch or transformers (a message naming no file) or a silent difference fails.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers_train import build_trainer, record

from hf_lowrank.checkpoint import MANIFEST_NAME, write_manifest

SEED, CASES = 20261206, 30
SHORT = {"strategy_args": {"warmup_steps": 1, "interval": 1, "stage2_at": 0.75}}  # InRank: grows, truncates at step 6
OTHER_TYPES = ["x", [], None, {}, -1, 1e308, True]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """checkpoint-4 of an 8-step run, and the losses of resuming from it intact."""
    out = tmp_path_factory.mktemp("fuzz-source")
    build_trainer(out, SHORT, max_steps=4, save_steps=4).train()
    intact = tmp_path_factory.mktemp("fuzz-intact")
    shutil.copytree(out / "checkpoint-4", intact / "checkpoint-4")
    trainer = build_trainer(intact, SHORT, max_steps=8, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(intact / "checkpoint-4"))
    return out / "checkpoint-4", record(trainer)["losses"]


def _retype(rng: random.Random, value):
    """``value`` with one entry somewhere inside replaced by a value of another type."""
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        return {**value, key: _retype(rng, value[key]) if rng.random() < 0.5 else _other(rng, value[key])}
    if isinstance(value, list) and value:
        i = rng.randrange(len(value))
        return value[:i] + [_other(rng, value[i])] + value[i + 1 :]
    return _other(rng, value)


def _other(rng: random.Random, value):
    return rng.choice([v for v in OTHER_TYPES if type(v) is not type(value)])


def damage(rng: random.Random, path: Path, kinds: list[str]) -> str:
    data = path.read_bytes()
    kind = rng.choice(kinds)
    if kind == "truncate":
        size = rng.randrange(len(data))
        path.write_bytes(data[:size])
        return f"truncated to {size} of {len(data)} bytes"
    if kind == "flip":
        i, bit = rng.randrange(len(data)), 1 << rng.randrange(8)
        path.write_bytes(data[:i] + bytes([data[i] ^ bit]) + data[i + 1 :])
        return f"bit {bit} of byte {i} flipped"
    if path.suffix == ".json":
        path.write_text(json.dumps(_retype(rng, json.loads(data))))
        return "a JSON value replaced by another type"
    torch.save(_other(rng, {}), path)
    return "replaced by a torch file of another type"


def cases():
    rng = random.Random(SEED)
    return [(i, rng.random() < 0.5, rng.getrandbits(32)) for i in range(CASES)]


@pytest.mark.parametrize("case, rewrite_manifest, seed", cases())
def test_a_damaged_checkpoint_resumes_exactly_or_is_refused_naming_the_file(source, tmp_path, case, rewrite_manifest, seed):
    checkpoint, intact_losses = source
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(checkpoint, ckpt)
    names = sorted(p.name for p in ckpt.iterdir() if p.is_file() and p.name != MANIFEST_NAME) + [MANIFEST_NAME]
    name = names[case % len(names)]  # every file is damaged in some case
    rng = random.Random(seed)
    rewrite_manifest = rewrite_manifest and name != MANIFEST_NAME
    # a flipped bit behind an updated manifest can be a valid float, which only the manifest tells
    what = damage(rng, ckpt / name, ["truncate", "type"] if rewrite_manifest else ["truncate", "flip", "type"])
    if rewrite_manifest:
        write_manifest(ckpt)
    trainer = build_trainer(tmp_path, SHORT, max_steps=8, save_strategy="no")
    try:
        trainer.train(resume_from_checkpoint=str(ckpt))
    except Exception as e:  # a refusal: it names the damaged file and comes before any step
        assert name in str(e), f"{name} {what}: {type(e).__name__} names no file: {e}"
        print(f"{name:28} {what:45} manifest {'rewritten' if rewrite_manifest else 'kept':9} refused: {str(e)[:110]}")
        assert not any(x.get("step", 0) > 4 for x in trainer.state.log_history), f"{name} {what}: refused after training"
        return
    resumed = record(trainer)["losses"]
    print(f"{name:28} {what:45} manifest {'rewritten' if rewrite_manifest else 'kept':9} resumed exactly")
    assert resumed == intact_losses, f"{name} {what}: resumed silently into another run"
