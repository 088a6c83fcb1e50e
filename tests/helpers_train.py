"""A tiny, self-contained LowRankTrainer run (tiny GPT-2, synthetic tokens, InRank) for the resume and crash tests.

    python tests/helpers_train.py OUT [--resume CKPT] [--mode factorized] [--max-steps 16] [--save-steps 4]
                                      [--pause-after-step N] [--pause-in-save N]

Writes OUT/result.json (per-step losses, rank pattern, strategy state, plan steps) at the end.
The pause options make a crash land exactly where a test wants it: the process writes
OUT/paused-after-step-N (or OUT/paused-in-save-N, once checkpoint N's model files are in its
staging folder but its optimizer and trainer state are not) and sleeps until it is killed.
The tests import ``build_trainer`` and ``run`` to do the same runs in-process, and the tiny models and
token data every training test uses: ``tiny_gpt2`` and ``TokenDataset``, and the trainer tests' larger
``wide_gpt2`` and ``wide_tokens`` (also imported by ddp_train.py and fsdp_train.py under torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as a script from a checkout
from hf_lowrank import LowRankConfig, get_lowrank_model  # noqa: E402
from hf_lowrank.trainer import LowRankTrainer  # noqa: E402

VOCAB, SEQ = 64, 16
WIDE_VOCAB, WIDE_SEQ = 50, 32  # the trainer tests' sizes: wide_tokens(), wide_gpt2()
RESULT = "result.json"


class TokenDataset(torch.utils.data.Dataset):
    """Deterministic token sequences with learnable structure (odd tokens are a function of even ones)."""

    def __init__(self, n: int = 128, vocab: int = VOCAB, seq: int = SEQ, shift: int = 1):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)
        self.x[:, 1::2] = (self.x[:, 0::2] * 3 + shift) % vocab

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def wide_tokens(n: int = 256) -> TokenDataset:
    """The trainer tests' data, for wide_gpt2(): sequences of 32 tokens out of 50, odd token = 3 x even token mod 50."""
    return TokenDataset(n, WIDE_VOCAB, WIDE_SEQ, shift=0)


def tiny_gpt2(
    n_layer: int = 2, n_embd: int = 32, n_head: int = 2, vocab_size: int = VOCAB, n_positions: int = SEQ, dropout: float = 0.1
) -> transformers.GPT2LMHeadModel:
    """A seeded random-init GPT-2 of a few tens of thousands of parameters (``dropout``: GPT2Config's three rates,
    0.1 as its default)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions, bos_token_id=0,
        eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return transformers.GPT2LMHeadModel(config)


def wide_gpt2(dropout: float = 0.1) -> transformers.GPT2LMHeadModel:
    """The trainer tests' model (tests/test_trainer.py, ddp_train.py, fsdp_train.py): 2 blocks 64 wide, 4 heads, for
    wide_tokens(). ``dropout=0.0`` for runs compared step for step (FSDP2 against DDP, compiled against eager)."""
    return tiny_gpt2(n_embd=64, n_head=4, vocab_size=WIDE_VOCAB, n_positions=WIDE_SEQ, dropout=dropout)


def build_trainer(out: str | os.PathLike, lowrank: dict | None = None, model=None, wide: bool = False, **training_args) -> LowRankTrainer:
    """InRank (stage 2 at half of training) on the MLPs of a tiny GPT-2 (or of ``model``) on synthetic tokens.

    By default the resume and crash tests' run: tiny_gpt2() on TokenDataset(), growth checks from step 2, 16
    optimizer steps of 2 x 4 sequences, a checkpoint every 4 steps. ``wide=True``: the trainer tests' run
    (tests/test_trainer.py): wide_gpt2() on wide_tokens(), growth checks from step 4, 24 steps of 8 sequences,
    logged every 4 steps, no checkpoints. ``lowrank`` and ``training_args`` override single settings.
    """
    lowrank = {
        "target_modules": ["c_fc", "c_proj"],
        "exclude_modules": r".*attn.*",
        "strategy": "inrank",
        "strategy_args": {"warmup_steps": 4 if wide else 2, "interval": 2, "stage2_at": 0.5},
        **(lowrank or {}),
    }
    if model is None:
        model = wide_gpt2() if wide else tiny_gpt2()
    model = get_lowrank_model(model, LowRankConfig(**lowrank))
    if wide:
        defaults = dict(
            max_steps=24, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=4, save_strategy="no",
            report_to=[], use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="linear", weight_decay=0.1,
        )
    else:
        defaults = dict(
            max_steps=16, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3,
            weight_decay=0.1, lr_scheduler_type="linear", logging_steps=1, save_strategy="steps", save_steps=4,
            report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, bf16=False,
        )
    args = transformers.TrainingArguments(str(out), **{**defaults, **training_args})
    return LowRankTrainer(model=model, args=args, train_dataset=wide_tokens() if wide else TokenDataset())


def record(trainer: LowRankTrainer) -> dict:
    """What a test compares between runs."""
    return {
        "losses": {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e},
        "rank_pattern": trainer.model.rank_pattern(),
        "strategy_state": trainer.strategy.state_dict(),
        "plan_steps": [h["step"] for h in trainer.plan_history],
    }


def _pause(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    while True:  # until the test kills this process
        time.sleep(1)


class _PauseAfterStep(transformers.TrainerCallback):
    def __init__(self, out: Path, step: int):
        self.out, self.step = out, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            _pause(self.out / f"paused-after-step-{self.step}")


def _pause_in_save(trainer: LowRankTrainer, out: Path, step: int) -> None:
    """Stop checkpoint ``step`` half-way: model files written (into staging), optimizer and state not yet."""
    save = trainer._save

    def save_then_pause(output_dir=None, state_dict=None):
        save(output_dir, state_dict)
        if trainer.state.global_step == step:
            _pause(out / f"paused-in-save-{step}")

    trainer._save = save_then_pause


def run(
    out: str | os.PathLike,
    resume: str | None = None,
    lowrank: dict | None = None,
    pause_after_step: int | None = None,
    pause_in_save: int | None = None,
    **training_args,
) -> dict:
    """Train (or resume) and return :func:`record` of the run, also written to ``OUT/result.json``."""
    out = Path(out)
    trainer = build_trainer(out, lowrank, **training_args)
    if pause_after_step is not None:
        trainer.add_callback(_PauseAfterStep(out, pause_after_step))
    if pause_in_save is not None:
        _pause_in_save(trainer, out, pause_in_save)
    trainer.train(resume_from_checkpoint=resume)
    result = record(trainer)
    (out / RESULT).write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--resume", default=None)
    p.add_argument("--mode", default="factorized", choices=["factorized", "residual"])
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--save-steps", type=int, default=4)
    p.add_argument("--pause-after-step", type=int, default=None)
    p.add_argument("--pause-in-save", type=int, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # as tests/conftest.py: the in-process runs must compute the same numbers
    run(
        a.out, a.resume, {"mode": a.mode}, a.pause_after_step, a.pause_in_save,
        max_steps=a.max_steps, save_steps=a.save_steps,
    )


if __name__ == "__main__":
    main()
