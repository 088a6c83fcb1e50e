"""Fine-tuning as PEFT users expect: the README's snippet keeps the function, residual mode trains only adapters, factorizing pretrained weights starts from them."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers_train import TokenDataset, tiny_gpt2

from hf_lowrank import LowRankConfig, get_lowrank_model

README = Path(__file__).parents[1] / "README.md"


def sample_ids() -> torch.Tensor:
    return TokenDataset(4).x


def readme_block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def readme_finetune_block() -> str:
    return readme_block("### Fine-tune a pretrained model")


def shrink(code: str, out: Path) -> str:
    """The README's run, made test-sized: the tiny corpus, a few steps with checkpoints, folders under ``out``."""
    code = code.replace('"sotu"', '"synthetic"').replace('"out/final"', repr(str(out / "final"))).replace('"out"', repr(str(out / "out")))
    for steps in ("max_steps=10_000", "max_steps=1000"):
        code = code.replace(steps, "max_steps=12, save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True")
    return code


@pytest.fixture
def saved_model(tmp_path):
    """A small 'pretrained' GPT-2 with its tokenizer: trained a few steps so its weights are not an init, then saved."""
    from hf_lowrank.data import load_text_corpus, train_tokenizer

    tokenizer = train_tokenizer(load_text_corpus("synthetic")["train"]["text"], vocab_size=300)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=128, bos_token_id=0, eos_token_id=0)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = TokenDataset()
    for i in range(5):
        batch = {k: torch.stack([data[j][k] for j in range(4 * i, 4 * i + 4)]) for k in ("input_ids", "labels")}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "pretrained")
    tokenizer.save_pretrained(tmp_path / "pretrained")
    return tmp_path / "pretrained"


def test_readme_finetune_snippet_keeps_the_function_and_trains_only_adapters(saved_model, tmp_path, monkeypatch):
    code = readme_finetune_block()
    assert 'mode="residual"' in code
    code = shrink(code.replace("path/to/model", str(saved_model)), tmp_path)
    setup, rest = code.split("trainer = ", 1)
    ns: dict = {}
    exec(setup, ns)
    ids = sample_ids()
    base = transformers.AutoModelForCausalLM.from_pretrained(saved_model).eval()
    with torch.no_grad():
        torch.testing.assert_close(ns["model"].eval()(input_ids=ids).logits, base(input_ids=ids).logits)
    trainable = [n for n, p in ns["model"].named_parameters() if p.requires_grad]
    assert trainable and all(n.rpartition(".")[2] in ("A", "B") for n in trainable), trainable
    exec("trainer = " + rest, ns)
    assert (tmp_path / "final" / "lowrank_config.json").is_file()
    assert (tmp_path / "out" / "checkpoint-12" / "lowrank_trainer_state.json").is_file(), "checkpoints were written"
    frozen = {n: p for n, p in ns["model"].base_model.named_parameters() if not p.requires_grad}
    reference = dict(base.named_parameters())
    compared = [n for n in frozen if n in reference]
    assert len(compared) > 10, "embeddings, norms and biases are frozen"
    for name in compared:
        torch.testing.assert_close(frozen[name], reference[name], msg=f"{name} is frozen and must not change")


def test_readme_from_scratch_snippet_runs_saves_and_merges(tmp_path):
    from hf_lowrank import LowRankModel

    code = readme_block("Train a model from scratch")
    assert "n_layer=12, n_embd=768" in code and "vocab_size=4096" in code
    code = shrink(code.replace("n_layer=12, n_embd=768", "n_layer=2, n_embd=48").replace("vocab_size=4096", "vocab_size=300"), tmp_path)
    ns: dict = {}
    exec(code.replace("dense = ", "ids = train[0:2]['input_ids']\ndense = "), ns)
    assert any("stage 2" in h["reason"] for h in ns["trainer"].plan_history), "InRank grew and truncated"
    assert (tmp_path / "out" / "checkpoint-8" / "lowrank_config.json").is_file(), "checkpoints were written"
    loaded = LowRankModel.from_pretrained(tmp_path / "final").eval()
    ids = torch.tensor(ns["ids"])
    with torch.no_grad():
        torch.testing.assert_close(ns["dense"].eval()(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert type(ns["dense"]) is transformers.GPT2LMHeadModel


def test_modules_to_save_trains_a_classification_head_by_default():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, num_labels=3, pad_token_id=0)
    base = transformers.GPT2ForSequenceClassification(config)
    base.config._name_or_path = "pretrained-classifier"
    model = get_lowrank_model(base, LowRankConfig(target_modules=["c_fc"], mode="residual", rank=4))
    trainable = {n.rsplit(".", 1)[0] for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert "score" in trainable and all(n == "score" or n.endswith("c_fc") for n in trainable)
    named = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], mode="residual", rank=4, modules_to_save=["ln_f"]))
    assert {n for n, p in named.base_model.named_parameters() if p.requires_grad and "c_fc" not in n} == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    with pytest.raises(ValueError, match=r"modules_to_save=\['nope'\].*name no module"):
        get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], mode="residual", rank=4, modules_to_save=["nope"]))


def test_training_from_scratch_keeps_the_whole_model_trainable():
    for config in (
        LowRankConfig(target_modules=["c_fc"], mode="factorized", rank=4),
        LowRankConfig(target_modules=["c_fc"], mode="residual", residual_base="orthogonal", rank=4),
    ):
        model = get_lowrank_model(tiny_gpt2(), config)
        assert model.base_model.transformer.wte.weight.requires_grad, config.mode


def test_factorizing_pretrained_weights_starts_from_them_and_reports_the_change(saved_model):
    base = transformers.AutoModelForCausalLM.from_pretrained(saved_model).eval()
    ids = sample_ids()
    with torch.no_grad():
        want = base(input_ids=ids).logits
    full = get_lowrank_model(
        transformers.AutoModelForCausalLM.from_pretrained(saved_model), LowRankConfig(target_modules=["c_fc"], rank=1.0)
    ).eval()
    assert full.lowrank_config.init == "auto" and max(full.init_report.values()) < 1e-5, "full rank: the SVD split is exact"
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match=r"changed their weights by .*mode='residual'"):
        low = get_lowrank_model(
            transformers.AutoModelForCausalLM.from_pretrained(saved_model), LowRankConfig(target_modules=["c_fc"], rank=4)
        )
    assert set(low.init_report) == set(low.lowrank_layers()) and all(0 < v < 1 for v in low.init_report.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model built from a config has no pretrained function to report on
        scratch = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4))
    assert scratch.init_report == {}


def test_print_trainable_parameters_is_one_line(capsys):
    get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4)).print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith("trainable params: ")


def test_trainable_parameters_count_the_active_ranks_as_a_lora_user_reads_them(capsys):
    """InRank allocates half of each layer for growth; "trainable" counts what the forward uses."""
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], mode="residual", strategy="inrank"))
    counts = model.parameter_counts()
    layers = model.lowrank_layers().values()
    active = sum(layer.rank * (layer.in_features + layer.out_features) for layer in layers)
    allocated = sum(layer.capacity * (layer.in_features + layer.out_features) for layer in layers)
    assert counts["trainable"] == allocated and counts["active"] == active < allocated
    assert counts["capacity"] == allocated - active
    assert model.get_nb_trainable_parameters() == (active, counts["total"])
    model.print_trainable_parameters()
    line = capsys.readouterr().out
    assert line.startswith(f"trainable params: {active:,} || allocated for growth: {allocated - active:,} || all params: {counts['total']:,}")
    assert f"trainable%: {100 * active / counts['total']:.4f}" in line
    fixed = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], mode="residual", rank=4))
    fixed.print_trainable_parameters()
    assert "allocated for growth" not in capsys.readouterr().out, "nothing allocated beyond the rank: one number"


def test_lora_habits_get_pointers():
    with pytest.raises(TypeError, match=r"unknown LowRankConfig field\(s\) \['lora_alpha', 'r'\] \(PEFT LoraConfig names; here: lora_alpha -> alpha=.*r -> rank="):
        LowRankConfig(r=8, lora_alpha=16)
    with pytest.raises(ValueError, match=r"lora_dropout -> nothing: low-rank layers have no dropout"):
        LowRankConfig.from_dict({"lora_dropout": 0.1})
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], mode="residual", rank=4)).eval()
    with pytest.raises(AttributeError, match=r"'LowRankModel' object has no attribute 'merge_adapter', nor has the GPT2LMHeadModel it wraps; merge with merge_and_unload"):
        model.merge_adapter()
    with pytest.raises(AttributeError, match=r"^'LowRankModel' object has no attribute 'no_such_thing', nor has the GPT2LMHeadModel it wraps$"):
        model.no_such_thing  # noqa: B018
    assert not hasattr(model, "hf_device_map")  # probes by transformers and accelerate still see an AttributeError


def test_disable_adapter_and_unload_give_the_frozen_base_back():
    base = tiny_gpt2().eval()
    ids = sample_ids()
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = get_lowrank_model(base, LowRankConfig(target_modules=["c_fc", "c_proj"], mode="residual", rank=4)).eval()
    with torch.no_grad():
        for layer in model.lowrank_layers().values():
            layer.B.normal_()  # a trained adapter
        tuned = model(input_ids=ids).logits
        assert not torch.allclose(tuned, want)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, tuned, atol=0, rtol=0)
        plain = model.unload()
        assert type(plain) is transformers.GPT2LMHeadModel
        assert not any(type(m).__name__ == "LowRankLinear" for m in plain.modules())
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=0, rtol=0)
    factorized = get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["c_fc"], rank=4))
    with pytest.raises(ValueError, match=r"disable_adapter\(\): no layer is in residual mode .*mode='residual'"):
        with factorized.disable_adapter():
            pass
    with pytest.raises(ValueError, match=r"unload\(\): layers .* are not residual.*merge_and_unload\(\)"):
        factorized.unload()
