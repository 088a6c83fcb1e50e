"""get_lowrank_model / LowRankModel: inject low-rank layers into any transformers model.

The layers it targets come from targets.py and are put in place by injection.py, the training
driver it delegates to is driver.py (TrainingDriver), the parameter counts and summary are
reporting.py, saving saving.py and loading loading.py.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import torch
from torch import nn

from . import injection, loading, optim, reporting, saving
from .card import push_model
from .config import LowRankConfig
from .driver import TrainingDriver
from .layer import LayerSpec, LowRankLinear
from .strategies import Plan, RankStrategy, UnavailableStrategy, find_strategy, get_strategy
from .strategies.base import TOKENS_PER_BATCH

WEIGHTS_NAME = saving.WEIGHTS_NAME


# PEFT names a LoRA user reaches for that LowRankModel does not have, with where to go instead.
_ONE_ADAPTER = "a LowRankModel has one low-rank factor pair per layer, not named adapters"
PEFT_POINTERS = {
    "merge_adapter": "merge with merge_and_unload() (returns the plain transformers model)",
    "unmerge_adapter": "merge_and_unload() returns a plain model; keep the LowRankModel to train on",
    "set_adapter": _ONE_ADAPTER,
    "add_adapter": _ONE_ADAPTER + "; export one to PEFT with hf_lowrank.peft_interop (docs/hub.md)",
    "delete_adapter": _ONE_ADAPTER + "; unload() drops it (residual mode)",
    "load_adapter": "load a saved model or adapter with LowRankModel.from_pretrained(folder, base_model=...)",
    "active_adapter": _ONE_ADAPTER,
    "active_adapters": _ONE_ADAPTER,
    "peft_config": "the settings are model.lowrank_config (a LowRankConfig)",
    "get_peft_config_as_dict": "the settings are model.lowrank_config.to_dict()",
}


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

    def __init__(self, model: nn.Module, config: LowRankConfig, *, weights_follow: bool = False):
        """``weights_follow``: the caller loads every tensor next (the loaders), so a saved rank pattern only
        allocates shapes. Otherwise a rank pattern applied to a model's own weights keeps each layer's function
        as far as the rank allows (balanced SVD split, as ``init="auto"`` does) and warns with the change."""
        super().__init__()
        self.base_model = model
        self.lowrank_config = config
        # Never imports: a saved layout (rank_pattern) loads without its strategy, which training then asks for.
        known = find_strategy(config.strategy)
        if known is None and not config.rank_pattern:
            known = get_strategy(config.strategy)  # raises, saying how to provide it
        self.strategy: RankStrategy = known(config) if known is not None else UnavailableStrategy(config)
        # The training state (run length, hooked optimizers, lr adjustments, plans applied): a plain object, so
        # neither the module tree nor state_dict sees it.
        self._driver = TrainingDriver(self)
        self.forward = _Forward(self)  # the wrapped model's signature, which the Trainer reads for columns
        # layer -> relative change of W when factorized at wrap time (hf_lowrank/injection.py)
        self.init_report: dict[str, float] = injection.inject(model, config, self.strategy, weights_follow=weights_follow)
        injection.freeze_for_adapters(self)

    def modules_to_save(self) -> list[str]:
        """Full names of the modules that train beside the adapters in residual mode.

        ``LowRankConfig.modules_to_save`` entries match a module name or its last parts; None
        means the model's classification head (PEFT's head names), if it has one.
        """
        return injection.modules_to_save(self.base_model, self.lowrank_config.modules_to_save)

    # -- delegation ----------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
        try:
            return getattr(self.base_model, name)
        except AttributeError:
            hint = PEFT_POINTERS.get(name, "")
            raise AttributeError(
                f"'LowRankModel' object has no attribute {name!r}, nor has the {type(self.base_model).__name__} it wraps"
                + (f"; {hint}" if hint else "")
            ) from None

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """The wrapped model's forward (``labels`` named so the Trainer's label detection finds it)."""
        if labels is not None:
            kwargs["labels"] = labels
        if self.training and not self._driver.bound and torch.is_grad_enabled():
            self._driver.refuse_undriven()  # a missing strategy, or settings that act during training, undriven
        if self._driver.ddp_check and not torch.compiler.is_compiling():
            self._driver.check_ddp_rebuilt()
        return self.base_model(*args, **kwargs)

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
        tokens_per_batch: int = TOKENS_PER_BATCH,
    ) -> None:
        """Tell the strategy how long the run is; call once before the first step (and again after a resume).

        ``lr_scheduler`` lets schedule-aware strategies (dynamic) read the learning rate at any
        step. Given an ``optimizer``, Frobenius decay (``LowRankConfig.frobenius_decay``) and the
        factor preconditioner (``LowRankConfig.precondition``, on unless False) are hooked into it. Schedule points that fall outside the run raise here, before training.
        """
        self._driver.bind(
            max_steps, optimizer, lr_scheduler, warn=warn, device=device, dtype=dtype, tokens_per_batch=tokens_per_batch
        )

    def check_run(self, max_steps: int) -> None:
        """Raise ``ValueError`` (naming the setting) if the strategy cannot act within ``max_steps``; binds nothing.

        For validating a run before any data is prepared; :meth:`bind_training` checks the same
        again, and warns about marginal schedules, when training starts.
        """
        self._driver.check_run(max_steps)

    def update_ranks(self, step: int, optimizer: Any = None, lr_scheduler: Any = None) -> Plan | None:
        """Run the strategy after optimizer step ``step`` (1-based) and apply what it plans.

        Call it after ``optimizer.step()`` and ``lr_scheduler.step()``, every step. Under
        ``torch.distributed`` process 0 decides and every process applies the same plan. When
        parameters are replaced, ``optimizer`` is regrouped onto the live ones (survivors keep
        their state); a plan's learning-rate factor and re-warm act on ``optimizer`` and
        ``lr_scheduler``. Returns the plan applied, or None. ``step`` runs from 1 to the
        ``max_steps`` given to :meth:`bind_training`; a step past it is refused. A DDP wrapper
        must be rebuilt by the caller when ``plan.changes_shapes``
        (``hf_lowrank.distributed.rewrap_ddp``); a forward through the old one raises, naming it.
        Every ``LowRankConfig.rebalance_every`` steps the factorized layers' factor pairs are
        re-balanced here (:func:`hf_lowrank.optim.rebalance`), on every process alike.
        """
        return self._driver.update_ranks(step, optimizer, lr_scheduler)

    def apply_plan(
        self, plan: Plan, step: int | None = None, optimizer: Any = None, lr_scheduler: Any = None
    ) -> list[str]:
        """Carry out a plan on the layers and bring ``optimizer`` / ``lr_scheduler`` in step.

        A transition whose SVD fails (``torch.linalg.LinAlgError``: it raised, or gave
        non-finite factors) leaves its layer as it was: the SVD comes before any parameter is
        replaced. The other changes still apply; the skipped ones are warned and returned.
        When every change is skipped, the plan's learning-rate factor and re-warm are not applied.
        """
        return self._driver.apply_plan(plan, step, optimizer, lr_scheduler)

    @property
    def plan_history(self) -> list[dict[str, Any]]:
        """Every plan applied so far, with its step and the changes skipped (saved in checkpoints)."""
        return self._driver.plan_history

    @plan_history.setter
    def plan_history(self, value: list[dict[str, Any]]) -> None:
        self._driver.plan_history = value

    @property
    def decision_seconds(self) -> float:
        """Wall-clock seconds spent deciding and applying rank changes and re-balancing."""
        return self._driver.decision_seconds

    @decision_seconds.setter
    def decision_seconds(self, value: float) -> None:
        self._driver.decision_seconds = value

    @property
    def lr_adjust(self) -> optim.LrAdjust:
        """The learning-rate factor and re-warm the plans applied (:class:`hf_lowrank.optim.LrAdjust`)."""
        return self._driver.lr_adjust

    @lr_adjust.setter
    def lr_adjust(self, value: optim.LrAdjust) -> None:
        self._driver.lr_adjust = value

    def lowrank_state_dict(self) -> dict[str, Any]:
        """Everything besides tensors that resuming needs: strategy state, lr adjustments, plan history, layout."""
        return {**self._driver.state_dict(), "rank_pattern": self.rank_pattern()}

    def load_lowrank_state_dict(self, state: dict[str, Any], source: str = "state") -> None:
        """Restore :meth:`lowrank_state_dict` (the layout must already match; see :meth:`apply_rank_pattern`)."""
        self._driver.load_state_dict(state, source)

    # -- layers --------------------------------------------------------------------------------

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
            layers[name].set_spec(LayerSpec(**spec))

    # -- reporting (hf_lowrank/reporting.py) ---------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters of the whole model (shared tensors counted once).

        ``trainable`` counts the allocated factors (the capacity, which the optimizer holds);
        ``active`` counts, of those, only the components in the forward (the active rank),
        which is what a LoRA user reads as trainable; ``capacity`` is the difference, the
        components allocated for growth.
        """
        return reporting.parameter_counts(self)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` as PEFT returns them; trainable counts the active ranks (see :meth:`parameter_counts`)."""
        counts = self.parameter_counts()
        return counts["active"], counts["total"]

    def layer_report(self) -> list[dict[str, Any]]:
        """One row per low-rank layer: name, mode, rank, capacity, full rank, parameters."""
        return reporting.layer_report(self)

    def rank_fraction(self) -> float:
        """Sum of active ranks over the sum of full ranks of the low-rank layers (dense counts as full)."""
        return reporting.rank_fraction(self)

    def summary(self) -> str:
        """A readable table of the layers and the parameter counts."""
        return reporting.summary(self)

    def print_trainable_parameters(self) -> None:
        """Print one line of parameter counts, as PEFT does (``summary()`` has the per-layer table).

        ``trainable params`` counts the active ranks, as a LoRA user reads it; factor components
        allocated beyond them (InRank's growth room) are shown apart as ``allocated for growth``.
        """
        print(reporting.counts_line(self, 4))

    # -- conversion and adapters ---------------------------------------------------------------

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

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: residual layers compute their frozen ``W0`` alone (PEFT's ``disable_adapter``).

        Only residual mode has an adapter; factorized and dense layers are the model itself, so
        a model without residual layers is refused.
        """
        layers = [layer for layer in self.lowrank_layers().values() if layer.mode == "residual"]
        if not layers:
            modes = sorted({layer.mode for layer in self.lowrank_layers().values()})
            raise ValueError(
                f"LowRankModel.disable_adapter(): no layer is in residual mode (modes: {modes}), so there is no adapter "
                "over a frozen base to switch off: factorized layers are the model's weights themselves. "
                "Adapters come with LowRankConfig(mode='residual')."
            )
        scalings = [layer.scaling for layer in layers]
        try:
            for layer in layers:
                layer.scaling = 0.0
            yield self
        finally:
            for layer, scaling in zip(layers, scalings):
                layer.scaling = scaling

    def unload(self) -> nn.Module:
        """The wrapped model with every residual layer back to its frozen ``W0``, adapters dropped (PEFT's ``unload``).

        Refused when a layer is factorized or dense (its weights are the model, there is nothing
        to drop): use :meth:`merge_and_unload`.
        """
        other = sorted(n for n, layer in self.lowrank_layers().items() if layer.mode != "residual")
        if other:
            raise ValueError(
                f"LowRankModel.unload(): layers {other[:3]}{'...' if len(other) > 3 else ''} are not residual, so they "
                "have no base weight to return to; merge_and_unload() gives the plain model with the trained weights."
            )
        with self.disable_adapter():
            return self.merge_and_unload()

    # -- persistence (hf_lowrank/saving.py, loading.py) -----------------------------------------

    def state_dict_for_save(self, trim: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors to save (factors sliced to the active rank when ``trim``) and aliases of tied tensors."""
        return saving.state_dict_for_save(self, trim)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        trim: bool = True,
        is_main_process: bool = True,
        adapter_only: bool = False,
        max_shard_size: int | str = saving.MAX_SHARD_SIZE,
        safe_serialization: bool = True,
    ) -> None:
        """Write the model folder atomically; see :func:`hf_lowrank.saving.save` for every option."""
        saving.save(self, save_directory, trim, is_main_process, adapter_only, max_shard_size, safe_serialization)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a saved folder's tensors into the current layout, strictly (:func:`hf_lowrank.loading.load_weights`)."""
        loading.load_weights(self, path)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        model_class: type | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        base_model: nn.Module | None = None,
        torch_dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        **hub_kwargs: Any,
    ) -> "LowRankModel":
        """Rebuild a saved LowRankModel (folder or Hub repo): shapes from the rank pattern, then tensors.

        ``dtype`` casts it; an adapter-only save loads onto ``base_model`` or the local base
        folder it names. The saved strategy is never imported: a ``"module:Class"`` strategy whose
        module is not imported yet loads for inference, ``summary`` and merging, and training it
        asks for the module; ``trust_remote_code=True`` imports it (running its code). See
        :func:`hf_lowrank.loading.load`.
        """
        return loading.load(
            cls, path_or_repo_id, model_class, dtype, base_model=base_model, torch_dtype=torch_dtype,
            trust_remote_code=trust_remote_code, **hub_kwargs
        )

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
        name = getattr(getattr(model, "config", None), "name_or_path", None) or None
        config = LowRankConfig.from_dict({**config.to_dict(), "base_model_name_or_path": name})
    return LowRankModel(model, config)
