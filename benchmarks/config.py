"""The benchmark scales and the rows every scale runs.

A scale is a set of :class:`~hf_lowrank.recipe.RecipeOptions` overrides shared by every row
(model shape, data, steps, optimizer) plus the few settings only a benchmark has (which layers
are low-rank, threads, steps left out of tokens/s). A row adds its ``lowrank`` settings, so
every row trains through the recipe's own model builder, data and ``TrainingArguments``.

Rows: full rank, both InRank formulations, the fixed-rank control and Kamalakara's spectral
init, then one row per registered strategy (``hf_lowrank.strategies.REGISTRY``: a new strategy
gets a row with its defaults), the peers GaLore and APOLLO (transformers' own optimizers on the
plain Llama model, :data:`PEERS`), and full rank under ``torch.compile``. ``fixed``, ``spectral``,
``warm_start`` and ``dynamic`` take InRank's final rank (the sum of its final ranks over the sum
of full ranks), so that they are compared at the rank InRank found.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Union

from hf_lowrank.checks import check_choice, check_int, fail
from hf_lowrank.options import set_path, yaml_value

# The low-rank layers of each placement (benchmark setting ``targets``), per architecture. Every
# row of a benchmark wraps the same layers, the full-rank row too (dense, through the same wrapper).
PLACEMENTS = {
    "gpt2": {
        "attention": ["attn.c_attn", "attn.c_proj"],
        "mlp": ["mlp.c_fc", "mlp.c_proj"],  # the InRank authors' placement
        "blocks": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    },
    "llama": {
        "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj"],
        "blocks": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
}
# Embeddings and norms of each architecture: what trains besides the adapters in a from-scratch
# residual row (LowRankConfig.modules_to_save), together with the block layers left dense.
NON_BLOCK = {
    "gpt2": ["wte", "wpe", "ln_1", "ln_2", "ln_f"],
    "llama": ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"],
}
INRANK_RANK = "<inrank final rank>"  # marks the settings filled with InRank's final rank fraction

# Options the driver sets itself; --set refuses them with the reason.
DRIVER_OPTIONS = {
    "task": "a benchmark trains causal language models",
    "lowrank": "each row sets its own low-rank settings",
    "output_dir": "--out sets where rows go",
    "use_cpu": "set device=cpu or device=cuda instead",
    "compare_full_rank": "the full-rank row is the comparison",
    "resume_from_checkpoint": "benchmark rows always start fresh",
}


@dataclass(frozen=True)
class Scale:
    """RecipeOptions overrides shared by every row, and the benchmark's own settings."""

    recipe: dict[str, Any] = field(default_factory=dict)
    targets: str = "blocks"  # a placement of PLACEMENTS
    device: str = "cpu"  # "cpu" or "cuda"
    threads: Union[int, None] = 2  # torch.set_num_threads on CPU; None leaves torch's default
    skip_steps: int = 5  # first optimizer steps left out of tokens/s (allocator and kernel warm-up)
    compile_backend: str = "inductor"  # torch.compile backend of the compiled row

    def replace(self, **changes: Any) -> "Scale":
        """A copy with ``changes``: RecipeOptions fields go to ``recipe``, the others are benchmark settings."""
        own = {f.name for f in dataclasses.fields(self)} - {"recipe"}
        recipe = {k: v for k, v in changes.items() if k not in own}
        scale = dataclasses.replace(self, recipe={**self.recipe, **recipe}, **{k: v for k, v in changes.items() if k in own})
        scale.check()
        return scale

    def check(self) -> None:
        """Validate the settings (and the recipe options they make) before any data or model is built."""
        from hf_lowrank.recipe import RecipeOptions

        known = {f.name for f in dataclasses.fields(RecipeOptions)} - set(DRIVER_OPTIONS)
        own = sorted({f.name for f in dataclasses.fields(self)} - {"recipe"})
        for key in sorted(self.recipe):
            if key in DRIVER_OPTIONS:
                fail(key, self.recipe[key], DRIVER_OPTIONS[key])
            if key not in known:
                fail("--set " + key, self.recipe[key], f"give a recipe option ({', '.join(sorted(known))}) or a benchmark setting ({', '.join(own)})")
        opts = self.options()
        check_choice("architecture", opts.architecture, tuple(PLACEMENTS))
        check_choice("targets", self.targets, tuple(PLACEMENTS[opts.architecture]))
        check_choice("device", self.device, ("cpu", "cuda"))
        if self.threads is not None:
            check_int("threads", self.threads)
        check_int("skip_steps", self.skip_steps, 0)
        shortest = min(row_steps(r, opts.max_steps) for r in ROWS)
        if self.skip_steps >= shortest:
            fail("skip_steps", self.skip_steps, f"give fewer than the shortest row's {shortest} steps (max_steps={opts.max_steps})")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            fail("compile_backend", self.compile_backend, "give a torch.compile backend name such as 'inductor'")

    def options(self, **overrides: Any):
        """The RecipeOptions of a row: the scale's recipe settings, then the row's ``overrides``."""
        from hf_lowrank.recipe import RecipeOptions

        training = {**self.recipe.get("training", {}), **overrides.get("training", {})}  # a row's TrainingArguments fields join the scale's
        return RecipeOptions(**{"task": "clm", **self.recipe, "use_cpu": self.device == "cpu", **overrides, "training": training})

    def target_modules(self) -> list[str]:
        return PLACEMENTS[self.options().architecture][self.targets]

    def to_dict(self) -> dict[str, Any]:
        """Every setting in one flat mapping (the recipe's fields and the benchmark's own)."""
        return {**self.recipe, **{k: v for k, v in dataclasses.asdict(self).items() if k != "recipe"}}


# GPT-2 models on the bundled State of the Union corpus, AdamW with cosine decay; every row
# evaluates on the same held-out tokens.
_COMMON = {
    "architecture": "gpt2", "dataset": "sotu", "lr_scheduler_type": "cosine", "weight_decay": 0.1,
    "max_grad_norm": 1.0, "seed": 0,
}
SCALES = {
    # GPT-2 4 x 256 (3.7M parameters, 3.1M of them in the blocks), a 2048-token BPE trained on the
    # corpus (2.7M training tokens), 300 steps of 8 x 128 tokens: far from converged, < 30 min.
    "cpu": Scale({
        **_COMMON, "n_layer": 4, "n_embd": 256, "n_head": 4, "block_size": 128, "vocab_size": 2048,
        "max_eval_tokens": 32768, "max_steps": 300, "per_device_train_batch_size": 8, "learning_rate": 2e-3,
        "warmup_steps": 20, "eval_steps": 50, "logging_steps": 10,
    }),
    # GPT-2 4 x 128 with a 512-token BPE: 0.79M of its 0.87M parameters are in the block linears.
    # The corpus is 5.2M training tokens at this vocabulary; 3,000 steps of 8 x 64 tokens (1.5M)
    # take full rank close to its plateau, about 5 minutes of training a row (5,300 tokens/s
    # measured). One thread: with a second on a busy core a step took 20x longer (7.4 s, not 0.35 s).
    "cpu-long": Scale(
        {
            **_COMMON, "n_layer": 4, "n_embd": 128, "n_head": 4, "block_size": 64, "vocab_size": 512,
            "max_eval_tokens": 16384, "max_steps": 3000, "per_device_train_batch_size": 8, "learning_rate": 2e-3,
            "warmup_steps": 100, "eval_steps": 250, "logging_steps": 50,
        },
        threads=1,
    ),
    # cpu-long's data, vocabulary, length and batch at width 256 (GPT-2 4 x 256, 3.3M parameters, 3.1M
    # in the block linears): the narrowest width where a step at half the block weights is measurably
    # faster on this CPU (python -m benchmarks.speed_widths: 1.29x at 256 against 1.09x at 128). About
    # 3x cpu-long's time a row at one thread; run subsets (--rows) and parts on two cores (--merge).
    "cpu-wide": Scale(
        {
            **_COMMON, "n_layer": 4, "n_embd": 256, "n_head": 4, "block_size": 64, "vocab_size": 512,
            "max_eval_tokens": 16384, "max_steps": 3000, "per_device_train_batch_size": 8, "learning_rate": 2e-3,
            "warmup_steps": 100, "eval_steps": 250, "logging_steps": 50,
        },
        threads=1,
    ),
    # GPT-2 small's shape (12 x 768, 12 heads, 1024 context) in bf16 on one GPU: 98M parameters
    # with this 16384-token vocabulary (124M with GPT-2's 50257). 600 steps of 16 x 1024 tokens
    # are about four passes over SOTU; point dataset/data_files at a larger corpus for longer runs.
    "gpu": Scale(
        {
            **_COMMON, "n_layer": 12, "n_embd": 768, "n_head": 12, "block_size": 1024, "vocab_size": 16384,
            "max_eval_tokens": 262144, "max_steps": 600, "per_device_train_batch_size": 16, "learning_rate": 6e-4,
            "warmup_steps": 60, "eval_steps": 100, "logging_steps": 10, "bf16": True,
        },
        device="cuda", threads=None, skip_steps=10,
    ),
}


@dataclass(frozen=True)
class Row:
    """One line of the benchmark table: LowRankConfig settings on the scale's placement."""

    name: str
    label: str
    lowrank: Union[dict[str, Any], bool]  # False: a peer's row, no low-rank layers
    reference: str = "full"  # the row its ratios and its time to quality are taken against
    steps_fraction: float = 1.0  # a shorter row runs this fraction of the scale's steps
    compiled: bool = False  # trains under torch.compile (accelerate's dynamo plugin)
    note: str = ""
    # A peer's row: no low-rank layers (lowrank false), the plain model under the Trainer with
    # these TrainingArguments fields (optim, optim_args, optim_target_modules); see PEERS.
    recipe: dict[str, Any] = field(default_factory=dict)


FULL = Row("full", "full rank", {"mode": "dense", "strategy": "fixed"})
INRANK = Row(
    "inrank", "InRank-Efficient", {"mode": "factorized", "strategy": "inrank"},
    note="the authors' public code: factorized from step 0, Kaiming factors, rank grows from 2 then stage 2 truncates",
)
INRANK_RESIDUAL = Row(
    "inrank_residual", "InRank (original, residual)",
    {"mode": "residual", "residual_base": "orthogonal", "strategy": "inrank"},
    note="the paper's formulation: a frozen orthogonal W0 plus a growing B A; embeddings, norms and dense layers train",
)
# Settings of the rows of registered strategies, where a strategy's defaults are not the comparison.
STRATEGY_ROWS = {
    "fixed": Row(
        "fixed", "fixed rank (control)", {"mode": "factorized", "init": "kaiming", "strategy": "fixed", "rank": INRANK_RANK},
        note="the naive control: InRank's final rank from step 0, random (Kaiming) init, library defaults",
    ),
    "cuttlefish": Row("cuttlefish", "Cuttlefish", {"strategy": "cuttlefish", "frobenius_decay": 1e-4}),
    "warm_start": Row("warm_start", "warm start (Kamalakara)", {"strategy": "warm_start", "rank": INRANK_RANK}),
    "dynamic": Row("dynamic", "dynamic rank (Shin)", {"strategy": "dynamic", "strategy_args": {"rank": INRANK_RANK}}),
}
SPECTRAL = Row(
    "spectral", "fixed rank, spectral init (Kamalakara)",
    {"mode": "factorized", "init": "spectral", "strategy": "fixed", "rank": INRANK_RANK},
    note="InRank's final rank from step 0 from the SVD of the dense init, without growth",
)
FULL_COMPILED = Row(
    "full_compiled", "full rank, torch.compile", {"mode": "dense", "strategy": "fixed"}, steps_fraction=1 / 3,
    compiled=True, note="a third of the steps: tokens/s and peak memory only (its perplexity is not comparable)",
)


# -- peers: what a user would pick instead, through transformers' Trainer (docs/peers.md) ----------
#
# GaLore (Zhao et al. 2024) for its smallest model, LLaMA 60M (hidden 512): rank 128, projection
# refreshed every 200 steps, update scale 0.25; rank scaled to the width here (hidden / 4).
# APOLLO (Zhu et al. 2024) for the same model: rank 256 (hidden / 2), random projection refreshed
# every 200 steps, channel-wise scaling, scale 1. Both project the gradients of the layers the
# strategies make low-rank (the placement), which must be nn.Linear: the Llama model.
PEERS = {
    "galore": {"optim": "galore_adamw", "rank_per_width": 1 / 4, "args": {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}},
    "apollo": {
        "optim": "apollo_adamw", "rank_per_width": 1 / 2,
        "args": {"update_proj_gap": 200, "scale": 1.0, "proj": "random", "scale_type": "channel", "proj_type": "std"},
    },
}
GALORE = Row(
    "galore", "GaLore (peer)", False,
    note="transformers' optim=galore_adamw on the plain model: full weights and gradients, AdamW state of the placement's "
    "layers projected to a low rank",
)
APOLLO = Row(
    "apollo", "APOLLO (peer)", False,
    note="transformers' optim=apollo_adamw on the plain model: full weights and gradients, AdamW state in a random "
    "low-rank projection that scales the full gradient channel-wise",
)


def peer_recipe(name: str, scale: "Scale") -> dict[str, Any]:
    """The TrainingArguments fields of peer row ``name`` at ``scale``: its optimizer on the placement's layers."""
    peer, opts = PEERS[name], scale.options()
    rank = max(1, round(opts.n_embd * peer["rank_per_width"]))
    args = ",".join(f"{k}={v}" for k, v in {"rank": rank, **peer["args"]}.items())
    return {"training": {"optim": peer["optim"], "optim_args": args, "optim_target_modules": scale.target_modules()}}


def default_rows(scale: "Scale") -> list[str]:
    """The rows a benchmark runs when ``--rows`` is not given: every row, the peers only on a model they can train."""
    linear = scale.options().architecture != "gpt2"  # GaLore and APOLLO project nn.Linear layers; GPT-2's are Conv1D
    return [r for r in row_names() if linear or r not in PEERS]


def all_rows() -> list[Row]:
    """Every row in run order (InRank before the rows that take its final rank), from the strategy registry."""
    from hf_lowrank.strategies import REGISTRY

    rows = [FULL, INRANK, INRANK_RESIDUAL]
    for name in sorted(REGISTRY, key=lambda n: n != "fixed"):  # the controls first, then registry order
        if name == "inrank":
            continue
        rows.append(STRATEGY_ROWS.get(name, Row(name, name, {"strategy": name})))
        if name == "fixed":
            rows.append(SPECTRAL)
    return rows + [GALORE, APOLLO, FULL_COMPILED]


ROWS = all_rows()  # the built-in rows; row_names() re-reads the registry for strategies registered later


def row_names() -> list[str]:
    return [r.name for r in all_rows()]


def row_steps(row: Row, max_steps: int) -> int:
    return max(1, math.floor(row.steps_fraction * max_steps))


def takes_inrank_rank(name: str) -> bool:
    """Whether row ``name`` is compared at InRank's final rank."""
    return any(r.name == name and INRANK_RANK in json.dumps(r.lowrank) for r in all_rows())


def get_row(name: str, scale: Scale, inrank_rank: float | None = None, ablation: dict[str, Any] | None = None) -> Row:
    """The row ``name`` on the scale's placement, with InRank's final rank filled in where it is used.

    ``ablation`` (``--lowrank KEY=VALUE``) overrides LowRankConfig settings of every
    row that is not dense; a dotted key sets one entry of a dict setting
    (``strategy_args.threshold``). Dense rows are the comparison and never take it.
    """
    by_name = {r.name: r for r in all_rows()}
    if name not in by_name:
        fail("row", name, f"choose from {', '.join(by_name)}")
    row = by_name[name]
    opts = scale.options()
    if name in PEERS:
        if opts.architecture == "gpt2":
            fail("row", name, "GaLore and APOLLO project nn.Linear layers and GPT-2's block layers are Conv1D: add --set architecture=llama")
        return dataclasses.replace(row, lowrank=False, recipe=peer_recipe(name, scale))
    lowrank = {"target_modules": scale.target_modules(), **row.lowrank}
    if lowrank.get("mode") == "residual" and lowrank.get("residual_base") == "orthogonal":
        # From scratch, everything but the frozen W0 trains: embeddings, norms, the layers left dense.
        dense = [m for m in PLACEMENTS[opts.architecture]["blocks"] if m not in lowrank["target_modules"]]
        lowrank["modules_to_save"] = NON_BLOCK[opts.architecture] + dense
    if ablation and row.lowrank.get("mode") != "dense":
        lowrank = apply_ablation(lowrank, ablation)
    if takes_inrank_rank(name):
        if inrank_rank is None:
            fail("row", name, "it takes InRank's final rank: run the inrank row first or pass --inrank-rank")
        lowrank = _fill(lowrank, inrank_rank)
    return dataclasses.replace(row, lowrank=lowrank)


def apply_ablation(lowrank: dict[str, Any], ablation: dict[str, Any]) -> dict[str, Any]:
    """``lowrank`` with each ``ablation`` setting on top; ``"a.b"`` sets key ``b`` of the dict setting ``a``."""
    out = dict(lowrank)
    for key, value in ablation.items():
        set_path(out, key.split("."), value, f"--lowrank {key}")
    return out


def _fill(value: Any, rank: float) -> Any:
    if value == INRANK_RANK:
        return rank
    if isinstance(value, dict):
        return {k: _fill(v, rank) for k, v in value.items()}
    return value


def parse_settings(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``key=value`` strings, each value read as the YAML value it spells, as the CLI reads its options."""
    example = {"--set": "--set max_steps=50", "--lowrank": "--lowrank init_scale=0.5"}.get(flag, f"{flag} key=value")
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            fail(flag, item, f"give key=value, e.g. {example}")
        try:
            out[key] = yaml_value(value)
        except ValueError as e:
            fail(f"{flag} {key}", value, str(e))
    return out


def parse_rates(text: str) -> list[float]:
    """``--lr-sweep 1e-3,2e-3,4e-3`` as a list of distinct positive learning rates."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part)
        except ValueError:
            fail("--lr-sweep", text, "give comma-separated learning rates, e.g. 1e-3,2e-3,4e-3")
        if not (math.isfinite(rate) and rate > 0) or rate in rates:
            fail("--lr-sweep", text, "give distinct learning rates > 0, e.g. 1e-3,2e-3,4e-3")
        rates.append(rate)
    return rates
