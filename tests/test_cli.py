"""The hf-lowrank command: help, errors, and a train -> inspect -> merge round trip."""

import subprocess
import sys

import pytest
import torch
import transformers

from hf_lowrank import LowRankModel
from hf_lowrank.cli import main

QUICK = ["--dataset", "synthetic", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "16", "--vocab_size", "300",
         "--max_steps", "3", "--logging_steps", "1", "--max_eval_tokens", "256", "--per_device_train_batch_size", "2", "--compare_full_rank", "false"]


@pytest.mark.parametrize("verb", ["train", "report", "merge", "inspect"])
def test_help(verb):
    proc = subprocess.run([sys.executable, "-m", "hf_lowrank.cli", verb, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: hf-lowrank" in proc.stdout
    if verb == "train":
        assert "--max_steps" in proc.stdout and "strategy_args" in proc.stdout


def test_bad_option_names_it(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['bogus'\]"):
        main(["train", "recipes/configs/quickstart.yaml", "--bogus", "1"])
    with pytest.raises(SystemExit, match="max_steps=0"):
        main(["train", "recipes/configs/quickstart.yaml", "--max_steps", "0"])
    with pytest.raises(SystemExit, match="needs a value"):
        main(["train", "recipes/configs/quickstart.yaml", "--max_steps"])
    with pytest.raises(SystemExit, match="holds no lowrank_config.json"):
        main(["inspect", str(tmp_path)])


def test_train_inspect_merge_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "recipes/configs/quickstart.yaml", *QUICK, "--output_dir", str(run)]) == 0
    main(["inspect", str(run)])
    assert "trainable params" in capsys.readouterr().out
    main(["merge", str(run), str(tmp_path / "merged")])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    lowrank = LowRankModel.from_pretrained(run / "final").eval()
    ids = torch.randint(0, 300, (1, 8))
    torch.testing.assert_close(merged(ids).logits, lowrank(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    main(["report", str(run)])
    assert "eval perplexity" in capsys.readouterr().out
