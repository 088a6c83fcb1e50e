"""What a Trainer checkpoint must hold to resume the same run, checked before anything is loaded.

The Trainer resumes silently from a checkpoint without ``optimizer.pt``, ``scheduler.pt`` or
``rng_state.pth`` (each then starts fresh: another run), and loads ``optimizer.pt`` into the
optimizer without comparing it with the parameters (a (1, 1) moment for a (32, 64) factor
crashes inside torch's step, a moment one row larger resumes wrong, an Inf moment is carried
into every later checkpoint). These checks refuse such a checkpoint, naming the file, the
parameter and what differs. ``torch.load`` runs with ``weights_only=True``: no pickle code.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .checks import is_int
from .files import read_json, write_json

TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
MANIFEST_NAME = "lowrank_checksums.json"
# The low-rank state of a checkpoint (strategy, learning-rate adjustments, plan history, layout,
# global_step, nonfinite_steps), one file and format for LowRankTrainer and hf_lowrank.fsdp.
LOWRANK_STATE_NAME = "lowrank_trainer_state.json"
LEGACY_STATE_NAMES = ("lowrank_state.json",)  # what hf_lowrank.fsdp.save_checkpoint wrote before the two were one: still read


def lowrank_state(model: Any, global_step: int | None = None, nonfinite_steps: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """What :data:`LOWRANK_STATE_NAME` holds: ``model.lowrank_state_dict()``, the skipped steps and, when known, the step."""
    state = {**model.lowrank_state_dict(), "nonfinite_steps": list(nonfinite_steps)}
    if global_step is not None:
        state["global_step"] = global_step
    return state


def state_file(folder: str | os.PathLike) -> Path:
    """The checkpoint's low-rank state file: :data:`LOWRANK_STATE_NAME`, or an older name where only that exists."""
    folder = Path(folder)
    for name in (LOWRANK_STATE_NAME, *LEGACY_STATE_NAMES):
        if (folder / name).is_file():
            return folder / name
    return folder / LOWRANK_STATE_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> None:
    """Record the SHA-256 of every file of a complete checkpoint (``lowrank_checksums.json``).

    A flipped bit in a weight or a moment is a valid float: only a checksum tells it from the
    saved value. Files in subfolders (FSDP's sharded states) are not listed.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    write_json(folder / MANIFEST_NAME, {"sha256": {p.name: _sha256(p) for p in files}})


def verify_manifest(folder: str | os.PathLike) -> None:
    """Refuse a checkpoint whose files differ from what ``lowrank_checksums.json`` recorded when it was written.

    A checkpoint written by this version (its ``lowrank_trainer_state.json`` records
    ``global_step``) must have the manifest; older checkpoints, without it, are not verified.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        try:
            state = read_json(state_file(folder))
        except (FileNotFoundError, ValueError):
            return  # named when the state is loaded
        if isinstance(state, dict) and "global_step" in state:
            raise FileNotFoundError(f"{path}: missing, although this checkpoint was written with one; it was edited. Resume from another checkpoint.")
        return
    data = read_json(path)
    sums = data.get("sha256") if isinstance(data, dict) else None
    if not (isinstance(sums, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items())):
        raise ValueError(f"{path}: not a checksum manifest (needs 'sha256': {{file: digest}}); the checkpoint is damaged.")
    for name, digest in sorted(sums.items()):
        file = folder / name
        if Path(name).name != name or name == MANIFEST_NAME:
            raise ValueError(f"{path}: lists {name!r}, not a file of the folder itself; the manifest is damaged.")
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing (listed in {path}); the checkpoint is incomplete.")
        if _sha256(file) != digest:
            raise ValueError(
                f"{file}: its contents changed since the checkpoint was written (SHA-256 differs from {MANIFEST_NAME}); "
                "the file is damaged or edited. Resume from another checkpoint."
            )


def rng_name(world_size: int, process_index: int) -> str:
    """The RNG file the Trainer writes for this process."""
    return f"rng_state_{process_index}.pth" if world_size > 1 else "rng_state.pth"


def check_complete(folder: str | os.PathLike, world_size: int = 1, process_index: int = 0) -> None:
    """Refuse a checkpoint missing a file that resuming the same run needs."""
    folder = Path(folder)
    what = {
        TRAINER_STATE_NAME: "the step, the logs and the data position",
        OPTIMIZER_NAME: "the optimizer's moments (Adam would restart from zero)",
        SCHEDULER_NAME: "the learning-rate schedule's position (it would restart from step 0)",
        rng_name(world_size, process_index): "the random state (dropout and sampling would differ)",
    }
    missing = [name for name in what if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder / missing[0]}: missing, so resuming would not continue the same run ({what[missing[0]]})"
            + (f"; also missing: {missing[1:]}" if missing[1:] else "")
            + ". Resume from a complete checkpoint, or start a new run from these weights: "
            "LowRankModel.from_pretrained(checkpoint) and train without resume_from_checkpoint."
        )
    rng = _load(folder / rng_name(world_size, process_index))
    if not (isinstance(rng, dict) and {"python", "numpy", "cpu"} <= set(rng) and torch.is_tensor(rng["cpu"])):
        raise ValueError(f"{folder / rng_name(world_size, process_index)}: not the Trainer's random state; the checkpoint is damaged.")
    saved_global_step(folder)  # the Trainer reads trainer_state.json first: name a damaged one here


def _load(path: Path) -> Any:
    from transformers.trainer_pt_utils import safe_globals  # the numpy types of the RNG state, as the Trainer allows

    try:
        with safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {str(e)[:200]}); the checkpoint is damaged.") from None


def saved_global_step(folder: str | os.PathLike) -> int:
    """``global_step`` of ``trainer_state.json``, checked against the folder name ``checkpoint-N``."""
    folder = Path(folder)
    path = folder / TRAINER_STATE_NAME
    state = read_json(path)
    step = state.get("global_step") if isinstance(state, dict) else None
    if not (is_int(step) and step >= 0):
        raise ValueError(f"{path}: global_step={step!r} is not an int >= 0; the checkpoint is damaged or edited.")
    named = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    if named and int(named.group(1)) != step:
        raise ValueError(
            f"{path}: global_step={step}, but the folder is {folder.name}; the checkpoint was edited or renamed, "
            "so where the run resumes is not known. Restore the original value or folder name."
        )
    return step


def check_step(folder: str | os.PathLike, step: int, lowrank_state: dict[str, Any], state_file: str) -> None:
    """The step the low-rank state and the schedule were saved at agree with ``trainer_state.json``."""
    saved = lowrank_state.get("global_step")
    if saved is not None and saved != step:
        raise ValueError(
            f"{state_file}: global_step={saved!r}, but {Path(folder) / TRAINER_STATE_NAME} says {step}; one of them "
            "was edited, so the strategy and the Trainer would resume at different steps."
        )
    history = lowrank_state.get("plan_history")
    late = [h.get("step") for h in history if isinstance(h, dict) and is_int(h.get("step")) and h["step"] > step] if isinstance(history, list) else []
    if late:
        raise ValueError(f"{state_file}: plans applied at steps {late[:3]}, after global_step={step}; the checkpoint was edited.")
    scheduler = _load(Path(folder) / SCHEDULER_NAME)
    if not isinstance(scheduler, dict):
        raise ValueError(f"{Path(folder) / SCHEDULER_NAME}: not a scheduler state (a {type(scheduler).__name__}).")
    last = scheduler.get("last_epoch")
    if "lr_lambdas" in scheduler and is_int(last) and last != step:
        raise ValueError(
            f"{Path(folder) / SCHEDULER_NAME}: the schedule was saved at step {last}, but "
            f"{Path(folder) / TRAINER_STATE_NAME} says global_step={step}; one of them was edited."
        )


def check_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, names: dict[int, str], step: int) -> None:
    """``optimizer.pt`` fits ``optimizer``: the same groups and parameters, each state tensor of its parameter's
    shape and dtype and finite, the step counts in ``[0, step]``. Raises ``ValueError`` naming file and parameter."""
    path = Path(path)
    saved = _load(path)
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("param_groups"), list)):
        raise ValueError(f"{path}: not an optimizer state (needs 'state' and 'param_groups'); the checkpoint is damaged.")
    groups = saved["param_groups"]
    live = optimizer.param_groups
    if len(groups) != len(live):
        raise ValueError(
            f"{path}: {len(groups)} parameter groups, but the optimizer of this model has {len(live)}; the checkpoint "
            "was saved with another optimizer setup (factor_lr_scale, frobenius_decay, weight decay) or edited."
        )
    params: dict[Any, torch.nn.Parameter] = {}
    for i, (group, mine) in enumerate(zip(groups, live)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(ids, list) and len(ids) == len(mine["params"])):
            count = len(ids) if isinstance(ids, list) else ids
            raise ValueError(f"{path}: parameter group {i} lists {count!r} parameters, the optimizer's has {len(mine['params'])}.")
        for key, value in group.items():
            if key != "params" and isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{path}: parameter group {i} has {key}={value}; the optimizer state is damaged.")
        params.update(zip(ids, mine["params"]))
    for key, entry in saved["state"].items():
        if key not in params:
            raise ValueError(f"{path}: state for parameter index {key!r}, which no parameter group lists.")
        p = params[key]
        name = names.get(id(p), f"#{key}")
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: the state of parameter {name} is a {type(entry).__name__}, not a dict of tensors.")
        for field, value in entry.items():
            where = f"{path}: {field!r} of parameter {name}"
            if field == "step":
                count = float(value) if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1) else None
                if count is None or not math.isfinite(count) or count < 0 or count > step:
                    raise ValueError(f"{where} is {value!r}, not a step count in [0, {step}] (global_step); the file is damaged or edited.")
                continue
            if not torch.is_tensor(value):
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{where} is {value}; the optimizer state is damaged.")
                continue
            if value.shape != p.shape:
                raise ValueError(
                    f"{where} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}; the optimizer state does not "
                    "belong to this layout (damaged, edited, or saved before a rank change)."
                )
            if value.dtype != p.dtype:
                raise ValueError(f"{where} has dtype {value.dtype}, the parameter {p.dtype}; the optimizer state is damaged or edited.")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"{where} holds NaN or Inf; resuming would carry them into every update. Resume from an earlier checkpoint."
                )
