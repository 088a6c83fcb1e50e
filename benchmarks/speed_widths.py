"""Training-step speed of every block layer factorized at half its parameters, against dense, by model width.

    python -m benchmarks.speed_widths                       # widths 128 256 512 768, 1 thread
    python -m benchmarks.speed_widths --widths 128,768 --threads 2 --rank 0.375

For each width, a GPT-2 of ``--layers`` blocks (vocabulary 512, context 64, batch 8) is built
twice: dense, and with every block linear layer (``c_attn``, ``attn.c_proj``, ``c_fc``,
``mlp.c_proj``) factorized at ``--rank`` of its smaller side (0.375 of 128 is 48 components,
which stores exactly half the weights of GPT-2's four block layers). Both train on the same
batch, step by step in alternating order (``hf_lowrank.speed.compare_speed``), so the
machine's load cancels out of each ratio. Every width prints one row, with the FLOP speedup
the two steps count (``torch.utils.flop_counter``) beside the measured one. A measurement,
not a test.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.speed import compare_speed

BLOCK_LAYERS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def build(width: int, layers: int, rank: float | None):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=512, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    if rank is None:
        return model
    return get_lowrank_model(model, LowRankConfig(target_modules=BLOCK_LAYERS, mode="factorized", init="spectral", rank=rank))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="128,256,512,768", help="comma-separated model widths")
    parser.add_argument("--layers", type=int, default=4, help="GPT-2 blocks")
    parser.add_argument("--rank", type=float, default=0.375, help="rank fraction of every block layer")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per width")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise SystemExit(f"benchmarks.speed_widths: --widths={args.widths!r} is not allowed; give integers, e.g. 128,768") from None
    if not 0 < args.rank <= 1:
        raise SystemExit(f"benchmarks.speed_widths: --rank={args.rank} is not allowed; give a fraction in (0, 1]")
    torch.set_num_threads(args.threads)
    batch_ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": batch_ids, "labels": batch_ids}
    print(f"GPT-2 {args.layers} blocks, batch 8 x 64, {args.threads} thread(s), every block layer at rank {args.rank}")
    print("| width | rank | block weights low / dense | dense step | low-rank step | measured speedup | FLOP speedup | measured / FLOP |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for width in widths:
        full, low = build(width, args.layers, None), build(width, args.layers, args.rank)
        layer = next(iter(low.lowrank_layers().values()))
        stored = sum(lay.rank * (lay.in_features + lay.out_features) for lay in low.lowrank_layers().values())
        dense = sum(lay.in_features * lay.out_features for lay in low.lowrank_layers().values())
        r = compare_speed(low, full, batch, args.steps)
        s = r["step_seconds"]
        print(
            f"| {width} | {layer.rank} | {stored / dense:.2f} | {1000 * s['full']:.1f} ms | {1000 * s['low']:.1f} ms "
            f"| {r['step_speedup']:.2f}x | {r['flop_speedup']:.2f}x | {r['step_speedup'] / r['flop_speedup']:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
