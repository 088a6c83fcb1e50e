"""Rank changes under FSDP2 (``fully_shard``) on CPU with gloo.

The slow tests launch tests/fsdp_train.py with ``torchrun --nproc_per_node 2``, once per
strategy that replaces parameters: InRank through stage 2 (truncate), Cuttlefish's switch
(to_factorized), the dynamic strategy's inflate (to_dense) and deflate (to_residual). Each
launch trains a user's own loop under FSDP2, resumes it from a checkpoint, and trains the
same loop under DDP; the tests compare the three. The fast tests shard in this process (a
one-process gloo group) to check the mechanism piece by piece.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hf_lowrank import LowRankConfig, get_lowrank_model, optim
from hf_lowrank import fsdp as lowrank_fsdp
from hf_lowrank.strategies import LayerChange, Plan

sys.path.insert(0, os.path.dirname(__file__))
import launch as launcher  # noqa: E402
from fsdp_train import SCENARIOS, STEPS  # noqa: E402
from helpers_train import wide_gpt2, wide_tokens  # noqa: E402

SCRIPT = Path(__file__).with_name("fsdp_train.py")
MLP = {"target_modules": ["c_fc", "c_proj"], "exclude_modules": r".*attn.*"}
# FSDP2 and DDP of the same global batch: measured identical to the last bit with gloo on
# CPU (the two processes' gradients are averaged either way); the tolerance leaves room for
# another reduction order.
REL_DDP = 1e-5


def launch(out: Path, scenario: str) -> list[dict]:
    launcher.run(launcher.torchrun(2), [str(SCRIPT), str(out), scenario])
    return [json.loads((out / f"process-{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario, shape_ops",
    [
        ("inrank", {"truncate"}), ("inrank_precondition", {"truncate"}), ("cuttlefish", {"to_factorized"}),
        ("dynamic", {"to_dense", "to_residual"}),
    ],
)
def test_two_process_fsdp2_run(tmp_path, scenario, shape_ops):
    procs = launch(tmp_path, scenario)
    first, second = procs
    fsdp_losses, fsdp_plans = first["fsdp"]
    ddp_losses, ddp_plans = first["ddp"]

    # every process made the same decisions, and the strategy's changes happened
    for run in ("fsdp", "resumed"):
        assert [p["pattern"] for p in first[run][1]] == [p["pattern"] for p in second[run][1]]
    assert first["fsdp_final"] == second["fsdp_final"] == first["resumed_final"] == first["ddp_final"]
    assert first["strategy_state"] == second["strategy_state"]
    assert shape_ops <= {op for p in fsdp_plans for op in p["ops"]}

    for plan, ddp in zip(fsdp_plans, ddp_plans, strict=True):
        assert plan["pattern"] == ddp["pattern"] and plan["ops"] == ddp["ops"]
        assert plan["all_dtensor"], f"step {plan['step']}: a parameter was left unsharded"
        assert plan["optimizer_matches"], f"step {plan['step']}: the optimizer does not hold the model's parameters"
        # optimizer state survives for every parameter the plan did not replace, as under DDP
        assert plan["with_state"] == ddp["with_state"] > 0
        if plan["ops"] == ["grow"]:
            assert plan["kept_params"] == plan["params"], "growth re-sharded parameters"
        else:
            assert plan["kept_params"] < plan["params"], "the changed units were not rebuilt"
    grows = [p for p in fsdp_plans if p["ops"] == ["grow"]]
    assert bool(grows) == scenario.startswith("inrank")

    # the same loss curve as DDP of the same global batch
    assert len(fsdp_losses) == STEPS
    assert list(fsdp_losses.values()) == pytest.approx(list(ddp_losses.values()), rel=REL_DDP)

    # resuming continues the uninterrupted curve
    resumed_losses, _ = first["resumed"]
    save_at = SCENARIOS[scenario][1]
    assert sorted(map(int, resumed_losses)) == list(range(save_at + 1, STEPS + 1))
    assert list(resumed_losses.values()) == pytest.approx([fsdp_losses[s] for s in resumed_losses], rel=1e-6)
    assert {"lowrank_config.json", "model.safetensors", "optimizer.safetensors", "rng_state.safetensors"} <= {
        p.name for p in (tmp_path / f"checkpoint-{save_at}").iterdir()
    }
    assert not list(tmp_path.glob(".staging-*"))


# -- one process, sharded in this process -----------------------------------------------------


@pytest.fixture
def group(tmp_path):
    """A one-process gloo group: FSDP2 shards over one rank, DTensors and all."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_model(config: dict):
    from torch.distributed.fsdp import fully_shard

    model = get_lowrank_model(wide_gpt2(dropout=0.0), LowRankConfig(**MLP, **config))
    for block in model.base_model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def train_step(model, opt):
    ids = torch.arange(32).remainder(50).repeat(2, 1)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_plain_model_is_untouched():
    model = get_lowrank_model(wide_gpt2(dropout=0.0), LowRankConfig(**MLP, rank=4))
    params = dict(model.named_parameters())
    assert not lowrank_fsdp.is_sharded(model)
    plan = Plan([LayerChange("transformer.h.0.mlp.c_fc", "truncate", rank=2)])
    with lowrank_fsdp.gathered_layers(model), lowrank_fsdp.gathered_model(model, write_back=True):
        assert all(params[n] is p for n, p in model.named_parameters())
    with lowrank_fsdp.resharding(model, ["transformer.h.0.mlp.c_fc"]):
        model.apply_plan(plan)
    assert model.lowrank_layers()["transformer.h.0.mlp.c_fc"].rank == 2


def test_growth_keeps_the_shards(group):
    from torch.distributed.tensor import DTensor

    model = sharded_model({"rank": 2, "capacity": 8})
    opt = torch.optim.AdamW(optim.param_groups(model, lr=1e-3))
    train_step(model, opt)
    before = dict(model.named_parameters())
    layer = model.lowrank_layers()["transformer.h.0.mlp.c_fc"]
    assert isinstance(layer.A, DTensor) and layer.capacity == 8, "capacity is the DTensor's global shape"
    plan = Plan([LayerChange("transformer.h.0.mlp.c_fc", "grow", rank=5)])
    with lowrank_fsdp.resharding(model, [c.layer for c in plan.changes if c.op != "grow"], opt):
        model.apply_plan(plan, optimizer=opt)
    assert layer.rank == 5 and layer.capacity == 8
    assert all(before[n] is p for n, p in model.named_parameters()), "growth re-sharded a parameter"
    train_step(model, opt)


def test_truncate_rebuilds_only_its_unit(group):
    from torch.distributed.tensor import DTensor

    model = sharded_model({"rank": 6, "capacity": 8})
    opt = torch.optim.AdamW(optim.param_groups(model, lr=1e-3))
    train_step(model, opt)
    ids = torch.arange(32).remainder(50).repeat(2, 1)
    before = dict(model.named_parameters())
    name = "transformer.h.0.mlp.c_fc"
    with lowrank_fsdp.gathered_layers(model):
        expected = model.lowrank_layers()[name].dense_weight()
        assert not isinstance(model.lowrank_layers()[name].A, DTensor), "the decision reads full tensors"
    assert isinstance(model.lowrank_layers()[name].A, DTensor), "shards are back after the decision"
    plan = Plan([LayerChange(name, "truncate", rank=6)])  # rank 6 of 6 active: the function is kept
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    with lowrank_fsdp.resharding(model, [name], opt):
        model.apply_plan(plan, optimizer=opt)
    after = dict(model.named_parameters())
    layer = model.lowrank_layers()[name]
    assert tuple(layer.A.shape) == (6, 64) and isinstance(layer.A, DTensor)
    with lowrank_fsdp.gathered_layers(model):
        assert torch.allclose(layer.dense_weight(), expected, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-4)
    other_unit = [n for n in after if ".h.1." in n]
    assert other_unit and all(after[n] is before[n] for n in other_unit), "a unit without a change was rebuilt"
    survivors = [n for n in after if ".h.0." in n and not n.endswith((".c_fc.A", ".c_fc.B"))]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(after[n] is not before[n] and after[n] in opt.state for n in survivors), "state of survivors carried"
    assert layer.A not in opt.state and layer.B not in opt.state
    train_step(model, opt)


@pytest.mark.parametrize("written_by", ["this version", "an earlier version"])
def test_checkpoint_round_trip_after_a_transition(group, tmp_path, written_by):
    """save_checkpoint writes LowRankTrainer's state file and checksums through the one atomic-folder helper
    (over an existing folder too); a checkpoint of an earlier version (``lowrank_state.json``, no checksums) loads."""
    from hf_lowrank import checkpoint as ckpt
    from hf_lowrank.files import read_json, write_json

    model = sharded_model({"rank": 4, "capacity": 8})
    opt = torch.optim.AdamW(optim.param_groups(model, lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 10)
    model.bind_training(10, opt, sched)
    train_step(model, opt)
    sched.step()
    name = "transformer.h.1.mlp.c_proj"
    with lowrank_fsdp.resharding(model, [name], opt):
        model.apply_plan(Plan([LayerChange(name, "to_dense")]), optimizer=opt)
    train_step(model, opt)
    sched.step()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "stale.txt").write_text("replaced whole")
    lowrank_fsdp.save_checkpoint(model, opt, tmp_path / "ckpt", sched, step=2)
    expected = [train_step(model, opt) for _ in range(2)]
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {ckpt.LOWRANK_STATE_NAME, ckpt.MANIFEST_NAME, "optimizer.safetensors", "model.safetensors"} <= files
    assert "stale.txt" not in files and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    state = read_json(tmp_path / "ckpt" / ckpt.LOWRANK_STATE_NAME)
    assert state["global_step"] == 2 and state["nonfinite_steps"] == []
    if written_by == "an earlier version":
        del state["global_step"], state["nonfinite_steps"]
        write_json(tmp_path / "ckpt" / "lowrank_state.json", state)
        (tmp_path / "ckpt" / ckpt.LOWRANK_STATE_NAME).unlink()
        (tmp_path / "ckpt" / ckpt.MANIFEST_NAME).unlink()

    fresh = sharded_model({"rank": 4, "capacity": 8})
    fresh_opt = torch.optim.AdamW(optim.param_groups(fresh, lr=1e-3))
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1 - s / 10)
    lowrank_fsdp.load_checkpoint(fresh, fresh_opt, tmp_path / "ckpt", fresh_sched)
    fresh.bind_training(10, fresh_opt, fresh_sched)  # as after any resume: hooks the preconditioner again
    assert fresh.rank_pattern() == model.rank_pattern()
    assert fresh.lowrank_layers()[name].mode == "dense"
    assert fresh_sched.last_epoch == 2
    assert [train_step(fresh, fresh_opt) for _ in range(2)] == pytest.approx(expected, rel=1e-6)


# -- what LowRankTrainer accepts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, strategy, refused",
    [
        ("deepspeed", "inrank", "DeepSpeed ZeRO"),
        ("deepspeed", "fixed", None),
        ("fsdp1", "cuttlefish", "FSDP1"),
        ("fsdp1", "fixed", None),
        ("fsdp2", "dynamic", None),
    ],
)
def test_trainer_gate(tmp_path, monkeypatch, backend, strategy, refused):
    """Before training: shape-changing strategies are refused under DeepSpeed and FSDP1, with what to use instead."""
    import transformers

    from hf_lowrank.trainer import LowRankTrainer

    create = transformers.Trainer.create_accelerator_and_postprocess

    def pretend(self):  # Accelerate enables DeepSpeed and FSDP on GPUs only; the gate reads these flags
        create(self)
        self.is_deepspeed_enabled = backend == "deepspeed"
        self.is_fsdp_enabled = backend.startswith("fsdp")

    monkeypatch.setattr(transformers.Trainer, "create_accelerator_and_postprocess", pretend)
    monkeypatch.setattr(LowRankTrainer, "_fsdp_version", lambda self: int(backend[-1]))
    args = {"strategy_args": {"rank": 0.25}} if strategy == "dynamic" else {}
    model = get_lowrank_model(wide_gpt2(dropout=0.0), LowRankConfig(**MLP, strategy=strategy, **args))
    targs = transformers.TrainingArguments(str(tmp_path), max_steps=4, report_to=[], use_cpu=True)
    if refused is None:
        LowRankTrainer(model=model, args=targs, train_dataset=wide_tokens())
        return
    with pytest.raises(ValueError, match=refused) as error:
        LowRankTrainer(model=model, args=targs, train_dataset=wide_tokens())
    assert "FSDP2" in str(error.value) and "DDP" in str(error.value) and repr(strategy) in str(error.value)


def test_trainer_on_a_sharded_model(group, tmp_path):
    """LowRankTrainer's FSDP2 glue on a model sharded over one process (Accelerate shards on GPUs only).

    Rank changes go through update_ranks on DTensors, ``save_model`` gathers and writes
    LowRankModel's files, and resuming reshapes the sharded model from the rank pattern and
    regroups the optimizer before loading the weights into the shards.
    """
    import transformers
    from torch.distributed.tensor import DTensor

    from hf_lowrank import LowRankModel
    from hf_lowrank.trainer import LowRankTrainer

    inrank = {"strategy": "inrank", "strategy_args": {"warmup_steps": 2, "interval": 2, "stage2_at": 0.5}}

    def trainer_for(model, out):
        args = transformers.TrainingArguments(
            str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3, save_strategy="steps",
            save_steps=8, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        )
        return LowRankTrainer(model=model, args=args, train_dataset=wide_tokens())

    model = sharded_model(inrank)
    trainer = trainer_for(model, tmp_path / "run")
    trainer.train()
    assert any(c["op"] == "truncate" for h in trainer.plan_history for c in h["changes"]), "stage 2 happened"
    assert all(isinstance(p, DTensor) for p in model.parameters())
    ids = torch.arange(32).remainder(50).repeat(2, 1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    trainer.save_model(tmp_path / "final")
    loaded = LowRankModel.from_pretrained(tmp_path / "final")
    assert loaded.rank_pattern() == model.rank_pattern(trim=True)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)

    fresh = sharded_model(inrank)
    resumed = trainer_for(fresh, tmp_path / "resumed")
    resumed.create_optimizer()
    resumed._load_from_checkpoint(str(tmp_path / "run" / "checkpoint-8"))
    assert fresh.rank_pattern() == model.rank_pattern()
    assert all(isinstance(p, DTensor) for p in fresh.parameters())
    in_opt = {id(p) for g in optim.inner_optimizer(resumed.optimizer).param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in fresh.parameters() if p.requires_grad}
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, expected, atol=1e-5)


def test_a_unit_that_cannot_be_resharded_is_refused_with_what_to_do():
    from types import SimpleNamespace

    with pytest.raises(RuntimeError, match="_fsdp_param_groups.*DDP, or a strategy with changes_shapes=False"):
        lowrank_fsdp._group(SimpleNamespace())
    with pytest.raises(ValueError, match="several meshes.*shard every parameter of a unit on one mesh"):
        lowrank_fsdp._group(SimpleNamespace(_fsdp_param_groups=["a", "b"]))
    assert lowrank_fsdp._group(SimpleNamespace(_fsdp_param_groups=[])) is None
