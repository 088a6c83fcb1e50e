"""Writes the stored checkpoints of this library version for tests/test_stored_checkpoints.py.

    python tests/data/make_checkpoints.py     # writes tests/data/checkpoints/<hf_lowrank.__version__>/

Run it once per release, with the release's code, and commit the new folder. It refuses to write
a version folder that exists: each folder is what that version saved, and every later version
must still load it and compute the same outputs (PEFT's regression tests), so an old folder is
never regenerated or edited. (While a version is unreleased and its folder uncommitted, delete
the folder and run this again.)

One folder holds, from tiny random-init GPT-2 models (2 blocks, width 32, vocabulary 64; about
260 KB in all, safetensors and JSON only):

- ``factorized/``: ``LowRankModel.save_pretrained`` of a model trained from scratch by InRank
  through its stage 2, every block linear factorized, the layers at the different ranks InRank found;
- ``residual/``: a fine-tune, frozen base plus residual adapters grown by InRank, saved whole;
- ``base/``: a plain transformers GPT-2 (``save_pretrained``), the base of ``adapter/``;
- ``adapter/``: residual adapters at a fixed rank trained on ``base/``, saved with
  ``adapter_only=True``; its ``base_model_name_or_path`` is ``"base"``, the folder beside it;
- ``outputs.safetensors``: ``input_ids`` and the logits each model gave for them when it was
  saved (tensors ``factorized``, ``residual``, ``adapter``), the versions that made them in its
  metadata.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import hf_lowrank  # noqa: E402
from hf_lowrank import LowRankConfig, LowRankModel, get_lowrank_model, optim  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
VOCAB, SEQ = 64, 16
MODELS = ("factorized", "residual", "adapter")


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_inner=64, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def input_ids() -> torch.Tensor:
    """The fixed input the stored logits are for."""
    return torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def train(model: LowRankModel, steps: int) -> LowRankModel:
    """A plain loop (docs/trainer.md) on token sequences whose odd tokens follow from the even ones."""
    optimizer = torch.optim.AdamW(optim.param_groups(model, lr=1e-2, weight_decay=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    model.bind_training(steps, optimizer, scheduler)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        ids = torch.randint(0, VOCAB, (8, SEQ), generator=g)
        ids[:, 1::2] = (ids[:, 0::2] * 3 + 1) % VOCAB
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        model.update_ranks(step, optimizer, scheduler)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits.contiguous()


def main() -> None:
    torch.set_num_threads(1)
    out = CHECKPOINTS / hf_lowrank.__version__
    if out.exists():
        raise SystemExit(f"{out} exists: a stored version is never regenerated (delete it only if it was never committed).")
    inrank = {"warmup_steps": 1, "interval": 1, "stage2_at": 8}
    outputs = {"input_ids": input_ids()}

    factorized = get_lowrank_model(
        tiny_gpt2(), LowRankConfig(target_modules=["c_attn", "c_proj", "c_fc"], strategy="inrank", strategy_args=inrank)
    )
    train(factorized, 12)
    ranks = {spec["rank"] for spec in factorized.rank_pattern().values()}
    assert factorized.strategy.is_final() and len(ranks) > 1, f"InRank left every layer at one rank: {ranks}"

    residual = get_lowrank_model(
        tiny_gpt2(), LowRankConfig(target_modules=["c_fc", "c_proj"], mode="residual", strategy="inrank", strategy_args=inrank)
    )
    train(residual, 12)

    base = tiny_gpt2(seed=1)
    base.save_pretrained(out / "base")  # before training: the adapter's base is this model's weights
    adapter = get_lowrank_model(
        transformers.GPT2LMHeadModel.from_pretrained(out / "base"),
        # "base": the folder beside the adapter's (saving would record a folder that exists here by its absolute path)
        LowRankConfig(target_modules=["c_attn", "c_proj"], mode="residual", rank=4, alpha=8, base_model_name_or_path="base"),
    )
    train(adapter, 6)

    for name, model in zip(MODELS, (factorized, residual, adapter)):
        model.save_pretrained(out / name, adapter_only=name == "adapter")
        outputs[name] = logits(model)
    meta = {"hf_lowrank": hf_lowrank.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    save_file(outputs, out / "outputs.safetensors", metadata=meta)

    # what the test will do, before anything is committed
    for name in ("factorized", "residual"):
        torch.testing.assert_close(logits(LowRankModel.from_pretrained(out / name)), outputs[name], rtol=0, atol=1e-6)
    onto = transformers.GPT2LMHeadModel.from_pretrained(out / "base")
    torch.testing.assert_close(logits(LowRankModel.from_pretrained(out / "adapter", base_model=onto)), outputs["adapter"], rtol=0, atol=1e-6)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors") for p in files), sorted(p.name for p in files)
    size = sum(p.stat().st_size for p in files)
    for name, model in zip(MODELS, (factorized, residual, adapter)):
        print(name, {layer: (spec["mode"], spec["rank"]) for layer, spec in model.rank_pattern().items()})
    print(f"wrote {out} ({len(files)} files, {size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
