"""PEFT interop: export a LowRankModel's adapters as a PEFT LoRA adapter, import one back.

Above model.py: it reads and builds LowRankModels. Only ``adapter_config.json`` and
``adapter_model.safetensors`` are read; a pickled ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import copy
import math
import warnings
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import is_int, is_number, resolve_size
from .config import LowRankConfig
from .files import read_json, read_safetensors, write_json, write_safetensors
from .hub import resolve_folder
from .layer import SUPPORTED_TYPES, LowRankLinear, out_in_weight
from .model import LowRankModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


# -- PEFT export ------------------------------------------------------------------------------


def _layers(module: nn.Module) -> dict:
    return {n: m for n, m in module.named_modules() if isinstance(m, LowRankLinear)}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu().to(a.dtype))


def export_base_model(model: LowRankModel) -> nn.Module:
    """A plain copy of the wrapped model that an exported LoRA adapter applies to.

    Residual layers become plain layers holding their frozen ``W0``; dense layers keep their
    weight; everything else is copied as it is. For a model wrapped from a pretrained
    checkpoint with ``residual_base="model"``, in which only the adapters trained, this equals
    that checkpoint. Factorized layers have no ``W0`` and are refused.
    """
    plain = copy.deepcopy(model.base_model)
    for name, layer in _layers(plain).items():
        if layer.mode == "factorized":
            raise ValueError(f"layer {name!r} is factorized (W = B A): it has no frozen base weight W0 to export.")
        if layer.mode == "residual":
            with torch.no_grad():
                layer.B.zero_()  # the layer then computes exactly W0 x + bias
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, layer.to_base_module())
    return plain


def _check_against_base(model: LowRankModel, base_model: nn.Module, saved_modules: list[str]) -> None:
    """Refuse unless every weight outside the adapters and ``saved_modules`` equals ``base_model``'s (the adapter carries nothing else)."""
    layers = model.lowrank_layers()
    base_modules = dict(base_model.named_modules())
    changed = []
    for name, layer in layers.items():
        ref = base_modules.get(name)
        try:
            ref_weight = out_in_weight(ref)
        except TypeError:
            raise ValueError(f"base_model has no nn.Linear / Conv1D named {name!r}; it is not the model the adapter belongs to.") from None
        own = layer.weight if layer.mode == "dense" else layer.base_weight
        what = "W (dense, trainable)" if layer.mode == "dense" else "frozen base W0"
        if not _same(own, ref_weight):
            changed.append(f"{name} {what}")
        if not _same(layer.bias, ref.bias):
            changed.append(f"{name}.bias")
    prefixes = tuple(f"{n}." for n in [*layers, *saved_modules])
    ours = {k: v for k, v in model.base_model.state_dict().items() if not k.startswith(prefixes)}
    theirs = base_model.state_dict()
    changed += sorted(k for k, v in ours.items() if not _same(v, theirs.get(k)))
    if changed:
        raise ValueError(
            f"the model differs from base_model outside its residual adapters and modules_to_save, which a LoRA adapter cannot carry: "
            f"{changed[:5]}{' ...' if len(changed) > 5 else ''} ({len(changed)} tensor(s)). Dense layers that trained, "
            "a W0 re-based by a mode transition, or trained embeddings/norms need the full model "
            "(save_pretrained or merge_and_unload) instead of an adapter."
        )


# PEFT task types by the transformers Auto mapping a model class belongs to (first match wins).
TASK_TYPES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
)


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (None for heads PEFT has no task for, e.g. masked LM)."""
    from transformers.models.auto import modeling_auto

    arch = type(model).__name__
    for mapping, task in TASK_TYPES:
        for value in getattr(modeling_auto, mapping).values():
            if arch == value or (isinstance(value, tuple) and arch in value):
                return task
    return None


def _trainable_outside(model: LowRankModel, saved_modules: list[str]) -> list[str]:
    """Trainable parameters that are neither adapter factors nor inside ``saved_modules``."""
    layers = model.lowrank_layers()
    saved = tuple(f"{m}." for m in saved_modules)
    names = []
    for name, p in model.base_model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if p.requires_grad and not (owner in layers and leaf in ("A", "B")) and not name.startswith(saved):
            names.append(name)
    return names


def export_peft_adapter(
    model: LowRankModel,
    save_directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    base_model: nn.Module | None = None,
):
    """Write a residual-mode model's adapters as a standard PEFT LoRA adapter; returns its ``LoraConfig``.

    ``adapter_config.json`` targets the exact layer names, with each layer's rank in
    ``rank_pattern`` and ``alpha_pattern`` set so that PEFT's ``lora_alpha / r`` is the layer's
    scale ``s``; ``fan_in_fan_out`` is set for GPT-2-style ``Conv1D`` layers; ``task_type``
    follows the model class (causal LM, seq2seq LM, sequence or token classification,
    question answering, feature extraction). ``adapter_model.safetensors`` holds
    ``base_model.model.<layer>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r), sliced
    to the active rank, and the whole tensors of the model's ``modules_to_save`` (by default
    its classification head) under ``base_model.model.<module>.<tensor>``, listed in the
    config's ``modules_to_save``, as PEFT saves them.

    LoRA expresses ``W = W0 + s B A`` plus replaced modules only: factorized layers are refused,
    and so are dense layers and any other trainable parameter, unless ``base_model`` (the model
    the adapter will be applied to) is given and shows them unchanged; dense layers are then
    left out. With ``base_model`` every tensor outside the adapters and ``modules_to_save`` is
    checked against it. ``PeftModel.from_pretrained(base, dir)`` reproduces the model on
    ``base = export_base_model(model)`` always, and on the original pretrained model when
    nothing but the adapters and ``modules_to_save`` trained.
    """
    from peft import LoraConfig

    layers = model.lowrank_layers()
    for name, layer in layers.items():
        if layer.mode == "factorized":
            raise ValueError(
                f"layer {name!r} is in mode 'factorized' (W = B A, no frozen base): a LoRA adapter (W = W0 + s B A) "
                "cannot express it. Export needs residual layers, e.g. LowRankConfig(mode='residual')."
            )
    dense = [n for n, layer in layers.items() if layer.mode == "dense"]
    if dense and base_model is None:
        raise ValueError(
            f"layer {dense[0]!r} is in mode 'dense' (its W trains): a LoRA adapter cannot carry a change to it "
            f"({len(dense)} dense layer(s)). If it is unchanged, pass base_model= (the model the adapter will be "
            "applied to) to have that checked and the layer left out."
        )
    saved_modules = model.modules_to_save()
    inside = [(m, n) for m in saved_modules for n in layers if n == m or n.startswith(m + ".")]
    if inside:
        raise ValueError(
            f"modules_to_save names {inside[0][0]!r}, which holds the low-rank layer {inside[0][1]!r}: PEFT replaces "
            "a module to save as a whole, so it cannot also adapt a layer inside it. Leave it out of "
            "LowRankConfig.modules_to_save, or exclude the layer (exclude_modules)."
        )
    if base_model is not None:
        _check_against_base(model, base_model, saved_modules)
    else:
        trained = _trainable_outside(model, saved_modules)
        if trained:
            raise ValueError(
                f"parameters outside the adapters and modules_to_save {saved_modules} are trainable: "
                f"{trained[:5]}{' ...' if len(trained) > 5 else ''} ({len(trained)} in all). A LoRA adapter leaves them "
                "out, so on the original base it would not reproduce the model if they trained. Pass base_model= (the "
                "model the adapter will be applied to) to have them checked unchanged, add their modules to "
                "LowRankConfig.modules_to_save, or save the full model (save_pretrained or merge_and_unload)."
            )
    residual = {n: layer for n, layer in layers.items() if layer.mode == "residual"}
    if not residual:
        raise ValueError("the model has no residual layers: there is no adapter to export.")
    ranks = {n: layer.rank for n, layer in residual.items()}
    r = max(ranks.values())
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(residual),
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: layer.scaling * layer.rank for n, layer in residual.items()},  # PEFT scale = alpha / r
        fan_in_fan_out=any(layer.base_type == "conv1d" for layer in residual.values()),
        bias="none",
        modules_to_save=saved_modules or None,
        task_type=peft_task_type(model.base_model),
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path or model.lowrank_config.base_model_name_or_path,
    )
    tensors = {}
    for name, layer in residual.items():
        B, A = layer.active_factors()  # (out, r), (r, in), whatever the wrapped layer type
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
    for module in saved_modules:
        for key, value in model.base_model.get_submodule(module).state_dict().items():
            tensors[f"{PEFT_PREFIX}{module}.{key}"] = value
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    # PEFT's own save_pretrained, but atomic and with target_modules in a stable order
    write_json(folder / ADAPTER_CONFIG, {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()})
    write_safetensors(folder / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    return config


# -- PEFT import ------------------------------------------------------------------------------

# LoraConfig fields that make an adapter something other than W0 + s B A over the unmodified base.
UNSUPPORTED_LORA_FIELDS = {
    "use_dora": "DoRA rescales the weight columns",
    "lora_bias": "it trains a bias in lora_B",
    "trainable_token_indices": "it trains embedding rows",
    "target_parameters": "it targets parameters, not layers",
    "layer_replication": "it duplicates layers",
    "use_qalora": "QA-LoRA pools the input",
    "alora_invocation_tokens": "aLoRA is active only after its invocation tokens",
    "use_bdlora": "it is a block-diagonal variant",
    "velora_config": "it is a LoRA variant",
    "monteclora_config": "it is a LoRA variant",
    "arrow_config": "it routes between adapters",
    "kasa_config": "it is a LoRA variant",
    "megatron_config": "it targets Megatron layers",
}
# init_lora_weights values that leave the base weights alone (pissa, olora, corda, loftq and lora_ga change them).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _adapter_files(adapter_dir: str | os.PathLike, **hub_kwargs: Any) -> tuple[Path, Path]:
    folder = resolve_folder(adapter_dir, where="import_peft_adapter", **hub_kwargs)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / ADAPTER_PICKLE).is_file():
            raise ValueError(
                f"{folder / ADAPTER_PICKLE}: pickle files are not loaded; save the adapter as {ADAPTER_WEIGHTS} "
                "(PEFT's save_pretrained does so by default, safe_serialization=True)."
            )
        raise FileNotFoundError(f"{weights}: file not found (only {ADAPTER_WEIGHTS} is read, never {ADAPTER_PICKLE}).")
    return folder / ADAPTER_CONFIG, weights


def _check_lora_config(cfg: dict[str, Any], path: Path) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: holds a {type(cfg).__name__}, not a PEFT adapter config (a mapping with peft_type, r, lora_alpha, ...).")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') can be imported.")
    for key in ("r", "lora_alpha"):
        if not is_number(cfg.get(key), 0.0):  # NaN and inf too
            raise ValueError(f"{path}: {key}={cfg.get(key)!r}; expected a positive number.")
    if not is_int(cfg["r"]):
        raise ValueError(f"{path}: r={cfg['r']!r}; expected an int >= 1.")
    for key, ok, what in (("rank_pattern", is_int, "an int >= 1"), ("alpha_pattern", is_number, "a positive number")):
        value = cfg.get(key) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {key}={value!r}; expected a mapping of layer names to {what}.")
        for name, v in value.items():
            if not (ok(v) and is_number(v, 0.0)):
                raise ValueError(f"{path}: {key}[{name!r}]={v!r}; expected {what}.")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg['bias']!r} trains biases, which a low-rank adapter does not hold; only bias='none' imports.")
    for key, why in UNSUPPORTED_LORA_FIELDS.items():
        if cfg.get(key):
            raise ValueError(f"{path}: {key}={cfg[key]!r} cannot be imported ({why}); only plain LoRA, W = W0 + s B A, can.")
    init = cfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise ValueError(
            f"{path}: init_lora_weights={init!r} changes the base weights when PEFT loads the adapter, so it does "
            "not apply to the unmodified base; convert it to a plain LoRA adapter first (PEFT's "
            "path_initial_model_for_weight_conversion)."
        )


def _split_tensors(
    tensors: dict[str, torch.Tensor], path: Path, modules_to_save: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """``{layer: {"A": (r, in), "B": (out, r)}}`` and ``{module to save: its state dict}`` from PEFT's key layout."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        part = "A" if key.endswith(".lora_A.weight") else "B" if key.endswith(".lora_B.weight") else None
        rest = key.removeprefix(PEFT_PREFIX)
        owner = next((m for m in modules_to_save if rest.startswith(m + ".")), None) if part is None else None
        if owner is not None and key.startswith(PEFT_PREFIX):
            saved.setdefault(owner, {})[rest[len(owner) + 1 :]] = value
            continue
        if not key.startswith(PEFT_PREFIX) or part is None or value.dim() != 2:
            raise ValueError(
                f"{path}: unexpected tensor {key!r} {tuple(value.shape)}; a plain LoRA adapter holds only "
                f"'{PEFT_PREFIX}<module>.lora_A.weight' and '.lora_B.weight' matrices, and the tensors of its "
                f"modules_to_save ({modules_to_save or 'none'})."
            )
        pairs.setdefault(rest[: -len(".lora_X.weight")], {})[part] = value
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise ValueError(f"{path}: {name} has no lora_{missing}.weight.")
    if not pairs:
        raise ValueError(f"{path}: holds no LoRA weights.")
    return pairs, saved


def import_peft_adapter(
    base_model: nn.Module,
    adapter_dir: str | os.PathLike,
    config: "LowRankConfig | None" = None,
    **hub_kwargs: Any,
) -> "LowRankModel":
    """A residual-mode LowRankModel over ``base_model`` whose adapters hold a PEFT LoRA adapter's factors.

    ``adapter_dir`` is a folder or a Hub repo id holding ``adapter_config.json`` and
    ``adapter_model.safetensors`` (``adapter_model.bin`` is refused: pickle is never loaded).
    Each adapted layer gets ``A``, ``B``, the rank and PEFT's scale (``lora_alpha / r``, or
    ``/ sqrt(r)`` with rsLoRA), so the model computes what ``PeftModel`` with the adapter does.

    The adapter's ``modules_to_save`` (PEFT's whole replaced modules, e.g. a classification
    head) are loaded into ``base_model`` and become the model's ``LowRankConfig.modules_to_save``.

    ``config`` supplies the rest (strategy, its settings, Frobenius decay) and ``capacity``: an int
    or a fraction of min(in, out), at least the adapter's rank, so the rank can grow later; the
    extra components start with ``B = 0``, leaving the function unchanged. Its ``mode``,
    ``target_modules``, ``exclude_modules`` and ``residual_base`` are replaced: the layers are
    the adapter's, residual over ``base_model``'s own weights.
    """
    from peft.utils.other import get_pattern_key

    if isinstance(base_model, LowRankModel):
        raise ValueError("base_model is already a LowRankModel; pass the plain transformers model the adapter was trained on.")
    config_path, weights_path = _adapter_files(adapter_dir, **hub_kwargs)
    cfg = read_json(config_path)
    _check_lora_config(cfg, config_path)
    wanted = cfg.get("modules_to_save") or []
    if not (isinstance(wanted, list) and all(isinstance(w, str) and w for w in wanted)):
        raise ValueError(f"{config_path}: modules_to_save={wanted!r}; expected a list of module names.")
    # PEFT replaces every module whose name ends with an entry
    to_save = [n for n, _ in base_model.named_modules() if n and any(n.endswith(w) for w in wanted)]
    pairs, saved = _split_tensors(read_safetensors(weights_path), weights_path, to_save)
    bad = sorted(f"{n}.lora_{k}" for n, pair in pairs.items() for k, t in pair.items() if not bool(torch.isfinite(t).all()))
    if bad:
        warnings.warn(f"{weights_path}: {bad[:5]} hold NaN or Inf, so the model's outputs will be NaN; the adapter is damaged.", stacklevel=2)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    capacity = None if config is None else config.capacity
    modules = dict(base_model.named_modules())
    pattern = {}
    for name, pair in pairs.items():
        module = modules.get(name)
        if not isinstance(module, SUPPORTED_TYPES):
            what = "no module" if module is None else f"a {type(module).__name__}, not nn.Linear / Conv1D, at"
            raise ValueError(f"{weights_path}: the base model has {what} {name!r}; the adapter belongs to another model.")
        out_f, in_f = out_in_weight(module).shape
        r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), cfg["r"]))
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), cfg["lora_alpha"]))
        A, B = pair["A"], pair["B"]
        if A.shape != (r, in_f) or B.shape != (out_f, r):
            raise ValueError(
                f"{weights_path}: {name} holds lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but {config_path.name} "
                f"gives rank {r} and the base layer is {out_f}x{in_f} (out x in): expected lora_A ({r}, {in_f}), lora_B ({out_f}, {r})."
            )
        cap = r if capacity is None else max(r, resolve_size(capacity, in_f, out_f, "capacity", name))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        pattern[name] = {"mode": "residual", "rank": r, "capacity": cap, "scaling": scaling}
    settings = (config or LowRankConfig(strategy="fixed")).to_dict()
    settings.update(
        mode="residual", residual_base="model", target_modules=sorted(pattern), exclude_modules=None, rank_pattern=pattern,
        modules_to_save=sorted(saved) if saved else settings["modules_to_save"],
        base_model_name_or_path=settings["base_model_name_or_path"] or cfg.get("base_model_name_or_path")
        or getattr(getattr(base_model, "config", None), "name_or_path", None) or None,
    )
    model = LowRankModel(base_model, LowRankConfig.from_dict(settings, source="import_peft_adapter"), weights_follow=True)
    layers = model.lowrank_layers()
    with torch.no_grad():
        for name, pair in pairs.items():
            layer, r = layers[name], pattern[name]["rank"]
            layer.A[:r] = pair["A"].to(layer.A.dtype)
            layer.B[:, :r] = pair["B"].to(layer.B.dtype)  # B[:, r:] stays 0: growing later is exact
    for name, state in saved.items():
        try:
            model.base_model.get_submodule(name).load_state_dict(state, strict=True)
        except RuntimeError as e:  # missing, unexpected or mis-shaped tensors of a module to save
            raise ValueError(f"{weights_path}: the tensors of modules_to_save entry {name!r} do not fit the base model's module ({e}).") from e
    return model
