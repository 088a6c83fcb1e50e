"""The benchmark driver end to end on a tiny GPT-2 and the synthetic corpus, and its FLOP count."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not part of the installed package

from benchmarks import run as bench  # noqa: E402
from benchmarks.config import ROW_NAMES, SCALES, get_row  # noqa: E402
from benchmarks.flops import average_flops, layer_flops  # noqa: E402
from hf_lowrank.files import read_json  # noqa: E402
from hf_lowrank.report import COLUMNS  # noqa: E402

TINY = {
    "dataset": "synthetic", "n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16, "vocab_size": 300,
    "max_eval_tokens": 256, "max_steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_steps": 3, "logging_steps": 1,
    "skip_steps": 1,
}


def test_driver_runs_rows_and_writes_every_column(tmp_path, monkeypatch, capsys):
    real_find_spec = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None if name == "galore_torch" else real_find_spec(name))
    report = bench.run_benchmark("cpu", tmp_path, ["full", "inrank", "fixed", "galore"], TINY, isolate=False, command="test")
    printed = capsys.readouterr().out
    assert "[2/4] InRank: ppl" in printed and "tok/s" in printed and "GaLore (Llama): skipped" in printed
    text = report.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| row"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    for label in ("full rank", "InRank", "fixed rank (control)"):
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS) and "-" not in cells[:-1], line  # only "rank decisions" may be empty
    assert "not run: galore-torch is not installed" in text
    for name in ("eval_loss.png", "ranks.png", "final_ranks.png"):
        assert (tmp_path / name).stat().st_size > 1000

    inrank = read_json(tmp_path / "rows" / "inrank" / "metrics.json")
    history = read_json(tmp_path / "rows" / "inrank" / "log_history.json")
    pattern = read_json(tmp_path / "rows" / "inrank" / "rank_pattern.json")
    assert [e["step"] for e in history if "eval_loss" in e] == [3, 6]
    assert all("layers" in e and "train_seconds" in e for e in history)
    assert set(pattern) == set(history[-1]["layers"]) and all(p["mode"] == "factorized" for p in pattern.values())
    assert inrank["tokens_per_second"] > 0 and inrank["steady_steps"] == 5 and 0 <= inrank["decision_share"] < 1
    assert inrank["flops_per_token_final"] < inrank["flops_per_token_dense"]
    fixed = read_json(tmp_path / "rows" / "fixed" / "metrics.json")
    fraction = sum(p["rank"] for p in pattern.values()) / sum(p["full_rank"] for p in pattern.values())
    assert fixed["lowrank_config"]["rank"] == pytest.approx(fraction, abs=1e-3), "fixed takes InRank's final rank"
    assert fixed["lowrank_config"]["init"] == "kaiming", "the control is the naive one"


@pytest.mark.slow
def test_one_row_in_its_own_process(tmp_path):
    args = [f"--set={k}={v}" for k, v in TINY.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--out", str(tmp_path), "--rows", "full", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[1/1] full rank: ppl" in proc.stdout
    assert read_json(tmp_path / "rows" / "full" / "metrics.json")["memory_kind"].startswith("process peak RSS")
    assert (tmp_path / "report.md").is_file()


def test_rows_and_scales_are_consistent():
    assert ROW_NAMES.index("inrank") < min(ROW_NAMES.index(n) for n in ("fixed", "spectral", "warm_start", "dynamic"))
    assert SCALES["gpu"].bf16 and SCALES["gpu"].device == "cuda" and SCALES["cpu"].threads == 2
    with pytest.raises(ValueError, match="run the inrank row first"):
        get_row("fixed")
    assert get_row("warm_start", 0.2).lowrank["rank"] == 0.2
    with pytest.raises(ValueError, match="unknown scale setting"):
        SCALES["cpu"].replace(bogus=1)
    with pytest.raises(ValueError, match="targets='ffn'; choose one of"):
        SCALES["cpu"].replace(targets="ffn")
    # every GPT-2 row factorizes the same layers, dense included (so its wrapper is the same)
    for targets, modules in [("attention", ["attn.c_attn", "attn.c_proj"]), ("mlp", ["mlp.c_fc", "mlp.c_proj"])]:
        scale = SCALES["cpu"].replace(targets=targets)
        for name in ("full", "inrank", "cuttlefish"):
            assert get_row(name, scale=scale).lowrank["target_modules"] == modules
    spectral, naive = get_row("spectral", 0.2).lowrank, get_row("fixed", 0.2).lowrank
    assert spectral["init"] == "spectral" and naive["init"] == "kaiming" and "factor_lr_scale" not in naive
    assert get_row("galore").lowrank is None


def test_flop_count():
    assert layer_flops("dense", 0, 64, 256) == 6 * 64 * 256
    assert layer_flops("factorized", 8, 64, 256) == 6 * 8 * 320
    assert layer_flops("residual", 8, 64, 256) == 4 * 64 * 256 + 6 * 8 * 320
    dense = {"a": ["dense", 64, 64, 256]}
    low = {"a": ["factorized", 8, 64, 256]}
    changes = [{"step": 0, "layout": dense}, {"step": 5, "layout": low}]
    # steps 2..4 dense (3 steps), 5..9 factorized (5 steps)
    expected = (3 * (100 + 6 * 64 * 256) + 5 * (100 + 6 * 8 * 320)) / 8
    assert average_flops(changes, 100.0, 2, 10) == pytest.approx(expected)
