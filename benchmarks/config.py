"""The two benchmark scales and the rows every scale runs.

A scale fixes the model shape, data, steps and optimizer settings shared by every row; a row
adds the low-rank settings (or, for GaLore, the optimizer). Rows run in this order; ``fixed``,
``spectral``, ``warm_start`` and ``dynamic`` take InRank's final rank (the sum of its final ranks over the
sum of full ranks), so that they are compared at the rank InRank found.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Union

# Which linear layers of the GPT-2 rows are low-rank (scale setting ``targets``); every GPT-2 row
# uses the same ones, and the dense row keeps them dense through the same wrapper.
TARGETS = {
    "attention": {"target_modules": ["attn.c_attn", "attn.c_proj"]},
    "mlp": {"target_modules": ["mlp.c_fc", "mlp.c_proj"]},
    "blocks": {"target_modules": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]},
}
FIXED_RANK = "<inrank final rank>"  # placeholder filled with InRank's final rank fraction

# InRank's settings: the quick start's (recipes/configs/quickstart.yaml).
INRANK = {
    "mode": "factorized",
    "init": "spectral",
    "strategy": "inrank",
    "factor_lr_scale": 3.0,
    "strategy_args": {"stage2_at": 0.3, "threshold": 0.9},
}


@dataclass
class Scale:
    """Model shape, data and training settings shared by every row of a benchmark."""

    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    block_size: int = 128
    vocab_size: int = 2048
    dataset: str = "sotu"  # a corpus of hf_lowrank.data.load_text_corpus; "text"/"json" read data_files
    data_files: Union[list[str], str, None] = None
    max_train_tokens: Union[int, None] = None
    max_eval_tokens: int = 32768
    max_steps: int = 300
    batch_size: int = 8
    learning_rate: float = 2e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 20
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    eval_steps: int = 50
    logging_steps: int = 10
    bf16: bool = False
    device: str = "cpu"  # "cpu" or "cuda"
    threads: Union[int, None] = 2  # torch.set_num_threads on CPU; None leaves torch's default
    skip_steps: int = 5  # first optimizer steps left out of tokens/s (allocator and kernel warm-up)
    seed: int = 0
    targets: str = "attention"  # low-rank layers of the GPT-2 rows: a key of TARGETS
    galore_rank: Union[int, None] = None  # GaLore projection rank; None = n_embd // 4 (the paper's 60M ratio)
    galore_update_proj_gap: int = 50

    def replace(self, **changes: Any) -> "Scale":
        """A copy with ``changes``; unknown names fail with the list of known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown scale setting(s) {unknown}; known settings are {sorted(known)}.")
        if changes.get("targets", self.targets) not in TARGETS:
            raise ValueError(f"targets={changes['targets']!r}; choose one of {sorted(TARGETS)}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCALES = {
    # GPT-2 4 x 256 (3.7M parameters, 3.1M of them in the blocks) on the bundled State of the
    # Union corpus (2.7M training tokens at this vocabulary), 300 steps of 8 x 128 tokens.
    "cpu": Scale(),
    # GPT-2 small's shape (12 x 768, 12 heads, 1024 context) in bf16 on one GPU: 98M parameters
    # with this 16384-token vocabulary (124M with GPT-2's 50257). 600 steps of 16 x 1024 tokens
    # are about four passes over SOTU; point dataset/data_files at a larger corpus for longer runs.
    "gpu": Scale(
        n_layer=12, n_embd=768, n_head=12, block_size=1024, vocab_size=16384, max_eval_tokens=262144,
        max_steps=600, batch_size=16, learning_rate=6e-4, warmup_steps=60, eval_steps=100, logging_steps=10,
        bf16=True, device="cuda", threads=None, skip_steps=10,
    ),
}


@dataclass
class Row:
    """One line of the benchmark table."""

    name: str
    label: str
    family: str = "gpt2"  # "gpt2" or "llama"
    lowrank: Union[dict[str, Any], None] = None  # LowRankConfig fields; None: plain Trainer (GaLore)
    optim: Union[str, None] = None  # a transformers optimizer name for the plain-Trainer rows
    reference: str = "full"  # the row its ratios are taken against
    changes_rank: bool = False  # draw its per-layer rank curves
    note: str = ""


ROWS = [
    Row("full", "full rank", lowrank={"mode": "dense", "strategy": "fixed"}),
    Row("inrank", "InRank", lowrank=INRANK, changes_rank=True),
    Row(
        "fixed", "fixed rank (control)",
        lowrank={"mode": "factorized", "init": "kaiming", "strategy": "fixed", "rank": FIXED_RANK},
        note="the naive control: InRank's final rank from step 0, random (Kaiming) init, library defaults",
    ),
    Row(
        "spectral", "fixed rank, spectral init (Kamalakara)",
        lowrank={**INRANK, "strategy": "fixed", "strategy_args": {}, "rank": FIXED_RANK},
        note="InRank's settings (spectral init, factor_lr_scale 3) and final rank from step 0, without growth",
    ),
    Row("cuttlefish", "Cuttlefish", lowrank={"strategy": "cuttlefish", "frobenius_decay": 1e-4}, changes_rank=True),
    Row(
        "warm_start", "warm start (Kamalakara)", lowrank={"strategy": "warm_start", "rank": FIXED_RANK},
        changes_rank=True,
    ),
    Row(
        "dynamic", "dynamic rank (Shin)", lowrank={"strategy": "dynamic", "strategy_args": {"rank": FIXED_RANK}},
        changes_rank=True,
    ),
    Row("llama_full", "Llama full rank", family="llama", optim="adamw_torch", reference="llama_full"),
    Row(
        "galore", "GaLore (Llama)", family="llama", optim="galore_adamw", reference="llama_full",
        note="transformers optim='galore_adamw' on attention and MLP; GPT-2's Conv1D is not supported by it",
    ),
]
ROW_NAMES = [r.name for r in ROWS]
ROW_BY_NAME = {r.name: r for r in ROWS}


def get_row(name: str, fixed_rank: float | None = None, scale: Scale | None = None) -> Row:
    """The row ``name`` on the scale's target layers, with InRank's final rank filled in where it is used."""
    if name not in ROW_BY_NAME:
        raise ValueError(f"unknown row {name!r}; choose from {ROW_NAMES}.")
    row = ROW_BY_NAME[name]
    if row.lowrank is None:
        return row
    scale = scale or Scale()
    row = dataclasses.replace(row, lowrank={**TARGETS[scale.targets], **row.lowrank})
    if FIXED_RANK not in json.dumps(row.lowrank):
        return row
    if fixed_rank is None:
        raise ValueError(f"row {name!r} takes InRank's final rank: run the inrank row first or pass --fixed-rank.")
    return dataclasses.replace(row, lowrank=_fill(row.lowrank, fixed_rank))


def _fill(value: Any, fixed_rank: float) -> Any:
    if value == FIXED_RANK:
        return fixed_rank
    if isinstance(value, dict):
        return {k: _fill(v, fixed_rank) for k, v in value.items()}
    return value


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings (values read as JSON when they parse, else as strings)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set max_steps=50")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
