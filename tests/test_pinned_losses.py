"""Pinned training losses: every strategy's first 12 steps against numbers written in this file.

torchtune's recipe tests do the same: a tiny deterministic run (CPU, one thread, fixed seed, no
dropout) whose per-step losses are compared with literal numbers, so a change to the numerics
(a transition's SVD split, the preconditioner, re-balancing, Adam's moments across a rank
change, the learning-rate factor) fails here even when every behavioural test still passes.
Each run changes ranks inside its 12 steps, on both sides of the checkpoint at step 6, and is
resumed from that checkpoint in a fresh trainer; the resumed steps must give the SAME pinned
numbers.

The tolerance (rtol 1e-4) passes the rounding noise of one torch version across CPUs and fails
a real change. When a change of the numbers is intended, regenerate the table and paste it over
``PINNED`` below (say why in the commit):

    HF_LOWRANK_REPIN=1 python -m pytest -q -s tests/test_pinned_losses.py

which prints each case's new entry instead of asserting. A new torch or transformers version
may move the numbers too: check that the change is only rounding-sized before repinning.
"""

from __future__ import annotations

import os

import pytest
from helpers_train import run

STEPS, SAVE = 12, 6
MLP = {"target_modules": ["c_fc", "c_proj"], "exclude_modules": r".*attn.*"}
INRANK_ARGS = {"warmup_steps": 2, "interval": 2, "stage2_at": 8}

# LowRankConfig of each case (tiny GPT-2 of tests/helpers_train.py, its token data, batch 4 x 2
# accumulated, AdamW 3e-3 with linear decay, weight decay 0.1).
CASES = {
    "fixed": {**MLP, "strategy": "fixed", "strategy_args": {}, "rank": 8},  # re-balanced at step 10
    "inrank": {**MLP, "strategy": "inrank", "strategy_args": INRANK_ARGS},  # growth from step 2, stage 2 at 8
    "cuttlefish": {  # stable ranks measured every 2 steps, the switch (lr / 3) at the deadline, step 8; lr 1e-2 below
        **MLP, "strategy": "cuttlefish", "strategy_args": {"select_layers": "all", "measure_every": 2, "max_dense_steps": 8},
    },
    "warm_start": {**MLP, "strategy": "warm_start", "strategy_args": {"dense_steps": 4}, "rank": 0.25},  # split at 4
    "dynamic": {  # factorized -> dense at 4 -> frozen base + adapter at 9
        **MLP, "strategy": "dynamic", "strategy_args": {"rank": 0.25, "inflate_at": 4, "deflate_at": 9, "check_schedule": False},
    },
    "residual_inrank": {**MLP, "mode": "residual", "strategy": "inrank", "strategy_args": INRANK_ARGS},  # a fine-tune
}

# TrainingArguments besides tests/helpers_train.py's: at 3e-3 the stable ranks barely move in 8 steps,
# so Cuttlefish's ranks would not make the factors smaller and it would keep every layer dense.
TRAINING = {"cuttlefish": {"learning_rate": 1e-2}}

# Generated with HF_LOWRANK_REPIN=1 (torch 2.13.0+cpu, transformers 5.25.0): per case the steps at
# which a plan was applied and the training loss of steps 1..12.
PINNED = {
    "cuttlefish": {"plans": [8], "losses": [3.90232, 3.861829, 3.794772, 3.823564, 3.838452, 3.780702, 3.766992, 3.734001, 3.726127, 3.691093, 3.701017, 3.681993]},
    "dynamic": {"plans": [4, 9], "losses": [3.913531, 3.886129, 3.880447, 3.870109, 3.878189, 3.871565, 3.849703, 3.869978, 3.855727, 3.834579, 3.825584, 3.821095]},
    "fixed": {"plans": [], "losses": [3.913531, 3.886129, 3.880447, 3.870109, 3.878189, 3.879832, 3.848628, 3.862699, 3.867329, 3.848843, 3.840438, 3.820255]},
    "inrank": {"plans": [2, 8], "losses": [3.910505, 3.888746, 3.869524, 3.869309, 3.849464, 3.862963, 3.824888, 3.842805, 3.834186, 3.807944, 3.811332, 3.789629]},
    "residual_inrank": {"plans": [2, 4, 6, 8], "losses": [3.90232, 3.909593, 3.909331, 3.930503, 3.900945, 3.8992, 3.908973, 3.915381, 3.901487, 3.910474, 3.902473, 3.897794]},
    "warm_start": {"plans": [4], "losses": [3.90232, 3.874935, 3.848789, 3.869286, 3.843397, 3.858212, 3.830098, 3.828997, 3.808234, 3.793067, 3.791215, 3.774408]},
}

REPIN = os.environ.get("HF_LOWRANK_REPIN") == "1"


def losses(result: dict, after: int = 0) -> dict[int, float]:
    return {int(s): v for s, v in result["losses"].items() if int(s) > after}


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_match_the_pinned_numbers_and_a_resume_gives_them_again(case, tmp_path):
    args = {"max_steps": STEPS, "save_steps": SAVE, **TRAINING.get(case, {})}
    full = run(tmp_path, lowrank=CASES[case], **args)
    got = losses(full)
    assert sorted(got) == list(range(1, STEPS + 1)), "one logged loss per optimizer step"
    if REPIN:
        print(f'\n    "{case}": {{"plans": {full["plan_steps"]}, "losses": [{", ".join(f"{got[s]:.7g}" for s in sorted(got))}]}},')
        pytest.skip("HF_LOWRANK_REPIN=1: printed the new entry instead of asserting")
    assert case in PINNED, f"no pinned numbers for {case!r}: run HF_LOWRANK_REPIN=1 pytest -s {__file__} and paste them"
    pinned = PINNED[case]
    assert full["plan_steps"] == pinned["plans"], "the rank changes came at other steps"
    expected = dict(enumerate(pinned["losses"], start=1))
    assert got == pytest.approx(expected, rel=1e-4)

    resumed = run(tmp_path, resume=str(tmp_path / f"checkpoint-{SAVE}"), lowrank=CASES[case], **args)
    assert resumed["plan_steps"] == pinned["plans"]
    assert losses(resumed, SAVE) == pytest.approx({s: v for s, v in expected.items() if s > SAVE}, rel=1e-4)
    assert resumed["rank_pattern"] == full["rank_pattern"]
