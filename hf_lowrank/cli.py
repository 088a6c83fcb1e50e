"""``hf-lowrank``: train | report | merge | inspect."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import LowRankConfig


def _options_help(cls) -> str:
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """``--key value`` pairs; values are read as YAML scalars or lists (``0.5``, ``true``, ``[c_fc, c_proj]``)."""
    overrides: dict[str, Any] = {}
    it = iter(tokens)
    for token in it:
        if not token.startswith("--") or len(token) < 3:
            raise SystemExit(f"hf-lowrank train: expected --option value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            value = next(it, None)
            if value is None:
                raise SystemExit(f"hf-lowrank train: option --{key} needs a value")
        overrides[key] = _scalar(value)
    return overrides


def _scalar(text: str) -> Any:
    """YAML value, with numbers such as ``4e-3`` read as floats (YAML 1.1 wants ``4.0e-3``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def cmd_train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .recipe import RecipeOptions, run

    try:
        opts = RecipeOptions.from_yaml(args.config, _parse_overrides(rest))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"hf-lowrank train: {e}") from None
    run(opts)
    return 0


def cmd_report(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .report import write_report

    print(write_report(args.run_dir).read_text())
    return 0


def cmd_merge(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .model import LowRankModel

    source = _model_dir(args.run_dir)
    model = LowRankModel.from_pretrained(source)
    merged = model.merge_and_unload()
    merged.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, Path(args.out) / name)
    print(f"merged {source} into a plain {type(merged).__name__} at {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .model import LowRankModel

    print(LowRankModel.from_pretrained(_model_dir(args.dir)).summary())
    return 0


def _model_dir(path: str) -> Path:
    """A saved LowRankModel folder, or the ``final`` model inside a run directory."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / "lowrank_config.json").is_file():
            return candidate
    raise SystemExit(f"hf-lowrank: {path} holds no lowrank_config.json (nor {path / 'final'}); pass a saved model folder.")


def build_parser() -> argparse.ArgumentParser:
    from .recipe import RecipeOptions

    parser = argparse.ArgumentParser(prog="hf-lowrank", description="Low-rank training for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train from a YAML recipe config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from a YAML config; any option can be overridden as --name value "
        "(dotted names reach into lowrank, e.g. --lowrank.rank 0.5).",
        epilog="options:\n" + _options_help(RecipeOptions) + "\n\nlowrank options (LowRankConfig):\n" + _options_help(LowRankConfig),
    )
    train.add_argument("config", help="a YAML file of recipe options, e.g. recipes/configs/quickstart.yaml")
    train.set_defaults(func=cmd_train)
    report = sub.add_parser("report", help="regenerate the tables and plots of a run or benchmark directory")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)
    merge = sub.add_parser("merge", help="write a plain (dense) transformers model from a saved low-rank model")
    merge.add_argument("run_dir", help="a saved LowRankModel folder or a run directory holding final/")
    merge.add_argument("out", help="output folder for the merged model")
    merge.set_defaults(func=cmd_merge)
    inspect = sub.add_parser("inspect", help="per-layer modes, ranks and parameter counts of a saved model")
    inspect.add_argument("dir")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-lowrank`` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
