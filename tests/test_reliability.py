"""Crashes, numerical faults, bad input, and memory over a long run of rank changes.

The crash tests run tests/helpers_train.py in a subprocess, stop it at a chosen point and kill
it with SIGKILL; the reference and resumed runs are the same code run in-process. NaN losses,
failing transitions, full disks and damaged checkpoints in a training run: tests/test_faults.py;
atomic writes of files and folders: tests/test_files.py.
"""

import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers_train import RESULT, build_trainer, run, tiny_gpt2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_resume import assert_same_run
from torch import nn
from transformers.trainer_utils import get_last_checkpoint

import hf_lowrank
import hf_lowrank.layer
from hf_lowrank import LowRankConfig, LowRankModel, get_lowrank_model, optim
from hf_lowrank.files import read_json, write_json
from hf_lowrank.layer import LowRankLinear
from hf_lowrank.strategies import REGISTRY, LayerChange, Plan, RankStrategy, StrategyArgs, TrainContext
from hf_lowrank.strategies.inrank import InRank
from hf_lowrank.trainer import LowRankTrainer

HELPER = Path(__file__).with_name("helpers_train.py")
MAX_STEPS, SAVE_STEPS = 16, 4  # helpers_train's defaults
BROKEN = "transformer.h.0.mlp.c_fc"


# -- crashes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    return run(tmp_path_factory.mktemp("reference"))


def launch(out: Path, *flags: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")  # a file, not a pipe: a full pipe would block the child
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(HELPER), str(out), *flags], env=env, stdout=log, stderr=log)


def kill_when(proc: subprocess.Popen, marker: Path, timeout: float = 240.0) -> None:
    """Wait until the child writes ``marker`` (it then sleeps), and SIGKILL it."""
    end = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            log = marker.parent.parent / f"{marker.parent.name}.log"
            pytest.fail(f"helper exited with {proc.returncode} before {marker.name}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"helper did not reach {marker.name} in {timeout:.0f} s")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_continues_the_same_run(tmp_path, reference):
    step = random.Random(8).randint(SAVE_STEPS + 1, MAX_STEPS - 1)  # after at least one checkpoint
    out = tmp_path / "run"
    proc = launch(out, "--pause-after-step", str(step))
    kill_when(proc, out / f"paused-after-step-{step}")
    assert not (out / RESULT).exists(), "killed before the end"

    last = get_last_checkpoint(str(out))
    assert last == str(out / f"checkpoint-{(step - 1) // SAVE_STEPS * SAVE_STEPS}")
    resumed = run(out, resume=last)
    assert_same_run(resumed, reference, after=int(last.rpartition("-")[2]))


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one(tmp_path, reference):
    out = tmp_path / "run"
    proc = launch(out, "--pause-in-save", "8")
    kill_when(proc, out / "paused-in-save-8")
    assert (out / ".staging-checkpoint-8" / "checkpoint-8" / "model.safetensors").is_file(), "killed mid-save"
    assert not (out / "checkpoint-8").exists(), "nothing half-written under the final name"

    last = get_last_checkpoint(str(out))
    assert last == str(out / "checkpoint-4")
    loaded = LowRankModel.from_pretrained(last)
    assert loaded.rank_pattern() == LowRankConfig.from_pretrained(last).rank_pattern
    resumed = run(out, resume=last)
    assert_same_run(resumed, reference, after=4)
    assert not list(out.glob(".staging-*")), "the stale staging folder is removed when training starts again"


# -- numerical faults ------------------------------------------------------------------------


def inrank_model(**strategy_args) -> LowRankModel:
    args = {"warmup_steps": 0, "interval": 1, "stage2_at": None, **strategy_args}
    config = LowRankConfig(target_modules=["c_fc", "c_proj"], strategy="inrank", strategy_args=args)
    return get_lowrank_model(tiny_gpt2(), config)


def break_svd(monkeypatch, layer: LowRankLinear, fault: str, function: str = "factor_svdvals") -> None:
    """Make ``hf_lowrank.layer.<function>`` fail with ``fault`` for ``layer`` only."""
    real = getattr(hf_lowrank.layer, function)

    def faulty(B, A):
        if B.data_ptr() != layer.B.data_ptr():
            return real(B, A)
        if fault == "linalg_error":
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        if fault == "runtime_error":
            raise RuntimeError("cusolver error")
        out = real(B, A)
        s = out if function == "factor_svdvals" else out[1]
        s[0] = float(fault)
        return out

    monkeypatch.setattr(hf_lowrank.layer, function, faulty)


@pytest.mark.parametrize("fault", ["linalg_error", "runtime_error", "nan", "inf"])
def test_a_bad_spectrum_skips_only_that_layer_with_a_warning(monkeypatch, fault):
    model = inrank_model()
    layers = model.lowrank_layers()
    break_svd(monkeypatch, layers[BROKEN], fault)
    seen = []
    model.strategy.bind(TrainContext(max_steps=10, warn=seen.append))
    plan = model.strategy.step(1, layers)
    assert len(seen) == 1 and BROKEN in seen[0] and "skipped" in seen[0]
    assert sorted(c.layer for c in plan.changes) == sorted(n for n in layers if n != BROKEN)
    assert model.strategy.ranks[BROKEN] == 2


def test_non_finite_weights_skip_the_layer():
    model = inrank_model()
    layers = model.lowrank_layers()
    with torch.no_grad():
        layers[BROKEN].A[0, 0] = float("nan")
    seen = []
    model.strategy.bind(TrainContext(max_steps=10, warn=seen.append))
    plan = model.strategy.step(1, layers)
    assert len(seen) == 1 and BROKEN in seen[0]
    assert BROKEN not in [c.layer for c in plan.changes] and len(plan.changes) == len(layers) - 1


# Spectra as SVDs and broken weights produce them: any order and magnitude, zeros, NaN, inf.
spectrum_values = st.one_of(
    st.floats(0.0, 1e6, allow_nan=False), st.sampled_from([0.0, 1e-30, float("nan"), float("inf")])
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_features=st.integers(1, 24),
    in_features=st.integers(1, 24),
    data=st.data(),
    threshold=st.floats(0.01, 1.0),
    initial_rank=st.integers(1, 30),
)
def test_inrank_never_grows_past_capacity_or_below_rank_one(out_features, in_features, data, threshold, initial_rank):
    full = min(out_features, in_features)
    capacity = data.draw(st.integers(1, full), label="capacity")
    buffer = data.draw(st.integers(0, 30), label="buffer")
    config = LowRankConfig(
        target_modules=["x"], strategy="inrank", capacity=capacity, rank=1,
        strategy_args={"initial_rank": initial_rank, "buffer": buffer, "threshold": threshold,
                       "warmup_steps": 0, "interval": 1, "stage2_at": None},
    )
    strategy = InRank(config)
    layer = LowRankLinear(nn.Linear(in_features, out_features))
    spec = strategy.initial_spec("x", layer)
    layer.init_factorized(spec.rank, spec.capacity)
    strategy.bind(TrainContext(max_steps=100, warn=lambda message: None))
    b = strategy.buffers["x"]
    assert 1 <= strategy.ranks["x"] <= capacity - b and layer.rank <= capacity

    for step in range(1, data.draw(st.integers(1, 4), label="checks") + 1):
        spectrum = data.draw(st.lists(spectrum_values, min_size=0, max_size=40), label="spectrum")
        layer.singular_values = lambda s=spectrum: torch.tensor(sorted(s, reverse=True), dtype=torch.float32)
        r_before, rank_before = strategy.ranks["x"], layer.rank
        plan = strategy.step(step, {"x": layer})
        for change in plan.changes if plan else []:
            assert change.op == "grow" and 1 <= change.rank <= capacity
            layer.grow(change.rank)
        r = strategy.ranks["x"]
        assert r_before <= r <= max(r_before, capacity - b), "never shrinks, capped at capacity - buffer"
        assert 1 <= rank_before <= layer.rank <= capacity

    strategy.stage2_step = step + 1
    (change,) = strategy.step(step + 1, {"x": layer}).changes
    assert change.op == "truncate" and 1 <= change.rank <= capacity
    del layer.singular_values
    layer.truncate(change.rank)
    assert layer.rank == layer.capacity == strategy.ranks["x"]


# -- bad input fails early, naming the field -------------------------------------------------


def raised_here(excinfo) -> bool:
    """The error comes from hf_lowrank's own checks, not from deep inside torch."""
    return Path(hf_lowrank.__file__).parent in Path(str(excinfo.traceback[-1].path)).parents


def test_trainer_refuses_a_model_that_is_not_lowrank(tmp_path):
    args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="LowRankTrainer needs a LowRankModel .*got GPT2LMHeadModel") as e:
        LowRankTrainer(model=tiny_gpt2(), args=args)
    assert raised_here(e)


def test_trainer_refuses_a_bad_max_nonfinite_steps(tmp_path):
    trainer = build_trainer(tmp_path, save_strategy="no")
    with pytest.raises(ValueError, match=r"LowRankTrainer\.max_nonfinite_steps=0 is not allowed; give an int >= 1") as e:
        LowRankTrainer(model=trainer.model, args=trainer.args, max_nonfinite_steps=0)
    assert raised_here(e)


@pytest.mark.parametrize(
    "strategy, args, field",
    [
        ("inrank", {"stage2_at": 500}, "stage2_at"),
        ("warm_start", {"dense_steps": 500}, "dense_steps"),
        ("dynamic", {"inflate_at": 50, "deflate_at": 500}, "deflate_at"),
        ("cuttlefish", {"max_dense_steps": 500, "select_layers": "all"}, "max_dense_steps"),
    ],
)
def test_a_schedule_point_past_the_end_fails_before_the_first_step(tmp_path, strategy, args, field):
    trainer = build_trainer(tmp_path, {"strategy": strategy, "strategy_args": args}, max_steps=100, save_strategy="no")
    with pytest.raises(ValueError, match=rf"LowRankConfig\.strategy_args\.{field}=500 is step 500, after the end") as e:
        trainer.train()
    assert raised_here(e) and trainer.state.global_step == 0


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rank": 1000}, r"LowRankConfig\.rank=1000 is larger than min\(in_features, out_features\)=32"),
        ({"rank": 4, "capacity": 1000}, r"LowRankConfig\.capacity=1000 is larger than"),
        ({"target_modules": ["not_a_layer"]}, r"LowRankConfig\.target_modules=\['not_a_layer'\].*matches no nn\.Linear / Conv1D.*c_fc"),
        ({"target_modules": r".*\.nothing_here$"}, r"LowRankConfig\.target_modules=.*matches no nn\.Linear / Conv1D.*c_fc"),
        ({"target_modules": ["c_fc"], "exclude_modules": ["c_fc"]}, r"LowRankConfig\.target_modules=.*matches no nn\.Linear / Conv1D.*c_fc"),
        ({"target_modules": ["wte"]}, r"LowRankConfig\.target_modules=\['wte'\].*matches no nn\.Linear / Conv1D.*c_fc"),  # an embedding
    ],
)
def test_sizes_and_names_that_do_not_fit_the_model_are_refused(config, message):
    with pytest.raises(ValueError, match=message) as e:
        get_lowrank_model(tiny_gpt2(), LowRankConfig(**config))
    assert raised_here(e)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_a_regex_that_does_not_compile_names_the_field(field):
    with pytest.raises(ValueError, match=rf"LowRankConfig\.{field}='\(\[' is not allowed; a string is a regex .* does not compile") as e:
        LowRankConfig(**{"target_modules": ["c_fc"], field: "(["})
    assert raised_here(e)


def test_a_config_can_be_a_dict_of_fields_and_a_wrong_key_is_named():
    model = get_lowrank_model(tiny_gpt2(), {"target_modules": ["c_fc"], "rank": 8})
    assert {layer.rank for layer in model.lowrank_layers().values()} == {8}
    with pytest.raises(ValueError, match=r"unknown LowRankConfig field\(s\) \['rnak'\]; known fields are") as e:
        get_lowrank_model(tiny_gpt2(), {"rnak": 8})
    assert raised_here(e)


def test_a_rank_pattern_too_large_for_its_layer_names_the_file(tmp_path):
    get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4)).save_pretrained(tmp_path)
    saved = read_json(tmp_path / "lowrank_config.json")
    saved["rank_pattern"][BROKEN].update(rank=1000, capacity=1000)
    write_json(tmp_path / "lowrank_config.json", saved)
    with pytest.raises(ValueError, match=rf"lowrank_config\.json: rank_pattern\['{BROKEN}'\] has rank=1000, capacity=1000, not allowed.*need 1 <= rank <= capacity <= 32") as e:
        LowRankModel.from_pretrained(tmp_path)
    assert raised_here(e)


# -- long runs -------------------------------------------------------------------------------


class Churn(RankStrategy):
    """Test-only: every 3 steps, every layer moves on in a cycle through all five transitions."""

    name = "churn"
    Args = StrategyArgs
    changes_shapes = True
    CYCLE = ("to_factorized", "grow", "truncate", "to_residual", "grow", "to_dense")

    def due(self, step):
        return step % 3 == 0

    def is_final(self):
        return False

    def step(self, step, layers):
        op = self.CYCLE[(step // 3) % len(self.CYCLE)]
        if op == "grow":
            return Plan([LayerChange(n, "grow", rank=layer.capacity) for n, layer in layers.items()])
        if op == "to_dense":
            return Plan([LayerChange(n, "to_dense") for n in layers])
        return Plan([LayerChange(n, op, rank=2, capacity=4) for n in layers])


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_a_long_run_of_rank_changes_keeps_memory_flat(tmp_path, monkeypatch):
    assert REGISTRY["churn"] is Churn, "a RankStrategy subclass with a name registers itself"
    steps, first, measured = 3000, 300, {}  # 300 and 3000: the same phase of the cycle

    class Probe(transformers.TrainerCallback):
        """Figures after the rank step of a step (callbacks run in the order they were added)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step not in (1, first, steps):
                return
            gc.collect()
            opt = optim.inner_optimizer(trainer.optimizer)
            model = trainer.model
            measured[state.global_step] = {
                "rss_mb": round(rss_mb(), 1),
                "live_tensors": sum(isinstance(o, torch.Tensor) for o in gc.get_objects()),
                "optimizer_state_entries": len(opt.state),
                "params_in_groups": sum(len(g["params"]) for g in opt.param_groups),
                "trainable_params": sum(p.requires_grad for p in model.parameters()),
                "forward_hooks": sum(
                    len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
                ),
                "modes": sorted({layer.mode for layer in model.lowrank_layers().values()}),
                "plans_applied": len(trainer.plan_history),
                "plan_history_kb": round(len(json.dumps(trainer.plan_history)) / 1024, 1),
                "cpu_seconds": round(time.process_time() - cpu_start, 1),
            }

    trainer = build_trainer(
        tmp_path,
        {"target_modules": "all-linear", "exclude_modules": None, "strategy": "churn", "strategy_args": {},
         "rank": 2, "capacity": 4},
        model=tiny_gpt2(n_layer=1, n_embd=8),
        max_steps=steps, per_device_train_batch_size=1, gradient_accumulation_steps=1, logging_steps=steps,
        save_strategy="no",
    )
    trainer.add_callback(Probe())
    started, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds = time.perf_counter() - started
    early, late = measured[first], measured[steps]
    print(json.dumps({"wall_seconds": round(seconds, 1), **measured}))  # the figures of docs/reliability.md (-s)

    assert late["plans_applied"] == steps // 3 and late["modes"] == early["modes"], "same phase of the cycle"
    for key in ("optimizer_state_entries", "params_in_groups", "trainable_params", "forward_hooks"):
        assert late[key] == early[key], (key, early, late)
    assert late["params_in_groups"] == late["trainable_params"] and late["optimizer_state_entries"] <= late["trainable_params"]
    assert late["live_tensors"] <= early["live_tensors"] + 10, (early, late)
    assert late["rss_mb"] - early["rss_mb"] < 25, (early, late)
