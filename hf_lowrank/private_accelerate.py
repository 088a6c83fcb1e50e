"""Every private accelerate name hf_lowrank touches, in one place.

After a rank change replaced parameters, the DDP wrapper is rebuilt (``LowRankTrainer._rewrap``);
the Accelerator's list of prepared models must hold the new wrapper, or its later
``unwrap_model`` / ``save`` / ``gather`` calls would reach the stale one. accelerate has no
public call to replace a prepared model, so that list is rewritten. ``tests/test_private_names.py``
checks it exists on a live Accelerator.
"""

from __future__ import annotations

from typing import Any

ACCELERATOR_ATTRIBUTES = ("_models",)


def replace_prepared_model(accelerator: Any, old: Any, new: Any) -> None:
    """Make ``new`` take ``old``'s place among the models ``accelerator`` prepared."""
    accelerator._models = [new if m is old else m for m in accelerator._models]


def missing(accelerator: Any) -> list[str]:
    """The attributes above that a live Accelerator lacks."""
    return [f"accelerate.Accelerator.{a}" for a in ACCELERATOR_ATTRIBUTES if not isinstance(getattr(accelerator, a, None), list)]
