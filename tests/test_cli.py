"""The hf-lowrank command: generated help, errors naming the option, and a train -> inspect -> merge round trip."""

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch
import transformers

from hf_lowrank import LowRankConfig, LowRankModel, get_lowrank_model
from hf_lowrank.cli import build_parser, main, train_overrides
from hf_lowrank.options import RecipeOptions

INRANK_RECIPE = "recipes/configs/gpt2_tiny_inrank.yaml"  # an InRank recipe: its strategy_args are InRank's
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
        # every other transformers.TrainingArguments field, with transformers' own help
        assert "--optim_target_modules VALUE" in out and "--adam_beta2 FLOAT" in out and "--optim_args VALUE" in out
        assert "Optional arguments supplied to optimizers such as" in out, "transformers' own help"
        assert out.count("--max_steps ") == 1, "a field the recipe declares is offered once"
    if verb == "merge":
        assert "run_dir" in out and "out" in out and "Output folder for the merged model" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", INRANK_RECIPE, "--bogus", "1"], "unknown option(s) --bogus"),
        (["train", INRANK_RECIPE, "--max_steps"], "argument --max_steps: expected one argument"),
        (["train", INRANK_RECIPE, "--lowrank.strategy_args.threshold"], "argument --lowrank.strategy_args.threshold"),
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
        (["--max_steps", "0"], "gpt2_tiny_inrank.yaml: max_steps=0 is not allowed; give an int >= 1"),
        (["--max_steps", "ten"], "gpt2_tiny_inrank.yaml: max_steps='ten' is not allowed; give int"),
        (["--learning_rate", ".inf"], "learning_rate=inf is not allowed; give a finite number > 0"),
        (["--lowrank.rank", "7.5"], "LowRankConfig.rank=7.5 is not allowed"),
        (["--lowrank.strategy", "nope"], "LowRankConfig.strategy='nope' is not allowed"),
        (["--lowrank.strategy_args.bogus", "1"], "unknown key(s) ['bogus']"),
        (["--lowrank.strategy_args.threshold", "high"], "LowRankConfig.strategy_args.threshold='high' is not allowed"),
        (["--adam_beta2", "high"], "adam_beta2='high' is not allowed; transformers.TrainingArguments.adam_beta2 takes float"),
    ],
)
def test_bad_value_names_the_option_and_file(override, message, capsys):
    """One line on stderr, exit status 2, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", INRANK_RECIPE, *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-lowrank train: recipes/configs/gpt2_tiny_inrank.yaml: ") and message in err and err.count("\n") == 1


def test_command_line_values_are_read_as_in_the_yaml_file():
    parser = build_parser()
    words = [
        "train", INRANK_RECIPE, "--output_dir", "007", "--max_steps", "50", "--bf16", "--eval_steps", "none",
        "--data_files", "[a.txt, b.txt]", "--lowrank.rank", "2", "--lowrank.capacity", "0.5",
        "--lowrank.target_modules", "[c_fc, c_proj]", "--lowrank.strategy_args.stage2_at", "10",
        "--lowrank.strategy_args.threshold", "0.8", "--learning_rate", "4e-3",
    ]
    args, rest = parser.parse_known_args(words)
    overrides, unknown = train_overrides(parser, args, rest)
    assert not unknown
    opts = RecipeOptions.from_yaml(INRANK_RECIPE, overrides)
    assert opts.output_dir == "007" and opts.max_steps == 50 and opts.bf16 is True and opts.eval_steps is None
    assert opts.data_files == ["a.txt", "b.txt"] and opts.learning_rate == 0.004
    assert opts.lowrank["rank"] == 2 and isinstance(opts.lowrank["rank"], int)  # absolute rank, not a fraction
    assert opts.lowrank["capacity"] == 0.5 and opts.lowrank["target_modules"] == ["c_fc", "c_proj"]
    assert opts.lowrank["strategy_args"] == {"stage2_at": 10, "threshold": 0.8}


def test_recipe_scripts_refuse_a_config_of_the_other_task(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "recipes/configs/classifier_tiny_residual.yaml"], task="clm")
    assert exit_info.value.code == 2 and "use recipes/train_classifier.py" in capsys.readouterr().err


def test_missing_run_dirs_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path)])
    assert "holds no lowrank_config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "results.json" in capsys.readouterr().err


@pytest.fixture
def saved_model(tmp_path):
    """A tiny saved LowRankModel folder."""
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = get_lowrank_model(transformers.GPT2LMHeadModel(config), LowRankConfig(target_modules=["c_fc"], rank=4))
    model.save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def test_merge_refuses_an_existing_folder_unless_overwrite(saved_model, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(saved_model), str(out)])
    assert exit_info.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", str(saved_model), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_inspect_into_a_closed_pipe_exits_quietly(saved_model):
    """``hf-lowrank inspect DIR | head``: the reader is gone before the table is written; no traceback."""
    script = f"{sys.executable} -c 'from hf_lowrank.cli import main; raise SystemExit(main())' inspect {saved_model} | true"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 1


@pytest.mark.slow
def test_train_inspect_merge_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    overrides = ["--lowrank.strategy_args.warmup_steps", "1", "--lowrank.strategy_args.interval", "1", "--lowrank.strategy_args.stage2_at", "3"]
    assert main(["train", INRANK_RECIPE, *TINY, *overrides, "--output_dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "eval perplexity" in out and "final ranks (inrank): " in out and "over 2 layers, factorized" in out
    results = json.loads((run / "results.json").read_text())
    assert results["options"]["max_steps"] == 3 and results["options"]["lowrank"]["strategy_args"]["interval"] == 1

    main(["inspect", str(run)])
    table = capsys.readouterr().out
    assert "transformer.h.0.mlp.c_fc" in table and "factorized" in table and "trainable params" in table

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
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG" and (run / "ranks.png").read_bytes()[:4] == b"\x89PNG"
