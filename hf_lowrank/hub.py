"""The Hub and PEFT: resolve and upload folders, model cards, LoRA adapter export and import.

Everything read here is JSON or safetensors; nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .files import read_json, read_safetensors, write_json, write_safetensors

if TYPE_CHECKING:
    from .model import LowRankModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt"]


def resolve_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a snapshot of the Hub repo (JSON, safetensors and text files only)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_repo_id), allow_patterns=SNAPSHOT_PATTERNS, **hub_kwargs))


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> Path:
    """``filename`` inside a local folder, or downloaded from the Hub repo."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path / filename
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(path_or_repo_id), filename, **hub_kwargs))


def push_folder(
    repo_id: str,
    write: Callable[[Path], None],
    commit_message: str = "Upload with hf_lowrank",
    private: bool | None = None,
    token: str | None = None,
):
    """Write files with ``write(folder)`` into a temporary folder and upload it as one commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)


def model_card(model: "LowRankModel", metrics: dict[str, Any] | None = None) -> str:
    """A README.md for a saved LowRankModel: what it is, its ranks, its size, how to load it."""
    config = model.lowrank_config
    base = config.base_model_name_or_path
    arch = type(model.base_model).__name__
    counts = model.parameter_counts()
    dense_total = counts["total"] + sum(
        layer.out_features * layer.in_features + (0 if layer.bias is None else layer.bias.numel()) - layer.num_parameters()["total"]
        for layer in model.lowrank_layers().values()
    )
    header = ["---", "library_name: hf_lowrank", "tags:", "- low-rank", f"- {config.strategy}"]
    if base:
        header.append(f"base_model: {base}")
    header.append("---")
    lines = [
        *header,
        "",
        f"# Low-rank {arch}",
        "",
        f"A `{arch}` whose linear layers were trained in low rank with [hf_lowrank](https://pypi.org/project/hf-lowrank/), "
        f"strategy `{config.strategy}`" + (f", from `{base}`." if base else "."),
        "",
        "| | parameters |",
        "| --- | ---: |",
        f"| this model (total) | {counts['total']:,} |",
        f"| trainable | {counts['trainable']:,} |",
        f"| the same model dense | {dense_total:,} |",
        f"| ratio | {counts['total'] / max(1, dense_total):.3f} |",
        "",
        f"Strategy settings: `{json.dumps(config.strategy_settings.to_dict(), sort_keys=True)}`",
        "",
        "## Per-layer ranks",
        "",
        "| layer | mode | rank | full rank | shape |",
        "| --- | --- | ---: | ---: | --- |",
        *(f"| `{r['layer']}` | {r['mode']} | {r['rank']} | {r['full_rank']} | {r['shape']} |" for r in model.layer_report()),
    ]
    if metrics:
        lines += ["", "## Training figures", "", "| metric | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from hf_lowrank import LowRankModel",
        "",
        'model = LowRankModel.from_pretrained("<repo id or folder>")   # low-rank layers, ranks from lowrank_config.json',
        "dense = model.merge_and_unload()                              # or a plain transformers model",
        "```",
        "",
    ]
    return "\n".join(lines)


def push_model(model: "LowRankModel", repo_id: str, metrics: dict[str, Any] | None = None, **kwargs: Any):
    """Save ``model`` (trimmed), write its model card, and upload both in one commit."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        summary = folder / "training_summary.json"
        figures = metrics if metrics is not None else (read_json(summary) if summary.is_file() else None)
        (folder / "README.md").write_text(model_card(model, figures))

    return push_folder(repo_id, write, **kwargs)


# -- PEFT -------------------------------------------------------------------------------------


def base_model_for_adapter(model: "LowRankModel") -> nn.Module:
    """A plain copy of the wrapped model with every residual layer's frozen ``W0`` as its weight.

    This is the base an exported LoRA adapter applies to (for a model wrapped from a
    pretrained checkpoint it equals that checkpoint).
    """
    plain = copy.deepcopy(model.base_model)
    for name, layer in list(_layers(plain).items()):
        if layer.mode != "residual":
            raise ValueError(f"layer {name!r} is in mode {layer.mode!r}; only residual layers have a frozen base.")
        with torch.no_grad():
            layer.B.zero_()
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, layer.to_base_module())
    return plain


def _layers(module: nn.Module) -> dict:
    from .layer import LowRankLinear

    return {n: m for n, m in module.named_modules() if isinstance(m, LowRankLinear)}


def export_peft_adapter(model: "LowRankModel", save_directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write a residual-mode model's adapters as a PEFT LoRA adapter (``PeftModel.from_pretrained`` loads it).

    Each layer keeps its own rank (``rank_pattern``) and scale (``alpha_pattern``, so that
    PEFT's ``lora_alpha / r`` equals the layer's ``s``); GPT-2 ``Conv1D`` layers set
    ``fan_in_fan_out``. Factorized or dense layers cannot be expressed as LoRA and are refused.
    """
    from peft import LoraConfig

    layers = model.lowrank_layers()
    wrong = {n: layer.mode for n, layer in layers.items() if layer.mode != "residual"}
    if wrong:
        name, mode = next(iter(wrong.items()))
        raise ValueError(
            f"layer {name!r} is {mode}: a LoRA adapter can only express residual layers (W = W0 + s B A); "
            f"{len(wrong)} layer(s) are not residual. Export needs LowRankConfig(mode='residual')."
        )
    ranks = {n: layer.rank for n, layer in layers.items()}
    r = max(ranks.values())
    conv1d = {layer.base_type == "conv1d" for layer in layers.values()}
    if len(conv1d) > 1:
        raise ValueError("the model mixes Conv1D and Linear targets; PEFT's fan_in_fan_out is one flag per adapter.")
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(layers),
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: layer.scaling * layer.rank for n, layer in layers.items()},
        fan_in_fan_out=conv1d.pop(),
        bias="none",
        base_model_name_or_path=base_model_name_or_path or model.lowrank_config.base_model_name_or_path,
    )
    tensors = {}
    for name, layer in layers.items():
        B, A = layer.active_factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / ADAPTER_CONFIG, {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()})
    write_safetensors(folder / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})


def import_peft_adapter(base_model: nn.Module, adapter_dir: str | os.PathLike, capacity: int | float | None = None) -> "LowRankModel":
    """A residual-mode LowRankModel whose adapters start from a PEFT LoRA adapter (the start of rank growth).

    ``capacity`` (absolute, or a fraction of min(in, out)) leaves room to grow: extra
    components start with ``B = 0``, so the function equals PEFT's with the adapter.
    """
    from .config import LowRankConfig, resolve_size
    from .model import LowRankModel

    folder = Path(adapter_dir)
    if (folder / "adapter_model.bin").is_file() and not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{folder / 'adapter_model.bin'}: pickle files are not loaded; save the adapter with safetensors.")
    cfg = read_json(folder / ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be imported.")
    tensors = read_safetensors(folder / ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("base_model.model.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: unexpected tensor {key!r}; expected LoRA A/B weights only.")
        name, _, part = key[len("base_model.model.") : -len(".weight")].rpartition(".")
        pairs.setdefault(name, {})[part] = value
    from peft.utils.other import get_pattern_key

    pattern = {}
    modules = dict(base_model.named_modules())
    for name, pair in pairs.items():
        if name not in modules:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: the base model has no module {name!r}.")
        r = int(cfg.get("rank_pattern", {}).get(get_pattern_key(cfg.get("rank_pattern", {}).keys(), name), cfg["r"]))
        alpha = float(cfg.get("alpha_pattern", {}).get(get_pattern_key(cfg.get("alpha_pattern", {}).keys(), name), cfg["lora_alpha"]))
        if pair["lora_A"].shape[0] != r:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: {name} has rank {pair['lora_A'].shape[0]}, its config says {r}.")
        scaling = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
        out_f, in_f = pair["lora_B"].shape[0], pair["lora_A"].shape[1]
        cap = r if capacity is None else max(r, resolve_size(capacity, in_f, out_f, "capacity", name))
        pattern[name] = {"mode": "residual", "rank": r, "capacity": cap, "scaling": scaling}
    config = LowRankConfig(
        mode="residual", target_modules=sorted(pattern), rank_pattern=pattern,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )
    model = LowRankModel(base_model, config)
    layers = model.lowrank_layers()
    with torch.no_grad():
        for name, pair in pairs.items():
            layer, r = layers[name], pattern[name]["rank"]
            layer.A[:r] = pair["lora_A"].to(layer.A.dtype)
            layer.B[:, :r] = pair["lora_B"].to(layer.B.dtype)
    return model
