"""A tiny InRank run for the distributed and crash tests.

    torchrun --nproc_per_node N tests/ddp_train.py OUT BATCH [RESUME] [--compile]
    python tests/ddp_train.py OUT BATCH [RESUME] [--compile]

``--compile`` trains with ``TrainingArguments(torch_compile=True)`` (Dynamo's eager backend:
the graphs, not Inductor's kernels).

Each process writes its rank pattern, strategy state, per-step losses and the model folders it
saved to OUT/process-<rank>.json."""

import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from helpers_train import wide_gpt2, wide_tokens  # noqa: E402

from hf_lowrank import LowRankConfig, get_lowrank_model  # noqa: E402
from hf_lowrank.trainer import LowRankTrainer  # noqa: E402


def main(out: str, batch: int, resume: str | None, compile_: bool) -> None:
    config = LowRankConfig(
        target_modules=["c_fc", "c_proj"], exclude_modules=r".*attn.*", strategy="inrank",
        strategy_args={"warmup_steps": 4, "interval": 2, "stage2_at": 0.5},
    )
    model = get_lowrank_model(wide_gpt2(), config)
    args = transformers.TrainingArguments(
        out, max_steps=16, per_device_train_batch_size=batch, learning_rate=3e-3, logging_steps=1,
        save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        lr_scheduler_type="linear", ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        ddp_find_unused_parameters=False, torch_compile=compile_, torch_compile_backend="eager" if compile_ else None,
    )
    trainer = LowRankTrainer(model=model, args=args, train_dataset=wide_tokens())
    writes = []  # model folders this process wrote (checkpoints): process 0 only
    save_pretrained = model.save_pretrained

    def counting_save_pretrained(*a, **k):
        writes.append(str(a[0] if a else k.get("save_directory")))
        return save_pretrained(*a, **k)

    model.save_pretrained = counting_save_pretrained
    trainer.train(resume_from_checkpoint=resume)
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "world_size": trainer.args.world_size,
        "rank_pattern": model.rank_pattern(),
        "strategy_state": trainer.strategy.state_dict(),
        "losses": {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e},
        "ddp": type(getattr(trainer.model_wrapped, "_orig_mod", trainer.model_wrapped)).__name__,
        "compiled": hasattr(trainer.model_wrapped, "_orig_mod"),
        "writes": writes,
    }
    with open(os.path.join(out, f"process-{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    positional = [a for a in sys.argv[1:] if a != "--compile"]
    main(positional[0], int(positional[1]), positional[2] if len(positional) > 2 else None, "--compile" in sys.argv)
