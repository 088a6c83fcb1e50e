"""Memory a training run holds, counted exactly from its tensors: weights, gradients, optimizer state.

Every row of a benchmark gets the same three counts (bytes = elements x element size, each
tensor once even when it is reachable twice, e.g. tied embeddings):

- **weights**: every parameter of the model, trainable or frozen (a residual row's frozen ``W0``
  is stored, so it counts);
- **gradients**: every ``.grad`` at the optimizer step, after clipping (the Trainer frees them
  right after the step, so "at the end" means at the last step);
- **optimizer state**: every tensor the optimizer keeps (``optimizer.state``), including what
  sits inside objects it keeps there: GaLore's and APOLLO's projectors hold their projection
  matrices in ``state[p]["projector"]``.

:class:`MemoryCounter` counts them at the first ``skip_steps + 1`` steps (optimizer state is
created lazily at the first step), at every step whose weights changed size (a strategy that
changes shapes regroups the optimizer too), and at the last step; it keeps the last count
("end") and the largest ("peak") of each. Steps between are not counted, so the count costs
the timed steps nothing. The process's peak resident set (and ``torch.cuda.max_memory_allocated``
on GPU) is measured by ``benchmarks.run_row`` beside these.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from hf_lowrank.optim import inner_optimizer

KINDS = ("weights", "gradients", "optimizer_state")
_DEPTH = 4  # containers and objects followed into from optimizer.state


def tensor_bytes(obj: Any, seen: set[int] | None = None, depth: int = _DEPTH) -> int:
    """Bytes of every tensor reachable from ``obj`` through dicts, lists, tuples and object attributes (each once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if depth <= 0 or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return 0
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return 0
    return sum(tensor_bytes(item, seen, depth - 1) for item in items)


def weight_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(list(model.parameters()))


def gradient_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes([p.grad for p in model.parameters() if p.grad is not None])


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state (parameters it only refers to are not counted again)."""
    inner = inner_optimizer(optimizer)
    return tensor_bytes(list(inner.state.values()), depth=_DEPTH + 1)


class MemoryCounter(transformers.TrainerCallback):
    """Counts weights, gradients and optimizer state at the steps that can change them; keeps end and peak."""

    def __init__(self, skip_steps: int):
        self.skip_steps = skip_steps
        self.end = dict.fromkeys(KINDS, 0)
        self.peak = dict.fromkeys(KINDS, 0)
        self.peak_weights_plus_optimizer = 0
        self._weights = None
        self._due = False

    def _record(self, kind: str, value: int) -> None:
        self.end[kind] = value
        self.peak[kind] = max(self.peak[kind], value)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        weights = weight_bytes(model)
        last = state.global_step + 1 >= state.max_steps
        self._due = state.global_step <= self.skip_steps or weights != self._weights or last
        if weights != self._weights:
            self._weights = weights
            self._record("weights", weights)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._due:
            self._record("gradients", gradient_bytes(model))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._due:
            self._record("optimizer_state", optimizer_state_bytes(optimizer))
            total = self._weights + self.end["optimizer_state"]
            self.peak_weights_plus_optimizer = max(self.peak_weights_plus_optimizer, total)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._record("weights", weight_bytes(model))

    def metrics(self) -> dict[str, int]:
        """``<kind>_bytes`` (at the end) and ``<kind>_peak_bytes`` of each kind, and weights + optimizer state."""
        out = {f"{k}_bytes": self.end[k] for k in KINDS}
        out.update({f"{k}_peak_bytes": self.peak[k] for k in KINDS})
        out["weights_plus_optimizer_bytes"] = self.end["weights"] + self.end["optimizer_state"]
        out["weights_plus_optimizer_peak_bytes"] = max(self.peak_weights_plus_optimizer, out["weights_plus_optimizer_bytes"])
        return out
