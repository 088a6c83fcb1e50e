"""``hf-lowrank``: train | report | merge | inspect.

Each verb is a plain function of a typed options dataclass; its argparse arguments and
``--help`` come from the dataclass fields (``typing.get_type_hints``) and their ``help``
metadata. ``train`` also takes every recipe option (``--max_steps 50``), every
LowRankConfig field (``--lowrank.rank 0.5``) and every other ``transformers.TrainingArguments``
field (``--optim galore_adamw``) as overrides of the YAML config, and strategy
settings as ``--lowrank.strategy_args.<key> value``. A bad recipe ends with one line on stderr
naming the file, the field and the fix, and exit status 2 (argparse's for bad usage).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .checks import check_bool
from .options import RecipeError, has_type, text_parser, type_name, yaml_value

STRATEGY_ARGS_PREFIX = "--lowrank.strategy_args."


@dataclass
class TrainOptions:
    """Train from a YAML recipe config; any recipe option can be overridden as --name value."""

    config: str = field(metadata={"help": "A YAML file of recipe options, e.g. recipes/configs/quickstart.yaml.", "positional": True})
    task: typing.Union[str, None] = field(
        default=None, metadata={"help": "Required task ('clm' or 'classification'); set by the recipe scripts.", "hidden": True}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Let the recipe's strategy 'module:Class' be imported (running that module's code), looked up in the "
            "working directory and PYTHONPATH. Without it only strategies already registered are found."
        },
    )
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"hidden": True})

    def __post_init__(self) -> None:
        check_bool("trust_remote_code", self.trust_remote_code)


@dataclass
class ReportOptions:
    """Regenerate report.md and the plots of a run or benchmark directory, and print the report."""

    run_dir: str = field(metadata={"help": "A training run (holds results.json) or a benchmark directory (holds rows/).", "positional": True})


@dataclass
class MergeOptions:
    """Write a plain transformers model (low-rank layers merged to dense) and copy the tokenizer."""

    run_dir: str = field(metadata={"help": "A saved LowRankModel folder, or a run directory holding final/.", "positional": True})
    out: str = field(metadata={"help": "Output folder for the merged model (loads with AutoModel*.from_pretrained).", "positional": True})
    overwrite: bool = field(default=False, metadata={"help": "Replace OUT if it exists (refused otherwise)."})

    def __post_init__(self) -> None:
        check_bool("overwrite", self.overwrite)


@dataclass
class InspectOptions:
    """Print per-layer modes, ranks and parameter counts of a saved low-rank model."""

    dir: str = field(metadata={"help": "A saved LowRankModel folder, a checkpoint, or a run directory holding final/.", "positional": True})


# -- the verbs ---------------------------------------------------------------------------------


def _usage_error(message: str) -> NoReturn:
    """One line on stderr and exit status 2, no traceback."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def train(opts: TrainOptions) -> dict[str, Any]:
    """Run a recipe: YAML config plus overrides; returns the results (also written to results.json)."""
    from .options import RecipeOptions
    from .recipe import run

    try:
        if opts.trust_remote_code:
            _import_strategy(opts)
        recipe = RecipeOptions.from_yaml(opts.config, opts.overrides)
        if opts.task is not None and recipe.task != opts.task:
            script = "recipes/train_classifier.py" if recipe.task == "classification" else "recipes/train_clm.py"
            raise RecipeError(f"{opts.config}: task={recipe.task!r} but this script trains {opts.task!r}; use {script}.")
        return run(recipe)  # validates the layout and the schedule before loading any data
    except RecipeError as e:
        _usage_error(f"hf-lowrank train: {e}")


def _import_strategy(opts: TrainOptions) -> None:
    """``--trust_remote_code``: import the recipe's ``module:Class`` strategy, from the working directory or PYTHONPATH."""
    from .options import load_yaml
    from .strategies import get_strategy

    lowrank = load_yaml(opts.config).get("lowrank")
    name = opts.overrides.get("lowrank.strategy", lowrank.get("strategy") if isinstance(lowrank, dict) else None)
    if not (isinstance(name, str) and ":" in name):
        return
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules beside the recipe run are found
    try:
        get_strategy(name, trust_remote_code=True)
    except ValueError as e:
        raise RecipeError(f"{opts.config}: {e}") from None


def report(opts: ReportOptions) -> str:
    """Regenerate and print the report of a run or benchmark directory."""
    from .report import write_report

    try:
        text = write_report(opts.run_dir).read_text()
    except FileNotFoundError as e:
        _usage_error(f"hf-lowrank report: {e}")
    print(text)
    return text


def merge(opts: MergeOptions) -> Path:
    """Merge a saved low-rank model into a plain transformers model at ``opts.out`` (with its tokenizer)."""
    from .files import TOKENIZER_FILES, atomic_directory
    from .model import LowRankModel

    source, out = _model_dir(opts.run_dir), Path(opts.out)
    if out.exists() and not opts.overwrite:
        _usage_error(f"hf-lowrank merge: {out} exists; pass --overwrite to replace it, or choose another folder.")
    merged = LowRankModel.from_pretrained(source).merge_and_unload()
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    with atomic_directory(out) as tmp:  # a replaced OUT is swapped in whole, never half-written
        merged.save_pretrained(tmp)
        for name in copied:
            shutil.copy(source / name, tmp / name)
    print(f"merged {source} into a plain {type(merged).__name__} at {out}" + (f" (with {', '.join(copied)})" if copied else ""))
    return out


def inspect(opts: InspectOptions) -> str:
    """The per-layer table of a saved low-rank model."""
    from .model import LowRankModel

    text = LowRankModel.from_pretrained(_model_dir(opts.dir)).summary()
    print(text)
    return text


def _model_dir(path: str) -> Path:
    """A saved LowRankModel folder, or the ``final`` model inside a run directory."""
    from .config import CONFIG_NAME

    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    _usage_error(f"hf-lowrank: {path} holds no {CONFIG_NAME} (nor {path / 'final'}); pass a saved model folder.")


VERBS = {
    "train": (train, TrainOptions),
    "report": (report, ReportOptions),
    "merge": (merge, MergeOptions),
    "inspect": (inspect, InspectOptions),
}


# -- argparse from dataclasses -----------------------------------------------------------------


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", suppress_defaults: bool = False, skip: frozenset[str] = frozenset()
) -> None:
    """One argument per field of ``cls``: positional when its metadata says so, else ``--<prefix><name>``.

    Each word is read by :func:`hf_lowrank.options.text_parser` of the field's type, so the
    command line and a YAML config accept the same spellings; the dataclass then validates it.
    Bool fields take an optional value: ``--bf16`` means ``--bf16 true``.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("hidden") or not f.init or f.name in skip:
            continue
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=help_text)
            continue
        is_bool = has_type(True, tp)
        parser.add_argument(
            f"--{prefix}{f.name}",
            dest=f"{prefix}{f.name}",
            type=text_parser(tp),
            default=argparse.SUPPRESS if suppress_defaults else f.default,
            metavar="BOOL" if is_bool else {int: "INT", float: "FLOAT", str: "TEXT"}.get(tp, "VALUE"),
            nargs="?" if is_bool else None,
            const=True if is_bool else None,
            help=f"{help_text} [{type_name(tp)}; default {_default_text(f)}]",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-lowrank`` parser: one sub-command per verb, arguments generated from its options dataclass."""
    import transformers

    from .config import LowRankConfig
    from .options import RecipeOptions

    parser = argparse.ArgumentParser(prog="hf-lowrank", description="Low-rank training for Hugging Face transformers models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,report,merge,inspect}")
    parser.verbs = {}
    for verb, (_, cls) in VERBS.items():
        doc = (cls.__doc__ or "").strip()
        usage = "hf-lowrank train CONFIG [--option value ...]" if verb == "train" else None
        p = sub.add_parser(verb, help=doc.split("\n")[0], description=doc, usage=usage, allow_abbrev=False)
        parser.verbs[verb] = p
        add_dataclass_arguments(p, cls)
        if verb == "train":
            add_dataclass_arguments(
                p.add_argument_group("recipe options (override the YAML config)"), RecipeOptions, suppress_defaults=True
            )
            add_dataclass_arguments(
                p.add_argument_group("low-rank options (override the config's lowrank: mapping)"),
                LowRankConfig, prefix="lowrank.", suppress_defaults=True,
            )
            add_dataclass_arguments(
                p.add_argument_group(
                    "transformers.TrainingArguments fields (override the config's training: mapping; "
                    "help and defaults are transformers')"
                ),
                transformers.TrainingArguments, suppress_defaults=True,
                skip=frozenset(f.name for f in dataclasses.fields(RecipeOptions)),
            )
            p.epilog = (
                "Strategy settings: --lowrank.strategy_args.<key> value (keys per strategy in docs/strategies.md). "
                "Values are YAML: lists [c_fc, c_proj], none/null for None."
            )
    return parser


def train_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``train``'s overrides of the YAML config (recipe options, ``lowrank.*`` and strategy settings) and the unknown tokens."""
    tokens, unknown, strategy_args = list(rest), [], {}
    while tokens:
        token = tokens.pop(0)
        key, eq, value = token.partition("=")
        if not key.startswith(STRATEGY_ARGS_PREFIX) or len(key) == len(STRATEGY_ARGS_PREFIX):
            unknown.append(token)
            continue
        if not eq:
            if not tokens or tokens[0].startswith("--"):
                parser.verbs["train"].error(f"argument {key}: expected one argument")
            value = tokens.pop(0)
        try:
            strategy_args[key[2:]] = yaml_value(value)  # its type is the strategy's, which validates it
        except ValueError as e:
            parser.verbs["train"].error(f"argument {key}: {e}")
    recipe_keys = {k: v for k, v in vars(args).items() if k not in ("command", "config", "trust_remote_code")}
    return {**recipe_keys, **strategy_args}, unknown


def main(argv: Sequence[str] | None = None, task: str | None = None) -> int:
    """Entry point of the ``hf-lowrank`` console script; ``task`` makes ``train`` refuse configs of another task."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    func, cls = VERBS[args.command]
    overrides: dict[str, Any] = {}
    if args.command == "train":
        overrides, rest = train_overrides(parser, args, rest)
    if rest:
        options = [t.partition("=")[0] for t in rest if t.startswith("-")]
        what = f"unknown option(s) {', '.join(options)}" if options else f"unexpected argument(s) {' '.join(rest)}"
        parser.verbs[args.command].error(f"{what}; see hf-lowrank {args.command} --help")
    try:
        if args.command == "train":
            opts = TrainOptions(config=args.config, task=task, trust_remote_code=args.trust_remote_code, overrides=overrides)
        else:
            opts = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    except ValueError as e:  # a verb's own option, e.g. merge --overwrite maybe
        _usage_error(f"hf-lowrank {args.command}: {e}")
    try:
        func(opts)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (``hf-lowrank inspect ... | head``): stop quietly, as the Python
        # docs advise, pointing stdout at devnull so the final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
