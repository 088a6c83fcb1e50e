"""LowRankTrainer: Trainer glue around ``LowRankModel.update_ranks`` (callbacks, checkpoints, logging).

After every optimizer step the model's ``update_ranks`` runs the strategy (process 0 decides,
every process applies the same plan), regroups the optimizer and adjusts the schedule; the
trainer adds what only it can do: re-wrap DDP after a shape change, skip steps whose
gradients are not finite, log ranks, and save and resume the strategy with each checkpoint.
``LowRankCallback`` runs the strategy under a plain ``transformers.Trainer``.

Checkpoints carry the untrimmed factors, the rank pattern, the strategy state and the
learning-rate adjustments (``lowrank_trainer_state.json``), and are written into a staging
folder renamed into place, so a crash mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils.generic import can_return_loss, find_labels

from . import checkpoint as ckpt
from . import distributed, fsdp, optim, private_accelerate, private_torch
from .checks import check_int
from .config import CONFIG_NAME, LowRankConfig
from .files import atomic_directory, read_json, remove_leftovers, run_lock, write_json
from .model import WEIGHTS_NAME, LowRankModel

STATE_NAME = ckpt.LOWRANK_STATE_NAME  # the one low-rank state file of a checkpoint (hf_lowrank.checkpoint)
RANK_LOG_PREFIX = "lowrank/rank/"  # per-layer ranks: loggers and plots get them, the console does not


def _tokens_per_batch(trainer: Trainer) -> int:
    try:
        seq = len(trainer.train_dataset[0]["input_ids"])
    except (TypeError, KeyError, IndexError):
        seq = 128
    return trainer.args.per_device_train_batch_size * seq


def _bind(model: LowRankModel, trainer_args, state, optimizer, lr_scheduler, warn, tokens: int) -> None:
    dtype = torch.bfloat16 if trainer_args.bf16 else torch.float16 if trainer_args.fp16 else torch.float32
    model.bind_training(
        state.max_steps, optimizer, lr_scheduler, warn=warn, device=str(trainer_args.device), dtype=dtype,
        tokens_per_batch=tokens,
    )


class LowRankCallback(TrainerCallback):
    """Runs a LowRankModel's strategy inside a plain ``transformers.Trainer``.

    ``Trainer(model=lowrank_model, ..., callbacks=[LowRankCallback()])`` binds the strategy
    when training starts and calls ``update_ranks`` after every optimizer step. When the
    Trainer is built with the callback, its checkpoints and ``save_model`` write what
    ``LowRankTrainer`` writes (config, rank pattern, tied weights stored once, strategy state)
    and resuming rebuilds the ranks and the strategy first, as ``LowRankTrainer`` does. It
    cannot rebuild the Trainer's DDP wrapper, so a strategy that changes shapes is refused
    under data parallelism (use ``LowRankTrainer``).
    """

    def on_init_end(self, args, state, control, **kwargs):
        _adopt(_calling_trainer(self))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        lowrank = _find_lowrank(model)
        if args.world_size > 1 and lowrank.strategy.changes_shapes:
            raise ValueError(
                f"LowRankConfig.strategy={lowrank.lowrank_config.strategy!r} changes parameter shapes, which a plain "
                "transformers.Trainer cannot follow under data parallelism (its DDP wrapper keeps the old parameters); "
                "use hf_lowrank.LowRankTrainer."
            )
        trainer = _calling_trainer(self)
        if trainer is not None and not getattr(trainer, "_lowrank_adopted", False):
            if args.save_strategy != "no":  # added after __init__: checkpoints would miss the rank pattern
                raise ValueError(
                    f"LowRankCallback was added after the Trainer was built (trainer.add_callback), so its checkpoints "
                    f"(save_strategy={str(args.save_strategy)!r}) would not carry the rank pattern or the strategy state; "
                    "pass it as Trainer(..., callbacks=[LowRankCallback()]) or use hf_lowrank.LowRankTrainer."
                )
        _bind(lowrank, args, state, optimizer, lr_scheduler, None, args.per_device_train_batch_size * 128)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        _find_lowrank(model).update_ranks(state.global_step, optimizer, lr_scheduler)


def _calling_trainer(callback: TrainerCallback) -> Trainer | None:
    """The Trainer whose event is calling ``callback`` (callbacks receive the model, not the Trainer)."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None) if isinstance(owner, Trainer) else None
        if handler is not None and any(cb is callback for cb in handler.callbacks):
            return owner
        frame = frame.f_back
    return None


def _adopt(trainer: Trainer | None) -> None:
    """Give a plain Trainer LowRankTrainer's model files: checkpoint and final saves, resume, best-model load.

    The Trainer's own save writes the state dict as one safetensors file (refused for tied
    weights, and without the config or rank pattern a LowRankModel loads from); resuming loads
    it into the current shapes, which a rank change has made different.
    """
    if trainer is None or isinstance(trainer, LowRankTrainer) or getattr(trainer, "_lowrank_adopted", False):
        return
    trainer.nonfinite_steps = []
    trainer._saving_checkpoint = False
    for name in ("lowrank_state", "_save", "_load_from_checkpoint", "_load_best_model"):
        setattr(trainer, name, getattr(LowRankTrainer, name).__get__(trainer))
    save_checkpoint = trainer._save_checkpoint

    def _save_checkpoint(model, trial):  # checkpoints keep the full capacity, so a resumed run continues exactly
        trainer._saving_checkpoint = True
        try:
            save_checkpoint(model, trial)
        finally:
            trainer._saving_checkpoint = False

    trainer._save_checkpoint = _save_checkpoint
    trainer._lowrank_adopted = True


def _find_lowrank(model: nn.Module | None) -> LowRankModel:
    for module in ([] if model is None else model.modules()):
        if isinstance(module, LowRankModel):
            return module
    raise TypeError(f"LowRankCallback needs a LowRankModel (from get_lowrank_model), got {type(model).__name__}.")


class _RankCallback(TrainerCallback):
    """LowRankTrainer's own hook: binds at train start, runs ``update_ranks`` after each optimizer step."""

    def __init__(self, trainer: "LowRankTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._bind_strategy()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._strategy_step(state.global_step)


def _quiet_console(handler) -> None:
    """Keep per-layer rank entries out of the printed logs (loggers such as TensorBoard still get them)."""
    for cb in handler.callbacks:
        if isinstance(cb, (ProgressCallback, PrinterCallback)):
            printed = cb.on_log

            def on_log(args, state, control, logs=None, _printed=printed, **kwargs):
                shown = None if logs is None else {k: v for k, v in logs.items() if not k.startswith(RANK_LOG_PREFIX)}
                return _printed(args, state, control, logs=shown, **kwargs)

            cb.on_log = on_log


class LowRankTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`LowRankModel`: rank strategy, Frobenius decay, rank logging.

    ``max_nonfinite_steps``: an optimizer step whose gradients hold NaN or Inf is skipped
    (no parameter or optimizer state changes) with a warning; this many in a row stop
    training with an error.
    """

    def __init__(self, model: LowRankModel | None = None, *args: Any, max_nonfinite_steps: int = 5, **kwargs: Any):
        if not isinstance(model, LowRankModel):
            raise TypeError(
                f"LowRankTrainer needs a LowRankModel (from get_lowrank_model), got {type(model).__name__}."
            )
        check_int("LowRankTrainer.max_nonfinite_steps", max_nonfinite_steps, 1)
        super().__init__(model, *args, **kwargs)
        base_cls = type(model.base_model)
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)
        strategy = model.strategy
        if strategy.changes_shapes and self.is_deepspeed_enabled:
            raise ValueError(
                f"LowRankConfig.strategy={model.lowrank_config.strategy!r} changes parameter shapes during training, "
                "which DeepSpeed ZeRO's partitioned parameters cannot follow; use FSDP2 (fsdp_version: 2) or DDP "
                "(accelerate launch --multi_gpu), or strategy 'fixed'."
            )
        if strategy.changes_shapes and self.is_fsdp_enabled and self._fsdp_version() != 2:
            raise ValueError(
                f"LowRankConfig.strategy={model.lowrank_config.strategy!r} changes parameter shapes during training, "
                "which FSDP1's flattened parameters cannot follow; use FSDP2 (fsdp_version: 2 in the accelerate "
                "config or fsdp_config), DDP (accelerate launch --multi_gpu), or strategy 'fixed'."
            )
        self.strategy = strategy
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps: list[int] = []
        self._rewrapped = False
        self._saving_checkpoint = False
        self._staging_dir: str | None = None
        self.add_callback(_RankCallback(self))
        _quiet_console(self.callback_handler)

    def _fsdp_version(self) -> int:
        return int(getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) or 1)

    # -- optimizer -----------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Trainer's rule, minus the factors when Frobenius decay replaces weight decay on them."""
        names = super().get_decay_parameter_names(model)
        if self.model.lowrank_config.frobenius_decay > 0:
            names = [n for n in names if not optim.is_factor(n)]
        return names

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the factors of each group in a group of their own.

        Factor groups carry ``lowrank_factors=True``, the learning rate times
        ``LowRankConfig.factor_lr_scale`` and ``LowRankConfig.factor_weight_decay`` (see
        :func:`hf_lowrank.optim.split_factor_groups`).
        A step pre-hook skips updates whose gradients are not finite.
        """
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            layers = self.model.lowrank_layers().values()
            factors = {id(p) for layer in layers for p in (layer.A, layer.B) if p is not None}
            c = self.model.lowrank_config
            optim.split_factor_groups(optimizer, factors, c.factor_lr_scale, optim.factor_decay(c))
            optim.inner_optimizer(optimizer).register_step_pre_hook(self._skip_nonfinite)
            self._built_optimizer = optim.inner_optimizer(optimizer)
        return optimizer

    def _skip_nonfinite(self, optimizer, args, kwargs) -> None:
        """Drop the gradients of a step that holds NaN or Inf, so that nothing non-finite reaches the weights."""
        if not optim.nonfinite_gradients(optimizer):
            self.nonfinite_in_a_row = 0
            return
        step = self.state.global_step + 1
        optim.drop_gradients(optimizer)
        self.nonfinite_in_a_row += 1
        self.nonfinite_steps.append(step)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row (up to step {step}) had NaN or Inf gradients, "
                "so training stopped; the last checkpoint holds finite weights. Lower the learning rate, enable "
                "gradient clipping (max_grad_norm), or check the data; LowRankTrainer(max_nonfinite_steps=...) sets "
                "how many skipped steps in a row are tolerated."
            )
        self._warn(f"step {step}: NaN or Inf gradients (loss not finite); the update was skipped.")

    # -- one run per output_dir; an in-process resume starts as a fresh process does -----------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """The Trainer's ``train``, holding ``output_dir``'s run lock and cleaning what killed saves left first.

        Resuming with a trainer that has trained before (a notebook, a retry after an error)
        first drops the optimizer, the scheduler and the strategy object it trained with, so
        they are rebuilt on the checkpoint's layout exactly as a fresh process builds them.
        """
        if resume_from_checkpoint not in (None, False) and self.optimizer is not None:
            self._forget_previous_run()
        main = self.is_world_process_zero()
        with run_lock(self.args.output_dir) if main else contextlib.nullcontext():
            if main:
                remove_leftovers(self.args.output_dir)  # before the Trainer looks for the last checkpoint
            self.accelerator.wait_for_everyone()
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: the Trainer's error
            if isinstance(resume_from_checkpoint, (str, os.PathLike)) and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
                ckpt.verify_manifest(resume_from_checkpoint)
                ckpt.check_complete(resume_from_checkpoint, self.args.world_size, self.args.process_index)
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _forget_previous_run(self) -> None:
        if optim.inner_optimizer(self.optimizer) is not getattr(self, "_built_optimizer", None):
            raise ValueError(
                "resume_from_checkpoint with a trainer that has trained before and an optimizer passed to it "
                "(optimizers=...): that optimizer holds the parameters of the current layout, not the checkpoint's. "
                "Build a new LowRankTrainer (with a new optimizer) and resume with it, or let the trainer build the optimizer."
            )
        self.optimizer, self.lr_scheduler, self._created_lr_scheduler = None, None, False
        self.model.strategy = self.strategy = type(self.strategy)(self.model.lowrank_config)
        self.model._driver.bound = False  # the new strategy is bound again on the checkpoint's run
        self.nonfinite_in_a_row, self.nonfinite_steps = 0, []
        self.model_wrapped, self._rewrapped = self.model, False

    # -- the rank step -------------------------------------------------------------------------

    def _bind_strategy(self) -> None:
        _bind(self.model, self.args, self.state, self.optimizer, self.lr_scheduler, self._warn, _tokens_per_batch(self))

    def _warn(self, message: str) -> None:
        if self.is_world_process_zero():
            warnings.warn(message, stacklevel=3)

    def _strategy_step(self, step: int) -> None:
        plan = self.model.update_ranks(step, self.optimizer, self.lr_scheduler)
        if plan is not None and plan.changes_shapes:
            self._rewrap()

    def apply_plan(self, plan, step: int) -> None:
        """Apply a plan by hand (as ``update_ranks`` would), with this trainer's optimizer and wrappers."""
        self.model.apply_plan(plan, step=step, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler)
        if plan.changes_shapes:
            self._rewrap()

    @property
    def plan_history(self) -> list[dict[str, Any]]:
        """Every plan applied so far, with its step (kept by the model, saved in checkpoints)."""
        return self.model.plan_history

    @property
    def decision_seconds(self) -> float:
        """Wall-clock seconds spent deciding and applying rank changes."""
        return self.model.decision_seconds

    def _rewrap(self) -> None:
        """Rebuild DDP around the model after its parameters changed (never wrapping twice).

        Under ``torch_compile`` Accelerate compiles the DDP wrapper (compile comes last), so the
        new wrapper is compiled again with the same settings. FSDP2 needs nothing here: it
        shards in place, and ``update_ranks`` re-shards the changed units.
        """
        old = self.model_wrapped
        compiled = isinstance(old, private_torch.compiled_module_class())
        ddp = old._orig_mod if compiled else old
        if not distributed.is_ddp(ddp):
            return
        handler = self.accelerator.ddp_handler
        new = distributed.rewrap_ddp(ddp, **(handler.to_kwargs() if handler is not None else {}))
        if handler is not None:
            handler.register_comm_hook(new)
        if compiled:
            new = torch.compile(new, **self.accelerator.state.dynamo_plugin.to_kwargs())
        private_accelerate.replace_prepared_model(self.accelerator, old, new)
        self.model_wrapped = new
        self._rewrapped = True

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # The training loop holds the wrapper it started with; after a re-wrap use the new one.
        return super().training_step(self.model_wrapped if self._rewrapped else model, inputs, num_items_in_batch)

    # -- logging -------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_loss" in logs:
            counts = self.model.parameter_counts()
            rows = self.model.layer_report()
            logs["lowrank/rank_fraction"] = round(self.model.rank_fraction(), 5)
            logs["lowrank/trainable_params"] = counts["trainable"]
            logs["lowrank/decision_seconds"] = round(self.model.decision_seconds, 4)
            if self.nonfinite_steps:
                logs["lowrank/skipped_steps"] = len(self.nonfinite_steps)
            for row in rows:
                logs[f"{RANK_LOG_PREFIX}{row['layer']}"] = row["rank"]
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------------------

    def lowrank_state(self) -> dict[str, Any]:
        """Everything besides tensors that resuming needs (see ``LowRankModel.lowrank_state_dict``)."""
        return ckpt.lowrank_state(self.model, self.state.global_step, self.nonfinite_steps)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save; under FSDP2 every process gathers the full model and process 0 writes it.

        The Trainer's own FSDP branch would hand ``_save`` a state dict of the wrapped model (or,
        with ``SHARDED_STATE_DICT``, skip it), while resuming needs ``LowRankModel``'s files.
        """
        if not fsdp.is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        with fsdp.gathered_model(self.model):
            self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        bad = [n for n, t in self.model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise RuntimeError(
                f"refusing to write {output_dir}: tensors {bad[:5]} hold NaN or Inf at step {self.state.global_step}; "
                "the previous checkpoint is kept. Resume from it with a lower learning rate or gradient clipping."
            )
        self.model.save_pretrained(output_dir, trim=not self._saving_checkpoint)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        write_json(Path(output_dir) / STATE_NAME, self.lowrank_state())

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """Write the checkpoint into ``.staging-checkpoint-N/checkpoint-N`` and rename it into place once complete.

        :func:`hf_lowrank.files.atomic_directory` (shared: every process writes its random state
        into the same staging folder) does the staging and the renames; a failed save leaves
        the previous checkpoints and removes its staging folder.
        """
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with atomic_directory(Path(run_dir, name), shared=True, owner=self.args.should_save) as staged:
            self._staging_dir = str(staged.parent)  # the Trainer writes <output dir>/checkpoint-N
            self._saving_checkpoint = True
            try:
                super()._save_checkpoint(model, trial)
            except OSError as e:
                if str(staged.parent) not in str(e):  # torch.save's errors name no file
                    raise OSError(e.errno, f"writing {name} into {staged.parent} failed ({e}); the previous checkpoints are "
                                  "kept, and the staging folder was removed. Free space or fix the folder, then resume.") from e
                raise
            finally:
                self._staging_dir, self._saving_checkpoint = None, False
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                best = self.state.best_model_checkpoint
                if best and best.startswith(str(staged.parent)):
                    # The Trainer recorded the staging path; point it (and the saved state) at the final folder.
                    self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                    self.state.save_to_json(os.path.join(staged, ckpt.TRAINER_STATE_NAME))
                ckpt.write_manifest(staged)  # every file's checksum, verified when resuming
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Rebuild the checkpoint's shapes, restore the strategy, then load tensors (safetensors only).

        A checkpoint without a readable ``lowrank_trainer_state.json`` is refused: resuming
        with a reset strategy would silently train another run.
        """
        folder = Path(resume_from_checkpoint)
        state_file = ckpt.state_file(folder)
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{state_file}: missing, so the strategy's state (ranks found so far, schedule) cannot be restored; "
                "resume from a checkpoint written by LowRankTrainer, or start a new run."
            )
        state = read_json(state_file)
        saved = LowRankConfig.from_dict(read_json(folder / CONFIG_NAME), source=str(folder / CONFIG_NAME))
        if fsdp.is_sharded(self.model):  # FSDP2 resumes after sharding: reshape and re-shard, then load the shards
            fsdp.load_model(self.model, folder, self.optimizer)
        else:
            self.model.apply_rank_pattern(saved.rank_pattern)
            self.model.load_weights(folder / WEIGHTS_NAME)
        self.model.load_lowrank_state_dict(state, source=str(state_file))
        self.nonfinite_steps = list(state.get("nonfinite_steps", []))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's load, after :meth:`_check_resumable` (files present, steps agree, optimizer state fits)."""
        if checkpoint is not None and not fsdp.is_sharded(self.model):
            self._check_resumable(Path(checkpoint))
        super()._load_optimizer_and_scheduler(checkpoint)

    def _check_resumable(self, folder: Path) -> None:
        """Refuse a checkpoint that would not continue the same run (see :mod:`hf_lowrank.checkpoint`)."""
        step = ckpt.saved_global_step(folder)
        state_file = ckpt.state_file(folder)
        ckpt.check_step(folder, step, read_json(state_file), str(state_file))
        names = {id(p): n for n, p in self.model.named_parameters()}
        ckpt.check_optimizer_state(folder / ckpt.OPTIMIZER_NAME, optim.inner_optimizer(self.optimizer), names, step)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
