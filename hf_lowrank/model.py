"""get_lowrank_model / LowRankModel: inject low-rank layers into any transformers model."""

from __future__ import annotations

import inspect
import json
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from torch import nn

from . import distributed, fsdp, optim
from .card import push_model
from .checks import check_bool, check_int, fail
from .config import CONFIG_NAME, LowRankConfig
from .files import (
    atomic_directory,
    check_shard_size,
    fingerprint,
    index_name,
    metadata_json,
    read_json,
    read_weights,
    weight_files,
    write_json,
    write_weights,
)
from .hub import resolve_folder
from .layer import SUPPORTED_TYPES, LayerSpec, LowRankLinear
from .strategies import LayerChange, Plan, RankStrategy, TrainContext, get_strategy

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


class _Forward:
    """``LowRankModel.forward`` bound to one model, carrying the wrapped model's signature.

    ``inspect.signature(model.forward)`` then lists the wrapped model's arguments
    (``input_ids``, ``attention_mask``, ...), as it does for a PEFT model, so the plain
    Trainer keeps the right dataset columns.
    """

    def __init__(self, owner: "LowRankModel"):
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.owner).forward(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.owner.base_model.forward)


class LowRankModel(nn.Module):
    """A transformers model whose target layers are :class:`LowRankLinear`.

    Attribute access falls through to the wrapped model (``config``, ``generate``, ...), as in
    PEFT's ``PeftModel``, and ``forward`` has the wrapped model's signature (the Trainer reads
    it to pick dataset columns). The strategy named by the config is built here; any training
    loop drives it with :meth:`bind_training` once and :meth:`update_ranks` after every
    optimizer step (``LowRankTrainer`` does both).
    """

    def __init__(self, model: nn.Module, config: LowRankConfig):
        super().__init__()
        self.base_model = model
        self.lowrank_config = config
        self.strategy: RankStrategy = get_strategy(config.strategy)(config)
        self.lr_adjust = optim.LrAdjust()
        self.plan_history: list[dict[str, Any]] = []
        self.decision_seconds = 0.0
        self.init_report: dict[str, float] = {}  # layer -> relative change of W when factorized at wrap time
        self._bound = False
        self._frobenius_hooked: set[int] = set()
        self.forward = _Forward(self)  # the wrapped model's signature, which the Trainer reads for columns
        self._inject()
        self._freeze_for_adapters()

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
        self._report_init()

    def _init_kind(self) -> str:
        """``init`` with ``"auto"`` resolved: the SVD split of pretrained weights, Kaiming for a model built from a config."""
        c = self.lowrank_config
        if c.init != "auto":
            return c.init
        return "spectral" if c.base_model_name_or_path else "kaiming"

    def _initialise(self, name: str, layer: LowRankLinear) -> None:
        c = self.lowrank_config
        spec = self.strategy.initial_spec(name, layer)
        if spec.mode == "factorized":
            before = layer.dense_weight() if c.base_model_name_or_path else None
            layer.init_factorized(spec.rank, spec.capacity, init=self._init_kind(), init_scale=c.init_scale)
            if before is not None:
                change = torch.linalg.matrix_norm(layer.dense_weight() - before) / torch.linalg.matrix_norm(before).clamp_min(1e-12)
                self.init_report[name] = float(change)
        elif spec.mode == "residual":
            layer.to_residual(spec.rank, spec.capacity, base=c.residual_base, init_scale=c.init_scale)
            layer.scaling = spec.scaling

    def _report_init(self) -> None:
        """Warn when factorizing pretrained weights changed the model's function (a truncation cannot keep it)."""
        if not self.init_report:
            return
        worst = max(self.init_report, key=self.init_report.get)
        if self.init_report[worst] > 1e-3:
            mean = sum(self.init_report.values()) / len(self.init_report)
            warnings.warn(
                f"factorizing {len(self.init_report)} pretrained layers changed their weights by {100 * mean:.1f}% on "
                f"average (relative Frobenius norm; worst {worst!r}: {100 * self.init_report[worst]:.1f}%), so the "
                "model's outputs change before training. To fine-tune with the pretrained function kept exactly, use "
                "mode='residual' (frozen W plus a low-rank adapter); see LowRankModel.init_report per layer.",
                stacklevel=4,
            )

    def _freeze_for_adapters(self) -> None:
        """Residual mode over the wrapped weights is fine-tuning: only adapters and ``modules_to_save`` train.

        Training from scratch (dense, factorized, or residual over a fresh orthogonal base) trains
        the whole model.
        """
        c = self.lowrank_config
        layers = self.lowrank_layers()
        if c.residual_base != "model" or not layers or any(layer.mode != "residual" for layer in layers.values()):
            return
        keep = self.modules_to_save()
        for name, p in self.base_model.named_parameters():
            owner = name.rpartition(".")[0]
            in_kept = any(owner == k or owner.startswith(k + ".") for k in keep)
            adapter = owner in layers and optim.is_factor(name)
            p.requires_grad_(adapter or in_kept)

    def modules_to_save(self) -> list[str]:
        """Full names of the modules that train beside the adapters in residual mode.

        ``LowRankConfig.modules_to_save`` entries match a module name or its last parts; None
        means the model's classification head (PEFT's head names), if it has one.
        """
        names = [n for n, _ in self.base_model.named_modules() if n]
        wanted = self.lowrank_config.modules_to_save
        if wanted is None:
            from peft.utils.constants import SEQ_CLS_HEAD_NAMES  # imported here: peft is slow to import

            heads = set(SEQ_CLS_HEAD_NAMES) | {"qa_outputs"}
            return [n for n in names if n in heads]
        found = [n for n in names if any(n == w or n.endswith("." + w) for w in wanted)]
        missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
        if missing:
            raise ValueError(
                f"LowRankConfig.modules_to_save={wanted!r}: {missing} name no module of {type(self.base_model).__name__}; "
                f"top-level modules are {sorted({n.split('.')[0] for n in names})}."
            )
        return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]

    # -- delegation ----------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """The wrapped model's forward (``labels`` named so the Trainer's label detection finds it)."""
        if labels is not None:
            kwargs["labels"] = labels
        if self.training and not self._bound and torch.is_grad_enabled() and self._needs_driver():
            raise RuntimeError(
                f"LowRankConfig.strategy={self.lowrank_config.strategy!r} (frobenius_decay="
                f"{self.lowrank_config.frobenius_decay}) acts during training, but nothing drives it: train with "
                "hf_lowrank.LowRankTrainer, add hf_lowrank.LowRankCallback() to a transformers.Trainer, or in your own "
                "loop call model.bind_training(max_steps, optimizer, lr_scheduler) once and "
                "model.update_ranks(step, optimizer, lr_scheduler) after every optimizer step."
            )
        return self.base_model(*args, **kwargs)

    def _needs_driver(self) -> bool:
        """Whether training without bind_training would silently skip something the config asks for."""
        return not self.strategy.is_final() or self.lowrank_config.frobenius_decay > 0

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the wrapped model, running through the low-rank layers."""
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with low-rank layers inside)."""
        return self.base_model

    # -- driving the strategy from any training loop --------------------------------------------

    def bind_training(
        self,
        max_steps: int,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        *,
        warn: Any = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        tokens_per_batch: int = 2048,
    ) -> None:
        """Tell the strategy how long the run is; call once before the first step (and again after a resume).

        ``lr_scheduler`` lets schedule-aware strategies (dynamic) read the learning rate at any
        step. Given an ``optimizer``, Frobenius decay (``LowRankConfig.frobenius_decay``) is
        hooked into it. Schedule points that fall outside the run raise here, before training.
        """
        check_int("max_steps", max_steps, 1)
        sched = optim.inner_scheduler(lr_scheduler)
        base = list(getattr(sched, "base_lrs", None) or [1.0])
        lambdas = getattr(sched, "lr_lambdas", None)

        def lr_at(step: int) -> float:
            return base[0] * lambdas[0](step) if lambdas else base[0]

        rank, _ = distributed.world()

        def warn_once(message: str) -> None:
            if rank == 0:
                warnings.warn(message, stacklevel=3)

        if device is None:
            device = str(next(self.parameters()).device)
        self.strategy.bind(
            TrainContext(
                max_steps=max_steps, lr_at=lr_at, warn=warn or warn_once, device=device, dtype=dtype,
                tokens_per_batch=tokens_per_batch,
            )
        )
        c = self.lowrank_config
        if optimizer is not None and c.frobenius_decay > 0:
            inner = optim.inner_optimizer(optimizer)
            if id(inner) not in self._frobenius_hooked:
                optim.add_frobenius_decay(inner, self.lowrank_layers, c.frobenius_decay)
                self._frobenius_hooked.add(id(inner))
        elif c.frobenius_decay > 0:
            raise ValueError(
                f"LowRankConfig.frobenius_decay={c.frobenius_decay} needs the optimizer: call "
                "bind_training(max_steps, optimizer, lr_scheduler) so the decay is applied at every step."
            )
        if optimizer is not None and c.factor_lr_scale != 1.0 and not any(
            g.get("lowrank_factors") for g in optim.inner_optimizer(optimizer).param_groups
        ):
            raise ValueError(
                f"LowRankConfig.factor_lr_scale={c.factor_lr_scale} needs factor parameter groups: build the optimizer "
                "from hf_lowrank.optim.param_groups(model, lr, weight_decay)."
            )
        self._bound = True

    def update_ranks(self, step: int, optimizer: Any = None, lr_scheduler: Any = None) -> Plan | None:
        """Run the strategy after optimizer step ``step`` (1-based) and apply what it plans.

        Call it after ``optimizer.step()`` and ``lr_scheduler.step()``, every step. Under
        ``torch.distributed`` process 0 decides and every process applies the same plan. When
        parameters are replaced, ``optimizer`` is regrouped onto the live ones (survivors keep
        their state); a plan's learning-rate factor and re-warm act on ``optimizer`` and
        ``lr_scheduler``. Returns the plan applied, or None. A DDP wrapper must be rebuilt by
        the caller when ``plan.changes_shapes`` (see ``hf_lowrank.distributed.rewrap_ddp``).
        """
        if not self._bound:
            raise RuntimeError("call model.bind_training(max_steps, optimizer, lr_scheduler) before update_ranks.")
        plan = None
        if self.strategy.due(step):
            start = time.perf_counter()
            layers = self.lowrank_layers()
            with fsdp.gathered_layers(self):  # FSDP2: the strategy reads full tensors, not shards
                payload, state = distributed.decide_on_rank0(
                    lambda: (lambda p: p.to_dict() if p else None)(self.strategy.step(step, layers)),
                    self.strategy.state_dict,
                )
            if distributed.world()[0] != 0:
                self.strategy.load_state_dict(state)
            plan = Plan.from_dict(payload) if payload else None
            if plan:
                # FSDP2: the units of replaced layers are re-sharded, the optimizer moved onto the new shards
                with fsdp.resharding(self, [c.layer for c in plan.changes if c.op != "grow"], optimizer):
                    self.apply_plan(plan, step=step, optimizer=optimizer, lr_scheduler=lr_scheduler)
            self.decision_seconds += time.perf_counter() - start
        self.lr_adjust.apply_rewarm(optimizer, step)
        return plan

    def lowrank_state_dict(self) -> dict[str, Any]:
        """Everything besides tensors that resuming needs: strategy state, lr adjustments, plan history, layout."""
        return {
            "strategy": self.lowrank_config.strategy,
            "strategy_state": self.strategy.state_dict(),
            **self.lr_adjust.state_dict(),
            "plan_history": self.plan_history,
            "decision_seconds": self.decision_seconds,
            "rank_pattern": self.rank_pattern(),
        }

    def load_lowrank_state_dict(self, state: dict[str, Any], source: str = "state") -> None:
        """Restore :meth:`lowrank_state_dict` (the layout must already match; see :meth:`apply_rank_pattern`)."""
        keys = ("strategy", "strategy_state", "lr_factor", "rewarm", "plan_history", "decision_seconds")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{source}: not a low-rank training state (needs keys {list(keys)}, has {have}); "
                "it is written with every LowRankTrainer checkpoint, so the checkpoint is incomplete or edited."
            )
        if state["strategy"] != self.lowrank_config.strategy:
            raise ValueError(
                f"{source}: checkpoint was trained with strategy {state['strategy']!r}, "
                f"this run uses {self.lowrank_config.strategy!r}."
            )
        try:
            self.strategy.load_state_dict(state["strategy_state"])
            self.lr_adjust.load_state_dict(state)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed strategy_state or lr adjustment ({type(e).__name__}: {e}).") from e
        self.plan_history = list(state["plan_history"])
        self.decision_seconds = float(state["decision_seconds"])

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

    def apply_plan(
        self, plan: Plan, step: int | None = None, optimizer: Any = None, lr_scheduler: Any = None
    ) -> list[str]:
        """Carry out a plan on the layers and bring ``optimizer`` / ``lr_scheduler`` in step.

        A transition whose SVD fails (``torch.linalg.LinAlgError``: it raised, or gave
        non-finite factors) leaves its layer as it was: the SVD comes before any parameter is
        replaced. The other changes still apply; the skipped ones are warned and returned.
        When every change is skipped, the plan's learning-rate factor and re-warm are not applied.
        """
        layers = self.lowrank_layers()
        before = dict(self.named_parameters())
        skipped = []
        for change in plan.changes:
            try:
                self._apply_change(layers[change.layer], change)
            except torch.linalg.LinAlgError as e:
                skipped.append(f"{change.op} of {change.layer} skipped: its SVD failed ({e}); the layer is left as it was.")
        after = dict(self.named_parameters())
        replaced = before.keys() != after.keys() or any(before[n] is not after[n] for n in after)
        if replaced and optimizer is not None:
            frob = self.lowrank_config.frobenius_decay > 0
            optim.regroup(optimizer, after.items(), before, decays=lambda n, p: optim.decays(n, p, frob))
        # The learning-rate change goes with the layer changes: when all of them were skipped the
        # model is the one the schedule was set for (a failed Cuttlefish switch stays dense).
        retune = not plan.changes or len(skipped) < len(plan.changes)
        if retune and plan.lr_factor != 1.0:
            self.lr_adjust.scale(optimizer, lr_scheduler, plan.lr_factor)
        if retune and plan.rewarm_steps > 0 and step is not None:
            self.lr_adjust.start_rewarm(step, plan.rewarm_steps)
        self.plan_history.append({"step": step, **plan.to_dict(), "skipped": skipped})
        if distributed.world()[0] == 0:  # every process skips the same change; one warns
            for message in skipped:
                warnings.warn(message, stacklevel=2)
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
        """Print one line of parameter counts, as PEFT does (``summary()`` has the per-layer table)."""
        counts = self.parameter_counts()
        print(
            f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} || "
            f"trainable%: {100 * counts['trainable'] / max(1, counts['total']):.4f} || rank fraction: {self.rank_fraction():.3f}"
        )

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

    def _adapter_keys(self) -> set[str]:
        """State-dict keys an adapter-only save holds: the factors, ``modules_to_save`` and every trainable tensor."""
        keys = {n for n, p in self.base_model.named_parameters(remove_duplicate=False) if p.requires_grad}
        for name, layer in self.lowrank_layers().items():
            keys.update(f"{name}.{leaf}" for leaf in ("A", "B") if getattr(layer, leaf) is not None)
        kept = tuple(f"{m}." for m in self.modules_to_save())
        keys.update(k for k in self.base_model.state_dict() if k.startswith(kept))
        return keys

    def _split_adapter(
        self, tensors: dict[str, torch.Tensor], aliases: dict[str, str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
        """The adapter part of a save, and the fingerprints of the frozen rest, which the base must supply on loading."""

        residual = [n for n, layer in self.lowrank_layers().items() if layer.mode == "residual"]
        if residual and self.lowrank_config.residual_base == "orthogonal":
            raise ValueError(
                f"save_pretrained(adapter_only=True): LowRankConfig.residual_base='orthogonal' made the frozen W0 of "
                f"the {len(residual)} residual layer(s) ({residual[0]!r}, ...) random orthogonal matrices that no base "
                "model holds; save the full model (adapter_only=False)."
            )
        keep = self._adapter_keys()
        state = self.base_model.state_dict()
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
        dtype = next((p.dtype for p in self.base_model.parameters() if p.is_floating_point()), torch.float32)
        return saved, saved_aliases, {"dtype": str(dtype).removeprefix("torch."), "tensors": prints}

    def save_pretrained(
        self,
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
        (``LowRankConfig.base_model_name_or_path``, or ``base_model=``) and checks. The
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
        config = LowRankConfig.from_dict({**self.lowrank_config.to_dict(), "rank_pattern": self.rank_pattern(trim=trim)})
        tensors, aliases = self.state_dict_for_save(trim=trim)
        base = None
        if adapter_only:
            tensors, aliases, base = self._split_adapter(tensors, aliases)
        self.base_model.config.architectures = [type(self.base_model).__name__]
        with atomic_directory(save_directory) as tmp:
            self.base_model.config.save_pretrained(tmp)
            # transformers validates this field before reading any weight, so its loaders fail with our text
            write_json(tmp / "config.json", {**read_json(tmp / "config.json"), TRANSFORMERS_GUARD: TRANSFORMERS_REFUSAL})
            if getattr(self.base_model, "generation_config", None) is not None and self.base_model.can_generate():
                self.base_model.generation_config.save_pretrained(tmp)
            config.save_pretrained(tmp)
            metadata = {"format": "pt", "aliases": json.dumps(aliases)}
            write_weights(tmp, tensors, ADAPTER_WEIGHTS_NAME if adapter_only else WEIGHTS_NAME, metadata, max_shard_size)
            if base is not None:
                write_json(tmp / BASE_FINGERPRINT_NAME, base)
            extra = Path(save_directory)
            if extra.is_dir():  # keep files others wrote there (trainer state, tokenizer, optimizer), not old weights
                for f in extra.iterdir():
                    if not (tmp / f.name).exists() and not self._is_weights_file(f.name):
                        os.replace(f, tmp / f.name)

    @staticmethod
    def _is_weights_file(name: str) -> bool:
        """Whether ``name`` is weights this class writes (one file, shards, index, base fingerprints), which a new save replaces."""
        stem = name.split(".", 1)[0].split("-", 1)[0]  # model-00001-of-00002.safetensors -> model
        weights = stem in ("model", "lowrank_adapter") and name.endswith((".safetensors", ".safetensors.index.json"))
        return weights or name == BASE_FINGERPRINT_NAME

    def load_weights(self, path: str | os.PathLike) -> None:
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
        expected = self.base_model.state_dict()
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
        self._check_inactive_components(tensors, source)
        if adapter:
            self._check_base(folder / BASE_FINGERPRINT_NAME, expected, set(tensors))
        self.base_model.load_state_dict(tensors, strict=not adapter)

    def _check_inactive_components(self, tensors: dict[str, torch.Tensor], source: dict[str, Path]) -> None:
        """Refuse factors whose ``B`` columns past the active rank are non-zero: the rank pattern was edited."""
        for name, layer in self.lowrank_layers().items():
            B = tensors.get(f"{name}.B")
            if B is None or layer.mode == "dense" or B.shape[1] <= layer.rank or not bool(B[:, layer.rank :].ne(0).any()):
                continue
            raise ValueError(
                f"{source[f'{name}.B']}: layer {name!r} has non-zero B[:, {layer.rank}:], past the rank {layer.rank} that "
                f"{CONFIG_NAME} gives it (capacity {layer.capacity}); components past the active rank must have B = 0, or "
                f"the loaded layer is not the saved one. Restore the rank save_pretrained wrote in {CONFIG_NAME}; to shrink "
                "a rank, truncate the layer (LowRankLinear.truncate) and save again."
            )

    def _check_base(self, path: Path, state: dict[str, torch.Tensor], saved: set[str]) -> None:
        """Refuse a base whose frozen tensors are not bit for bit those an adapter-only save was made on."""

        record = read_json(path)
        prints = record.get("tensors") if isinstance(record, dict) else None
        if not isinstance(prints, dict) or not all(isinstance(v, dict) and {"dtype", "shape", "sha256"} <= set(v) for v in prints.values()):
            raise ValueError(f"{path}: no 'tensors' object of {{dtype, shape, sha256}} entries; save the adapter again.")
        layers = self.lowrank_layers()
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
                f"(base_model_name_or_path={self.lowrank_config.base_model_name_or_path!r}, in the dtype it was trained in), "
                "or save the model in full (adapter_only=False) when a transition re-based W0."
            )

    @staticmethod
    def _check_rank_pattern(path: Path, model: nn.Module, pattern: dict[str, dict[str, Any]]) -> None:
        """Refuse ranks and capacities that do not fit the layers they name, naming the file and the layer."""
        modules = dict(model.named_modules())
        for name, spec in pattern.items():
            module = modules.get(name)
            if spec["mode"] == "dense" or not isinstance(module, SUPPORTED_TYPES):
                continue  # names that are no linear layer are reported when the layers are injected
            out_f, in_f = module.weight.shape if isinstance(module, nn.Linear) else module.weight.T.shape
            r, c, full = spec["rank"], spec["capacity"], min(in_f, out_f)
            if not 1 <= r <= c <= full:
                raise ValueError(
                    f"{path}: rank_pattern[{name!r}] has rank={r}, capacity={c}, not allowed for this {out_f}x{in_f} "
                    f"layer: need 1 <= rank <= capacity <= {full}. Restore the values save_pretrained wrote "
                    "(a trimmed save has capacity = rank)."
                )

    @staticmethod
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

    @staticmethod
    def _load_base(folder: Path, config: LowRankConfig, model_class: type, dtype_name: str) -> nn.Module:
        """The base model an adapter-only save names, from its local folder (safetensors only)."""
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
        return model_class.from_pretrained(name, use_safetensors=True, dtype=dtype if isinstance(dtype, torch.dtype) else "auto")

    @classmethod
    def _wrap_and_load(cls, model: nn.Module, config: LowRankConfig, folder: Path, keep_on_failure: bool) -> "LowRankModel":
        """Wrap ``model`` with the saved layout and load the folder's tensors.

        With ``keep_on_failure`` (a base the caller passed), a failure puts the replaced layers
        and the ``requires_grad`` flags back, so the caller's model is left as it was given.
        """
        replaced = {n: m for n, m in model.named_modules() if n in config.rank_pattern}
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            try:
                wrapped = cls(model, config)
            except ValueError as e:  # a rank pattern that does not fit the architecture
                raise ValueError(f"{folder / CONFIG_NAME}: {e}") from e
            wrapped.load_weights(folder)
        except Exception:
            if keep_on_failure:
                for name, module in replaced.items():
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, module)
                for p, flag in flags:
                    p.requires_grad_(flag)
            raise
        return wrapped

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        model_class: type | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        base_model: nn.Module | None = None,
        torch_dtype: torch.dtype | str | None = None,
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

        dtype = cls._load_dtype(dtype, torch_dtype)
        if base_model is not None and (isinstance(base_model, LowRankModel) or not isinstance(base_model, nn.Module)):
            raise ValueError(
                f"LowRankModel.from_pretrained: base_model is a {type(base_model).__name__}; pass the plain transformers "
                "model the adapter was trained on."
            )
        folder = resolve_folder(path_or_repo_id, where="LowRankModel.from_pretrained", **hub_kwargs)
        for needed in ("config.json", CONFIG_NAME):
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
            model_class = getattr(transformers, arch, None) if arch else None
            if model_class is None:
                raise ValueError(f"{folder / 'config.json'}: no known 'architectures' entry ({arch!r}); pass model_class=.")
        config = LowRankConfig.from_dict(read_json(folder / CONFIG_NAME), source=str(folder / CONFIG_NAME))
        if not adapter:
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
            model = cls._load_base(folder, config, model_class, str(record.get("dtype", "")) if isinstance(record, dict) else "")
        cls._check_rank_pattern(folder / CONFIG_NAME, model, config.rank_pattern)
        wrapped = cls._wrap_and_load(model, config, folder, keep_on_failure=base_model is not None)
        if (folder / "generation_config.json").is_file() and model.can_generate():
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        if dtype is not None:
            wrapped.to(dtype)
        return wrapped.eval()  # as transformers' from_pretrained: no dropout until training calls train()

    def push_to_hub(self, repo_id: str, metrics: dict[str, Any] | None = None, **kwargs: Any):
        """Upload to a Hub repo in one commit: the saved model (trimmed) and a generated README.md model card.

        ``metrics`` (e.g. ``{"eval_loss": 3.2, "steps": 300}``) go into the card; without them a
        ``training_summary.json`` in the folder the model was loaded from is used. ``kwargs``:
        ``commit_message``, ``private``, ``token``, ``revision``, ``create_pr``. See docs/hub.md.
        """
        return push_model(self, repo_id, metrics=metrics, **kwargs)


def get_lowrank_model(model: nn.Module, config: LowRankConfig | dict[str, Any] | None = None) -> LowRankModel:
    """Wrap ``model`` (built from a config or loaded with ``from_pretrained``) with low-rank layers."""
    if isinstance(model, LowRankModel):
        raise ValueError("the model is already a LowRankModel; call get_lowrank_model on the plain transformers model.")
    if isinstance(config, dict):
        config = LowRankConfig.from_dict(config, source="get_lowrank_model(config=dict)")
    elif config is None:
        config = LowRankConfig()
    elif not isinstance(config, LowRankConfig):
        raise TypeError(f"get_lowrank_model(config=...) takes a LowRankConfig or a dict of its fields, not {type(config).__name__}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_lowrank_model(model=...) takes a torch.nn.Module (a transformers model), not {type(model).__name__}.")
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        config = LowRankConfig.from_dict({**config.to_dict(), "base_model_name_or_path": name})
    return LowRankModel(model, config)
