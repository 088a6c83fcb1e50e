"""Numerical faults and damaged checkpoints through a real LowRankTrainer run.

Each test trains the tiny GPT-2 of tests/helpers_train.py (InRank on the MLPs unless it says
otherwise) for a few steps and injects one fault where it bites: a NaN or Inf loss at chosen
optimizer steps (through ``compute_loss``), an SVD or QR that raises ``RuntimeError`` (what
cuSOLVER raises) or returns NaN without raising, during InRank's stage-2 truncation or at the
dense -> factorized switch of Cuttlefish and warm start, a full disk in the middle of a
checkpoint save, a checkpoint whose strategy state is missing or edited. Every test checks
that the run goes on (or stops with a clear error), that no NaN reaches the weights, and that
every checkpoint written is finite and loads.
"""

import dataclasses
import errno
import json
import math
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers_train import TokenDataset, build_trainer, tiny_gpt2
from transformers.trainer_utils import get_last_checkpoint

import hf_lowrank.files
import hf_lowrank.layer
from hf_lowrank import LowRankConfig, LowRankModel, get_lowrank_model, optim
from hf_lowrank.files import LOCK_NAME, TEMP_MARKER, read_json, read_safetensors, run_lock, write_json
from hf_lowrank.strategies import LayerChange, Plan
from hf_lowrank.checkpoint import MANIFEST_NAME, write_manifest
from hf_lowrank.files import remove_leftovers as remove_stale_staging
from hf_lowrank.trainer import STATE_NAME, LowRankTrainer

MLP = "transformer.h.0.mlp.c_fc"
SHORT = {"strategy_args": {"warmup_steps": 1, "interval": 1, "stage2_at": None}}  # InRank for runs of a few steps


# -- injecting faults ------------------------------------------------------------------------


def poison_loss(trainer: LowRankTrainer, steps: set[int], value: float = math.nan) -> None:
    """Multiply the loss of every micro-batch of the optimizer steps ``steps`` (1-based) by ``value``."""
    compute = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        loss = compute(model, inputs, *args, **kwargs)
        return loss * value if trainer.state.global_step + 1 in steps else loss

    trainer.compute_loss = compute_loss


def break_linalg(monkeypatch, function: str, fault: str, when=lambda: True) -> list[str]:
    """Make ``torch.linalg.<function>`` (svd or qr) fail while ``when()``: raise, or return NaN silently.

    Returns the list of failed calls, so a test can check that the fault was hit at all.
    """
    real = getattr(torch.linalg, function)
    failed = []

    def broken(*args, **kwargs):
        if not when():
            return real(*args, **kwargs)
        failed.append(function)
        if fault == "raise":
            raise RuntimeError(f"cusolver error: {function} did not converge")
        out = [t.clone() for t in real(*args, **kwargs)]
        out[1 if function == "svd" else 0].view(-1)[0] = math.nan  # one NaN singular value / Q entry
        return tuple(out)

    monkeypatch.setattr(torch.linalg, function, broken)
    return failed


def break_layer_svds(monkeypatch, layer) -> list[str]:
    """Make ``hf_lowrank.layer``'s ``factor_svdvals`` (growth checks) and ``factor_svd`` (truncation) raise
    ``LinAlgError`` for ``layer`` only. Returns the list of failed calls."""
    failed = []
    for function in ("factor_svdvals", "factor_svd"):
        real = getattr(hf_lowrank.layer, function)

        def broken(B, A, real=real, function=function):
            if B.data_ptr() != layer.B.data_ptr():
                return real(B, A)
            failed.append(function)
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

        monkeypatch.setattr(hf_lowrank.layer, function, broken)
    return failed


def with_max_nonfinite(trainer: LowRankTrainer, max_nonfinite_steps: int) -> LowRankTrainer:
    """The same run built with ``LowRankTrainer(max_nonfinite_steps=...)``."""
    return LowRankTrainer(
        model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset, max_nonfinite_steps=max_nonfinite_steps
    )


def recorded(trainer: LowRankTrainer) -> list[str]:
    """Train and return every warning message the run emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in caught]


# -- what a healthy result looks like ----------------------------------------------------------


def assert_finite(model: torch.nn.Module) -> None:
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"non-finite tensors {bad[:5]}"


def assert_finite_and_loadable(folder: Path) -> None:
    """Every saved tensor is finite, and the folder loads with the rank pattern it declares."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    for file in files:
        bad = [k for k, t in read_safetensors(file).items() if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, f"{file}: non-finite tensors {bad[:5]}"
    loaded = LowRankModel.from_pretrained(folder)
    assert loaded.rank_pattern() == LowRankConfig.from_pretrained(folder).rank_pattern
    assert_finite(loaded)
    batch = TokenDataset(4)[0]
    with torch.no_grad():
        out = loaded(input_ids=batch["input_ids"][None], labels=batch["labels"][None])
    assert torch.isfinite(out.loss), folder


def assert_clean(out: Path) -> None:
    """No staging or temporary folder left in the run folder."""
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def finite_losses(trainer: LowRankTrainer) -> bool:
    return all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def skipped_logged(trainer: LowRankTrainer) -> dict[int, int]:
    """``lowrank/skipped_steps`` as logged at each step (absent before the first skip)."""
    return {e["step"]: e.get("lowrank/skipped_steps", 0) for e in trainer.state.log_history if "loss" in e}


class Snapshot(transformers.TrainerCallback):
    """Parameters and optimizer state of the optimizer step ``step``: before it, after it, after its rank step.

    Added after LowRankTrainer's own callback, so ``on_step_end`` sees the model after ``update_ranks``.
    """

    def __init__(self, trainer: LowRankTrainer, step: int):
        self.trainer, self.step, self.taken = trainer, step, {}

    def take(self) -> dict:
        opt = optim.inner_optimizer(self.trainer.optimizer)
        return {
            name: (p.detach().clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items()})
            for name, p in self.trainer.model.named_parameters()
        }

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.taken["before"] = self.take()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.taken["after"] = self.take()
            self.taken["specs"] = {n: layer.spec for n, layer in self.trainer.model.lowrank_layers().items()}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.taken["ranked"] = self.take()
            self.taken["ranked_specs"] = {n: layer.spec for n, layer in self.trainer.model.lowrank_layers().items()}


def same(a: dict, b: dict) -> bool:
    """Two snapshots hold the same parameters, equal values and equal optimizer state."""
    if a.keys() != b.keys():
        return False
    for name, (p, s) in a.items():
        q, t = b[name]
        if not torch.equal(p, q) or s.keys() != t.keys() or not all(torch.equal(s[k], t[k]) for k in s):
            return False
    return True


def part(snapshot: dict, layers: set[str]) -> dict:
    """The entries of a snapshot that belong to ``layers``."""
    return {name: value for name, value in snapshot.items() if any(f"{layer}." in name for layer in layers)}


# -- a failing SVD or QR inside a transition --------------------------------------------------


@pytest.mark.parametrize(
    "function, fault, mode, op",
    [
        ("svd", "raise", "factorized", "truncate"),
        ("svd", "nan", "factorized", "truncate"),
        ("qr", "raise", "factorized", "truncate"),
        ("qr", "nan", "factorized", "truncate"),
        ("svd", "raise", "dense", "to_factorized"),
        ("svd", "nan", "dense", "to_factorized"),
    ],
)
def test_a_transition_whose_svd_fails_leaves_the_layer_as_it_was(monkeypatch, function, fault, mode, op):
    """The issue's reproducer: the plan is applied with a warning instead of raising or writing NaN factors."""
    model = get_lowrank_model(tiny_gpt2(), {"target_modules": ["c_fc"], "rank": 8, "capacity": 16, "mode": mode})
    layer = model.lowrank_layers()[MLP]
    spec, before = layer.spec, {n: p.detach().clone() for n, p in layer.named_parameters()}
    failed = break_linalg(monkeypatch, function, fault)
    with pytest.warns(UserWarning, match=rf"{op} of {MLP} skipped: its SVD failed"):
        skipped = model.apply_plan(Plan([LayerChange(MLP, op, rank=4, capacity=4)]))
    assert failed and len(skipped) == 1
    assert layer.spec == spec
    after = dict(layer.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    monkeypatch.undo()
    model.apply_plan(Plan([LayerChange(MLP, op, rank=4, capacity=4)]))
    assert layer.rank == 4, "with a working SVD the same plan applies"


# (strategy settings, the step of the transition, its op): each transition needs an SVD.
TRANSITIONS = {
    "inrank_stage2": ({}, 4, "truncate"),  # stage2_at=0.5 of 8 steps
    "cuttlefish_switch": (
        {"strategy": "cuttlefish", "strategy_args": {"max_dense_steps": 4, "measure_every": 100, "select_layers": "all"}},
        4, "to_factorized",
    ),
    "warm_start_switch": ({"strategy": "warm_start", "strategy_args": {"dense_steps": 4}, "rank": 4}, 4, "to_factorized"),
}


def low_rank_weights(trainer: LowRankTrainer) -> None:
    """Give every dense layer a spectrum of stable rank 1, so that Cuttlefish's scaled ranks factorize it."""
    with torch.no_grad():
        for layer in trainer.model.lowrank_layers().values():
            u, _, vh = torch.linalg.svd(layer.weight, full_matrices=False)
            s = torch.zeros(len(vh))
            s[:4] = torch.tensor([4.0, 2.0, 1.0, 0.5])
            layer.weight.copy_(u @ torch.diag(s) @ vh)


@pytest.mark.parametrize(
    "transition, function, fault",
    [
        ("inrank_stage2", "svd", "raise"),
        ("inrank_stage2", "svd", "nan"),
        ("inrank_stage2", "qr", "raise"),
        ("cuttlefish_switch", "svd", "raise"),
        ("warm_start_switch", "svd", "nan"),
        ("inrank_stage2", "factor_svd", "one_layer"),  # one layer's growth checks and truncation, all run long
    ],
)
def test_training_goes_on_when_the_svd_of_a_transition_fails(tmp_path, monkeypatch, transition, function, fault):
    """Every layer's SVD fails at the transition, or one layer's at every check: the run finishes, the
    broken layers keep their layout, tensors and optimizer state, the others change."""
    lowrank, step, op = TRANSITIONS[transition]
    out = tmp_path / "run"
    trainer = build_trainer(out, lowrank, max_steps=8)
    if transition == "cuttlefish_switch":
        low_rank_weights(trainer)
    snapshot = Snapshot(trainer, step)
    trainer.add_callback(snapshot)
    layers = trainer.model.lowrank_layers()
    start = {n: layer.spec for n, layer in layers.items()}
    if fault == "one_layer":
        failed = break_layer_svds(monkeypatch, layers[MLP])
        broken = {MLP}
    else:
        failed = break_linalg(monkeypatch, function, fault, when=lambda: trainer.state.global_step == step)
        broken = set(layers)
    messages = recorded(trainer)

    layers = trainer.model.lowrank_layers()
    healthy = sorted(set(layers) - broken)
    assert failed, "the fault was hit"
    skipped = [m for m in messages if f"{op} of " in m and "skipped: its SVD failed" in m]
    assert len(skipped) == len(broken), messages
    specs, ranked_specs = snapshot.taken["specs"], snapshot.taken["ranked_specs"]
    assert {n: ranked_specs[n] for n in broken} == {n: specs[n] for n in broken}, "every broken layer kept its layout"
    ranked, after = snapshot.taken["ranked"], snapshot.taken["after"]
    if healthy:
        ranked, after = part(ranked, broken), part(after, broken)
    assert same(ranked, after), "and its tensors and optimizer state"
    (entry,) = [h for h in trainer.plan_history if h["step"] == step]
    assert len(entry["skipped"]) == len(broken)
    if healthy:
        assert any(f"SVD of {MLP}" in m and "failed" in m for m in messages), "its growth checks failed too"
        assert layers[MLP].spec == start[MLP] and trainer.strategy.ranks[MLP] == 2, "it never grew"
        for name in healthy:
            layer = layers[name]
            assert ranked_specs[name] != specs[name], f"{name} was truncated"
            assert layer.rank == layer.capacity == trainer.strategy.ranks[name] > 2, "the others grew and were truncated"
    else:
        assert trainer.model.lr_adjust.factor == 1.0, "no layer changed, so the learning rate did not either"
    assert trainer.state.global_step == 8 and finite_losses(trainer)
    assert {n: layers[n].spec for n in broken} == {n: specs[n] for n in broken}, "not retried later"
    assert_finite(trainer.model)

    trainer.save_model(str(out / "final"))
    for folder in (out / "checkpoint-4", out / "checkpoint-8", out / "final"):
        assert_finite_and_loadable(folder)
    assert_clean(out)


# -- NaN and Inf losses ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_loss_skips_the_update(tmp_path, value):
    """The step changes no weight and no optimizer state, warns with its number, and training goes on."""
    trainer = build_trainer(tmp_path, SHORT, max_steps=4, save_strategy="no")
    poison_loss(trainer, {3}, value)
    skipped, normal = Snapshot(trainer, 3), Snapshot(trainer, 2)
    trainer.add_callback(skipped)
    trainer.add_callback(normal)
    messages = recorded(trainer)

    assert same(skipped.taken["before"], skipped.taken["after"]), "step 3 changed nothing"
    assert not same(normal.taken["before"], normal.taken["after"]), "step 2 trained (the snapshot sees changes)"
    assert [m for m in messages if "NaN or Inf gradients" in m] == [
        "step 3: NaN or Inf gradients (loss not finite); the update was skipped."
    ]
    assert trainer.state.global_step == 4 and trainer.nonfinite_steps == [3]
    assert_finite(trainer.model)
    assert skipped_logged(trainer) == {1: 0, 2: 0, 3: 1, 4: 1}


def test_a_run_with_nan_losses_and_a_failing_svd_finishes_with_finite_loadable_checkpoints(tmp_path, monkeypatch):
    """The issue's acceptance run: NaN and Inf losses, then the stage-2 SVD raises; then a resume."""
    out = tmp_path / "run"
    trainer = with_max_nonfinite(build_trainer(out), 3)
    poison_loss(trainer, {3, 4}, math.nan)
    poison_loss(trainer, {6, 7}, math.inf)  # 2 in a row twice: the count restarts after a good step
    failed = break_linalg(monkeypatch, "svd", "raise", when=lambda: trainer.state.global_step == 8)
    messages = recorded(trainer)

    assert failed and trainer.state.global_step == 16
    for step in (3, 4, 6, 7):
        assert f"step {step}: NaN or Inf gradients (loss not finite); the update was skipped." in messages
    assert sum("truncate of " in m and "skipped: its SVD failed" in m for m in messages) == 4
    assert skipped_logged(trainer)[16] == 4
    trainer.save_model(str(out / "final"))
    for n in (4, 8, 12, 16):
        assert_finite_and_loadable(out / f"checkpoint-{n}")
    assert_finite_and_loadable(out / "final")
    assert read_json(out / "checkpoint-4" / STATE_NAME)["nonfinite_steps"] == [3, 4]
    assert read_json(out / "checkpoint-16" / STATE_NAME)["nonfinite_steps"] == [3, 4, 6, 7]
    assert_clean(out)

    monkeypatch.undo()
    resumed = with_max_nonfinite(build_trainer(out), 3)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-12"))
    assert resumed.nonfinite_steps == [3, 4, 6, 7], "the skipped steps are restored with the checkpoint"
    assert resumed.model.rank_pattern() == trainer.model.rank_pattern()


def test_too_many_non_finite_steps_in_a_row_stop_with_advice(tmp_path):
    out = tmp_path / "run"
    trainer = with_max_nonfinite(build_trainer(out), 3)
    poison_loss(trainer, set(range(3, 17)))
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row \(up to step 5\) had NaN or Inf") as e:
        trainer.train()
    assert "max_nonfinite_steps" in str(e.value) and "learning rate" in str(e.value)
    assert trainer.nonfinite_steps == [3, 4, 5]
    assert_finite(trainer.model)
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert_finite_and_loadable(out / "checkpoint-4")
    assert read_json(out / "checkpoint-4" / STATE_NAME)["nonfinite_steps"] == [3, 4]


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    """Weights that went non-finite outside the gradients (here: set by hand) stop the save, not corrupt it."""
    out = tmp_path / "run"
    trainer = build_trainer(out, max_steps=8)

    class Corrupt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                with torch.no_grad():
                    trainer.model.base_model.transformer.wte.weight[0, 0] = math.nan

    trainer.add_callback(Corrupt())
    with pytest.raises(RuntimeError, match=r"refusing to write .*checkpoint-8: tensors \[.*wte.weight.*\] hold NaN or Inf"):
        trainer.train()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert_finite_and_loadable(out / "checkpoint-4")
    assert_clean(out)
    with pytest.raises(RuntimeError, match=r"refusing to write .*final"):
        trainer.save_model(str(out / "final"))
    assert not (out / "final").exists()
    assert_clean(out)


# -- a full disk, leftovers of killed saves ----------------------------------------------------


def test_a_disk_full_checkpoint_save_leaves_nothing_behind_and_the_run_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = build_trainer(out)
    real_save = hf_lowrank.files.save_file

    def disk_full(tensors, filename, metadata=None):
        if trainer.state.global_step != 8:
            return real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\x00" * 64)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_lowrank.files, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    assert not (out / ".staging-checkpoint-8").exists(), "the failed save's staging folder is removed at once"
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert_finite_and_loadable(out / "checkpoint-4")
    assert_clean(out)

    monkeypatch.undo()  # space freed
    resumed = build_trainer(out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert resumed.state.global_step == 16 and get_last_checkpoint(str(out)) == str(out / "checkpoint-16")
    assert_clean(out)


def test_a_full_disk_inside_torch_save_names_the_checkpoint(tmp_path, monkeypatch):
    """The Trainer's own torch.save of optimizer.pt raised a bare ENOSPC naming no file."""
    out = tmp_path / "run"
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"writing checkpoint-4 into .*\.staging-checkpoint-4 failed \(.*No space left on device\); the previous") as e:
        build_trainer(out, SHORT, max_steps=4, save_steps=4).train()
    assert e.value.errno == errno.ENOSPC
    assert_clean(out)


def test_training_start_removes_what_killed_saves_left(tmp_path):
    """A kill mid-checkpoint leaves ``.staging-checkpoint-N``; a kill in ``atomic_directory`` ``.NAME.<random>``.

    A kill between atomic_directory's two renames leaves the previous contents under
    ``.NAME.old<pid>`` and nothing under ``NAME``: they are put back, not deleted. A kill
    between moving an old ``checkpoint-N`` aside and renaming the complete new one in leaves
    the only copy in its staging folder: it is put in place. Only folders holding hf_lowrank's
    marker are touched: the user's ``.cache.datasets`` or ``.git.previous`` (names of the same
    form) stay.
    """
    out = tmp_path / "run"
    staged = out / ".staging-checkpoint-8" / "checkpoint-8"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"\x00" * 1024)
    (staged.parent / TEMP_MARKER).write_text("checkpoint being written")  # killed mid-save: removed
    complete = out / ".staging-checkpoint-12"
    (complete / "checkpoint-12").mkdir(parents=True)
    (complete / "checkpoint-12" / "model.safetensors").write_text("complete")
    (complete / "replaced").mkdir()  # the old checkpoint-12, moved aside
    (complete / TEMP_MARKER).write_text(json.dumps({"complete": "checkpoint-12"}))
    for name in ("final", "kept"):
        (out / name).mkdir()
        (out / name / "model.safetensors").write_text(name)
        # the temporary folders atomic_directory makes, as it names and marks them
        half = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        (half / "model.safetensors").write_bytes(b"\x00" * 7)
        (half / TEMP_MARKER).write_text("new contents")
    (out / ".final.old4242").mkdir()  # an older run's leftover next to a complete final/
    (out / ".final.old4242" / "model.safetensors").write_text("older")
    (out / ".final.old4242" / TEMP_MARKER).write_text("old contents")
    (out / "kept" / TEMP_MARKER).write_text("old contents")
    (out / "kept").rename(out / ".kept.old4343")  # killed between the two renames: no kept/ left
    for name in (".cache", ".cache.datasets", ".git.previous", ".staging-mine", ".notes.old1"):
        (out / name).mkdir()  # not ours: left alone, whatever the name
        (out / name / "data").write_text("mine")
    (out / "notes.txt").write_text("mine")

    build_trainer(out, SHORT, max_steps=1, save_strategy="no").train()
    assert sorted(p.name for p in out.iterdir()) == [
        ".cache", ".cache.datasets", ".git.previous", ".notes.old1", ".staging-mine", "checkpoint-12", "final", "kept",
        "notes.txt",
    ]
    assert (out / "final" / "model.safetensors").read_text() == "final"
    assert (out / "kept" / "model.safetensors").read_text() == "kept", "the only copy is restored"
    assert sorted(p.name for p in (out / "kept").iterdir()) == ["model.safetensors"], "its marker is gone"
    assert (out / "checkpoint-12" / "model.safetensors").read_text() == "complete", "the complete copy is kept"
    assert all((out / n / "data").read_text() == "mine" for n in (".cache.datasets", ".git.previous", ".staging-mine"))


def test_replacing_a_checkpoint_never_leaves_it_half_deleted(tmp_path, monkeypatch):
    """Re-saving ``checkpoint-N`` moves the old one aside in one rename; a kill before the new one is renamed
    in leaves the complete new copy in the (marked) staging folder, and the next start puts it in place."""
    out = tmp_path / "run"
    build_trainer(out, SHORT, max_steps=4, save_steps=4).train()
    old = (out / "checkpoint-4" / "trainer_state.json").read_text()
    real_replace = os.replace

    def killed_before_the_new_one_is_in(src, dst):
        if str(dst) == str(out / "checkpoint-4") and ".staging-" in str(src):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_one_is_in)
    trainer = build_trainer(out, SHORT, max_steps=4, save_steps=4, seed=1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "checkpoint-4").exists() and (out / ".staging-checkpoint-4" / "checkpoint-4").is_dir()
    new = (out / ".staging-checkpoint-4" / "checkpoint-4" / "trainer_state.json").read_text()
    remove_stale_staging(out)
    assert (out / "checkpoint-4" / "trainer_state.json").read_text() == new != old
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# -- resuming from a damaged checkpoint --------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """checkpoint-4 of a 4-step InRank run."""
    out = tmp_path_factory.mktemp("source")
    build_trainer(out, SHORT, max_steps=4).train()
    return out / "checkpoint-4"


@pytest.mark.parametrize(
    "damage, error, message",
    [
        ("missing", FileNotFoundError, r"lowrank_trainer_state\.json: missing, so the strategy's state .* cannot be restored"),
        ("empty", ValueError, r"lowrank_trainer_state\.json: not a low-rank training state \(needs keys .*has \[\]\)"),
        ("no_strategy_state", ValueError, r"lowrank_trainer_state\.json: not a low-rank training state .*'strategy_state'"),
        ("bad_strategy_state", ValueError, r"lowrank_trainer_state\.json: malformed strategy_state"),
        ("not_json", ValueError, r"lowrank_trainer_state\.json: not valid JSON"),
    ],
)
def test_resume_refuses_a_checkpoint_without_a_valid_strategy_state(tmp_path, checkpoint, damage, error, message):
    """Resuming with a reset strategy would silently train another run: refused, naming the file."""
    out = tmp_path / "run"
    ckpt = out / checkpoint.name
    shutil.copytree(checkpoint, ckpt)
    state_file = ckpt / STATE_NAME
    if damage == "missing":
        state_file.unlink()
    elif damage == "empty":
        write_json(state_file, {})
    elif damage == "not_json":
        state_file.write_text('{"strategy": "inrank", ')
    else:
        state = read_json(state_file)
        if damage == "no_strategy_state":
            del state["strategy_state"]
        else:
            state["strategy_state"] = {"ranks": 3}
        write_json(state_file, state)
    write_manifest(ckpt)  # as if the checksums were updated too: the state checks must hold on their own

    trainer = build_trainer(out, SHORT, max_steps=8)
    with pytest.raises(error, match=message) as e:
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert str(state_file) in str(e.value)
    assert trainer.state.global_step == 0, "refused before the first step"


def _edit_optimizer(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    for entry in state["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            if entry[key].dim() == 2:
                entry[key] = edit(key, entry[key])
    torch.save(state, path)


RESUME_DAMAGE = {
    # name: (damage, error, message)
    "no_optimizer": (lambda c: (c / "optimizer.pt").unlink(), FileNotFoundError, r"optimizer\.pt: missing, so resuming would not continue the same run \(the optimizer's moments"),
    "no_scheduler": (lambda c: (c / "scheduler.pt").unlink(), FileNotFoundError, r"scheduler\.pt: missing, .*schedule's position"),
    "no_rng": (lambda c: (c / "rng_state.pth").unlink(), FileNotFoundError, r"rng_state\.pth: missing, .*random state"),
    "no_trainer_state": (lambda c: (c / "trainer_state.json").unlink(), FileNotFoundError, r"trainer_state\.json: missing"),
    "step_edited": (
        lambda c: write_json(c / "trainer_state.json", {**read_json(c / "trainer_state.json"), "global_step": 3}),
        ValueError, r"trainer_state\.json: global_step=3, but the folder is checkpoint-4",
    ),
    "lowrank_step_edited": (
        lambda c: write_json(c / STATE_NAME, {**read_json(c / STATE_NAME), "global_step": 6}),
        ValueError, r"lowrank_trainer_state\.json: global_step=6, but .*trainer_state\.json says 4",
    ),
    "moments_1x1": (
        lambda c: _edit_optimizer(c / "optimizer.pt", lambda k, t: torch.zeros(1, 1)),
        ValueError, r"optimizer\.pt: 'exp_avg' of parameter base_model\.\S+ has shape \(1, 1\), the parameter \(",
    ),
    "moments_a_row_larger": (
        lambda c: _edit_optimizer(c / "optimizer.pt", lambda k, t: torch.cat([t, t[:1]])),
        ValueError, r"optimizer\.pt: 'exp_avg' of parameter \S+ has shape",
    ),
    "inf_moment": (
        lambda c: _edit_optimizer(c / "optimizer.pt", lambda k, t: t.fill_(math.inf) if k == "exp_avg_sq" else t),
        ValueError, r"optimizer\.pt: 'exp_avg_sq' of parameter \S+ holds NaN or Inf",
    ),
    "moment_dtype": (
        lambda c: _edit_optimizer(c / "optimizer.pt", lambda k, t: t.double()),
        ValueError, r"optimizer\.pt: 'exp_avg' of parameter \S+ has dtype torch\.float64",
    ),
    "optimizer_truncated": (
        lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:300]),
        ValueError, r"optimizer\.pt: not a readable torch file",
    ),
    "optimizer_not_a_state": (lambda c: torch.save([1, 2], c / "optimizer.pt"), ValueError, r"optimizer\.pt: not an optimizer state"),
    "scheduler_step_edited": (
        lambda c: torch.save({**torch.load(c / "scheduler.pt", weights_only=True), "last_epoch": 2}, c / "scheduler.pt"),
        ValueError, r"scheduler\.pt: the schedule was saved at step 2, but .*global_step=4",
    ),
}


@pytest.mark.parametrize("damage", sorted(RESUME_DAMAGE))
def test_resume_refuses_a_checkpoint_that_would_not_continue_the_same_run(tmp_path, checkpoint, damage):
    """Missing optimizer, scheduler or RNG state, an edited step, an optimizer state that does not fit the
    parameters (a (1, 1) moment made torch's step crash the process): refused before the first step, naming the file."""
    out = tmp_path / "run"
    ckpt = out / checkpoint.name
    shutil.copytree(checkpoint, ckpt)
    edit, error, message = RESUME_DAMAGE[damage]
    edit(ckpt)
    write_manifest(ckpt)  # an edit that also updates the checksums: the checks behind them must hold on their own
    trainer = build_trainer(out, SHORT, max_steps=8)
    with pytest.raises(error, match=message) as e:
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert str(ckpt) in str(e.value)
    assert not (out / "checkpoint-8").exists() and not any(x.get("step", 0) > 4 for x in trainer.state.log_history)


# -- the best checkpoint survives rotation and a resume ------------------------------------------


def test_the_best_checkpoint_is_kept_and_loaded_after_a_resume(tmp_path):
    """``best_model_checkpoint`` names the final folder, so rotation keeps it and load_best_model_at_end loads it."""
    out = tmp_path / "run"

    def trainer_for(stop_at: int | None = None) -> LowRankTrainer:
        base = build_trainer(out, max_steps=12)
        best = {"eval_strategy": "steps", "eval_steps": 4, "save_total_limit": 2, "load_best_model_at_end": True,
                "metric_for_best_model": "score", "greater_is_better": True}

        def score(prediction) -> dict:
            # A metric best at step 4 (an eval loss would be best at the end, where nothing can go wrong).
            return {"score": 1.0 if trainer.state.global_step == 4 else 0.0}

        trainer = LowRankTrainer(
            model=base.model, args=dataclasses.replace(base.args, **best), train_dataset=base.train_dataset,
            eval_dataset=TokenDataset(4), compute_metrics=score,
        )
        if stop_at is not None:
            trainer.add_callback(StopAt(stop_at))
        return trainer

    class StopAt(transformers.TrainerCallback):
        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                control.should_training_stop = True  # as a kill after checkpoint-8, minus the kill

    trainer_for(stop_at=8).train()
    state = read_json(out / "checkpoint-8" / "trainer_state.json")
    assert state["best_model_checkpoint"] == str(out / "checkpoint-4")

    resumed = trainer_for()
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-8"))
    assert resumed.state.global_step == 12
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-12", "checkpoint-4"]
    assert resumed.state.best_model_checkpoint == str(out / "checkpoint-4")
    best = LowRankModel.from_pretrained(out / "checkpoint-4")
    assert resumed.model.rank_pattern() == best.rank_pattern(), "the best checkpoint's shapes were loaded"
    loaded, saved = resumed.model.state_dict(), best.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


# -- one run per output_dir ---------------------------------------------------------------------


def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path):
    """A live lock holder (here this very process, through another open file) refuses the second run before any step."""
    out = tmp_path / "run"
    with run_lock(out):
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        trainer = build_trainer(out, SHORT, max_steps=2, save_steps=1)
        with pytest.raises(RuntimeError, match=rf"in use by another training run \(pid {os.getpid()} on host "):
            trainer.train()
        assert trainer.state.global_step == 0 and not list(out.glob("checkpoint-*"))
    assert not (out / LOCK_NAME).exists(), "released when the holder ends"


def test_a_stale_lock_is_taken_over(tmp_path):
    """A killed run leaves its lock file, but no process holds the lock any more: the next run goes ahead."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "since": "earlier"}))
    trainer = build_trainer(out, SHORT, max_steps=2, save_strategy="no")
    trainer.train()
    assert trainer.state.global_step == 2 and not (out / LOCK_NAME).exists()


def test_an_output_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    trainer = build_trainer(tmp_path / "run", SHORT, max_steps=2)
    trainer.args.output_dir = str(tmp_path / "a_file" / "run")  # a folder under a file: never writable
    with pytest.raises(OSError, match="output_dir=.* cannot be written"):
        trainer.train()
    assert trainer.state.global_step == 0
