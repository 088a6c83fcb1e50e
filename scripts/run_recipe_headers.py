"""Run every command written in the recipe configs' headers, exactly as written, and say how each went.

    .venv/bin/python scripts/run_recipe_headers.py                 # every CPU config, in file order
    .venv/bin/python scripts/run_recipe_headers.py --only gpt2_tiny_inrank --dry-run

Each config opens with the command that runs it and the result it gave; this runs those commands
(``accelerate launch ...``, ``hf-lowrank train ...``) one after another from the repository root,
with the tools of this Python's environment first on PATH and the Hugging Face libraries offline.
Configs that need a GPU are skipped when torch sees none. Writes ``runs/recipe_headers.json``
(command, exit status, seconds, and the perplexity or accuracy the run wrote to its results.json).
With ``--update-headers`` each config's ``Hardware:`` and ``Result`` lines are rewritten from the
results.json its commands just wrote, so a header never states a figure that was not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the repository's hf_lowrank is importable without installing

from hf_lowrank.files import read_json, write_json  # noqa: E402
LAUNCHERS = ("accelerate launch", "hf-lowrank train", "python recipes/")


def header_commands(path: Path) -> list[str]:
    """The commands in the comment block a config opens with."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if text.startswith(LAUNCHERS):
            commands.append(text)
    return commands


def needs_gpu(path: Path) -> bool:
    import yaml

    return not (yaml.safe_load(path.read_text()) or {}).get("use_cpu", False)


def outcome(command: str) -> tuple[dict, dict | None]:
    """What the run wrote: its output folder and main figures, and the whole results.json (None if absent)."""
    words = shlex.split(command)
    config = next(w for w in words if w.startswith("recipes/configs/"))
    import yaml

    out = (yaml.safe_load((ROOT / config).read_text()) or {}).get("output_dir")
    if "--output_dir" in words:
        out = words[words.index("--output_dir") + 1]
    results = ROOT / str(out) / "results.json"
    if not results.is_file():
        return {"output_dir": out}, None
    data = read_json(results)
    low, full = data["lowrank"], data.get("full_rank") or {}
    keys = ("perplexity", "accuracy", "f1", "trainable_params", "tokens_per_second", "world_size")
    summary = {"output_dir": out, "lowrank": {k: low[k] for k in keys if k in low}, "full_rank": {k: full[k] for k in keys if k in full}}
    return summary, data


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def result_line(results: dict, reference: dict | None) -> str:
    """One header line from a run's results.json (``reference``: the dense run of the same model, if any)."""
    low, full = results["lowrank"], results.get("full_rank")
    if "perplexity" in low:
        parts = [f"eval perplexity {low['perplexity']:.1f}"]
        if full:
            parts[0] += f" (full rank, same run: {full['perplexity']:.1f}; ratio {low['perplexity'] / full['perplexity']:.2f})"
        elif reference:
            parts[0] += f" ({reference['name']}: {reference['perplexity']:.1f})"
    else:
        parts = [f"eval accuracy {low['accuracy']:.3f}, macro F1 {low['f1']:.3f}"]
        if full:
            parts[0] += f" (full fine-tuning: accuracy {full['accuracy']:.3f}, F1 {full['f1']:.3f})"
    parts.append(f"trainable params {_millions(low['trainable_params'])} of {_millions(low['total_params'])}")
    if full:
        parts[-1] += f" (full rank: {_millions(full['trainable_params'])})"
    ranks = sorted(set(low.get("ranks", {}).values()))
    if ranks:
        parts.append(f"final ranks {ranks[0]}" + (f"-{ranks[-1]}" if len(ranks) > 1 else ""))
    if low.get("strategy") is not None:  # a run with low-rank layers (not a peer's plain model)
        parts.append(f"rank decisions {low['decision_seconds']:.1f} s")
    parts.append(f"{low['tokens_per_second']:,.0f} tokens/s" + (f" (full rank {full['tokens_per_second']:,.0f})" if full else ""))
    step = results.get("comparison", {}).get("step_speedup")
    if step:  # the final layouts timed side by side on one batch: the speed ratio the machine's load does not skew
        parts.append(f"step speedup {step:.2f}x side by side (FLOPs {results['comparison']['flop_speedup']:.2f}x)")
    parts.append(f"train {low['train_seconds']:.0f} s")
    return ", ".join(parts) + f" ({results['hardware']['date'][:10]})."


def hardware_line(results: dict, launcher: str) -> str:
    hw = results["hardware"]
    return f"{hw['cpu_count']}-core {hw['machine']} CPU, torch {hw['torch']}, {hw['torch_threads']} thread(s) per process, run with {launcher}."


def update_header(path: Path, lines: list[tuple[str, str]]) -> None:
    """Replace the ``Hardware:`` / ``Result...`` lines (and their continuations) of ``path``'s header with ``lines``."""
    text = path.read_text().splitlines(keepends=True)
    end = next(i for i, line in enumerate(text) if not line.startswith("#"))
    kept, skipping = [], False
    for line in text[:end]:
        body = line[1:].strip()
        if body.startswith(("Hardware", "Result")):
            skipping = True
            continue
        if skipping and line.startswith("#   ") and not body.startswith(LAUNCHERS):
            continue
        skipping = False
        kept.append(line)
    new = [f"# {label}: {value}\n" for label, value in lines]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept + new + text[end:]))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="config name (stem) to run; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="list the commands without running them")
    parser.add_argument("--log", default="runs/recipe_headers.json", help="where the outcomes go")
    parser.add_argument("--update-headers", action="store_true", help="rewrite each config's Hardware/Result lines from its runs")
    args = parser.parse_args(argv)

    import torch

    configs = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    unknown = sorted(set(args.only) - {p.stem for p in configs})
    if unknown:
        parser.error(f"--only: unknown config(s) {unknown}; choose from {[p.stem for p in configs]}")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    }
    records, failed = [], 0
    for path in configs:
        if args.only and path.stem not in args.only:
            continue
        if needs_gpu(path) and not torch.cuda.is_available():
            print(f"{path.name}: skipped, needs a GPU (torch sees none)", flush=True)
            records.append({"config": path.name, "skipped": "needs a GPU"})
            continue
        for command in header_commands(path):
            if any(r.get("command") == command for r in records):
                print(f"$ {command}  (ran above)", flush=True)
                continue
            print(f"$ {command}", flush=True)
            if args.dry_run:
                records.append({"command": command})
                continue
            start = time.perf_counter()
            status = subprocess.run(shlex.split(command), cwd=ROOT, env=env).returncode
            ran = next(w for w in shlex.split(command) if w.startswith("recipes/configs/")).rpartition("/")[2]
            record = {"config": ran, "header_of": path.name, "command": command, "exit": status, "seconds": round(time.perf_counter() - start, 1)}
            summary, results = outcome(command)
            record.update(summary)
            records.append(record)
            if status == 0 and results is not None:
                ref_file = ROOT / "runs" / "gpt2_tiny_full" / "results.json"
                reference = None
                if ran.startswith("gpt2_tiny") and ran != "gpt2_tiny_full.yaml" and ref_file.is_file():
                    reference = {"name": "gpt2_tiny_full", **read_json(ref_file)["lowrank"]}
                launcher = "accelerate launch" if command.startswith("accelerate") else "hf-lowrank train"
                world = results["lowrank"].get("world_size", 1)
                record["header"] = {
                    "hardware": hardware_line(results, launcher),
                    "result": result_line(results, reference),
                    "how": f"{command.split()[0]}, {'one process' if world == 1 else f'{world} processes'}",
                }
            failed += status != 0
            print(f"  -> exit {status} in {record['seconds']:.0f} s: {json.dumps(record.get('lowrank', {}))}", flush=True)
    if args.update_headers and not args.dry_run:
        for path in configs:
            runs = [r["header"] for r in records if r.get("config") == path.name and "header" in r]
            if runs and not any(r.get("config") == path.name and r.get("exit") for r in records):
                lines = [("Hardware", runs[0]["hardware"]), ("Result", runs[0]["result"])]
                lines += [(f"Result ({h['how']})", h["result"]) for h in runs[1:]]
                update_header(path, lines)
                print(f"{path.name}: header updated", flush=True)
    if not args.dry_run:
        log = ROOT / args.log
        log.parent.mkdir(parents=True, exist_ok=True)
        write_json(log, records)
        print(f"{len(records)} entries, {failed} failed: {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
