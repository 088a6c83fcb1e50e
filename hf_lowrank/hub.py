"""The Hub and PEFT: resolve and upload folders, model cards, LoRA adapter export and import.

Everything read here is JSON or safetensors; nothing is unpickled, and Hub snapshots never
download anything else.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .files import read_json, read_safetensors, write_json, write_safetensors

if TYPE_CHECKING:
    from .config import LowRankConfig
    from .model import LowRankModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
SUMMARY_NAME = "training_summary.json"
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.md"]
PEFT_PREFIX = "base_model.model."

# -- resolving folders and files --------------------------------------------------------------


def _hub_errors() -> tuple[type[Exception], ...]:
    from huggingface_hub import errors

    return (errors.EntryNotFoundError, errors.LocalEntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError)


def _check_repo_id(path_or_repo_id: str | os.PathLike) -> str:
    """The argument as a Hub repo id; a string that can only be a local path is reported missing."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(path_or_repo_id)
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise FileNotFoundError(f"{text}: no such folder, and not a Hub repo id either.") from None
    return text


def resolve_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a snapshot of the Hub repo holding only its JSON, safetensors and .md files.

    ``hub_kwargs`` go to ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``, ``token``, ...).
    """
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    repo_id = _check_repo_id(path_or_repo_id)
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS, **hub_kwargs))
    except _hub_errors() as e:
        raise FileNotFoundError(f"{repo_id}: no local folder of that name, and the Hub repo could not be read ({e})") from e


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> Path:
    """``filename`` inside a local folder, or downloaded from the Hub repo (``hub_kwargs`` go to ``hf_hub_download``)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path / filename
    repo_id = _check_repo_id(path_or_repo_id)
    import huggingface_hub

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, **hub_kwargs))
    except _hub_errors() as e:
        raise FileNotFoundError(f"{repo_id}/{filename}: not found on the Hub or in the local cache ({e})") from e


# -- uploading --------------------------------------------------------------------------------


def push_folder(
    repo_id: str,
    write: Callable[[Path], None],
    commit_message: str = "Upload with hf_lowrank",
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Write files with ``write(folder)`` into a fresh temporary folder and upload exactly them as one commit.

    Goes through huggingface_hub's standard path (``HfApi.create_repo`` then ``HfApi.upload_folder``)
    and returns ``upload_folder``'s result (the commit info).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"  # a child, so atomic writers can stage siblings inside tmp
        folder.mkdir()
        write(folder)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message,
            revision=revision, create_pr=create_pr,
        )


def push_model(model: "LowRankModel", repo_id: str, metrics: dict[str, Any] | None = None, **kwargs: Any):
    """Save ``model`` (factors trimmed to the active ranks) with its model card and upload both in one commit.

    ``kwargs`` are :func:`push_folder`'s (``commit_message``, ``private``, ``token``, ``revision``, ``create_pr``).
    """
    card = model_card(model, metrics, repo_id=repo_id)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        (folder / "README.md").write_text(card)

    return push_folder(repo_id, write, **kwargs)


# -- model card -------------------------------------------------------------------------------


def _model_folder(model: "LowRankModel") -> Path | None:
    """The saved LowRankModel folder ``model`` was loaded from, if any."""
    name = getattr(getattr(model.base_model, "config", None), "_name_or_path", "") or ""
    from .config import CONFIG_NAME

    return Path(name) if name and (Path(name) / CONFIG_NAME).is_file() else None


def training_summary(model: "LowRankModel") -> dict[str, Any] | None:
    """The metrics in ``training_summary.json`` of the folder the model was loaded from, or None."""
    folder = _model_folder(model)
    if folder is None or not (folder / SUMMARY_NAME).is_file():
        return None
    summary = read_json(folder / SUMMARY_NAME)
    if not isinstance(summary, dict):
        raise ValueError(f"{folder / SUMMARY_NAME}: expected a JSON object of metrics, got {type(summary).__name__}.")
    return summary


def _hub_base_model(name: str | None) -> str | None:
    """``name`` when it is a Hub repo id (the card's ``base_model`` must be one), not a local path."""
    if not name or Path(name).exists():
        return None
    try:
        return _check_repo_id(name)
    except FileNotFoundError:
        return None


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True)
    return text.replace("|", "\\|").replace("\n", " ")


def card_parameter_counts(model: "LowRankModel") -> dict[str, int]:
    """Parameters of the uploaded (trimmed) model, total and trainable, and of the same model all dense."""
    counts = model.parameter_counts()
    total, trainable, dense = counts["total"], counts["trainable"], counts["total"]
    for layer in model.lowrank_layers().values():
        allocated, active = layer.num_parameters(), layer.num_parameters(active_only=True)
        total += active["total"] - allocated["total"]
        trainable += active["trainable"] - allocated["trainable"]
        bias = 0 if layer.bias is None else layer.bias.numel()
        dense += layer.out_features * layer.in_features + bias - allocated["total"]
    return {"total": total, "trainable": trainable, "dense": dense}


def _architecture(model: "LowRankModel") -> str:
    config = model.base_model.config
    arch = type(model.base_model).__name__
    parts = [f"model_type `{config.model_type}`"] if getattr(config, "model_type", "") else []
    for attr, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden size"), ("vocab_size", "vocabulary")):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            parts.append(f"{label} {value}" if attr != "num_hidden_layers" else f"{value} {label}")
    return f"`{arch}` ({', '.join(parts)})" if parts else f"`{arch}`"


def _loader_class(model: "LowRankModel") -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = type(model.base_model).__name__
    return "AutoModelForCausalLM" if arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else arch


def model_card(model: "LowRankModel", metrics: dict[str, Any] | None = None, repo_id: str | None = None) -> str:
    """README.md for an uploaded LowRankModel: YAML metadata, architecture, strategy, ranks, sizes, figures, loading.

    ``metrics`` (e.g. ``{"eval_loss": 3.2, "perplexity": 24.5, "steps": 300}``) fill the training
    table; without them the ``training_summary.json`` of the folder the model was loaded from is
    used, when there is one. ``repo_id`` goes into the loading instructions.
    """
    from huggingface_hub import ModelCardData

    config = model.lowrank_config
    base = config.base_model_name_or_path
    hub_base = _hub_base_model(base)
    figures = metrics if metrics is not None else training_summary(model)
    counts = card_parameter_counts(model)
    arch = type(model.base_model).__name__
    where = repo_id or "<repo id or local folder>"
    loader = _loader_class(model)
    yaml = ModelCardData(library_name="hf_lowrank", tags=["low-rank", config.strategy], base_model=hub_base).to_yaml()
    settings = {
        "strategy": f"`{config.strategy}`",
        "strategy settings": f"`{json.dumps(config.strategy_settings.to_dict(), sort_keys=True)}`",
        "starting mode": f"`{config.mode}`",
        "target modules": f"`{json.dumps(config.target_modules)}`",
        "frobenius decay": _cell(float(config.frobenius_decay)),
        "hf_lowrank version": config.hf_lowrank_version,
    }
    lines = [
        "---",
        yaml,
        "---",
        "",
        f"# {repo_id.split('/')[-1] if repo_id else 'Low-rank ' + arch}",
        "",
        f"A {_architecture(model)} whose linear layers were trained in low rank with hf_lowrank"
        + (f", starting from `{base}`." if base else ", from scratch or from an unrecorded base."),
        "",
        "## Low-rank setup",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in settings.items()),
        "",
        "## Parameters",
        "",
        "| | this model | the same model dense | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| total | {counts['total']:,} | {counts['dense']:,} | {counts['total'] / max(1, counts['dense']):.3f} |",
        f"| trainable | {counts['trainable']:,} | {counts['dense']:,} | {counts['trainable'] / max(1, counts['dense']):.3f} |",
        "",
        f"Rank fraction (sum of ranks over sum of full ranks of the low-rank layers): {model.rank_fraction():.3f}.",
        "",
        "## Per-layer ranks",
        "",
        "| layer | mode | rank | full rank | shape (out x in) |",
        "| --- | --- | ---: | ---: | --- |",
        *(f"| `{r['layer']}` | {r['mode']} | {r['rank']} | {r['full_rank']} | {r['shape']} |" for r in model.layer_report()),
    ]
    if figures:
        lines += ["", "## Training figures", "", "| metric | value |", "| --- | ---: |"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in sorted(figures.items())]
    lines += [
        "",
        "## How to load",
        "",
        "With hf_lowrank installed, the low-rank layers come back with their ranks:",
        "",
        "```python",
        "from hf_lowrank import LowRankModel",
        "",
        f'model = LowRankModel.from_pretrained("{where}")',
        "```",
        "",
        "`merge_and_unload` turns it into a plain transformers model (dense `nn.Linear` / `Conv1D` "
        "layers, same outputs) that no longer needs hf_lowrank:",
        "",
        "```python",
        "plain = model.merge_and_unload()",
        'plain.save_pretrained("merged")',
        "",
        "import transformers",
        "",
        f'plain = transformers.{loader}.from_pretrained("merged")',
        "```",
        "",
    ]
    return "\n".join(lines)


# -- PEFT export ------------------------------------------------------------------------------


def _layers(module: nn.Module) -> dict:
    from .layer import LowRankLinear

    return {n: m for n, m in module.named_modules() if isinstance(m, LowRankLinear)}


def _out_in_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an ``nn.Linear`` or ``Conv1D``."""
    from .layer import SUPPORTED_TYPES

    if not isinstance(module, SUPPORTED_TYPES):
        raise TypeError(type(module).__name__)
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu().to(a.dtype))


def export_base_model(model: "LowRankModel") -> nn.Module:
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


def _check_against_base(model: "LowRankModel", base_model: nn.Module) -> None:
    """Refuse unless every weight outside the adapters equals ``base_model``'s (the adapter carries nothing else)."""
    layers = model.lowrank_layers()
    base_modules = dict(base_model.named_modules())
    changed = []
    for name, layer in layers.items():
        ref = base_modules.get(name)
        try:
            ref_weight = _out_in_weight(ref)
        except TypeError:
            raise ValueError(f"base_model has no nn.Linear / Conv1D named {name!r}; it is not the model the adapter belongs to.") from None
        own = layer.weight if layer.mode == "dense" else layer.base_weight
        what = "W (dense, trainable)" if layer.mode == "dense" else "frozen base W0"
        if not _same(own, ref_weight):
            changed.append(f"{name} {what}")
        if not _same(layer.bias, ref.bias):
            changed.append(f"{name}.bias")
    prefixes = tuple(f"{n}." for n in layers)
    ours = {k: v for k, v in model.base_model.state_dict().items() if not k.startswith(prefixes)}
    theirs = base_model.state_dict()
    changed += sorted(k for k, v in ours.items() if not _same(v, theirs.get(k)))
    if changed:
        raise ValueError(
            f"the model differs from base_model outside its residual adapters, which a LoRA adapter cannot carry: "
            f"{changed[:5]}{' ...' if len(changed) > 5 else ''} ({len(changed)} tensor(s)). Dense layers that trained, "
            "a W0 re-based by a mode transition, or trained embeddings/norms need the full model "
            "(save_pretrained or merge_and_unload) instead of an adapter."
        )


def export_peft_adapter(
    model: "LowRankModel",
    save_directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    base_model: nn.Module | None = None,
):
    """Write a residual-mode model's adapters as a standard PEFT LoRA adapter; returns its ``LoraConfig``.

    ``adapter_config.json`` targets the exact layer names, with each layer's rank in
    ``rank_pattern`` and ``alpha_pattern`` set so that PEFT's ``lora_alpha / r`` is the layer's
    scale ``s``; ``fan_in_fan_out`` is set for GPT-2-style ``Conv1D`` layers.
    ``adapter_model.safetensors`` holds ``base_model.model.<layer>.lora_A.weight`` (r, in) and
    ``lora_B.weight`` (out, r), sliced to the active rank.

    LoRA expresses ``W = W0 + s B A`` only: factorized layers are refused, and so are dense
    layers, whose weight trains, unless ``base_model`` (the model the adapter will be applied
    to) is given and shows them unchanged; they are then left out. With ``base_model`` every
    tensor outside the adapters is checked against it. ``PeftModel.from_pretrained(base, dir)``
    reproduces the model on ``base = export_base_model(model)`` always, and on the original
    pretrained model when nothing but the adapters trained.
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
    if base_model is not None:
        _check_against_base(model, base_model)
    residual = {n: layer for n, layer in layers.items() if layer.mode == "residual"}
    if not residual:
        raise ValueError("the model has no residual layers: there is no adapter to export.")
    ranks = {n: layer.rank for n, layer in residual.items()}
    r = max(ranks.values())
    arch = type(model.base_model).__name__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(residual),
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: layer.scaling * layer.rank for n, layer in residual.items()},  # PEFT scale = alpha / r
        fan_in_fan_out=any(layer.base_type == "conv1d" for layer in residual.values()),
        bias="none",
        task_type="CAUSAL_LM" if arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else None,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path or model.lowrank_config.base_model_name_or_path,
    )
    tensors = {}
    for name, layer in residual.items():
        B, A = layer.active_factors()  # (out, r), (r, in), whatever the wrapped layer type
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
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
    "modules_to_save": "it replaces whole modules",
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
    folder = resolve_folder(adapter_dir, **hub_kwargs)
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
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') can be imported.")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ValueError(f"{path}: {key}={cfg.get(key)!r}; expected a positive number.")
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


def _lora_pairs(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"A": (r, in), "B": (out, r)}}`` from PEFT's key layout."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        part = "A" if key.endswith(".lora_A.weight") else "B" if key.endswith(".lora_B.weight") else None
        if not key.startswith(PEFT_PREFIX) or part is None or value.dim() != 2:
            raise ValueError(
                f"{path}: unexpected tensor {key!r} {tuple(value.shape)}; a plain LoRA adapter holds only "
                f"'{PEFT_PREFIX}<module>.lora_A.weight' and '.lora_B.weight' matrices."
            )
        pairs.setdefault(key[len(PEFT_PREFIX) : -len(".lora_X.weight")], {})[part] = value
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise ValueError(f"{path}: {name} has no lora_{missing}.weight.")
    if not pairs:
        raise ValueError(f"{path}: holds no LoRA weights.")
    return pairs


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

    ``config`` supplies the rest (strategy, its settings, Frobenius decay) and ``capacity``: an int
    or a fraction of min(in, out), at least the adapter's rank, so the rank can grow later; the
    extra components start with ``B = 0``, leaving the function unchanged. Its ``mode``,
    ``target_modules``, ``exclude_modules`` and ``residual_base`` are replaced: the layers are
    the adapter's, residual over ``base_model``'s own weights.
    """
    from peft.utils.other import get_pattern_key

    from .config import LowRankConfig, resolve_size
    from .layer import SUPPORTED_TYPES
    from .model import LowRankModel

    if isinstance(base_model, LowRankModel):
        raise ValueError("base_model is already a LowRankModel; pass the plain transformers model the adapter was trained on.")
    config_path, weights_path = _adapter_files(adapter_dir, **hub_kwargs)
    cfg = read_json(config_path)
    _check_lora_config(cfg, config_path)
    pairs = _lora_pairs(read_safetensors(weights_path), weights_path)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    capacity = None if config is None else config.capacity
    modules = dict(base_model.named_modules())
    pattern = {}
    for name, pair in pairs.items():
        module = modules.get(name)
        if not isinstance(module, SUPPORTED_TYPES):
            what = "no module" if module is None else f"a {type(module).__name__}, not nn.Linear / Conv1D, at"
            raise ValueError(f"{weights_path}: the base model has {what} {name!r}; the adapter belongs to another model.")
        out_f, in_f = _out_in_weight(module).shape
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
        base_model_name_or_path=settings["base_model_name_or_path"] or cfg.get("base_model_name_or_path")
        or getattr(getattr(base_model, "config", None), "_name_or_path", None) or None,
    )
    model = LowRankModel(base_model, LowRankConfig.from_dict(settings, source="import_peft_adapter"))
    layers = model.lowrank_layers()
    with torch.no_grad():
        for name, pair in pairs.items():
            layer, r = layers[name], pattern[name]["rank"]
            layer.A[:r] = pair["A"].to(layer.A.dtype)
            layer.B[:, :r] = pair["B"].to(layer.B.dtype)  # B[:, r:] stays 0: growing later is exact
    return model
