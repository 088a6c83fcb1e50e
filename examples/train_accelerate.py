"""Low-rank training of a GPT-2 with Accelerate in one file: examples/train_pytorch.py's run, on any number of processes.

    python examples/train_accelerate.py --out runs/example                # one process (GPU if there is one)
    accelerate launch examples/train_accelerate.py --out runs/example     # with your `accelerate config`
    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu_2proc_gloo.yaml \\
        examples/train_accelerate.py --dataset synthetic --n-layer 2 --n-embd 32 --block-size 32 \\
        --vocab-size 300 --max-steps 12 --out /tmp/tiny                   # two CPU processes (gloo), seconds

The same model, data and schedule as examples/train_pytorch.py, in docs/trainer.md's Accelerate
loop: ``accelerator.prepare`` wraps the model (DDP on several processes), the optimizer and the
data loader, not the scheduler (a prepared scheduler steps once per process). ``update_ranks``
decides on process 0 and applies the same plan everywhere; after a plan that changes shapes the
DDP wrapper is rebuilt with ``rewrap_ddp`` (it holds the replaced parameters). Process 0 saves
the model to OUT/final. (ACCELERATE_USE_CPU=1: accelerate's multi-GPU launcher does not pass the
config's use_cpu on to a plain ``Accelerator()``.)
"""

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator

from hf_lowrank import LowRankConfig, get_lowrank_model, optim
from hf_lowrank.data import build_lm_datasets, get_tokenizer, load_text_corpus
from hf_lowrank.distributed import rewrap_ddp

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default="runs/example-accelerate", help="the model is saved to OUT/final")
p.add_argument("--strategy", default="inrank", help="fixed, inrank, cuttlefish, warm_start, dynamic")
p.add_argument("--strategy-args", default="{}", type=json.loads, help='JSON, e.g. \'{"stage2_at": 0.3}\'')
p.add_argument("--rank", type=float, default=None, help="LowRankConfig.rank (fixed, warm_start): a fraction, or a whole number")
p.add_argument("--mode", default="factorized", choices=["factorized", "residual"])
p.add_argument("--dataset", default="sotu", choices=["sotu", "synthetic"])
p.add_argument("--vocab-size", type=int, default=2048)
p.add_argument("--n-layer", type=int, default=4)
p.add_argument("--n-embd", type=int, default=256)
p.add_argument("--n-head", type=int, default=4)
p.add_argument("--block-size", type=int, default=128)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--max-steps", type=int, default=300)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--eval-batches", type=int, default=20)
p.add_argument("--log-every", type=int, default=10)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
out = Path(args.out)
accelerator = Accelerator()
accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}")
torch.manual_seed(args.seed)  # the same initial weights on every process

# data: causal-LM blocks of input_ids, attention_mask and labels
corpus = load_text_corpus(args.dataset)
tokenizer = get_tokenizer(corpus, vocab_size=args.vocab_size, cache_dir=out / "tokenizer")
data = build_lm_datasets(corpus, tokenizer, block_size=args.block_size).with_format("torch")
loader = torch.utils.data.DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, drop_last=True)

# model: GPT-2 from a config, every block linear low-rank under the strategy
config = transformers.GPT2Config(
    vocab_size=len(tokenizer), n_positions=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
    bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
)
rank = {} if args.rank is None else {"rank": int(args.rank) if args.rank >= 1 else args.rank}
lowrank_config = LowRankConfig(
    target_modules=["c_attn", "c_proj", "c_fc"], mode=args.mode, strategy=args.strategy, strategy_args=args.strategy_args, **rank
)
model = get_lowrank_model(transformers.GPT2LMHeadModel(config), lowrank_config)
if accelerator.is_main_process:
    model.print_trainable_parameters()

# optimizer: nanoGPT-style groups with the factors in groups of their own; warm-up, then cosine decay
optimizer = torch.optim.AdamW(optim.param_groups(model, lr=args.lr, weight_decay=0.1), betas=(0.9, 0.95))
warmup = max(1, args.max_steps // 20)
schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.max_steps))  # noqa: E731
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # the scheduler stays unprepared
lowrank = accelerator.unwrap_model(model)
lowrank.bind_training(args.max_steps, optimizer, scheduler)  # the strategy learns the run's length and schedule
batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch (each process its share)

model.train()
for step, batch in enumerate(itertools.islice(batches, args.max_steps), start=1):
    loss = model(**batch).loss
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    plan = lowrank.update_ranks(step, optimizer, scheduler)  # after the step and the schedule: may change ranks
    if plan is not None and plan.changes_shapes:
        model = rewrap_ddp(model)  # a DDP wrapper holds the replaced parameters; one process: returned as it is
    if plan is not None:
        layout = sorted({f"{s['mode']} {s['rank'] or ''}".strip() for s in lowrank.rank_pattern().values()})
        accelerator.print(f"step {step}: {plan.reason or 'plan applied'} -> {', '.join(layout)}")
    if step % args.log_every == 0 or step == args.max_steps:
        accelerator.print(f"step {step}: loss {loss.item():.4f}, lr {optimizer.param_groups[0]['lr']:.2e}")

lowrank.eval()
with torch.no_grad():  # every process evaluates the same blocks on the same weights
    held_out = itertools.islice(torch.utils.data.DataLoader(data["validation"], batch_size=args.batch_size), args.eval_batches)
    losses = [lowrank(**{k: v.to(accelerator.device) for k, v in b.items()}).loss.item() for b in held_out]
eval_loss = sum(losses) / len(losses)
accelerator.print(f"eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}")
accelerator.wait_for_everyone()
if accelerator.is_main_process:
    lowrank.save_pretrained(out / "final")  # config, rank pattern, safetensors trimmed to the ranks
    tokenizer.save_pretrained(out / "final")
accelerator.print(f"saved {out / 'final'}")
