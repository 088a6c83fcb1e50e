"""The model card (README.md) uploaded with a LowRankModel, and the upload of model + card.

Sits below model.py and reads the model only through its public methods (``rank_pattern``,
``layer_report``, ``parameter_counts``, ``lowrank_config``), so the model can push itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import CONFIG_NAME
from .files import read_json
from .hub import check_repo_id, push_folder
from .strategies import find_strategy

if TYPE_CHECKING:
    from .model import LowRankModel

SUMMARY_NAME = "training_summary.json"


def _strategy_args(config) -> dict:
    """The strategy's settings with defaults filled in, or as saved when this process lacks the strategy."""
    return config.parsed_strategy_args.to_dict() if find_strategy(config.strategy) else dict(config.strategy_args)


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
    name = getattr(getattr(model.base_model, "config", None), "name_or_path", "") or ""
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
        return check_repo_id(name)
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
        "strategy settings": f"`{json.dumps(_strategy_args(config), sort_keys=True)}`",
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
        "transformers' own `from_pretrained` refuses this repo, with a message saying so: its low-rank "
        "layers need hf_lowrank. `merge_and_unload` turns it into a plain transformers model (dense "
        "`nn.Linear` / `Conv1D` layers, same outputs) that no longer needs hf_lowrank:",
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


