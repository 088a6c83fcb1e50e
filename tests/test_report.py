"""write_report on a small synthetic benchmark directory: the table, the targets and the PNG plots."""

import json

import pytest

from hf_lowrank.cli import main
from hf_lowrank.report import COLUMNS, write_report

MLP = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


def _row(folder, name, label, order, ppl, tps, trainable, layers_by_step, reference="full", decision=0.0, flops=None):
    """Write the three JSON files a benchmark row leaves: metrics, log history, final rank pattern."""
    import math

    d = folder / "rows" / name
    d.mkdir(parents=True)
    history = []
    for i, (step, layers) in enumerate(layers_by_step):
        entry = {"step": step, "wall_seconds": 2.0 * step, "train_seconds": 1.5 * step, "layers": layers}
        if step and i % 2 == 0:
            entry["eval_loss"] = math.log(ppl) + 1.0 / step
        elif step:
            entry["loss"] = math.log(ppl) + 1.2 / step
        history.append(entry)
    final = layers_by_step[-1][1]
    (d / "log_history.json").write_text(json.dumps(history))
    (d / "rank_pattern.json").write_text(
        json.dumps({n: {"mode": m, "rank": r, "full_rank": 64, "in_features": 64, "out_features": 256} for n, (m, r) in final.items()})
    )
    metrics = {
        "name": name, "label": label, "reference": reference, "family": "gpt2", "order": order, "note": "",
        "changes_rank": len({json.dumps(x) for _, x in layers_by_step}) > 1, "eval_loss": math.log(ppl), "perplexity": ppl,
        "tokens_per_second": tps, "train_seconds": 100.0, "steady_seconds": 95.0, "decision_seconds": decision,
        "decision_share": decision / 100.0, "trainable_params": trainable, "total_params": trainable,
        "peak_memory_bytes": 600 * 2**20, "memory_kind": "process peak RSS during training",
        "flops_per_token_run": flops or 1e6, "flops_per_token_final": flops or 1e6, "flops_per_token_dense": 1e6,
        "plans": [{"step": 4, "reason": "stage 2", "lr_factor": 1.0, "layers_changed": 4}] if decision else [],
        "lowrank_config": {"strategy": name},
    }
    (d / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def bench_dir(tmp_path):
    dense = {n: ["dense", 64] for n in MLP}
    low = lambda r: {n: ["factorized", r] for n in MLP}  # noqa: E731
    _row(tmp_path, "full", "full rank", 0, 100.0, 1000.0, 4000, [(0, dense), (2, dense), (4, dense), (6, dense), (8, dense)])
    _row(tmp_path, "inrank", "InRank", 1, 101.0, 1400.0, 2000, [(0, low(6)), (2, low(10)), (4, low(8)), (6, low(8)), (8, low(8))],
         decision=1.0, flops=6e5)
    _row(tmp_path, "fixed", "fixed rank (control)", 2, 105.0, 1450.0, 2000, [(0, low(8)), (4, low(8)), (8, low(8))], flops=6e5)
    skipped = tmp_path / "rows" / "galore"
    skipped.mkdir()
    (skipped / "metrics.json").write_text(
        json.dumps({"name": "galore", "label": "GaLore (Llama)", "reference": "llama_full", "order": 3, "skipped": "galore-torch is not installed"})
    )
    (tmp_path / "benchmark.json").write_text(json.dumps({"scale": "cpu", "command": "python -m benchmarks.run", "date": "today"}))
    return tmp_path


def test_write_report_table_targets_and_plots(bench_dir):
    report = write_report(bench_dir)
    text = report.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| row"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    inrank = next(line for line in text.splitlines() if line.startswith("| InRank"))
    cells = [c.strip() for c in inrank.strip("|").split("|")]
    assert cells[2] == "1.010" and cells[4] == "1.40x" and cells[5] == "1.67x" and cells[10] == "0.50"
    assert cells[12] == "8 of 64" and cells[13] == "1.00%"  # final ranks of the low-rank layers, rank decisions
    assert "not run: galore-torch is not installed" in text
    assert "**met**: InRank perplexity within 2% of full rank" in text
    assert "**met**: InRank tokens/s >= 1.3x full rank" in text
    assert "**met**: InRank better than the fixed-rank control" in text
    assert "**missed**: InRank: measured speedup 1.40x is 84% of" not in text
    for name in ("eval_loss.png", "ranks.png", "final_ranks.png"):
        png = bench_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in text


def test_report_is_idempotent_and_reachable_from_the_cli(bench_dir, capsys):
    first = write_report(bench_dir).read_text()
    assert main(["report", str(bench_dir)]) == 0
    assert capsys.readouterr().out.strip() == first.strip()


def test_report_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither rows/"):
        write_report(tmp_path)
    (tmp_path / "rows").mkdir()
    with pytest.raises(FileNotFoundError, match="no rows/<name>/metrics.json"):
        write_report(tmp_path)
