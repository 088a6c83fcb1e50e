"""The training run behind ``recipes/`` and ``hf-lowrank train``: the check, training, result.

The model, data and TrainingArguments come from :mod:`hf_lowrank.recipe_build` (re-exported
here, as the recipe's). :func:`run` takes :class:`~hf_lowrank.options.RecipeOptions`, validates the whole recipe
against the model before any data is read (:func:`check`), trains one low-rank model with
:class:`~hf_lowrank.trainer.LowRankTrainer`, optionally the same model dense for comparison,
prints the result block (:mod:`hf_lowrank.results`) and writes ``<output_dir>/results.json``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .checks import fail
from .config import LowRankConfig
from .files import write_json
from .options import RecipeError, RecipeOptions
from .recipe_build import build_model, dense_config, derived_arguments, is_lowrank_folder, load_data, training_arguments
from .results import RESULTS_NAME, compare, format_results, hardware

__all__ = [
    "RESULTS_NAME",
    "RecipeOptions",
    "build_model",
    "check",
    "dense_config",
    "load_data",
    "run",
    "train_one",
    "training_arguments",
]


# -- the check before any data -----------------------------------------------------------------


def _check_model_path(path: str) -> None:
    """A missing local folder is reported as such (transformers would call it a malformed repo id)."""
    from .checks import fail
    from .hub import check_repo_id

    if Path(path).is_dir():
        return
    try:
        check_repo_id(path)
    except FileNotFoundError:
        fail("model_name_or_path", path, "that folder does not exist; give the final/ folder of a train_clm run or a saved transformers model")


def _check_adapter_only(opts: RecipeOptions, model) -> None:
    """``save_adapter_only`` needs a base on disk the adapters can be loaded onto again."""
    from .checks import fail

    if not opts.model_name_or_path or is_lowrank_folder(opts.model_name_or_path):
        fail(
            "save_adapter_only", True,
            "an adapter-only save goes onto a base folder that stays on disk: give model_name_or_path a plain "
            "transformers folder (for a LowRankModel folder, merge it first: hf-lowrank merge IN OUT)",
        )
    modes = {layer.mode for layer in model.lowrank_layers().values()}
    if modes != {"residual"} or model.lowrank_config.residual_base != "model":
        fail("save_adapter_only", True, "adapters over frozen pretrained weights need lowrank.mode 'residual' with residual_base 'model'")


def check(opts: RecipeOptions) -> None:
    """Validate the recipe against its model before any data or tokenizer is touched.

    Builds the model (loaded, or from scratch with ``vocab_size`` embeddings), wraps it with
    the ``lowrank`` settings (target layers exist and are not tied, ranks fit each layer, the
    mode suits the strategy) and binds the strategy to ``max_steps`` (schedule points inside
    the run). Raises :class:`~hf_lowrank.options.RecipeError` naming ``opts.source``.
    """
    from .model import get_lowrank_model

    try:
        if opts.fp16 and (opts.use_cpu or not torch.cuda.is_available()):
            where = "use_cpu is true" if opts.use_cpu else "no CUDA device is available"
            fail("fp16", opts.fp16, f"fp16 autocast with a gradient scaler needs a GPU and {where}; use bf16 (CPU or GPU) or leave fp16 off")
        if opts.model_name_or_path:
            _check_model_path(opts.model_name_or_path)
        # num_labels None keeps every topic, a count only the data knows: any head size shows the layout
        labels = (opts.num_labels or 2) if opts.task == "classification" else None
        model = build_model(opts, None, labels)
        if opts.lowrank_config is not None:
            model = get_lowrank_model(model, opts.lowrank_config)
            model.check_run(opts.max_steps)  # schedule points inside the run; warnings come when training binds
            if opts.save_adapter_only:
                _check_adapter_only(opts, model)
        _check_training(opts, model)
    except ValueError as e:
        raise RecipeError(f"{opts.source}: {e}") from None
    except OSError as e:  # transformers could not read model_name_or_path
        raise RecipeError(f"{opts.source}: model_name_or_path={opts.model_name_or_path!r} could not be loaded ({e})") from None


# -- training ----------------------------------------------------------------------------------


def _compute_metrics_fn():
    from .metrics import load_metric

    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        predictions = logits.argmax(-1)
        return {
            **accuracy.compute(predictions=predictions, references=pred.label_ids),
            **f1.compute(predictions=predictions, references=pred.label_ids, average="macro"),
        }

    return compute_metrics


def _check_training(opts: RecipeOptions, model) -> None:
    """transformers' own checks of the run's TrainingArguments and optimizer, before any data.

    Builds the ``TrainingArguments`` (its ``__post_init__`` refuses a bad ``optim`` name, a
    bad combination, ...) and resolves the optimizer against ``model`` as the Trainer will
    (``Trainer.get_optimizer_cls_and_kwargs``: a missing package, ``optim_args`` it cannot
    read, GaLore or APOLLO target modules that match no ``nn.Linear``). The error names the
    field the user set.
    """
    import transformers

    from .checks import fail

    with tempfile.TemporaryDirectory(prefix="hf_lowrank_check_") as tmp:
        try:
            args = training_arguments(opts, tmp)
        except (ValueError, TypeError, ImportError) as e:
            derived = derived_arguments(opts)
            culprit = next(
                (k for k in opts.training if _refused(lambda k=k: transformers.TrainingArguments(tmp, **{**derived, k: opts.training[k]}))),
                None,
            )
            names = [culprit] if culprit else sorted(opts.training) or ["the recipe's training options"]
            fail(", ".join(names), culprit and opts.training[culprit], f"transformers.TrainingArguments refused it ({e})")
        try:
            transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
        except ImportError as e:
            fail("optim", args.optim.value, f"its package is missing ({e}); install it (docs/peers.md) or choose another optim")
        except (ValueError, TypeError, KeyError) as e:
            if args.optim_args and any(w in str(e) for w in ("unpack", "invalid literal", "could not convert")):
                fail("optim_args", args.optim_args, f"transformers could not read it ({e}); give key=value pairs separated by commas, e.g. rank=32,update_proj_gap=200")
            fix = f"transformers could not build it ({e})"
            if "target modules" in str(e).lower() or "optim_target_modules" in str(e):
                fix += f"; optim_target_modules={args.optim_target_modules!r} must name nn.Linear layers" + _why_no_linear(args, model)
            fail("optim", args.optim.value, fix)


def _why_no_linear(args, model) -> str:
    """Why layers ``optim_target_modules`` names are not ``nn.Linear``: wrapped as low-rank layers, or GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D
    from transformers.trainer_utils import check_target_module_exists

    from .layer import LowRankLinear

    named = [(n, m) for n, m in model.named_modules() if n and check_target_module_exists(args.optim_target_modules, n)]
    if any(isinstance(m, LowRankLinear) and m.base_type == "linear" for _, m in named):
        return (
            ", and the low-rank layers (lowrank.target_modules) are LowRankLinear, not nn.Linear: set lowrank: false "
            "to train the plain model, or leave these layers out of lowrank.target_modules"
        )
    if any(isinstance(m, Conv1D) or (isinstance(m, LowRankLinear) and m.base_type == "conv1d") for _, m in named):
        return ", and the layers it names are transformers Conv1D (GPT-2's), which GaLore and APOLLO skip: use architecture llama"
    return ""


def _refused(build) -> bool:
    try:
        build()
    except (ValueError, TypeError, ImportError):
        return True
    return False


def run_clock(sync=None):
    """The one training clock: a Trainer callback counting the run's training seconds (evaluation excluded).

    Its state rides in the checkpoint's ``trainer_state.json`` (``stateful_callbacks``), so a
    resumed run adds to the seconds the earlier sessions spent. ``clock.seconds`` reads it at
    any time (the benchmarks read it at every log and at the steady-state start); ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before each reading so queued GPU work is counted.
    :func:`train_one` uses the clock it is given among its callbacks, or makes one.
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class RunClock(TrainerCallback, ExportableState):
        is_run_clock = True  # train_one uses a clock given among its callbacks

        def __init__(self, seconds: float = 0.0):
            self._seconds = seconds
            self._since: float | None = None

        @property
        def seconds(self) -> float:
            """Training seconds so far (this session and those before a resume)."""
            if self._since is not None:
                if sync is not None:
                    sync()
                now = time.perf_counter()
                self._seconds += now - self._since
                self._since = now
            return self._seconds

        def on_train_begin(self, args, state, control, **kwargs):
            saved = state.stateful_callbacks.get("RunClock")  # restored with the trainer state on resume
            self._seconds = saved["args"]["seconds"] if isinstance(saved, dict) else 0.0
            if sync is not None:
                sync()
            self._since = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            # an evaluation logs its runtime once, before anyone reads the clock for it; one after
            # training (the clock stopped) is not counted anyway
            if self._since is not None and "eval_runtime" in (logs or {}):
                self._seconds = self.seconds - logs["eval_runtime"]

        def on_train_end(self, args, state, control, **kwargs):
            self._seconds = self.seconds
            self._since = None

        def state(self) -> dict[str, Any]:
            return {"args": {"seconds": self.seconds}, "attributes": {}}

    return RunClock()


def _final_metrics(trainer) -> dict[str, float]:
    """The metrics at the last step: the periodic evaluation's when it ran there, else one evaluation now."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def train_one(
    opts: RecipeOptions,
    lowrank: LowRankConfig | dict[str, Any],
    output_dir: str,
    tokenizer,
    data,
    labels: list[str] | None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train one model with the ``lowrank`` settings (a LowRankConfig or its fields as a dict).

    ``callbacks`` (``transformers.TrainerCallback`` instances) are added to the trainer. Returns
    the run's result; ``result["is_main"]`` says whether this is process 0. Steps, tokens and
    seconds count the whole run, the sessions before a resume included.
    """
    from .metrics import perplexity
    from .model import get_lowrank_model
    from .trainer import LowRankTrainer

    if lowrank is None or lowrank is False:
        config = None
    else:
        config = lowrank if isinstance(lowrank, LowRankConfig) else LowRankConfig.from_dict(lowrank, source="lowrank")
    base = build_model(opts, tokenizer, len(labels) if labels else None)
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {name: i for i, name in enumerate(labels)}
    if config is None:  # no low-rank layers: the plain model under transformers' own Trainer
        from transformers import Trainer as trainer_class

        model = base
    else:
        model, trainer_class = get_lowrank_model(base, config), LowRankTrainer
    initial_pattern = {} if config is None else model.rank_pattern()  # the layout at step 0, which the rank plot starts from
    given = [c for c in callbacks or [] if getattr(c, "is_run_clock", False)]
    clock = given[0] if given else run_clock()
    trainer = trainer_class(
        model=model,
        args=training_arguments(opts, output_dir),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        compute_metrics=_compute_metrics_fn() if opts.task == "classification" else None,
        callbacks=[*([] if given else [clock]), *(callbacks or [])],
    )
    train_out = trainer.train(resume_from_checkpoint=opts.resume_from_checkpoint)
    metrics = _final_metrics(trainer)
    final_dir = os.path.join(output_dir, "final")
    trainer.save_model(final_dir)
    adapters = config is not None and all(layer.mode == "residual" for layer in model.lowrank_layers().values())  # not the dense comparison
    if opts.save_adapter_only and adapters and trainer.is_world_process_zero():
        model.save_pretrained(final_dir, adapter_only=True)  # replaces the full weights, keeps tokenizer and state
    args = trainer.args
    steps = trainer.state.global_step
    samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if opts.task == "clm":
        tokens = samples * opts.block_size
    else:  # unpadded example lengths
        lengths = [len(ids) for ids in data["train"]["input_ids"]]
        tokens = round(samples * sum(lengths) / len(lengths))
    train_seconds = max(clock.seconds, 1e-9)
    result = {
        "strategy": None if config is None else config.strategy,
        "mode": None if config is None else config.mode,
        "eval_loss": metrics["eval_loss"],
        "train_loss": train_out.training_loss,
        **(_plain_model_facts(model, trainer) if config is None else _lowrank_model_facts(model, trainer)),
        "initial_pattern": initial_pattern,
        "steps": steps,
        "tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds,
        "log_history": trainer.state.log_history,
        "final_model": final_dir,
        "world_size": args.world_size,
    }
    if opts.task == "clm":
        result["perplexity"] = perplexity(metrics["eval_loss"])
    else:
        result.update(accuracy=metrics["eval_accuracy"], f1=metrics["eval_f1"])
    result["is_main"] = trainer.is_world_process_zero()
    return result


def _lowrank_model_facts(model, trainer) -> dict[str, Any]:
    counts = model.parameter_counts()
    report = model.layer_report()
    return {
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "rank_fraction": model.rank_fraction(),
        "ranks": {r["layer"]: r["rank"] for r in report},
        "full_ranks": {r["layer"]: r["full_rank"] for r in report},
        "rank_pattern": model.rank_pattern(),
        "summary": model.summary(),
        "decision_seconds": trainer.decision_seconds,
        "plan_history": trainer.plan_history,
    }


def _plain_model_facts(model, trainer) -> dict[str, Any]:
    """The same keys for a run without low-rank layers (``lowrank: false``): no ranks, no rank decisions."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "rank_fraction": None,
        "ranks": {},
        "full_ranks": {},
        "rank_pattern": {},
        "summary": f"{type(model).__name__} without low-rank layers: {trainable:,} trainable of {total:,} parameters",
        "decision_seconds": 0.0,
        "plan_history": [],
    }


def _speed(opts: RecipeOptions, results: dict[str, Any], tokenizer, data) -> dict[str, Any]:
    """Both final models timed side by side on the first training batch (:mod:`hf_lowrank.speed`)."""
    from transformers import DataCollatorWithPadding

    from .model import LowRankModel
    from .speed import compare_speed

    device = torch.device("cpu" if opts.use_cpu or not torch.cuda.is_available() else "cuda")
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in data["train"].column_names]
    rows = data["train"].select(range(min(opts.per_device_train_batch_size, len(data["train"])))).select_columns(columns)
    batch = {k: v.to(device) for k, v in DataCollatorWithPadding(tokenizer)(list(rows)).items()}
    # The wrapped transformers models, low-rank layers inside: the layouts without a strategy to drive.
    low, full = (
        LowRankModel.from_pretrained(results[k]["final_model"]).get_base_model().to(device) for k in ("lowrank", "full_rank")
    )
    autocast = torch.bfloat16 if opts.bf16 else torch.float16 if opts.fp16 else None
    return compare_speed(low, full, batch, opts.speed_steps, autocast)


def run(opts: RecipeOptions) -> dict[str, Any]:
    """Check, train (and the dense comparison when asked), print the result block, write ``results.json``."""
    check(opts)
    tokenizer, data, labels = load_data(opts)
    results: dict[str, Any] = {"lowrank": train_one(opts, opts.lowrank_config, opts.output_dir, tokenizer, data, labels)}
    if opts.compare_full_rank:
        results["full_rank"] = train_one(
            opts, dense_config(opts.lowrank_config), os.path.join(opts.output_dir, "full_rank"), tokenizer, data, labels
        )
    is_main = all(r.pop("is_main") for r in results.values())
    if "full_rank" in results:
        results["comparison"] = compare(results["lowrank"], results["full_rank"])
        if is_main and opts.speed_steps:
            results["comparison"].update(_speed(opts, results, tokenizer, data))
    results["options"] = dataclasses.asdict(opts)
    results["hardware"] = hardware()
    if is_main:
        write_json(Path(opts.output_dir) / RESULTS_NAME, results)
        print(format_results(results), flush=True)
    return results
