"""The result of a recipe run: low-rank over full-rank ratios, the printed block, the hardware.

``results.json`` holds ``lowrank`` (and, with ``compare_full_rank``, ``full_rank`` and
``comparison``), ``options`` and ``hardware``; :func:`format_results` turns it into the block a
run prints at the end and ``hf-lowrank report`` writes into ``report.md``.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS_NAME = "results.json"

# Wall-clock and interleaved speed ratios further apart than this factor get a warning.
SPEED_DISAGREEMENT = 1.25


def compare(low: dict[str, Any], full: dict[str, Any]) -> dict[str, float]:
    """Low-rank over full-rank ratios of quality, size and wall-clock speed."""
    keys = ["eval_loss", "trainable_params", "total_params", "tokens_per_second", "train_seconds"]
    keys += ["perplexity"] if "perplexity" in low else ["accuracy", "f1"]
    return {f"{k}_ratio": low[k] / full[k] if full[k] else math.nan for k in keys}


def speed_warning(comparison: dict[str, Any]) -> str | None:
    """A warning when the wall-clock speed ratio and the interleaved one disagree by more than SPEED_DISAGREEMENT."""
    wall, step = comparison.get("tokens_per_second_ratio"), comparison.get("step_speedup")
    if not wall or not step or max(wall / step, step / wall) <= SPEED_DISAGREEMENT:
        return None
    return (
        f"the wall-clock speed ratio {wall:.2f}x and the interleaved one {step:.2f}x disagree: the runs trained one after "
        "the other, so other load on the machine (and ranks that changed during training) shows up in the wall-clock "
        "ratio; the interleaved ratio times both final models on the same batch, alternating."
    )


def rank_summary(ranks: dict[str, int], pattern: dict[str, dict[str, Any]], full_ranks: dict[str, int] | None = None) -> str:
    """Final ranks in one line: ``24-36 of 192 over 8 layers, factorized``; ``hf-lowrank inspect`` has the table."""
    if not ranks:
        return "no low-rank layers"
    values = sorted(ranks.values())
    span = f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"
    fulls = sorted(set((full_ranks or {}).values()))
    of = f" of {'/'.join(map(str, fulls))}" if fulls else ""
    modes = sorted({spec.get("mode", "?") for spec in pattern.values()}) or ["?"]
    return f"{span}{of} over {len(ranks)} layers, {'/'.join(modes)}"


def format_results(results: dict[str, Any]) -> str:
    """The result block printed at the end of a run (``hf-lowrank report`` writes it again)."""
    low, full = results["lowrank"], results.get("full_rank")
    rows = [("eval perplexity", "perplexity", "{:.3f}")] if "perplexity" in low else [
        ("eval accuracy", "accuracy", "{:.4f}"),
        ("eval macro F1", "f1", "{:.4f}"),
    ]
    rows += [
        ("eval loss", "eval_loss", "{:.4f}"),
        ("trainable params", "trainable_params", "{:,}"),
        ("total params", "total_params", "{:,}"),
        ("rank fraction", "rank_fraction", "{:.3f}"),
        ("tokens / s", "tokens_per_second", "{:,.0f}"),
        ("train time (s)", "train_seconds", "{:.1f}"),
        ("rank decisions (s)", "decision_seconds", "{:.2f}"),
    ]
    plain = low.get("strategy") is None  # lowrank: false, no low-rank layers
    lines = ["", f"{'':<22}{'plain model' if plain else 'low-rank':>14}" + (f"{'full rank':>14}{'low / full':>12}" if full else "")]
    for label, key, fmt in rows:
        if low.get(key) is None:
            continue
        line = f"{label:<22}{fmt.format(low[key]):>14}"
        if full:
            ratio = f"{low[key] / full[key]:.3f}" if full.get(key) else "-"
            line += f"{fmt.format(full[key]):>14}{ratio:>12}"
        lines.append(line)
    comparison = results.get("comparison", {})
    if "step_speedup" in comparison:
        lines.append(
            f"speed, low-rank over full rank: wall clock {comparison['tokens_per_second_ratio']:.2f}x, interleaved "
            f"steps on one batch {comparison['step_speedup']:.2f}x (median of {comparison['speed_steps']}), "
            f"FLOPs {comparison['flop_speedup']:.2f}x"
        )
        warning = speed_warning(comparison)
        if warning:
            lines.append(f"warning: {warning}")
    if plain:
        lines.append(low.get("summary", "no low-rank layers"))
    else:
        lines.append(f"decisions share of train time: {low['decision_seconds'] / max(low['train_seconds'], 1e-9):.2%}")
        lines.append(f"final ranks ({low['strategy']}): {rank_summary(low['ranks'], low.get('rank_pattern', {}), low.get('full_ranks'))}")
    out = results.get("options", {}).get("output_dir")
    if out:
        final = low.get("final_model", Path(out) / "final")
        if not plain:
            lines.append(f"per layer: hf-lowrank inspect {final}   plots: hf-lowrank report {out}")
        lines.append(f"results: {Path(out) / RESULTS_NAME}   model: {final}")
    return "\n".join(lines)


def hardware() -> dict[str, Any]:
    """What the run ran on, for the results file and the config headers."""
    info = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
