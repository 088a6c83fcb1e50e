"""The benchmark: rows through the recipe, scales, rows from the registry, time to quality, FLOPs, sweep."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not part of the installed package

from benchmarks import run as bench  # noqa: E402
from benchmarks.config import (  # noqa: E402
    PEERS,
    PLACEMENTS,
    SCALES,
    default_rows,
    get_row,
    parse_rates,
    parse_settings,
    row_names,
)
from benchmarks.flops import average_flops, layer_flops, layout, total_flops  # noqa: E402
from benchmarks.report import QUALITY_COLUMNS  # noqa: E402
from hf_lowrank import recipe  # noqa: E402
from hf_lowrank.files import read_json  # noqa: E402
from hf_lowrank.report import COLUMNS  # noqa: E402
from hf_lowrank.strategies import REGISTRY, RankStrategy  # noqa: E402

TINY = {
    "dataset": "synthetic", "n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16, "vocab_size": 300,
    "max_eval_tokens": 256, "max_steps": 6, "per_device_train_batch_size": 4, "warmup_steps": 1, "eval_steps": 3,
    "logging_steps": 1, "skip_steps": 1, "threads": 1,
}


def _cells(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_rows_train_through_the_recipe(tmp_path, monkeypatch, capsys):
    built, arguments = [], []
    real_build, real_args = recipe.build_model, recipe.training_arguments
    monkeypatch.setattr(recipe, "build_model", lambda opts, *a, **k: built.append(opts) or real_build(opts, *a, **k))
    monkeypatch.setattr(recipe, "training_arguments", lambda opts, d: arguments.append(opts) or real_args(opts, d))
    report = bench.run_benchmark("cpu", tmp_path, ["full", "inrank", "fixed"], TINY, isolate=False, command="test")

    # one model builder and one set of TrainingArguments: the recipe's, for every row
    trained = [o for o in built if o.lowrank == {}]  # the pre-flight check builds with each row's lowrank settings
    assert len(trained) == 3 and len(arguments) == 6  # each row's check builds its TrainingArguments before any data too
    assert {o.learning_rate for o in arguments} == {SCALES["cpu"].recipe["learning_rate"]}
    assert all(o.per_device_train_batch_size == 4 and o.max_steps == 6 and o.use_cpu for o in arguments)
    printed = capsys.readouterr().out
    assert "[2/3] InRank-Efficient (lr 0.002): ppl" in printed and "tok/s" in printed and "data ready" in printed
    from hf_lowrank import __version__

    assert read_json(tmp_path / "benchmark.json")["code"].startswith(__version__), "which code ran (its defaults) is recorded"

    text = report.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| row"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    for label in ("full rank", "InRank-Efficient", "fixed rank (control)"):
        cells = _cells(text, label)
        assert len(cells) == len(COLUMNS) and "-" not in cells[:-1], cells  # only "rank decisions" may be empty

    inrank = read_json(tmp_path / "rows" / "inrank" / "metrics.json")
    history = read_json(tmp_path / "rows" / "inrank" / "log_history.json")
    pattern = read_json(tmp_path / "rows" / "inrank" / "rank_pattern.json")
    assert [e["step"] for e in history if "eval_loss" in e] == [3, 6]
    assert all("layers" in e and "train_seconds" in e for e in history)
    assert set(pattern) == set(history[-1]["layers"]) and all(p["mode"] == "factorized" for p in pattern.values())
    assert all(name.endswith(tuple(PLACEMENTS["gpt2"]["blocks"])) for name in pattern), "blocks is the default placement"
    assert inrank["tokens_per_second"] > 0 and inrank["steady_steps"] == 5 and 0 <= inrank["decision_share"] < 1
    assert inrank["flops_per_token_final"] < inrank["flops_per_token_dense"]
    assert 0 < inrank["train_flops"] < read_json(tmp_path / "rows" / "full" / "metrics.json")["train_flops"]
    assert inrank["strategy_state"]["ranks"], "the strategy's own state_dict is recorded"
    fixed = read_json(tmp_path / "rows" / "fixed" / "metrics.json")
    fraction = sum(p["rank"] for p in pattern.values()) / sum(p["full_rank"] for p in pattern.values())
    assert fixed["lowrank_config"]["rank"] == pytest.approx(fraction, abs=1e-3), "fixed takes InRank's final rank"
    assert fixed["lowrank_config"]["init"] == "kaiming", "the control is the naive one"

    # time to quality: full rank reaches its own final perplexity by its last evaluation at the latest
    full = read_json(tmp_path / "rows" / "full" / "metrics.json")
    assert full["time_to_quality"]["target_perplexity"] == full["perplexity"] and full["time_to_quality"]["step"] in (3, 6)
    assert inrank["time_to_quality"]["target_perplexity"] == full["perplexity"]
    quality = text[text.index("## Time to quality"):]
    header = next(line for line in quality.splitlines() if line.startswith("| row"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(QUALITY_COLUMNS)
    assert _cells(quality, "full rank")[3].endswith("of 6") and _cells(quality, "full rank")[-1] == "1.00"
    assert "at step 3 to" in quality and "over the last quarter of the run" in quality


def test_any_corpus_through_dataset_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = ["river", "stone", "light", "winter", "garden", "letter", "market", "signal"]
    corpus.write_text("\n".join(f"the {a} and the {b} were {c} ." for a in words for b in words for c in words))
    settings = {**TINY, "dataset": "text", "data_files": [str(corpus)]}
    bench.run_benchmark("cpu", tmp_path / "bench", ["full"], settings, isolate=False, command="test")
    metrics = read_json(tmp_path / "bench" / "rows" / "full" / "metrics.json")
    assert metrics["recipe_options"]["dataset"] == "text" and metrics["recipe_options"]["data_files"] == [str(corpus)]
    assert metrics["perplexity"] < 300  # learned something of a 300-token vocabulary


def test_time_to_quality_is_the_first_evaluation_at_the_target():
    metrics = {"flop_layouts": [{"step": 0, "layout": {"a": ["dense", 8, 8, 8]}}], "other_flops_per_token": 0.0, "tokens_per_step": 10}
    history = [
        {"step": 2, "eval_loss": 3.0, "train_seconds": 1.0},
        {"step": 3, "loss": 0.1, "train_seconds": 1.5},  # a training loss is not an evaluation
        {"step": 4, "eval_loss": 2.0, "train_seconds": 2.0},
        {"step": 6, "eval_loss": 1.0, "train_seconds": 3.0},
    ]
    hit = bench.time_to_quality(metrics, history, target=7.5)  # exp(2.0) = 7.39 is the first <= 7.5
    assert (hit["step"], hit["train_seconds"]) == (4, 2.0)
    assert hit["flops"] == pytest.approx(4 * 10 * 6 * 64)
    never = bench.time_to_quality(metrics, history, target=2.0)
    assert never["step"] is None and never["train_seconds"] is None and never["flops"] is None


@pytest.mark.slow
def test_lr_sweep_reports_each_row_at_its_best_rate_and_keeps_every_point(tmp_path):
    rates = parse_rates("1e-3,8e-3")
    report = bench.run_benchmark("cpu", tmp_path, ["full", "inrank"], TINY, isolate=False, command="test", rates=rates)
    for name in ("full", "inrank"):
        points = {rate: read_json(tmp_path / "sweep" / name / f"lr-{rate:g}" / "metrics.json") for rate in rates}
        best = min(points.values(), key=lambda m: m["perplexity"])
        kept = read_json(tmp_path / "rows" / name / "metrics.json")
        assert kept["learning_rate"] == best["learning_rate"] and kept["perplexity"] == best["perplexity"]
        assert [p["learning_rate"] for p in kept["sweep"]] == rates
        assert {p["learning_rate"]: p["perplexity"] for p in kept["sweep"]} == {r: m["perplexity"] for r, m in points.items()}
    text = report.read_text()
    sweep = text[text.index("## Learning-rate sweep"):]
    assert sum(line.startswith("| ") for line in sweep.splitlines()) == 1 + 2 * len(rates)  # header + every point
    assert sweep.count("| best |") == 2
    for bad in ("1e-3,x", "1e-3,1e-3", "0,1e-3"):
        with pytest.raises(ValueError, match="--lr-sweep"):
            parse_rates(bad)


def test_rows_come_from_the_registry():
    names = row_names()
    assert set(REGISTRY) <= set(names)
    assert names.index("inrank") < min(names.index(n) for n in ("fixed", "spectral", "warm_start", "dynamic"))

    class Probe(RankStrategy):
        name = "probe_for_benchmark_test"

    try:
        assert "probe_for_benchmark_test" in row_names(), "a newly registered strategy gets a row"
        row = get_row("probe_for_benchmark_test", SCALES["cpu"])
        assert row.lowrank["strategy"] == "probe_for_benchmark_test"
    finally:
        REGISTRY.pop("probe_for_benchmark_test")


def test_rows_and_placements():
    scale = SCALES["cpu-long"]
    with pytest.raises(ValueError, match="run the inrank row first"):
        get_row("fixed", scale)
    assert get_row("warm_start", scale, 0.2).lowrank["rank"] == 0.2
    assert get_row("dynamic", scale, 0.2).lowrank["strategy_args"]["rank"] == 0.2
    spectral, naive = get_row("spectral", scale, 0.2).lowrank, get_row("fixed", scale, 0.2).lowrank
    assert spectral["init"] == "spectral" and naive["init"] == "kaiming" and "factor_lr_scale" not in naive
    # the paper's InRank: residual over a frozen orthogonal W0; what is not a frozen W0 trains
    original = get_row("inrank_residual", scale.replace(targets="mlp")).lowrank
    assert original["mode"] == "residual" and original["residual_base"] == "orthogonal"
    assert {"wte", "wpe", "ln_f", "attn.c_attn", "attn.c_proj"} <= set(original["modules_to_save"])
    assert not set(original["modules_to_save"]) & set(original["target_modules"])
    assert get_row("inrank", scale).lowrank["mode"] == "factorized" and "init" not in get_row("inrank", scale).lowrank
    # every row wraps the same layers, full rank included
    for targets in ("mlp", "blocks"):
        placed = scale.replace(targets=targets)
        for name in ("full", "inrank", "cuttlefish", "full_compiled"):
            assert get_row(name, placed, 0.2).lowrank["target_modules"] == PLACEMENTS["gpt2"][targets]
    assert get_row("full_compiled", scale).compiled and not get_row("full", scale).compiled


def test_ablation_overrides_every_low_rank_row_and_never_the_dense_one():
    scale = SCALES["cpu-long"]
    ablation = parse_settings(["init_scale=0.5", "strategy_args.threshold=0.95"], "--lowrank")
    assert ablation == {"init_scale": 0.5, "strategy_args.threshold": 0.95}
    inrank = get_row("inrank", scale, ablation=ablation).lowrank
    assert inrank["init_scale"] == 0.5 and inrank["strategy_args"] == {"threshold": 0.95}
    dynamic = get_row("dynamic", scale, 0.2, ablation).lowrank
    assert dynamic["strategy_args"] == {"rank": 0.2, "threshold": 0.95}, "a dotted key adds to the row's own dict"
    assert "init_scale" not in get_row("full", scale, ablation=ablation).lowrank, "the comparison stays as it is"
    with pytest.raises(ValueError, match="--lowrank strategy.x"):
        get_row("inrank", scale, ablation={"strategy.x": 1})
    with pytest.raises(ValueError, match="--lowrank='init_scale'.*--lowrank init_scale=0.5"):
        parse_settings(["init_scale"], "--lowrank")


def test_scales_are_recipe_overrides_and_bad_settings_fail_early():
    assert set(SCALES) == {"cpu", "cpu-long", "cpu-wide", "gpu"}
    assert all(s.targets == "blocks" for s in SCALES.values())
    gpu = SCALES["gpu"].options()
    assert gpu.bf16 and not gpu.use_cpu and (gpu.n_layer, gpu.n_embd, gpu.block_size) == (12, 768, 1024)
    scale = SCALES["cpu"].replace(max_steps=50, targets="mlp", threads=1)
    assert scale.recipe["max_steps"] == 50 and scale.targets == "mlp" and scale.threads == 1
    assert scale.options().max_steps == 50 and SCALES["cpu"].recipe["max_steps"] == 300
    for changes, match in [
        ({"bogus": 1}, "--set bogus=1"),
        ({"targets": "ffn"}, "targets='ffn'"),
        ({"lowrank": {}}, "each row sets its own"),
        ({"use_cpu": True}, "set device=cpu"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0"),
        ({"skip_steps": 300}, "skip_steps=300"),
        ({"device": "tpu"}, "device='tpu'"),
    ]:
        with pytest.raises(ValueError, match=match):
            SCALES["cpu"].replace(**changes)
    assert parse_settings(["max_steps=50", "dataset=text", "data_files=[\"a.txt\"]"]) == {
        "max_steps": 50, "dataset": "text", "data_files": ["a.txt"],
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_settings(["max_steps"])


def test_setup_errors_come_before_any_data(tmp_path):
    with pytest.raises(bench.SetupError, match="row 'fixed' takes InRank's final rank: add inrank"):
        bench.run_benchmark("cpu", tmp_path, ["fixed"], TINY, isolate=False)
    with pytest.raises(bench.SetupError, match="--rows='full,nope' is not allowed; choose from full,inrank"):
        bench.run_benchmark("cpu", tmp_path, ["full", "nope"], TINY, isolate=False)
    with pytest.raises(bench.SetupError, match="stage2_at=0.25 is not allowed"):  # a row's schedule against the run
        bench.run_benchmark("cpu", tmp_path, ["inrank"], {**TINY, "max_steps": 2, "skip_steps": 0}, isolate=False)
    if not torch.cuda.is_available():
        with pytest.raises(bench.SetupError, match="device='cuda' is not allowed; torch .* sees no GPU"):
            bench.run_benchmark("gpu", tmp_path, ["full"], isolate=False)
    assert not any(tmp_path.iterdir()), "nothing is written before the checks pass"


@pytest.mark.parametrize("name", ["cpu-long", "cpu-wide"])
def test_cpu_long_model_is_mostly_block_linears_and_runs_thousands_of_steps(name):
    opts = SCALES[name].options()
    model = recipe.build_model(opts, None)
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(tuple(PLACEMENTS["gpt2"]["blocks"])))
    assert blocks / total > 0.85
    assert opts.max_steps >= 3000 and opts.eval_steps and opts.max_steps // opts.eval_steps >= 10
    if name == "cpu-wide":  # cpu-long's data, length and batch, twice the width
        long = SCALES["cpu-long"].options()
        assert (opts.n_embd, opts.block_size, opts.per_device_train_batch_size, opts.max_steps) == (2 * long.n_embd, long.block_size, long.per_device_train_batch_size, long.max_steps)


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
    assert total_flops(changes, 100.0, 10, 32) == pytest.approx(32 * (5 * (100 + 6 * 64 * 256) + 5 * (100 + 6 * 8 * 320)))


def test_layout_comes_from_the_models_layer_report():
    from conftest import build

    from hf_lowrank import LowRankConfig, get_lowrank_model

    model = get_lowrank_model(build("gpt2"), LowRankConfig(target_modules=["mlp.c_fc", "mlp.c_proj"], rank=4))
    first = next(iter(model.lowrank_layers()))
    model.lowrank_layers()[first].to_dense()
    lay = layout(model)
    assert {n: v[:2] for n, v in lay.items()} == {r["layer"]: [r["mode"], r["rank"]] for r in model.layer_report()}
    assert lay[first][:2] == ["dense", 32] and lay["transformer.h.0.mlp.c_proj"] == ["factorized", 4, 128, 32]


@pytest.mark.slow
def test_compiled_row_trains_under_torch_compile(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["frames"]["ok"]
    bench.run_benchmark("cpu", tmp_path, ["full_compiled"], {**TINY, "compile_backend": "eager"}, isolate=False, command="test")
    assert torch._dynamo.utils.counters["frames"]["ok"] > before, "the row's model ran through dynamo"
    metrics = read_json(tmp_path / "rows" / "full_compiled" / "metrics.json")
    assert metrics["compiled"] and metrics["max_steps"] == 2  # a third of the steps
    torch._dynamo.reset()


@pytest.mark.slow
def test_one_row_in_its_own_process(tmp_path):
    args = [f"--set={k}={v}" for k, v in TINY.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--out", str(tmp_path), "--rows", "full", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[1/1] full rank (lr 0.002): ppl" in proc.stdout
    assert read_json(tmp_path / "rows" / "full" / "metrics.json")["memory_kind"].startswith("process peak RSS")
    assert (tmp_path / "report.md").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--out", str(tmp_path), "--rows", "full,nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode != 0 and "--rows='full,nope' is not allowed" in bad.stderr


def test_speed_by_width_prints_one_row_per_width(capsys):
    from benchmarks.speed_widths import main as speed_widths

    speed_widths(["--widths", "32,64", "--layers", "1", "--steps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["32", "64"]
    assert all(r.split("|")[3].strip() == "0.50" for r in rows), "rank 0.375 stores half the block weights"
    with pytest.raises(SystemExit, match="--rank=2.0"):
        speed_widths(["--rank", "2"])


def test_speed_of_rows_times_whole_training_steps_side_by_side(capsys, monkeypatch):
    from benchmarks import speed_rows

    calls = {"update_ranks": 0}
    real = speed_rows.train_step

    def counting(r, batch):
        calls["update_ranks"] += r["lowrank"]
        real(r, batch)

    monkeypatch.setattr(speed_rows, "train_step", counting)
    tiny = [f"--set={k}={v}" for k, v in TINY.items()]
    speed_rows.main(["--scale", "cpu", *tiny, "--rows", "full,warm_start,spectral", "--inrank-rank", "0.5", "--rounds", "3", "--warmup", "1"])
    lines = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(lines) >= {"full rank", "warm start (Kamalakara)", "fixed rank, spectral init (Kamalakara)"}
    from hf_lowrank.strategies.warm_start import WarmStartArgs

    phase = f"factorized 16 (after {WarmStartArgs().dense_steps:.0%} dense)"
    assert phase in lines["warm start (Kamalakara)"], "timed after its switch, the dense phase folded in"
    assert lines["full rank"].split("|")[5].strip() == "1.00x"
    assert calls["update_ranks"] == 3 * 4, "every row steps through update_ranks, as in training (full rank is the dense mode)"
    for argv, match in ((["--rows", "full"], "two or more distinct rows"), (["--rows", "full,inrank"], "its ranks come from the run")):
        with pytest.raises(SystemExit, match=match):
            speed_rows.main(["--scale", "cpu", *tiny, *argv])


@pytest.mark.slow
def test_seeds_run_the_benchmark_per_seed_and_pair_ratios_by_seed(tmp_path):
    from benchmarks.report import paired_rows

    path = bench.run_seeds("cpu", tmp_path / "s", ["full", "spectral"], TINY, [0, 1], 0.25, False, None, {})
    for seed in (0, 1):
        meta = read_json(tmp_path / "s" / f"seed-{seed}" / "benchmark.json")
        assert meta["settings"]["seed"] == seed
    rows = {p["row"]["name"]: p for p in paired_rows([tmp_path / "s"])}
    full = {s: read_json(tmp_path / "s" / f"seed-{s}" / "rows" / "full" / "metrics.json")["perplexity"] for s in (0, 1)}
    low = {s: read_json(tmp_path / "s" / f"seed-{s}" / "rows" / "spectral" / "metrics.json")["perplexity"] for s in (0, 1)}
    assert rows["spectral"]["ratios"] == [low[0] / full[0], low[1] / full[1]]  # paired, never across seeds
    assert rows["full"]["spread"] == pytest.approx(abs(full[0] - full[1]) / ((full[0] + full[1]) / 2))
    assert "| s | full rank |" in path.read_text()
    for bad in ("0,0", "x", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            bench.parse_seeds(bad, {})
    with pytest.raises(ValueError, match="not both"):
        bench.parse_seeds("0,1", {"seed": 3})


@pytest.mark.slow
def test_price_plot_has_one_point_per_setting(tmp_path):
    from benchmarks.report import plot_price

    bench.run_seeds("cpu", tmp_path / "s", ["full", "spectral"], TINY, [0], 0.25, False, None, {})
    assert plot_price([tmp_path / "s"], tmp_path / "price.png").stat().st_size > 10_000


def test_a_setting_that_became_the_default_joins_its_series_in_the_price_plot():
    from benchmarks.report import setting_beyond_defaults
    from hf_lowrank.config import PRECONDITION_DAMPING

    assert setting_beyond_defaults({"precondition_damping": PRECONDITION_DAMPING, "rank": 0.5}) == {}
    assert setting_beyond_defaults({"rebalance_every": 10, "factor_weight_decay": 0, "rebalance_moments": "rotate"}) == {}
    kept = {"precondition_damping": PRECONDITION_DAMPING / 100, "strategy_args.threshold": 0.9, "target_modules": ["mlp.c_fc"]}
    assert setting_beyond_defaults(kept) == kept


needs_galore = pytest.mark.skipif(
    __import__("importlib").util.find_spec("galore_torch") is None, reason="the GaLore row needs galore-torch (pip install -e '.[galore]')"
)


@pytest.mark.slow
@needs_galore
def test_peers_train_the_plain_llama_with_their_optimizer_and_memory_is_counted(tmp_path):
    import importlib.util

    peers = ["galore"] + (["apollo"] if importlib.util.find_spec("apollo_torch") else [])
    report = bench.run_benchmark("cpu", tmp_path, ["full", "inrank", *peers], {**TINY, "architecture": "llama"}, isolate=False, command="test")
    rows = {name: read_json(tmp_path / "rows" / name / "metrics.json") for name in ["full", "inrank", *peers]}
    full, galore = rows["full"], rows["galore"]
    # the peers' own optimizer on the layers the strategies make low-rank, the plain model (no LowRankLinear)
    assert galore["optim"] == "galore_adamw" and galore["lowrank_config"] is False
    assert galore["optim_target_modules"] == PLACEMENTS["llama"]["blocks"]
    assert galore["optim_args"].startswith("rank=8,update_proj_gap=200,scale=0.25"), "the paper's 128 at 512 wide, scaled to 32"
    assert galore["trainable_params"] == full["trainable_params"] and galore["strategy_state"] == {}
    # memory from the tensors: the same weights and gradients as full rank, less optimizer state (its projection)
    mem, full_mem = galore["memory"], full["memory"]
    assert mem["weights_bytes"] == full_mem["weights_bytes"] == 4 * full["total_params"]
    assert mem["gradients_bytes"] == full_mem["gradients_bytes"] == 4 * full["trainable_params"]
    assert 0 < mem["optimizer_state_bytes"] < full_mem["optimizer_state_bytes"]
    assert full_mem["optimizer_state_bytes"] >= 2 * full_mem["weights_bytes"], "AdamW: two moments per weight"
    assert mem["weights_plus_optimizer_bytes"] == mem["weights_bytes"] + mem["optimizer_state_bytes"]
    assert mem["process_peak_rss_bytes"] > mem["weights_plus_optimizer_bytes"] and "cuda_max_allocated_bytes" not in mem
    # a strategy that changes shapes: its peak is above its end
    inrank = rows["inrank"]["memory"]
    assert inrank["weights_peak_bytes"] >= inrank["weights_bytes"] and inrank["optimizer_state_peak_bytes"] > 0
    text = report.read_text()
    memory = text[text.index("## Memory, counted from the tensors"):]
    assert all(f"| {rows[n]['label']} |" in memory for n in rows)
    assert "best strategy (InRank-Efficient) against GaLore (peer): weights + optimizer state" in memory
    assert (tmp_path / "memory_perplexity.png").is_file() and "![memory_perplexity.png]" in memory


def test_peer_rows_need_linear_layers_and_run_by_default_on_llama():
    assert get_row("galore", SCALES["cpu"].replace(architecture="llama")).recipe["training"]["optim"] == "galore_adamw"
    with pytest.raises(ValueError, match="GPT-2's block layers are Conv1D: add --set architecture=llama"):
        get_row("galore", SCALES["cpu"])
    assert not set(PEERS) & set(default_rows(SCALES["cpu-long"]))
    llama = SCALES["cpu-long"].replace(architecture="llama")
    assert set(PEERS) <= set(default_rows(llama)) and default_rows(llama) == row_names()
    apollo = get_row("apollo", llama).recipe["training"]
    assert apollo["optim_args"].startswith("rank=64,") and "proj=random" in apollo["optim_args"], "hidden / 2 at 128 wide"
    assert apollo["optim_target_modules"] == PLACEMENTS["llama"]["blocks"]
    mlp = get_row("galore", llama.replace(targets="mlp")).recipe["training"]
    assert mlp["optim_target_modules"] == PLACEMENTS["llama"]["mlp"], "the layers the strategies make low-rank"


def test_memory_is_counted_from_the_tensors():
    from types import SimpleNamespace

    from benchmarks.memory import gradient_bytes, optimizer_state_bytes, tensor_bytes, weight_bytes

    shared = torch.zeros(10)  # 40 bytes, reachable twice
    projector = SimpleNamespace(ortho_matrix=torch.zeros(4, 2, dtype=torch.float64), rank=2)  # 64 bytes inside an object
    assert tensor_bytes({"a": shared, "b": [shared, (torch.zeros(3, dtype=torch.int8),)], "p": projector, "n": 3}) == 40 + 3 + 64
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight  # tied: one tensor
    assert weight_bytes(model) == 4 * 20
    optimizer = torch.optim.AdamW(model.parameters())
    assert gradient_bytes(model) == 0 and optimizer_state_bytes(optimizer) == 0
    model(torch.tensor([[1, 2]])).sum().backward()
    assert gradient_bytes(model) == 4 * 20
    optimizer.step()
    step = optimizer.state[model[0].weight]["step"]
    assert optimizer_state_bytes(optimizer) == 2 * 4 * 20 + step.numel() * step.element_size()


def test_llama_model_of_a_scale_has_linear_projections_and_the_same_data():
    """--set architecture=llama builds a Llama of the scale's size (RMSNorm, SwiGLU, rotary, nn.Linear) for every row."""
    import transformers

    gpt2, llama = SCALES["cpu-long"], SCALES["cpu-long"].replace(architecture="llama")
    model = recipe.build_model(llama.options(), None)
    assert isinstance(model, transformers.LlamaForCausalLM)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 4, 4)
    assert config.hidden_act == "silu" and type(model.model.norm).__name__ == "LlamaRMSNorm"
    blocks = [m for n, m in model.named_modules() if n.endswith(tuple(PLACEMENTS["llama"]["blocks"]))]
    assert len(blocks) == 4 * 7 and all(type(m) is torch.nn.Linear for m in blocks), "what GaLore and APOLLO project"
    same = ("dataset", "vocab_size", "block_size", "max_steps", "per_device_train_batch_size", "learning_rate", "seed")
    assert all(getattr(llama.options(), k) == getattr(gpt2.options(), k) for k in same), "the same tokenizer, data and run"
