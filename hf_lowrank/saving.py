"""Saving a LowRankModel: safetensors and JSON only, with the rank pattern; the folder's format.

The functions behind ``LowRankModel.save_pretrained`` and ``state_dict_for_save``; loading is
:mod:`hf_lowrank.loading`, which reads the names defined here. They read the model through its
public methods (``lowrank_layers``, ``rank_pattern``, ``modules_to_save``, ``base_model``), so
this module sits below model.py.

A folder holds ``config.json`` (transformers' config, with a field that makes transformers'
own loaders refuse it), ``lowrank_config.json`` (the LowRankConfig with its rank pattern) and
``model.safetensors`` (or shards with an index); an adapter-only save holds
``lowrank_adapter.safetensors`` and the fingerprints of the base it goes onto instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import CONFIG_NAME as MODEL_CONFIG_NAME

from .checks import check_bool, fail
from .config import LowRankConfig
from .files import atomic_directory, check_shard_size, fingerprint, read_json, write_json, write_weights

if TYPE_CHECKING:
    from .model import LowRankModel

WEIGHTS_NAME = "model.safetensors"
ADAPTER_WEIGHTS_NAME = "lowrank_adapter.safetensors"  # adapter-only save: factors, modules_to_save, trainable tensors
BASE_FINGERPRINT_NAME = "lowrank_base.json"  # adapter-only save: fingerprints of the tensors the base supplies
MAX_SHARD_SIZE = "50GB"  # transformers' default for save_pretrained
# A config.json field transformers checks before reading any weight: a saved LowRankModel sets it to a
# text that is no weights file name, so AutoModel*.from_pretrained fails with that text instead of
# loading the model with random weights where the low-rank layers are.
TRANSFORMERS_GUARD = "transformers_weights"
TRANSFORMERS_REFUSAL = (
    "this folder holds an hf_lowrank LowRankModel, whose low-rank layers transformers cannot load: load it with "
    "hf_lowrank.LowRankModel.from_pretrained(folder), or merge it into a plain transformers model first with "
    "LowRankModel.from_pretrained(folder).merge_and_unload().save_pretrained(out)"
)


def state_dict_for_save(lowrank: "LowRankModel", trim: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to save (factors sliced to the active rank when ``trim``) and aliases of tied tensors."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    layers = lowrank.lowrank_layers()
    for name, tensor in lowrank.base_model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in first_name:
            aliases[name] = first_name[key]
            continue
        if key is not None:
            first_name[key] = name
        owner, _, leaf = name.rpartition(".")
        layer = layers.get(owner)
        if trim and layer is not None and leaf in ("A", "B"):
            tensor = tensor[: layer.rank] if leaf == "A" else tensor[:, : layer.rank]
        tensors[name] = tensor
    return tensors, aliases


def _adapter_keys(lowrank: "LowRankModel") -> set[str]:
    """State-dict keys an adapter-only save holds: the factors, ``modules_to_save`` and every trainable tensor."""
    keys = {n for n, p in lowrank.base_model.named_parameters(remove_duplicate=False) if p.requires_grad}
    for name, layer in lowrank.lowrank_layers().items():
        keys.update(f"{name}.{leaf}" for leaf in ("A", "B") if getattr(layer, leaf) is not None)
    kept = tuple(f"{m}." for m in lowrank.modules_to_save())
    keys.update(k for k in lowrank.base_model.state_dict() if k.startswith(kept))
    return keys


def _split_adapter(
    lowrank: "LowRankModel", tensors: dict[str, torch.Tensor], aliases: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """The adapter part of a save, and the fingerprints of the frozen rest, which the base must supply on loading."""

    residual = [n for n, layer in lowrank.lowrank_layers().items() if layer.mode == "residual"]
    if residual and lowrank.lowrank_config.residual_base == "orthogonal":
        raise ValueError(
            f"save_pretrained(adapter_only=True): LowRankConfig.residual_base='orthogonal' made the frozen W0 of "
            f"the {len(residual)} residual layer(s) ({residual[0]!r}, ...) random orthogonal matrices that no base "
            "model holds; save the full model (adapter_only=False)."
        )
    keep = _adapter_keys(lowrank)
    state = lowrank.base_model.state_dict()
    saved = {k: v for k, v in tensors.items() if k in keep}
    saved_aliases = {}
    for alias, source in aliases.items():
        if alias in keep and source in saved:
            saved_aliases[alias] = source
        elif alias in keep:  # tied to a frozen tensor: the kept name carries its own copy
            saved[alias] = state[alias]
    hashes: dict[tuple, str] = {}  # tied tensors are hashed once
    prints = {}
    for name in sorted(set(state) - keep):
        t = state[name]
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
        if key not in hashes:
            hashes[key] = fingerprint(t)
        prints[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": hashes[key]}
    dtype = next((p.dtype for p in lowrank.base_model.parameters() if p.is_floating_point()), torch.float32)
    return saved, saved_aliases, {"dtype": str(dtype).removeprefix("torch."), "tensors": prints}


def save(
    lowrank: "LowRankModel",
    save_directory: str | os.PathLike,
    trim: bool = True,
    is_main_process: bool = True,
    adapter_only: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    safe_serialization: bool = True,
) -> None:
    """Write ``config.json``, ``lowrank_config.json`` (with the rank pattern) and the tensors as safetensors.

    The folder is written next to ``save_directory`` and renamed into place, so a crash
    leaves the previous contents intact. ``trim`` slices factors to the active rank (the
    saved model then has capacity = rank); checkpoints for resuming keep the capacity.
    Tensors go to ``model.safetensors``, or to shards with ``model.safetensors.index.json``
    once they exceed ``max_shard_size`` (an int in bytes or a string such as ``"5GB"``), as
    transformers writes them. ``safe_serialization`` must stay True: nothing is pickled.

    ``adapter_only`` writes, instead, ``lowrank_adapter.safetensors`` with only the factors,
    ``modules_to_save`` and trainable tensors, and ``lowrank_base.json`` with fingerprints
    of everything else, which :meth:`from_pretrained` takes from the base model
    (``LowRankConfig.base_model_name_or_path``, recorded as an absolute path when it is a local
    folder, or ``base_model=``) and checks. The
    ``config.json`` written makes transformers' own loaders refuse the folder with a message
    pointing here, instead of loading it with random weights.
    """

    check_bool("save_pretrained.trim", trim)
    check_bool("save_pretrained.adapter_only", adapter_only)
    check_shard_size("save_pretrained.max_shard_size", max_shard_size)
    if safe_serialization is not True:
        fail(
            "save_pretrained.safe_serialization", safe_serialization,
            "hf_lowrank writes safetensors only and never pickles (loading one could run code); leave it True",
        )
    if not is_main_process:
        return
    config = LowRankConfig.from_dict({**lowrank.lowrank_config.to_dict(), "rank_pattern": lowrank.rank_pattern(trim=trim)})
    tensors, aliases = state_dict_for_save(lowrank, trim=trim)
    base = None
    if adapter_only:
        tensors, aliases, base = _split_adapter(lowrank, tensors, aliases)
        name = config.base_model_name_or_path
        if name and Path(name).is_dir():  # typed relative to where training ran: record it so it loads from anywhere
            config = LowRankConfig.from_dict({**config.to_dict(), "base_model_name_or_path": str(Path(name).resolve())})
    lowrank.base_model.config.architectures = [type(lowrank.base_model).__name__]
    with atomic_directory(save_directory) as tmp:
        lowrank.base_model.config.save_pretrained(tmp)
        # transformers validates this field before reading any weight, so its loaders fail with our text
        write_json(tmp / MODEL_CONFIG_NAME, {**read_json(tmp / MODEL_CONFIG_NAME), TRANSFORMERS_GUARD: TRANSFORMERS_REFUSAL})
        if getattr(lowrank.base_model, "generation_config", None) is not None and lowrank.base_model.can_generate():
            lowrank.base_model.generation_config.save_pretrained(tmp)
        config.save_pretrained(tmp)
        metadata = {"format": "pt", "aliases": json.dumps(aliases)}
        write_weights(tmp, tensors, ADAPTER_WEIGHTS_NAME if adapter_only else WEIGHTS_NAME, metadata, max_shard_size)
        if base is not None:
            write_json(tmp / BASE_FINGERPRINT_NAME, base)
        extra = Path(save_directory)
        if extra.is_dir():  # keep files others wrote there (trainer state, tokenizer, optimizer), not old weights
            for f in extra.iterdir():
                if not (tmp / f.name).exists() and not _is_weights_file(f.name):
                    os.replace(f, tmp / f.name)


def _is_weights_file(name: str) -> bool:
    """Whether ``name`` is weights this class writes (one file, shards, index, base fingerprints), which a new save replaces."""
    stem = name.split(".", 1)[0].split("-", 1)[0]  # model-00001-of-00002.safetensors -> model
    weights = stem in ("model", "lowrank_adapter") and name.endswith((".safetensors", ".safetensors.index.json"))
    return weights or name == BASE_FINGERPRINT_NAME
