"""Rank changes in any training loop: plain PyTorch, plain Accelerate, the plain Trainer, a user's own strategy."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers_train import TokenDataset, tiny_gpt2

from hf_lowrank import LayerChange, LowRankCallback, LowRankConfig, LowRankTrainer, Plan, RankStrategy, get_lowrank_model, optim
from hf_lowrank.strategies import REGISTRY

INRANK = {
    "target_modules": ["c_fc", "c_proj"],
    "exclude_modules": r".*attn.*",
    "strategy": "inrank",
    "strategy_args": {"warmup_steps": 2, "interval": 2, "stage2_at": 8},
}


class EveryFourthTruncates(RankStrategy):
    """A strategy defined in a user's own file: halves every factorized rank at steps 4 and 8."""

    name = "test_every_fourth_truncates"
    changes_shapes = True

    def __init__(self, config):
        super().__init__(config)
        self.done: list[int] = []

    def due(self, step):
        return step in (4, 8) and step not in self.done

    def step(self, step, layers):
        self.done.append(step)
        return Plan([LayerChange(n, "truncate", rank=max(1, layer.rank // 2)) for n, layer in layers.items()], reason="halve")

    def is_final(self):
        return len(self.done) == 2

    def state_dict(self):
        return {"done": list(self.done)}

    def load_state_dict(self, state):
        self.done = list(state["done"])


def batches(steps: int, batch: int = 4):
    data = TokenDataset()
    for step in range(steps):
        rows = [data[(step * batch + i) % len(data)] for i in range(batch)]
        yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def live_trainable(model) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def optimizer_params(optimizer) -> list[int]:
    return [id(p) for g in optim.inner_optimizer(optimizer).param_groups for p in g["params"]]


def plain_loop(model, steps: int, optimizer=None, scheduler=None, check=None):
    """The loop docs/trainer.md shows: step, schedule, then update_ranks."""
    optimizer = optimizer or torch.optim.AdamW(optim.param_groups(model, lr=3e-3, weight_decay=0.1))
    scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    model.bind_training(steps, optimizer, scheduler)
    model.train()
    plans, losses = [], []
    for step, batch in enumerate(batches(steps), start=1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        plan = model.update_ranks(step, optimizer, scheduler)
        plans.append((step, plan))
        losses.append(loss.item())
        if check:
            check(step, model, optimizer)
    return plans, losses


def test_plain_pytorch_loop_runs_inrank_through_stage_2():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**INRANK))
    start = {n: layer.rank for n, layer in model.lowrank_layers().items()}

    def check(step, model, optimizer):
        ids = optimizer_params(optimizer)
        assert sorted(ids) == sorted(live_trainable(model)), f"step {step}: the optimizer holds exactly the live parameters"
        assert len(ids) == len(set(ids))

    plans, losses = plain_loop(model, 12, check=check)
    applied = {step: p for step, p in plans if p}
    assert min(applied) == 2 and "stage 2" in applied[8].reason and applied[8].changes_shapes
    assert all(not p.changes_shapes for s, p in applied.items() if s != 8), "growth changes no shape"
    assert model.strategy.is_final() and not any(p for s, p in plans if s > 8)
    ranks = {n: layer.rank for n, layer in model.lowrank_layers().items()}
    assert all(layer.capacity == layer.rank for layer in model.lowrank_layers().values()), "stage 2 drops the buffer"
    assert ranks != start
    assert losses[-1] < losses[0]
    assert [h["step"] for h in model.plan_history] == sorted(applied)


def test_update_ranks_needs_binding_and_training_without_a_driver_is_refused():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**INRANK))
    with pytest.raises(RuntimeError, match="bind_training"):
        model.update_ranks(1)
    batch = next(batches(1))
    with pytest.raises(RuntimeError, match="LowRankTrainer.*LowRankCallback.*update_ranks"):
        model.train()(**batch)
    with torch.no_grad():
        model(**batch)  # inference never needs a driver
    fixed = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4))
    fixed.train()(**batch).loss.backward()  # the fixed strategy has nothing to run


def test_bind_training_refuses_what_it_cannot_apply():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4, frobenius_decay=1e-3))
    with pytest.raises(ValueError, match="frobenius_decay=0.001 needs the optimizer"):
        model.bind_training(10)
    scaled = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4, factor_lr_scale=3.0))
    with pytest.raises(ValueError, match="factor_lr_scale=3.0 needs factor parameter groups"):
        scaled.bind_training(10, torch.optim.AdamW(scaled.parameters()))
    with pytest.raises(ValueError, match="max_steps=0 is not allowed"):
        scaled.bind_training(0)


def test_plain_accelerate_loop_with_a_shape_changing_strategy():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=8, strategy=EveryFourthTruncates.name))
    optimizer = torch.optim.AdamW(optim.param_groups(model, lr=3e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    seen = []

    def check(step, model, optimizer):
        assert sorted(optimizer_params(optimizer)) == sorted(live_trainable(model))
        seen.append({layer.rank for layer in model.lowrank_layers().values()})

    plans, _ = plain_loop(accelerator.unwrap_model(model), 10, optimizer, scheduler, check=check)
    assert [s for s, p in plans if p] == [4, 8]
    assert seen[2] == {8} and seen[3] == {4} and seen[-1] == {2}


def test_a_strategy_defined_in_a_test_file_registers_and_trains_under_the_trainer(tmp_path):
    assert REGISTRY[EveryFourthTruncates.name] is EveryFourthTruncates
    config = LowRankConfig(target_modules=["c_fc"], rank=8, strategy=EveryFourthTruncates.name)
    assert config.parsed_strategy_args.to_dict() == {}
    module_path = f"{EveryFourthTruncates.__module__}:{EveryFourthTruncates.__qualname__}"
    assert LowRankConfig(target_modules=["c_fc"], rank=8, strategy=module_path).strategy == module_path
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=3e-3, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_steps=5,
    )
    trainer = LowRankTrainer(model=get_lowrank_model(tiny_gpt2(), config), args=args, train_dataset=TokenDataset())
    trainer.train()
    assert [h["step"] for h in trainer.plan_history] == [4, 8]
    assert {layer.rank for layer in trainer.model.lowrank_layers().values()} == {2}
    opt = optim.inner_optimizer(trainer.optimizer)
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(live_trainable(trainer.model))


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="strategy name 'inrank' is taken"):

        class Impostor(RankStrategy):  # noqa: F841
            name = "inrank"


def plain_trainer(tmp_path, model, callbacks=None):
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)


def test_plain_trainer_keeps_the_columns_and_refuses_an_undriven_strategy(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**INRANK))
    trainer = plain_trainer(tmp_path, model)
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert trainer.label_names == ["labels"]
    with pytest.raises(RuntimeError, match="LowRankCallback"):
        trainer.train()


def test_plain_trainer_runs_the_strategy_through_the_callback(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**INRANK))
    trainer = plain_trainer(tmp_path, model, callbacks=[LowRankCallback()])
    trainer.train()
    assert model.strategy.is_final() and any("stage 2" in h["reason"] for h in model.plan_history)
    opt = optim.inner_optimizer(trainer.optimizer)
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(live_trainable(model))


def test_the_documented_custom_strategy_runs():
    """docs/strategies.md's "Your own strategy" example registers, validates and halves ranks in a loop."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    ns: dict = {}
    exec(re.search(r"## Your own strategy.*?```python\n(.*?)```", text, re.S).group(1), ns)
    assert REGISTRY["halve_once"] is ns["HalveOnce"]
    with pytest.raises(ValueError, match=r"strategy_args\.at=2\.0"):
        LowRankConfig(target_modules=["c_fc"], strategy="halve_once", strategy_args={"at": 2.0})
    plans, _ = plain_loop(get_lowrank_model(tiny_gpt2(), ns["config"]), 10)
    assert [s for s, p in plans if p] == [3]


def test_precondition_trains_in_a_plain_loop_and_needs_the_optimizer():
    config = LowRankConfig(**INRANK, precondition=True)
    with pytest.raises(ValueError, match="precondition=True needs the optimizer"):
        get_lowrank_model(tiny_gpt2(), config).bind_training(10)
    model = get_lowrank_model(tiny_gpt2(), config)
    with pytest.raises(RuntimeError, match="precondition=True. acts during training"):
        model.train()(**next(iter(batches(1))))
    plans, losses = plain_loop(model, 10)
    assert any(p for _, p in plans), "InRank grew and truncated with preconditioned factors"
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="LowRankConfig.precondition='yes'"):
        LowRankConfig(target_modules=["c_fc"], precondition="yes")


def test_update_ranks_rebalances_every_k_steps_in_a_plain_loop():
    config = LowRankConfig(target_modules=["c_fc"], rank=1.0, init="spectral", rebalance_every=3, precondition=False)
    model = get_lowrank_model(tiny_gpt2(), config)
    with pytest.raises(RuntimeError, match="rebalance_every=3. acts during training"):
        model.train()(**next(iter(batches(1))))

    def gap(layer):
        B, A = layer.active_factors()
        return (B.T @ B - A @ A.T).abs().max().item() / (B.T @ B).abs().max().item()

    gaps = {}

    def check(step, model, optimizer):
        gaps[step] = max(gap(layer) for layer in model.lowrank_layers().values())

    plain_loop(model, 7, check=check)
    assert gaps[3] < 1e-4 and gaps[6] < 1e-4, gaps  # re-split at steps 3 and 6
    assert gaps[4] > 10 * gaps[3] and gaps[7] > 10 * gaps[6], gaps  # steps in between drift away again
    default = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=1.0, init="spectral", precondition=False))
    gaps.clear()
    plain_loop(default, 11, check=check)  # rebalance_every=None: every 10 steps wherever training is driven
    assert gaps[10] < 1e-4 < gaps[9], (gaps[9], gaps[10])
    undriven = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4, precondition=False))
    undriven.train()(**next(iter(batches(1)))).loss.backward()  # the default needs no driver: an unbound loop trains
    with pytest.raises(ValueError, match="rebalance_moments='reset' needs the optimizer"):
        get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rebalance_every=2, rebalance_moments="reset")).bind_training(10)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rebalance_every", -1, "rebalance_every=-1"),
        ("rebalance_every", 2.5, "rebalance_every=2.5"),
        ("rebalance_every", "50", "rebalance_every=.50."),
        ("rebalance_moments", "rotated", "rebalance_moments='rotated'"),
        ("factor_weight_decay", -0.1, "factor_weight_decay=-0.1"),
        ("precondition_damping", 2.0, "precondition_damping=2.0"),
    ],
)
def test_rebalance_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        LowRankConfig(target_modules=["c_fc"], **{field: value})


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def saving_trainer(out, model, max_steps=12):
    args = transformers.TrainingArguments(
        str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-3, report_to=[], use_cpu=True,
        save_strategy="steps", save_steps=4, logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[LowRankCallback()])


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # GPT-2 ties lm_head to wte; this Llama does not
def test_plain_trainer_with_the_callback_saves_resumes_and_loads(family, tmp_path):
    from hf_lowrank import LowRankModel

    build = tiny_gpt2 if family == "gpt2" else tiny_llama
    config = {**INRANK, "exclude_modules": None} if family == "llama" else INRANK
    config = {**config, "target_modules": ["c_fc", "c_proj"] if family == "gpt2" else ["gate_proj", "down_proj"]}
    full = saving_trainer(tmp_path / "full", get_lowrank_model(build(), LowRankConfig(**config)))
    full.train()
    assert any("stage 2" in h["reason"] for h in full.model.plan_history)
    checkpoint = tmp_path / "full" / "checkpoint-8"  # right after stage 2 changed the shapes
    assert {"config.json", "lowrank_config.json", "model.safetensors", "lowrank_trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    loaded = LowRankModel.from_pretrained(checkpoint).eval()
    assert loaded.rank_pattern() == json_pattern(checkpoint)

    resumed = saving_trainer(tmp_path / "full", get_lowrank_model(build(), LowRankConfig(**config)))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    losses = lambda t: {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e and e["step"] > 8}  # noqa: E731
    torch.testing.assert_close(list(losses(resumed).values()), list(losses(full).values()), rtol=1e-4, atol=1e-6)
    assert resumed.model.rank_pattern() == full.model.rank_pattern()
    assert resumed.model.strategy.state_dict() == full.model.strategy.state_dict()

    full.save_model(str(tmp_path / "final"))  # the final save is trimmed to the active ranks
    final = LowRankModel.from_pretrained(tmp_path / "final").eval()
    ids = next(batches(1))["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(final(input_ids=ids).logits, full.model.eval()(input_ids=ids).logits)
    assert all(layer.capacity == layer.rank for layer in final.lowrank_layers().values())


def json_pattern(folder):
    import json

    return json.loads((folder / "lowrank_config.json").read_text())["rank_pattern"]


def test_a_callback_added_after_the_trainer_was_built_refuses_checkpoints_it_cannot_write(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**INRANK))
    trainer = saving_trainer(tmp_path, model)
    trainer.callback_handler.callbacks = [cb for cb in trainer.callback_handler.callbacks if not isinstance(cb, LowRankCallback)]
    late = transformers.Trainer(model=model, args=trainer.args, train_dataset=TokenDataset())
    late.add_callback(LowRankCallback())
    with pytest.raises(ValueError, match=r"added after the Trainer was built.*callbacks=\[LowRankCallback\(\)\]"):
        late.train()


# -- docs/trainer.md's loops, as written, in one process and two ---------------------------------

def run_docs_loop(which: str, out, launcher=None, **env_vars: str) -> list[dict]:
    """Run docs_loops.py in one plain process, or under ``launcher`` (launch.torchrun / launch.accelerate_launch)."""
    import json
    import sys
    from pathlib import Path

    import launch

    script = Path(__file__).with_name("docs_loops.py")
    launch.run(launcher or (lambda port: [sys.executable]), [str(script), which, str(out)], **env_vars)
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("process-*.json"))]


def check_docs_run(runs: list[dict], world: int, wrapper: str) -> None:
    from docs_loops import MAX_STEPS

    assert [r["world_size"] for r in runs] == [world] * world
    for r in runs:
        assert r["steps"] == list(range(1, MAX_STEPS + 1)), "the loop stops at max_steps though the loader is longer"
        assert any(p["changes_shapes"] and "stage 2" in p["reason"] for p in r["plans"]), "InRank's stage 2 ran"
        assert r["wrapper"] == wrapper
        assert min(r["lr"]) >= 0
        assert all(spec["rank"] == spec["capacity"] for spec in r["rank_pattern"].values())
    assert all(r["rank_pattern"] == runs[0]["rank_pattern"] and r["plans"] == runs[0]["plans"] for r in runs)
    assert all(abs(r["eval_loss"] - runs[0]["eval_loss"]) < 1e-5 for r in runs), "DDP kept the processes' weights equal"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["pytorch", "accelerate"])
def test_docs_loops_run_as_written_in_one_process(which, tmp_path):
    check_docs_run(run_docs_loop(which, tmp_path), 1, "LowRankModel")


@pytest.mark.slow
def test_docs_pytorch_loop_runs_as_written_under_torchrun(tmp_path):
    import launch

    check_docs_run(run_docs_loop("pytorch", tmp_path, launch.torchrun(2)), 2, "DistributedDataParallel")


@pytest.mark.slow
def test_docs_accelerate_loop_runs_as_written_under_accelerate_launch(tmp_path):
    import launch

    config = launch.ROOT / "recipes" / "accelerate" / "cpu_2proc_gloo.yaml"
    # accelerate's multi-GPU launcher does not pass the config's use_cpu on; a plain Accelerator() reads it from here
    runs = run_docs_loop("accelerate", tmp_path, launch.accelerate_launch(config), ACCELERATE_USE_CPU="true")
    check_docs_run(runs, 2, "DistributedDataParallel")


def test_a_ddp_wrapper_left_after_a_shape_change_is_named_and_update_ranks_stops_at_max_steps(tmp_path):
    """The loop without its rewrap_ddp line fails at the first forward after the shape change, naming the fix;
    a loop that runs past max_steps is stopped by update_ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=8, strategy=EveryFourthTruncates.name))
        optimizer = torch.optim.AdamW(optim.param_groups(model, lr=3e-3))
        model.bind_training(10, optimizer)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with pytest.raises(RuntimeError, match=r"still holds the parameters a rank change replaced.*rewrap_ddp"):
            for step, batch in enumerate(batches(10), start=1):
                ddp(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                model.update_ranks(step, optimizer)
        assert step == 5, "caught at the first forward after the truncation at step 4"
        fresh = torch.nn.parallel.DistributedDataParallel(model)
        from hf_lowrank.distributed import rewrap_ddp

        assert rewrap_ddp(model) is model, "without DDP rewrap_ddp returns the model as it is"
        rebuilt = rewrap_ddp(fresh)
        assert rebuilt.module is model and rebuilt.find_unused_parameters == fresh.find_unused_parameters
        rebuilt(**next(batches(1))).loss.backward()  # the rebuilt wrapper holds the live parameters
    finally:
        dist.destroy_process_group()

    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(**INRANK))
    optimizer = torch.optim.AdamW(optim.param_groups(model, lr=3e-3))
    model.bind_training(12, optimizer)
    model.update_ranks(12, optimizer)
    with pytest.raises(ValueError, match=r"update_ranks\(step=13\): steps run from 1 to max_steps=12.*islice"):
        model.update_ranks(13, optimizer)
    with pytest.raises(ValueError, match=r"update_ranks\(step=0\)"):
        model.update_ranks(0, optimizer)


class HalvesThenRewarms(RankStrategy):
    """Halves the learning rate after step 3, re-warms it over 3 steps after step 6 (no layer changes)."""

    name = "test_halves_then_rewarms"

    def due(self, step):
        return step in (3, 6)

    def step(self, step, layers):
        return Plan(lr_factor=0.5, reason="halve") if step == 3 else Plan(rewarm_steps=3, reason="re-warm")


def test_the_scheduler_reports_the_rate_a_plan_set():
    """After a plan's factor or re-warm, scheduler.get_last_lr() (what the Trainer logs) is the rate the next step uses."""
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4, strategy=HalvesThenRewarms.name))
    optimizer = torch.optim.AdamW(optim.param_groups(model, lr=1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / 20)
    model.bind_training(12, optimizer, scheduler)
    used = []
    for step, batch in enumerate(batches(12), start=1):
        used.append([g["lr"] for g in optimizer.param_groups])
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        model.update_ranks(step, optimizer, scheduler)
        assert scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups], f"step {step}"
    base = 1e-3
    assert used[3][0] == pytest.approx(base * 0.5 * (1 - 3 / 20)), "halved from step 4 on"
    assert used[6][0] == pytest.approx(base * 0.5 * (1 - 6 / 20) / 4), "re-warm: a quarter of the schedule at step 7"
    assert used[9][0] == pytest.approx(base * 0.5 * (1 - 9 / 20)), "back on the (halved) schedule"
