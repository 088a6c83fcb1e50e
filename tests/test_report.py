"""write_report on small synthetic benchmark and training-run directories: the table, the targets and the PNG plots."""

import json

import pytest

from hf_lowrank.cli import main
from hf_lowrank.plots import plot_ranks
from hf_lowrank.report import COLUMNS, run_rows, write_report
from hf_lowrank.results import speed_warning

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
        "lowrank_config": {"strategy": name}, "learning_rate": 2e-3, "scale": {"targets": "mlp"}, "max_steps": 8,
        "train_flops": 8 * 512 * (flops or 1e6),
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
    assert cells[11] == "0.16"  # 8 * (64 + 256) of 64 * 256 weights in each low-rank layer
    assert cells[12] == "-", "rows measured before memory was counted from the tensors say so"
    assert cells[14] == "8 of 64" and cells[15] == "1.00%"  # final ranks of the low-rank layers, rank decisions
    assert "not run: galore-torch is not installed" in text
    assert "**met**: InRank within 2% of full rank's perplexity at <= 0.5x the low-rank layers' parameters: 1.010x (101.0) at 0.16x" in text
    assert "**met**: best low-rank row (InRank) within 2% of full rank at <= 0.5x" in text
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


def _run_results(strategy="inrank", ranks_by_step=((1, 9), (2, 10), (4, 6))):
    """A results.json as hf-lowrank train writes it, with the Trainer's log history of a 4-step run."""
    layers = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]

    def history(ranks):
        out = []
        for step, rank in ranks:
            out.append({"step": step, "loss": 5.0 - 0.1 * step, **{f"lowrank/rank/{n}": rank for n in layers}})
            if step % 2 == 0:
                out.append({"step": step, "eval_loss": 5.1 - 0.1 * step, "eval_runtime": 0.1})
        return out

    def run(strategy, mode, ranks):
        final = ranks[-1][1]
        return {
            "strategy": strategy, "mode": mode, "eval_loss": 4.7, "perplexity": 110.0, "trainable_params": 1000,
            "total_params": 1000, "rank_fraction": final / 32, "tokens_per_second": 300.0, "train_seconds": 1.0,
            "decision_seconds": 0.01, "ranks": {n: final for n in layers}, "full_ranks": {n: 32 for n in layers},
            "rank_pattern": {n: {"mode": mode, "rank": final, "capacity": final} for n in layers},
            "plan_history": [
                {"step": 3, "reason": "InRank stage 2", "changes": [{"layer": n, "op": "truncate", "rank": 6} for n in layers]}
            ] if strategy == "inrank" else [],
            "log_history": history(ranks), "final_model": "runs/x/final",
        }

    return {
        "lowrank": run(strategy, "factorized", list(ranks_by_step)),
        "full_rank": run("fixed", "dense", [(s, 32) for s, _ in ranks_by_step]),
        "comparison": {"tokens_per_second_ratio": 2.67, "step_speedup": 1.06, "flop_speedup": 1.1, "speed_steps": 10},
        "options": {"output_dir": "runs/x"},
    }


def test_training_run_report_has_loss_and_rank_plots(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_run_results()))
    text = write_report(tmp_path).read_text()
    for name in ("loss.png", "ranks.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in text
    assert "final ranks (inrank): 6 of 32 over 2 layers, factorized" in text
    assert "wall clock 2.67x, interleaved steps on one batch 1.06x (median of 10), FLOPs 1.10x" in text
    assert "warning: the wall-clock speed ratio 2.67x and the interleaved one 1.06x disagree" in text


def test_rank_rows_follow_the_log_history():
    rows = run_rows(_run_results())
    low = rows[0]
    assert [r["name"] for r in rows] == ["lowrank", "full_rank"] and low["changes_rank"]
    # logged at steps 1, 2 and 4; the stage-2 plan at step 3 says when the ranks fell
    # (results without initial_pattern start at step 0 from the first logged ranks, no plan having come before)
    steps = [(e["step"], e["layers"]["transformer.h.0.attn.c_attn"][1]) for e in low["history"] if e.get("layers")]
    assert steps == [(0, 9), (1, 9), (2, 10), (3, 6), (4, 6)]
    assert low["pattern"]["transformer.h.0.attn.c_proj"]["full_rank"] == 32


def _phased_run(strategy, initial_mode, plans):
    """results.json of a 40-step run of 4 layers logging every 10 steps, from ``initial_mode`` through ``plans``."""
    results = _run_results(strategy, ranks_by_step=((10, 32), (20, 8), (30, 8), (40, 8)))
    low = results["lowrank"]
    layers = [f"transformer.h.{b}.mlp.{k}" for b in (0, 1) for k in ("c_fc", "c_proj")]
    low["full_ranks"] = {n: 32 for n in layers}
    low["ranks"] = {n: 8 for n in layers}
    low["initial_pattern"] = {n: {"mode": initial_mode, "rank": None if initial_mode == "dense" else 8, "capacity": None if initial_mode == "dense" else 8, "scaling": 1.0} for n in layers}
    low["plan_history"] = [{"step": step, "reason": "r", "changes": [{"layer": n, "op": op, "rank": rank} for n in layers]} for step, op, rank in plans]
    low["log_history"] = [{"step": s, "loss": 5.0 - 0.01 * s} for s in (10, 20, 30, 40)]  # losses only: ranks come from the plans
    return results


def test_rank_plot_starts_at_step_0_groups_identical_layers_and_names_each_phase(tmp_path):
    from hf_lowrank.plots import _group_label, _group_layers, _phases

    warm = run_rows(_phased_run("warm_start", "dense", [(15, "to_factorized", 8)]))[0]
    entries = [e for e in warm["history"] if e.get("layers")]
    assert entries[0]["step"] == 0 and set(map(tuple, entries[0]["layers"].values())) == {("dense", 32)}, "the dense phase shows from step 0"
    assert [(a, b, m) for a, b, m in _phases(entries, 40)] == [(0, 15, "dense"), (15, 40, "factorized")]
    layers = list(entries[0]["layers"])
    groups = _group_layers(entries, layers)
    assert groups == [layers] and _group_label(groups[0], layers) == "all 4 layers"

    dynamic = run_rows(_phased_run("dynamic", "factorized", [(10, "to_dense", None), (25, "to_residual", 8)]))[0]
    entries = [e for e in dynamic["history"] if e.get("layers")]
    assert [(a, b, m) for a, b, m in _phases(entries, 40)] == [(0, 10, "factorized"), (10, 25, "dense"), (25, 40, "residual")]
    assert dynamic["label"] == "low-rank (dynamic)", "the title no longer calls every phase factorized"
    for name, row in (("warm", warm), ("dynamic", dynamic)):
        assert plot_ranks([row], tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    mixed = _group_layers(
        [{"step": 0, "layers": {"a.c_fc": ["factorized", 4], "b.c_fc": ["factorized", 4], "a.c_proj": ["factorized", 5]}}],
        ["a.c_fc", "b.c_fc", "a.c_proj"],
    )
    assert mixed == [["a.c_fc", "b.c_fc"], ["a.c_proj"]]
    assert _group_label(mixed[0], ["a.c_fc", "b.c_fc", "a.c_proj"]) == "2 layers: c_fc x2"


def test_report_of_a_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no/such/run: no such folder"):
        write_report(tmp_path / "no" / "such" / "run")


def test_speed_warning_only_when_the_ratios_disagree():
    assert speed_warning({"tokens_per_second_ratio": 1.1, "step_speedup": 1.05}) is None
    assert "disagree" in speed_warning({"tokens_per_second_ratio": 0.5, "step_speedup": 1.05})
    assert speed_warning({"tokens_per_second_ratio": 1.1}) is None


def test_ablation_table_lists_every_row_of_every_run_against_one_reference(bench_dir, tmp_path):
    from benchmarks.report import ABLATION_COLUMNS, ablation_table

    meta = json.loads((bench_dir / "benchmark.json").read_text())
    (bench_dir / "benchmark.json").write_text(json.dumps({**meta, "ablation": {"init_scale": 0.5}}))
    lines = ablation_table([bench_dir], bench_dir).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(ABLATION_COLUMNS)
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == {"full rank", "InRank", "fixed rank (control)"}, "every finished row, losers too; skipped rows have no result"
    assert rows["InRank"][3] == "init_scale=0.5" and rows["full rank"][3] == "-", "the dense comparison never takes an ablation"
    assert rows["fixed rank (control)"][6] == "1.050" and rows["InRank"][7] == "0.16"
    other = tmp_path / "without_full"
    (other / "rows").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no rows/full/metrics.json"):
        ablation_table([bench_dir], other)


def test_merge_runs_one_table_from_parts_run_apart(tmp_path):
    from benchmarks.run import merge_runs

    dense = {n: ["dense", 64] for n in MLP}
    low = {n: ["factorized", 8] for n in MLP}
    meta = {"scale": "cpu-long", "settings": {"max_steps": 8}, "command": "part", "runtime": "1.0 min"}
    a, b = tmp_path / "a", tmp_path / "b"
    _row(a, "full", "full rank", 0, 100.0, 1000.0, 4000, [(0, dense), (2, dense), (4, dense)])
    _row(b, "inrank", "InRank", 0, 101.0, 1400.0, 2000, [(0, low), (2, low), (4, low)], decision=1.0)
    for part in (a, b):
        (part / "benchmark.json").write_text(json.dumps(meta))
    text = merge_runs(tmp_path / "merged", [a, b]).read_text()
    assert "| InRank | 101.0 | 1.010 |" in text, "ratios are taken against the other part's full-rank row"
    assert "1.0 min + 1.0 min (parts)" in text
    with pytest.raises(ValueError, match="give a new directory"):
        merge_runs(tmp_path / "merged", [a, b])
    with pytest.raises(ValueError, match="row 'full' is in both"):
        merge_runs(tmp_path / "again", [a, a])
    (b / "benchmark.json").write_text(json.dumps({**meta, "settings": {"max_steps": 9}}))
    with pytest.raises(ValueError, match="the parts differ in settings"):
        merge_runs(tmp_path / "again", [a, b])
    assert not (tmp_path / "again").exists(), "a refused merge writes nothing"
