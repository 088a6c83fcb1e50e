"""Resuming a LowRankTrainer run continues the same run: ranks, strategy state and loss curve."""

import pytest
import torch
from test_trainer import make_trainer


def step_losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


@pytest.mark.parametrize("mode", ["factorized", "residual"])
@pytest.mark.parametrize("resume_at", [8, 16])  # before and after InRank's stage 2 (step 12)
def test_resume_continues_the_same_run(tmp_path, mode, resume_at):
    common = dict(gradient_accumulation_steps=2, per_device_train_batch_size=4, logging_steps=1, save_strategy="steps", save_steps=8)
    full = make_trainer(tmp_path / "a", {"mode": mode}, **common)
    full.train()
    resumed = make_trainer(tmp_path / "b", {"mode": mode}, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "run" / f"checkpoint-{resume_at}"))
    expected, got = step_losses(full), step_losses(resumed)
    after = [s for s in expected if s > resume_at]
    assert after and all(s in got for s in after)
    torch.testing.assert_close([got[s] for s in after], [expected[s] for s in after], rtol=1e-4, atol=1e-5)
    assert resumed.model.rank_pattern() == full.model.rank_pattern()
    assert resumed.strategy.state_dict() == full.strategy.state_dict()
    assert [h["step"] for h in resumed.plan_history] == [h["step"] for h in full.plan_history]


def test_checkpoint_holds_the_rank_pattern_untrimmed(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=8)
    trainer.train()
    from hf_lowrank import LowRankConfig

    ckpt = tmp_path / "run" / "checkpoint-8"
    saved = LowRankConfig.from_pretrained(ckpt).rank_pattern
    assert all(spec["capacity"] > spec["rank"] for spec in saved.values()), "buffer kept before stage 2"
    assert (ckpt / "lowrank_trainer_state.json").is_file()
    assert not list((tmp_path / "run").glob(".staging-*")), "staging folders are renamed away"
