"""Every private transformers name hf_lowrank touches, in one place, and why.

``transformers.Trainer`` has no public hook for these; each override keeps the Trainer's own
code path and adds the library's part around it. ``tests/test_private_names.py`` checks that
the installed Trainer still has each method (with the parameters the overrides take), so
an upgrade that renames one fails there, naming it. docs/trainer.md lists them too.
"""

from __future__ import annotations

import inspect

# Trainer methods LowRankTrainer overrides (or, for a plain Trainer under LowRankCallback,
# wraps), with the parameters the override relies on.
TRAINER_METHODS = {
    # checkpoints are written into a staging folder and renamed in once complete (crash safety)
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
    # a LowRankModel folder (rank pattern, factors, strategy state), safetensors only
    "_save": ("output_dir", "state_dict"),
    # resuming rebuilds the checkpoint's shapes and the strategy before any tensor loads
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    # the optimizer state is checked against each parameter before the Trainer loads it
    "_load_optimizer_and_scheduler": ("checkpoint",),
    # the best checkpoint is a LowRankModel folder too
    "_load_best_model": (),
}


def missing() -> list[str]:
    """The methods above that this transformers' Trainer lacks, or whose parameters changed."""
    from transformers import Trainer

    out = []
    for name, params in TRAINER_METHODS.items():
        method = getattr(Trainer, name, None)
        if method is None:
            out.append(f"transformers.Trainer.{name}")
            continue
        have = list(inspect.signature(method).parameters)[1:]
        if any(p not in have for p in params):
            out.append(f"transformers.Trainer.{name}({', '.join(params)}) (it takes ({', '.join(have)}))")
    return out
