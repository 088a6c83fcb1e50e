"""LowRankTrainer: a transformers Trainer that runs the rank strategy and applies its plans.

After every optimizer step the strategy is consulted (on process 0; its plan and state are
broadcast so every process applies the same change). A plan's transitions replace
parameters, so the trainer then:

- regroups the optimizer's parameter lists in model order (the order a fresh optimizer would
  have, so checkpoints resume into the right slots), keeping the state of untouched
  parameters and starting new ones with empty state;
- rescales the learning-rate schedule (``lr_factor``) or ramps it back up (``rewarm_steps``);
- re-wraps the model in DDP when shapes changed under data parallelism.

Checkpoints carry the untrimmed factors, the rank pattern, the strategy state and the
learning-rate adjustments (``lowrank_trainer_state.json``), and are written into a staging
folder renamed into place, so a crash mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils.generic import can_return_loss, find_labels

from .config import CONFIG_NAME, LowRankConfig
from .files import read_json, write_json
from .model import WEIGHTS_NAME, LowRankModel
from .strategies import Plan, TrainContext

STATE_NAME = "lowrank_trainer_state.json"


class _RankCallback(TrainerCallback):
    """Runs the strategy after each optimizer step (``on_step_end`` follows the scheduler step)."""

    def __init__(self, trainer: "LowRankTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._bind_strategy()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._rank_step(state.global_step)


class LowRankTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`LowRankModel`: rank strategy, Frobenius decay, rank logging."""

    def __init__(self, model: LowRankModel | None = None, *args: Any, **kwargs: Any):
        if not isinstance(model, LowRankModel):
            raise TypeError(
                f"LowRankTrainer needs a LowRankModel (from get_lowrank_model), got {type(model).__name__}."
            )
        super().__init__(model, *args, **kwargs)
        base_cls = type(model.base_model)
        if self.args.label_names is None:
            self.label_names = find_labels(base_cls)
        self.can_return_loss = can_return_loss(base_cls)
        if self.is_fsdp_enabled and model.lowrank_config.strategy != "fixed":
            raise ValueError(
                f"strategy {model.lowrank_config.strategy!r} changes parameter shapes during training, which FSDP's "
                "flattened parameters cannot follow; use DDP (accelerate launch --multi_gpu) or strategy 'fixed'."
            )
        self.strategy = model.strategy
        self.lr_factor = 1.0
        self.rewarm: tuple[int, int] | None = None  # (start step, length)
        self.plan_history: list[dict[str, Any]] = []
        self.decision_seconds = 0.0
        self._rewrapped = False
        self._saving_checkpoint = False
        self._staging_dir: str | None = None
        self._strategy_bound = False
        self.add_callback(_RankCallback(self))

    # -- data columns come from the wrapped model's forward ----------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            params = inspect.signature(self.model.base_model.forward).parameters
            self._signature_columns = list(params) + list({"label", "label_ids", *self.label_names})

    # -- optimizer -----------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Trainer's rule, minus the factors when Frobenius decay replaces weight decay on them."""
        names = super().get_decay_parameter_names(model)
        if self.model.lowrank_config.frobenius_decay > 0:
            names = [n for n in names if n.rpartition(".")[2] not in ("A", "B")]
        return names

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the factors of each group split into a group of their own.

        Factor groups carry ``lowrank_factors=True`` and the learning rate times
        ``LowRankConfig.factor_lr_scale``. The split is made even at scale 1, so that the group
        structure (and with it a checkpoint's optimizer state) never depends on the setting.
        """
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            factors = {id(layer.A) for layer in self.model.lowrank_layers().values() if layer.A is not None}
            factors |= {id(layer.B) for layer in self.model.lowrank_layers().values() if layer.B is not None}
            scale = self.model.lowrank_config.factor_lr_scale
            for group in list(optimizer.param_groups):
                moved = [p for p in group["params"] if id(p) in factors]
                group["params"] = [p for p in group["params"] if id(p) not in factors]
                extra = {k: v for k, v in group.items() if k != "params"}
                optimizer.add_param_group({**extra, "params": moved, "lr": group["lr"] * scale, "lowrank_factors": True})
            if self.model.lowrank_config.frobenius_decay > 0:
                optimizer.register_step_pre_hook(self._frobenius_decay)
        return optimizer

    @torch.no_grad()
    def _frobenius_decay(self, optimizer, args, kwargs) -> None:
        """Add the gradient of ``(lambda/2) ||B A||_F^2`` to the active factors before each step.

        ``grad_B += lambda B (A A^T)`` and ``grad_A += lambda (B^T B) A``: O((out + in) r^2),
        never forming ``B A``.
        """
        lam = self.model.lowrank_config.frobenius_decay
        for layer in self.model.lowrank_layers().values():
            if layer.mode == "dense" or layer.A.grad is None or layer.B.grad is None:
                continue
            B, A = layer.active_factors()  # (out, r), (r, in)
            k = layer.rank
            layer.B.grad[:, :k].add_(B @ (A @ A.T), alpha=lam)
            layer.A.grad[:k].add_((B.T @ B) @ A, alpha=lam)

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _inner_scheduler(self):
        return getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)

    def _regroup_optimizer(self, before: dict[str, nn.Parameter]) -> None:
        """Point the optimizer at the model's current parameters, in model order.

        Parameters that survived a transition keep their group and state; new ones (new
        factors, a merged dense weight) join the group the decay rule gives them with empty
        state; parameters that left the model or stopped training are dropped with their state.
        """
        opt = self._inner_optimizer()
        group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        decay = set(self.get_decay_parameter_names(self.model))
        wd = self.args.weight_decay

        def group_for_new(name: str) -> int:
            want = (wd if name in decay else 0.0, name.rpartition(".")[2] in ("A", "B"))
            return next(
                (i for i, g in enumerate(opt.param_groups) if (g.get("weight_decay", 0.0), g.get("lowrank_factors", False)) == want),
                0,
            )

        lists: list[list[nn.Parameter]] = [[] for _ in opt.param_groups]
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            kept = name in before and before[name] is p and id(p) in group_of
            lists[group_of[id(p)] if kept else group_for_new(name)].append(p)
        alive = {id(p) for ps in lists for p in ps}
        for p in [p for p in opt.state if id(p) not in alive]:
            del opt.state[p]
        for group, params in zip(opt.param_groups, lists):
            group["params"] = params

    def _scale_lr(self, factor: float) -> None:
        opt, sched = self._inner_optimizer(), self._inner_scheduler()
        for group in opt.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if hasattr(sched, "base_lrs"):
            sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        self.lr_factor *= factor

    def _apply_rewarm(self, step: int) -> None:
        """Scale the schedule's learning rate for the next step by the re-warm ramp."""
        if self.rewarm is None:
            return
        start, length = self.rewarm
        ramp = (step - start + 1) / (length + 1)
        if ramp >= 1.0:
            self.rewarm = None
            return
        for group in self._inner_optimizer().param_groups:
            group["lr"] *= ramp

    # -- the rank step -------------------------------------------------------------------------

    def _bind_strategy(self) -> None:
        sched = self._inner_scheduler()
        base = list(getattr(sched, "base_lrs", [self.args.learning_rate]))
        lr_lambdas = getattr(sched, "lr_lambdas", None)

        def lr_at(step: int) -> float:
            return base[0] * lr_lambdas[0](step) if lr_lambdas else base[0]

        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32
        try:
            seq = len(self.train_dataset[0]["input_ids"])
        except (TypeError, KeyError, IndexError):
            seq = 128
        self.strategy.bind(
            TrainContext(
                max_steps=self.state.max_steps,
                lr_at=lr_at,
                warn=self._warn,
                device=str(self.args.device),
                dtype=dtype,
                tokens_per_batch=self.args.per_device_train_batch_size * seq,
            )
        )
        self._strategy_bound = True
        if self.is_world_process_zero():
            stale = Path(self.args.output_dir).glob(".staging-*")
            for folder in stale:
                shutil.rmtree(folder, ignore_errors=True)

    def _warn(self, message: str) -> None:
        if self.is_world_process_zero():
            import warnings

            warnings.warn(message, stacklevel=3)

    def _decide(self, step: int) -> tuple[Plan | None, dict[str, Any]]:
        """Process 0 decides; everyone receives the plan and the strategy state."""
        payload = [None, None]
        if self.args.process_index == 0:
            plan = self.strategy.step(step, self.model.lowrank_layers())
            payload = [plan.to_dict() if plan else None, self.strategy.state_dict()]
        if self.args.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(payload, src=0)
        plan = Plan.from_dict(payload[0]) if payload[0] else None
        return plan, payload[1]

    def _rank_step(self, step: int) -> None:
        if not self.strategy.due(step):
            self._apply_rewarm(step)
            return
        start = time.perf_counter()
        plan, strategy_state = self._decide(step)
        if self.args.process_index != 0:
            self.strategy.load_state_dict(strategy_state)
        if plan:
            self.apply_plan(plan, step)
        self._apply_rewarm(step)
        self.decision_seconds += time.perf_counter() - start

    def apply_plan(self, plan: Plan, step: int) -> None:
        """Apply a plan to the model and bring optimizer, schedule and wrappers in step."""
        before = dict(self.model.named_parameters())
        for message in self.model.apply_plan(plan):
            self._warn(message)
        after = dict(self.model.named_parameters())
        shapes_changed = before.keys() != after.keys() or any(before[n] is not after[n] for n in after)
        if shapes_changed and self.optimizer is not None:
            self._regroup_optimizer(before)
        if plan.lr_factor != 1.0:
            self._scale_lr(plan.lr_factor)
        if plan.rewarm_steps > 0:
            self.rewarm = (step, plan.rewarm_steps)
        if shapes_changed:
            self._rewrap()
        self.plan_history.append({"step": step, **plan.to_dict()})

    def _rewrap(self) -> None:
        """Rebuild DDP around the model after its parameters changed (never wrapping twice)."""
        ddp = torch.nn.parallel.DistributedDataParallel
        if not isinstance(self.model_wrapped, ddp):
            return
        handler = self.accelerator.ddp_handler
        kwargs = handler.to_kwargs() if handler is not None else {}
        device = next(self.model.parameters()).device
        device_ids = None if device.type == "cpu" else [device.index]
        new = ddp(self.model, device_ids=device_ids, output_device=device_ids[0] if device_ids else None, **kwargs)
        if handler is not None:
            handler.register_comm_hook(new)
        self.accelerator._models = [new if m is self.model_wrapped else m for m in self.accelerator._models]
        self.model_wrapped = new
        self._rewrapped = True

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # The training loop holds the wrapper it started with; after a re-wrap use the new one.
        return super().training_step(self.model_wrapped if self._rewrapped else model, inputs, num_items_in_batch)

    # -- logging -------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_loss" in logs:
            counts = self.model.parameter_counts()
            logs["lowrank/rank_fraction"] = round(self.model.rank_fraction(), 5)
            logs["lowrank/trainable_params"] = counts["trainable"]
            logs["lowrank/decision_seconds"] = round(self.decision_seconds, 4)
            for row in self.model.layer_report():
                logs[f"lowrank/rank/{row['layer']}"] = row["rank"]
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------------------

    def lowrank_state(self) -> dict[str, Any]:
        """Everything besides tensors that resuming needs."""
        return {
            "strategy": self.model.lowrank_config.strategy,
            "strategy_state": self.strategy.state_dict(),
            "lr_factor": self.lr_factor,
            "rewarm": list(self.rewarm) if self.rewarm else None,
            "plan_history": self.plan_history,
            "decision_seconds": self.decision_seconds,
            "rank_pattern": self.model.rank_pattern(),
        }

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.model.save_pretrained(output_dir, trim=not self._saving_checkpoint)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        write_json(Path(output_dir) / STATE_NAME, self.lowrank_state())

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_dir = os.path.join(run_dir, f".staging-{name}")
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir, self._saving_checkpoint = None, False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = os.path.join(run_dir, f".staging-{name}", name), os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(os.path.join(run_dir, f".staging-{name}"), ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and ".staging-" in best:
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Rebuild the checkpoint's shapes, restore the strategy, then load tensors (safetensors only)."""
        folder = Path(resume_from_checkpoint)
        saved = LowRankConfig.from_dict(read_json(folder / CONFIG_NAME), source=str(folder / CONFIG_NAME))
        self.model.apply_rank_pattern(saved.rank_pattern)
        self.model.load_weights(folder / WEIGHTS_NAME)
        if (folder / STATE_NAME).is_file():
            state = read_json(folder / STATE_NAME)
            if state["strategy"] != self.model.lowrank_config.strategy:
                raise ValueError(
                    f"{folder / STATE_NAME}: checkpoint was trained with strategy {state['strategy']!r}, "
                    f"this run uses {self.model.lowrank_config.strategy!r}."
                )
            self.strategy.load_state_dict(state["strategy_state"])
            self.lr_factor = state["lr_factor"]
            self.rewarm = tuple(state["rewarm"]) if state["rewarm"] else None
            self.plan_history = state["plan_history"]
            self.decision_seconds = state["decision_seconds"]

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
