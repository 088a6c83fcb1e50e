"""get_lowrank_model / LowRankModel: inject low-rank layers into any transformers model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from torch import nn

from .config import CONFIG_NAME, LowRankConfig
from .files import atomic_directory, read_json, read_safetensors, write_safetensors
from .layer import SUPPORTED_TYPES, LayerSpec, LowRankLinear
from .card import push_model
from .hub import resolve_folder
from .strategies import LayerChange, Plan, RankStrategy, get_strategy

WEIGHTS_NAME = "model.safetensors"


def _all_linear(model: nn.Module) -> list[str]:
    """Every nn.Linear / Conv1D except the output embedding and a classification head."""
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    skip: set[int] = set()
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        skip.add(id(model.get_output_embeddings()))
    for head in SEQ_CLS_HEAD_NAMES + ["qa_outputs"]:
        module = getattr(model, head, None)
        if isinstance(module, nn.Module):
            skip.update(id(m) for m in module.modules())
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES) and id(m) not in skip]


def find_target_modules(model: nn.Module, config: LowRankConfig) -> list[str]:
    """Names of the modules ``config`` selects, matched with PEFT's ``check_target_module_exists``."""
    from peft.tuners.tuners_utils import check_target_module_exists  # imported here: peft is slow to import

    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model)
    matcher = SimpleNamespace(
        target_modules=targets, exclude_modules=config.exclude_modules, target_parameters=None, modules_to_save=None
    )
    names = []
    for name, module in model.named_modules():
        hit = check_target_module_exists(matcher, name)
        if hit and type(hit).__name__ != "_ExcludedModule" and isinstance(module, (SUPPORTED_TYPES, LowRankLinear)):
            names.append(name)
    if not names:
        candidates = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)})
        raise ValueError(
            f"LowRankConfig.target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matches no nn.Linear / Conv1D layer of {type(model).__name__}; its linear layers are named {candidates}."
        )
    return names


def _check_not_tied(model: nn.Module, names: list[str]) -> None:
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    modules = dict(model.named_modules())
    for name in names:
        shared = owners.get(id(modules[name].weight), [])
        if len(shared) > 1:
            raise ValueError(
                f"layer {name!r} shares its weight with {[s for s in shared if not s.startswith(name + '.')]} "
                "(tied weights); add it to LowRankConfig.exclude_modules."
            )


class LowRankModel(nn.Module):
    """A transformers model whose target layers are :class:`LowRankLinear`.

    Attribute access falls through to the wrapped model (``config``, ``generate``, ...), as in
    PEFT's ``PeftModel``. The strategy named by the config is built here and owned by the
    trainer during training.
    """

    def __init__(self, model: nn.Module, config: LowRankConfig):
        super().__init__()
        self.base_model = model
        self.lowrank_config = config
        self.strategy: RankStrategy = get_strategy(config.strategy)(config)
        self._inject()

    def _inject(self) -> None:
        config = self.lowrank_config
        if config.rank_pattern:
            names = list(config.rank_pattern)
            modules = dict(self.base_model.named_modules())
            missing = [n for n in names if not isinstance(modules.get(n), (SUPPORTED_TYPES, LowRankLinear))]
            if missing:
                raise ValueError(
                    f"LowRankConfig.rank_pattern names {missing[:5]} which are not linear layers of "
                    f"{type(self.base_model).__name__}; the checkpoint belongs to another architecture."
                )
        else:
            names = find_target_modules(self.base_model, config)
        _check_not_tied(self.base_model, [n for n in names if not isinstance(self.base_model.get_submodule(n), LowRankLinear)])
        for name in names:
            module = self.base_model.get_submodule(name)
            layer = module if isinstance(module, LowRankLinear) else LowRankLinear(module)
            if config.rank_pattern:
                layer.set_layout(LayerSpec(**config.rank_pattern[name]))
            else:
                self._initialise(name, layer)
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent), child, layer)

    def _initialise(self, name: str, layer: LowRankLinear) -> None:
        c = self.lowrank_config
        spec = self.strategy.initial_spec(name, layer)
        if spec.mode == "factorized":
            layer.init_factorized(spec.rank, spec.capacity, init=c.init, init_scale=c.init_scale)
        elif spec.mode == "residual":
            layer.to_residual(spec.rank, spec.capacity, base=c.residual_base, init_scale=c.init_scale)
            layer.scaling = spec.scaling

    # -- delegation ----------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the wrapped model, running through the low-rank layers."""
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with low-rank layers inside)."""
        return self.base_model

    # -- layers and reporting ------------------------------------------------------------------

    def lowrank_layers(self) -> dict[str, LowRankLinear]:
        """Low-rank layers by module name (relative to the wrapped model)."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, LowRankLinear)}

    def rank_pattern(self, trim: bool = False) -> dict[str, dict[str, Any]]:
        """Per-layer ``{mode, rank, capacity, scaling}``; ``trim`` reports capacity = rank."""
        pattern = {}
        for name, layer in self.lowrank_layers().items():
            spec = layer.spec.to_dict()
            if trim and spec["capacity"] is not None:
                spec["capacity"] = spec["rank"]
            pattern[name] = spec
        return pattern

    def apply_rank_pattern(self, pattern: dict[str, dict[str, Any]]) -> None:
        """Reshape the layers to ``pattern`` (values are to be loaded afterwards)."""
        layers = self.lowrank_layers()
        unknown = sorted(set(pattern) - set(layers))
        if unknown:
            raise ValueError(f"rank pattern names layers this model does not have: {unknown[:5]}")
        for name, spec in pattern.items():
            layers[name].set_layout(LayerSpec(**spec))

    def apply_plan(self, plan: Plan) -> list[str]:
        """Carry out a strategy's plan on the layers (optimizer state is the trainer's business).

        A transition whose SVD fails (``torch.linalg.LinAlgError``, e.g. non-finite factors)
        leaves its layer as it was: the SVD comes before any parameter is replaced. The other
        changes still apply; the skipped ones are returned as messages for the caller to warn.
        """
        layers = self.lowrank_layers()
        skipped = []
        for change in plan.changes:
            try:
                self._apply_change(layers[change.layer], change)
            except torch.linalg.LinAlgError as e:
                skipped.append(f"{change.op} of {change.layer} skipped: its SVD failed ({e}); the layer is left as it was.")
        return skipped

    @staticmethod
    def _apply_change(layer: LowRankLinear, change: LayerChange) -> None:
        if change.op == "grow":
            layer.grow(change.rank)
        elif change.op == "truncate":
            layer.truncate(change.rank, change.capacity)
        elif change.op == "to_factorized":
            layer.to_factorized(change.rank, change.capacity, ones=change.ones)
        elif change.op == "to_dense":
            layer.to_dense()
        else:
            layer.to_residual(change.rank, change.capacity, alpha=change.alpha)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters of the whole model (shared tensors counted once)."""
        seen: dict[int, nn.Parameter] = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in seen.values())
        trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
        return {"trainable": trainable, "total": total}

    def layer_report(self) -> list[dict[str, Any]]:
        """One row per low-rank layer: name, mode, rank, capacity, full rank, parameters."""
        rows = []
        for name, layer in self.lowrank_layers().items():
            counts = layer.num_parameters()
            rows.append(
                {
                    "layer": name,
                    "mode": layer.mode,
                    "rank": layer.rank if layer.mode != "dense" else layer.full_rank,
                    "capacity": layer.capacity,
                    "full_rank": layer.full_rank,
                    "shape": f"{layer.out_features}x{layer.in_features}",
                    "trainable": counts["trainable"],
                    "total": counts["total"],
                }
            )
        return rows

    def rank_fraction(self) -> float:
        """Sum of active ranks over the sum of full ranks of the low-rank layers (dense counts as full)."""
        rows = self.layer_report()
        return sum(r["rank"] for r in rows) / max(1, sum(r["full_rank"] for r in rows))

    def summary(self) -> str:
        """A readable table of the layers and the parameter counts."""
        rows = self.layer_report()
        width = max([len(r["layer"]) for r in rows] + [5])
        lines = [f"{'layer':<{width}}  {'mode':<10} {'rank':>5} {'cap':>5} {'full':>5}  {'shape':>11} {'params':>10}"]
        for r in rows:
            cap = "-" if r["capacity"] is None else r["capacity"]
            lines.append(
                f"{r['layer']:<{width}}  {r['mode']:<10} {r['rank']:>5} {cap:>5} {r['full_rank']:>5}  "
                f"{r['shape']:>11} {r['total']:>10,}"
            )
        counts = self.parameter_counts()
        lines.append(
            f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
            f"trainable%: {100 * counts['trainable'] / max(1, counts['total']):.2f} || rank fraction: {self.rank_fraction():.3f}"
        )
        return "\n".join(lines)

    def print_trainable_parameters(self) -> None:
        """Print the summary table (PEFT's name for it)."""
        print(self.summary())

    # -- conversion ----------------------------------------------------------------------------

    def merge_and_unload(self) -> nn.Module:
        """Replace every low-rank layer by a plain ``nn.Linear`` / ``Conv1D`` with the same function.

        Returns the wrapped transformers model, which no longer needs hf_lowrank.
        """
        for name, layer in self.lowrank_layers().items():
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent), child, layer.to_base_module())
        for p in self.base_model.parameters():
            p.requires_grad_(True)
        return self.base_model

    # -- persistence ---------------------------------------------------------------------------

    def state_dict_for_save(self, trim: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors to save (factors sliced to the active rank when ``trim``) and aliases of tied tensors."""
        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        first_name: dict[tuple, str] = {}
        layers = self.lowrank_layers()
        for name, tensor in self.base_model.state_dict().items():
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

    def save_pretrained(self, save_directory: str | os.PathLike, trim: bool = True, is_main_process: bool = True) -> None:
        """Write ``config.json``, ``lowrank_config.json`` (with the rank pattern) and ``model.safetensors``.

        The folder is written next to ``save_directory`` and renamed into place, so a crash
        leaves the previous contents intact. ``trim`` slices factors to the active rank (the
        saved model then has capacity = rank); checkpoints for resuming keep the capacity.
        """
        if not is_main_process:
            return
        config = LowRankConfig.from_dict({**self.lowrank_config.to_dict(), "rank_pattern": self.rank_pattern(trim=trim)})
        tensors, aliases = self.state_dict_for_save(trim=trim)
        self.base_model.config.architectures = [type(self.base_model).__name__]
        with atomic_directory(save_directory) as tmp:
            self.base_model.config.save_pretrained(tmp)
            if getattr(self.base_model, "generation_config", None) is not None and self.base_model.can_generate():
                self.base_model.generation_config.save_pretrained(tmp)
            config.save_pretrained(tmp)
            write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt", "aliases": json.dumps(aliases)})
            extra = Path(save_directory)
            if extra.is_dir():  # keep files others wrote there (trainer state, tokenizer, optimizer)
                for f in extra.iterdir():
                    if not (tmp / f.name).exists():
                        os.replace(f, tmp / f.name)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load ``model.safetensors`` whose shapes match the current rank pattern, strictly."""
        path = Path(path)
        tensors = read_safetensors(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        for alias, source in aliases.items():
            if source not in tensors:
                raise ValueError(f"{path}: tensor {alias!r} aliases {source!r}, which the file does not hold.")
            tensors[alias] = tensors[source]
        expected = self.base_model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(
            f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(tensors) & set(expected)
            if tensors[k].shape != expected[k].shape
        )
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} does not match the rank pattern in {CONFIG_NAME}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}."
            )
        self.base_model.load_state_dict(tensors, strict=True)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        model_class: type | None = None,
        torch_dtype: torch.dtype | None = None,
        **hub_kwargs: Any,
    ) -> "LowRankModel":
        """Rebuild a saved LowRankModel (local folder or Hub repo): shapes from the rank pattern, then tensors."""
        folder = resolve_folder(path_or_repo_id, **hub_kwargs)
        for needed in ("config.json", CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / needed).is_file():
                raise FileNotFoundError(f"{folder / needed}: missing; a LowRankModel folder holds config.json, {CONFIG_NAME} and {WEIGHTS_NAME}.")
        model_config = transformers.AutoConfig.from_pretrained(folder)
        if model_class is None:
            arch = (model_config.architectures or [None])[0]
            model_class = getattr(transformers, arch, None) if arch else None
            if model_class is None:
                raise ValueError(f"{folder / 'config.json'}: no known 'architectures' entry ({arch!r}); pass model_class=.")
        model = model_class(model_config)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        config = LowRankConfig.from_dict(read_json(folder / CONFIG_NAME), source=str(folder / CONFIG_NAME))
        try:
            wrapped = cls(model, config)
        except ValueError as e:  # a rank pattern that does not fit the architecture
            raise ValueError(f"{folder / CONFIG_NAME}: {e}") from e
        wrapped.load_weights(folder / WEIGHTS_NAME)
        if (folder / "generation_config.json").is_file() and model.can_generate():
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        return wrapped.eval()  # as transformers' from_pretrained: no dropout until training calls train()

    def push_to_hub(self, repo_id: str, metrics: dict[str, Any] | None = None, **kwargs: Any):
        """Upload to a Hub repo in one commit: the saved model (trimmed) and a generated README.md model card.

        ``metrics`` (e.g. ``{"eval_loss": 3.2, "steps": 300}``) go into the card; without them a
        ``training_summary.json`` in the folder the model was loaded from is used. ``kwargs``:
        ``commit_message``, ``private``, ``token``, ``revision``, ``create_pr``. See docs/hub.md.
        """
        return push_model(self, repo_id, metrics=metrics, **kwargs)


def get_lowrank_model(model: nn.Module, config: LowRankConfig | None = None) -> LowRankModel:
    """Wrap ``model`` (built from a config or loaded with ``from_pretrained``) with low-rank layers."""
    if isinstance(model, LowRankModel):
        raise ValueError("the model is already a LowRankModel; call get_lowrank_model on the plain transformers model.")
    config = config or LowRankConfig()
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        config = LowRankConfig.from_dict({**config.to_dict(), "base_model_name_or_path": name})
    return LowRankModel(model, config)
