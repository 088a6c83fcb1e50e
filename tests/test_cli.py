"""The hf-lowrank command: generated help, errors naming the option, and a train -> inspect -> merge round trip."""

import importlib.metadata
import json

import pytest
import torch
import transformers

from hf_lowrank import LowRankModel
from hf_lowrank.cli import main

QUICKSTART = "recipes/configs/quickstart.yaml"
TINY = [
    "--dataset", "synthetic", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16",
    "--vocab_size", "300", "--max_steps", "3", "--logging_steps", "1", "--max_eval_tokens", "256",
    "--per_device_train_batch_size", "2", "--compare_full_rank", "false", "--disable_tqdm",
]


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("hf-lowrank") == "hf_lowrank.cli:main"


@pytest.mark.parametrize("verb", ["train", "report", "merge", "inspect"])
def test_help_is_generated_from_the_options(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-lowrank {verb}")
    if verb == "train":  # a recipe option, a LowRankConfig field, their help and types
        assert "--max_steps INT" in out and "Optimizer steps of the run." in out
        assert "--lowrank.rank" in out and "--lowrank.strategy_args.<key>" in out and "[float; default" in out
    if verb == "merge":
        assert "run_dir" in out and "out" in out and "Output folder for the merged model" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", QUICKSTART, "--bogus", "1"], "unknown option(s) --bogus"),
        (["train", QUICKSTART, "--max_steps"], "argument --max_steps: expected one argument"),
        (["train", QUICKSTART, "--lowrank.strategy_args.threshold"], "argument --lowrank.strategy_args.threshold"),
        (["inspect", "somewhere", "--deep"], "unknown option(s) --deep"),
        (["merge", "only_one_folder"], "required: out"),
    ],
)
def test_bad_command_line_names_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        (["--max_steps", "0"], "quickstart.yaml: max_steps=0 is not allowed"),
        (["--max_steps", "ten"], "max_steps='ten' is not allowed; expected int"),
        (["--lowrank.rank", "7.5"], "LowRankConfig.rank=7.5 is not allowed"),
        (["--lowrank.strategy", "nope"], "LowRankConfig.strategy='nope' is not allowed"),
        (["--lowrank.strategy_args.bogus", "1"], "unknown key(s) ['bogus']"),
        (["--lowrank.strategy_args.threshold", "high"], "lowrank.strategy_args.threshold='high' is not allowed; expected float"),
    ],
)
def test_bad_value_names_the_option_and_file(override, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", QUICKSTART, *override])
    assert message in str(exit_info.value)


def test_recipe_scripts_refuse_a_config_of_the_other_task():
    with pytest.raises(SystemExit, match="use recipes/train_classifier.py"):
        main(["train", "recipes/configs/classifier_tiny_residual.yaml"], task="clm")


def test_missing_run_dirs_are_named(tmp_path):
    with pytest.raises(SystemExit, match="holds no lowrank_config.json"):
        main(["inspect", str(tmp_path)])
    with pytest.raises(SystemExit, match="results.json"):
        main(["report", str(tmp_path)])


@pytest.mark.slow
def test_train_inspect_merge_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    overrides = ["--lowrank.strategy_args.warmup_steps", "1", "--lowrank.strategy_args.interval", "1"]
    assert main(["train", QUICKSTART, *TINY, *overrides, "--output_dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "eval perplexity" in out and "final ranks (inrank (factorized))" in out
    results = json.loads((run / "results.json").read_text())
    assert results["options"]["max_steps"] == 3 and results["options"]["lowrank"]["strategy_args"]["interval"] == 1

    main(["inspect", str(run)])
    table = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in table and "factorized" in table and "trainable params" in table

    main(["merge", str(run), str(tmp_path / "merged")])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lowrank" in type(m).__name__.lower() for m in merged.modules())
    lowrank = LowRankModel.from_pretrained(run / "final").eval()
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lowrank(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")("the nation")["input_ids"]

    capsys.readouterr()
    main(["report", str(run)])
    assert "eval perplexity" in capsys.readouterr().out and (run / "report.md").is_file()
