"""Loading a saved LowRankModel: the folder's files checked, the base found, shapes from the rank pattern, tensors.

The functions behind ``LowRankModel.load_weights`` / ``from_pretrained``: every file is checked
against the others before anything is allocated or loaded (sizes against the weight headers,
the rank pattern against the layers, inactive factor components, an adapter's base against its
fingerprints). The folder's format and the saving side are :mod:`hf_lowrank.saving`; ``load``
takes the wrapper class to build, so this module sits below model.py too.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers.utils import CONFIG_NAME as MODEL_CONFIG_NAME
from transformers.utils import GENERATION_CONFIG_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

from .checks import check_layer_sizes, fail
from .config import CONFIG_NAME, LowRankConfig
from .files import fingerprint, index_name, metadata_json, read_json, read_weights, weight_files
from .hub import resolve_folder
from .layer import SUPPORTED_TYPES, out_in_weight
from .saving import ADAPTER_WEIGHTS_NAME, BASE_FINGERPRINT_NAME, TRANSFORMERS_GUARD, WEIGHTS_NAME
from .strategies import get_strategy

if TYPE_CHECKING:
    from .model import LowRankModel


def load_weights(lowrank: "LowRankModel", path: str | os.PathLike) -> None:
    """Load saved tensors whose shapes match the current rank pattern, strictly.

    ``path`` is a saved folder or its ``model.safetensors`` (a sharded checkpoint is read
    through its index). An adapter-only folder (``lowrank_adapter.safetensors``) loads its
    tensors over the model, whose other tensors must match ``lowrank_base.json``. Factors
    past a layer's active rank must have ``B = 0`` (the layer's invariant).
    """

    path = Path(path)
    folder, names = (path, (WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)) if path.is_dir() else (path.parent, (path.name,))
    for name in names:
        files = weight_files(folder, name)
        if files is not None:
            break
    else:
        raise FileNotFoundError(f"{folder / names[0]}: file not found (nor its shards' index {index_name(names[0])}).")
    adapter = name == ADAPTER_WEIGHTS_NAME
    tensors, source, metadata = read_weights(files)
    for file, meta in metadata.items():
        aliases = metadata_json(file, meta, "aliases", {})
        if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise ValueError(f"{file}: metadata field 'aliases' is not an object of tensor names; save the model again.")
        for alias, original in aliases.items():
            if original not in tensors:
                raise ValueError(f"{file}: tensor {alias!r} aliases {original!r}, which the checkpoint does not hold.")
            tensors[alias], source[alias] = tensors[original], source[original]
    expected = lowrank.base_model.state_dict()
    missing = [] if adapter else sorted(set(expected) - set(tensors))  # an adapter's rest is the base, checked below
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(tensors) & set(expected)
        if tensors[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"{files[0] if len(files) == 1 else folder / index_name(name)} does not match the rank pattern in "
            f"{CONFIG_NAME}: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}."
        )
    _check_inactive_components(lowrank, tensors, source)
    if adapter:
        _check_base(lowrank, folder / BASE_FINGERPRINT_NAME, expected, set(tensors))
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        warnings.warn(
            f"{folder}: tensors {bad[:5]}{' and more' if len(bad) > 5 else ''} hold NaN or Inf, so the model's outputs "
            "will be NaN; the checkpoint was saved from a diverged run or damaged. Load an earlier one.",
            stacklevel=3,
        )
    lowrank.base_model.load_state_dict(tensors, strict=not adapter)


def _check_inactive_components(lowrank: "LowRankModel", tensors: dict[str, torch.Tensor], source: dict[str, Path]) -> None:
    """Refuse factors whose ``B`` columns past the active rank are non-zero: the rank pattern was edited.

    Only where the strategy keeps that invariant (``zero_inactive``; InRank with the authors'
    random inactive components does not).
    """
    if not lowrank.strategy.zero_inactive:
        return
    for name, layer in lowrank.lowrank_layers().items():
        B = tensors.get(f"{name}.B")
        if B is None or layer.mode == "dense" or B.shape[1] <= layer.rank or not bool(B[:, layer.rank :].ne(0).any()):
            continue
        raise ValueError(
            f"{source[f'{name}.B']}: layer {name!r} has non-zero B[:, {layer.rank}:], past the rank {layer.rank} that "
            f"{CONFIG_NAME} gives it (capacity {layer.capacity}); components past the active rank must have B = 0, or "
            f"the loaded layer is not the saved one. Restore the rank save_pretrained wrote in {CONFIG_NAME}; to shrink "
            "a rank, truncate the layer (LowRankLinear.truncate) and save again."
        )


def _check_base(lowrank: "LowRankModel", path: Path, state: dict[str, torch.Tensor], saved: set[str]) -> None:
    """Refuse a base whose frozen tensors are not bit for bit those an adapter-only save was made on."""

    record = read_json(path)
    prints = record.get("tensors") if isinstance(record, dict) else None
    if not isinstance(prints, dict) or not all(isinstance(v, dict) and {"dtype", "shape", "sha256"} <= set(v) for v in prints.values()):
        raise ValueError(f"{path}: no 'tensors' object of {{dtype, shape, sha256}} entries; save the adapter again.")
    layers = lowrank.lowrank_layers()
    needed = sorted(set(state) - saved)
    absent = [k for k in needed if k not in prints]
    if absent:
        raise ValueError(
            f"{path}: the base model has tensors {absent[:5]} that the adapter was not saved with; "
            "it is another architecture than the one the adapter was trained on."
        )
    differ = []
    for key in needed:
        want, have = prints[key], state[key]
        owner, _, leaf = key.rpartition(".")
        what = f"layer {owner!r} (frozen W0)" if owner in layers and leaf == "base_weight" else repr(key)
        if list(have.shape) != want["shape"]:
            differ.append(f"{what}: shape {tuple(have.shape)}, saved with {tuple(want['shape'])}")
            continue
        dtype = getattr(torch, str(want["dtype"]), None)
        if not isinstance(dtype, torch.dtype) or fingerprint(have.to(dtype)) != want["sha256"]:
            cast = f" (here {str(have.dtype).removeprefix('torch.')}, saved in {want['dtype']})" if have.dtype != dtype else ""
            differ.append(f"{what}{cast}")
    if differ:
        raise ValueError(
            f"{path}: the base model is not the one this adapter was trained on; its weights differ at "
            f"{differ[:5]}{' ...' if len(differ) > 5 else ''} ({len(differ)} tensor(s)). Load the adapter onto that base "
            f"(base_model_name_or_path={lowrank.lowrank_config.base_model_name_or_path!r}, in the dtype it was trained in), "
            "or save the model in full (adapter_only=False) when a transition re-based W0."
        )


def _check_rank_pattern(path: Path, model: nn.Module, pattern: dict[str, dict[str, Any]]) -> None:
    """Refuse ranks and capacities that do not fit the layers they name, naming the file and the layer."""
    modules = dict(model.named_modules())
    for name, spec in pattern.items():
        module = modules.get(name)
        if spec["mode"] == "dense" or not isinstance(module, SUPPORTED_TYPES):
            continue  # names that are no linear layer are reported when the layers are injected
        out_f, in_f = out_in_weight(module).shape
        check_layer_sizes(
            spec["rank"], spec["capacity"], out_f, in_f, f"{path}: rank_pattern[{name!r}]",
            "Restore the values save_pretrained wrote (a trimmed save has capacity = rank).",
        )


def _load_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``dtype`` (or its old name ``torch_dtype``) as a floating torch dtype, or None."""

    def resolve(field: str, value: torch.dtype | str | None) -> torch.dtype | None:
        resolved = getattr(torch, value, None) if isinstance(value, str) else value
        if resolved is not None and not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
            fail(f"LowRankModel.from_pretrained.{field}", value, "give a floating torch dtype such as torch.bfloat16, or its name 'bfloat16'")
        return resolved

    new, old = resolve("dtype", dtype), resolve("torch_dtype", torch_dtype)
    if new is not None and old is not None and new != old:
        fail("LowRankModel.from_pretrained.torch_dtype", torch_dtype, f"it is the old name of dtype, given as {dtype}; pass dtype only")
    return new or old


def _load_base(folder: Path, config: LowRankConfig, model_class: type, dtype_name: str, model_config: Any) -> nn.Module:
    """The base model an adapter-only save names, from its local folder (safetensors only).

    Built with the saved ``config.json`` (``model_config``), so a head the fine-tuning added or
    resized (a classifier's labels) has the saved shape; its values come from the adapter.
    """
    name = config.base_model_name_or_path
    where = folder / CONFIG_NAME
    if not name:
        raise ValueError(
            f"{where}: base_model_name_or_path is not recorded, so the base of this adapter-only save is unknown; "
            "pass the model it was trained on: LowRankModel.from_pretrained(folder, base_model=model)."
        )
    if not Path(name).is_dir():
        raise ValueError(
            f"{where}: base_model_name_or_path={name!r} is not a local folder; load the base yourself and pass it: "
            f"LowRankModel.from_pretrained(folder, base_model={model_class.__name__}.from_pretrained({name!r}))."
        )
    dtype = getattr(torch, dtype_name, None)
    return model_class.from_pretrained(
        name, config=model_config, use_safetensors=True, dtype=dtype if isinstance(dtype, torch.dtype) else "auto"
    )


def _wrap_and_load(wrapper: type, model: nn.Module, config: LowRankConfig, folder: Path, keep_on_failure: bool) -> "LowRankModel":
    """Wrap ``model`` with the saved layout and load the folder's tensors.

    With ``keep_on_failure`` (a base the caller passed), a failure puts the replaced layers
    and the ``requires_grad`` flags back, so the caller's model is left as it was given.
    """
    replaced = {n: m for n, m in model.named_modules() if n in config.rank_pattern}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        try:
            wrapped = wrapper(model, config, weights_follow=True)
        except ValueError as e:  # a rank pattern that does not fit the architecture
            raise ValueError(f"{folder / CONFIG_NAME}: {e}") from e
        load_weights(wrapped, folder)
    except Exception:
        if keep_on_failure:
            for name, module in replaced.items():
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
            for p, flag in flags:
                p.requires_grad_(flag)
        raise
    return wrapped


def _known_model_class(path: Path, arch: Any) -> type:
    """The transformers model class ``architectures`` names, only if transformers' Auto mappings know it.

    ``getattr(transformers, name)`` alone would hand any attribute (``"pipeline"``, a function) to
    the loader; a file's string must name a model class and nothing else.
    """
    from transformers.models.auto import modeling_auto

    known: set[str] = set()
    for attr, mapping in vars(modeling_auto).items():
        if attr.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            for value in mapping.values():
                known.update([value] if isinstance(value, str) else value)
    cls = getattr(transformers, arch, None) if isinstance(arch, str) and arch in known else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"{path}: 'architectures' names {arch!r}, not a model class transformers' Auto mappings know; "
            "pass model_class= (the transformers class of the saved model)."
        )
    return cls


def _check_sizes(folder: Path, model_class: type, model_config: Any, pattern: dict[str, Any]) -> None:
    """Refuse a ``config.json`` whose sizes disagree with the weight files' headers, before any allocation.

    The model is built on the meta device (no memory) and every tensor outside the low-rank
    layers is compared with the shape the safetensors header records: an edited ``n_embd`` or
    ``vocab_size`` (13 TB, 256 GB) or extra layers are refused here, naming the tensor.
    """
    files = weight_files(folder, WEIGHTS_NAME) or []
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
                aliases = metadata_json(path, f.metadata() or {}, "aliases", {})
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        if not isinstance(aliases, dict):
            return  # damaged metadata: load_weights names it
        shapes.update({a: shapes[o] for a, o in aliases.items() if isinstance(o, str) and o in shapes})
    with torch.device("meta"):
        meta = model_class(model_config)
    for name, tensor in meta.state_dict().items():
        if name.rpartition(".")[0] in pattern:
            continue  # a low-rank layer: its shapes come from the rank pattern, checked on loading
        if shapes.get(name) != tuple(tensor.shape):
            saved = shapes.get(name, "absent")
            raise ValueError(
                f"{folder / 'config.json'} builds {name} of shape {tuple(tensor.shape)}, but the weights hold {saved}; "
                "config.json was edited or belongs to another model (nothing was allocated)."
            )


def load(
    wrapper: type,
    path_or_repo_id: str | os.PathLike,
    model_class: type | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    base_model: nn.Module | None = None,
    torch_dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    **hub_kwargs: Any,
) -> "LowRankModel":
    """Rebuild a saved LowRankModel (local folder or Hub repo): shapes from the rank pattern, then tensors.

    ``dtype`` (``torch_dtype`` is its old name) casts the loaded model, as transformers'
    ``from_pretrained`` does. ``hub_kwargs`` are ``revision``, ``cache_dir``, ``token``,
    ``force_download``, ``local_files_only`` and ``subfolder``; any other keyword is refused.
    An adapter-only save is loaded onto ``base_model`` (a plain transformers model, wrapped
    in place, as PEFT's ``PeftModel.from_pretrained`` does) or, without it, onto the local
    folder ``LowRankConfig.base_model_name_or_path`` names; the base's frozen tensors must
    match the fingerprints saved with the adapter.
    """

    dtype = _load_dtype(dtype, torch_dtype)
    if base_model is not None and (isinstance(base_model, wrapper) or not isinstance(base_model, nn.Module)):
        raise ValueError(
            f"LowRankModel.from_pretrained: base_model is a {type(base_model).__name__}; pass the plain transformers "
            "model the adapter was trained on."
        )
    folder = resolve_folder(path_or_repo_id, where="LowRankModel.from_pretrained", **hub_kwargs)
    for needed in (MODEL_CONFIG_NAME, CONFIG_NAME):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder / needed}: missing; a LowRankModel folder holds config.json, {CONFIG_NAME} and {WEIGHTS_NAME}.")
    adapter = weight_files(folder, WEIGHTS_NAME) is None
    if adapter and weight_files(folder, ADAPTER_WEIGHTS_NAME) is None:
        raise FileNotFoundError(
            f"{folder / WEIGHTS_NAME}: missing; a LowRankModel folder holds config.json, {CONFIG_NAME} and {WEIGHTS_NAME} "
            f"(or its shards and {index_name(WEIGHTS_NAME)}), or, saved with adapter_only=True, {ADAPTER_WEIGHTS_NAME} "
            f"and {BASE_FINGERPRINT_NAME}."
        )
    if base_model is not None and not adapter:
        raise ValueError(
            f"LowRankModel.from_pretrained: base_model= is for adapter-only saves, and {folder} holds the whole model "
            f"({WEIGHTS_NAME}); leave base_model out."
        )
    model_config = transformers.AutoConfig.from_pretrained(folder)
    if hasattr(model_config, TRANSFORMERS_GUARD):  # it is for transformers' loaders only
        delattr(model_config, TRANSFORMERS_GUARD)
    arch = (model_config.architectures or [None])[0]
    if model_class is None:
        model_class = _known_model_class(folder / MODEL_CONFIG_NAME, arch)
    data = read_json(folder / CONFIG_NAME)
    if trust_remote_code and isinstance(data, dict):  # the user's opt-in: import a "module:Class" strategy it names
        get_strategy(data.get("strategy"), trust_remote_code=True)
    config = LowRankConfig.from_dict(data, source=str(folder / CONFIG_NAME))
    if not adapter:
        _check_sizes(folder, model_class, model_config, config.rank_pattern)  # before allocating what config.json sizes
        model = model_class(model_config)
    elif base_model is not None:
        if arch and type(base_model).__name__ != arch:
            raise ValueError(
                f"LowRankModel.from_pretrained: base_model is a {type(base_model).__name__}, but {folder / 'config.json'} "
                f"was saved from a {arch}; pass the model the adapter was trained on."
            )
        model = base_model
    else:
        record = read_json(folder / BASE_FINGERPRINT_NAME)
        dtype_name = str(record.get("dtype", "")) if isinstance(record, dict) else ""
        model = _load_base(folder, config, model_class, dtype_name, model_config)
    _check_rank_pattern(folder / CONFIG_NAME, model, config.rank_pattern)
    wrapped = _wrap_and_load(wrapper, model, config, folder, keep_on_failure=base_model is not None)
    if (folder / GENERATION_CONFIG_NAME).is_file() and model.can_generate():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    if dtype is not None:
        wrapped.to(dtype)
    return wrapped.eval()  # as transformers' from_pretrained: no dropout until training calls train()
