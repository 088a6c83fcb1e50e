"""A model folder, a checkpoint and a recipe are untrusted data: loading runs none of their code.

A saved ``lowrank_config.json`` naming ``"module:Class"`` never imports that module: the
model loads with its saved layout (inference, summary, merge, inspect), training asks for
the strategy, and ``trust_remote_code=True`` is the one opt-in that imports it.
"""

import json
import sys

import pytest
import torch
import transformers
from conftest import build, logits, sample_ids

from hf_lowrank import LowRankConfig, LowRankModel, get_lowrank_model, saving
from hf_lowrank.cli import TrainOptions, _import_strategy, main
from hf_lowrank.options import RecipeError, RecipeOptions
from hf_lowrank.strategies import REGISTRY, UnavailableStrategy, get_strategy

PLUGIN = '''
from pathlib import Path
from hf_lowrank.strategies import RankStrategy
Path(__file__).with_name("imported").write_text("the plugin's top-level code ran")

class S(RankStrategy):
    name = "plugin_s"
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An importable ``lowrank_plugin`` whose top-level code leaves a file behind when it runs."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "lowrank_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("lowrank_plugin", None)
    REGISTRY.pop("plugin_s", None)


def saved_with_strategy(tmp_path, strategy: str):
    """A saved model whose lowrank_config.json names ``strategy`` (as a model trained with it would)."""
    model = get_lowrank_model(build("gpt2"), LowRankConfig(target_modules=["c_fc"], rank=4))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    data = json.loads((folder / "lowrank_config.json").read_text())
    (folder / "lowrank_config.json").write_text(json.dumps({**data, "strategy": strategy, "strategy_args": {"k": 1}}))
    return model, folder


def test_loading_never_imports_the_module_a_config_names(plugin, tmp_path, capsys):
    model, folder = saved_with_strategy(tmp_path, "lowrank_plugin:S")
    loaded = LowRankModel.from_pretrained(folder)
    assert not (plugin / "imported").exists() and "lowrank_plugin" not in sys.modules
    assert isinstance(loaded.strategy, UnavailableStrategy)
    ids = sample_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(model.eval(), ids))  # inference needs only the layout
    assert "c_fc" in loaded.summary()
    torch.testing.assert_close(logits(loaded.merge_and_unload(), ids), logits(model, ids))
    assert main(["inspect", str(folder)]) == 0 and "c_fc" in capsys.readouterr().out  # no traceback
    out = tmp_path / "merged"
    assert main(["merge", str(folder), str(out)]) == 0 and (out / "config.json").is_file()
    assert not (plugin / "imported").exists()
    # Training asks for the strategy and says how to provide it.
    with pytest.raises(ValueError, match=r"import lowrank_plugin.*trust_remote_code"):
        LowRankModel.from_pretrained(folder).train()(input_ids=ids)
    with pytest.raises(ValueError, match="trust_remote_code"):
        LowRankModel.from_pretrained(folder).bind_training(10)


def test_zen_of_python_is_not_printed(tmp_path, capsys):
    _, folder = saved_with_strategy(tmp_path, "this:X")
    sys.modules.pop("this", None)
    LowRankModel.from_pretrained(folder)
    assert "Beautiful is better" not in capsys.readouterr().out and "this" not in sys.modules


def test_a_new_config_naming_an_unimported_module_is_refused_without_importing(plugin):
    with pytest.raises(ValueError, match=r"never imports a module.*import lowrank_plugin.*trust_remote_code"):
        LowRankConfig(strategy="lowrank_plugin:S")
    assert not (plugin / "imported").exists()


def test_opting_in_imports_the_strategy(plugin, tmp_path):
    _, folder = saved_with_strategy(tmp_path, "lowrank_plugin:S")
    data = json.loads((folder / "lowrank_config.json").read_text())
    (folder / "lowrank_config.json").write_text(json.dumps({**data, "strategy_args": {}}))
    loaded = LowRankModel.from_pretrained(folder, trust_remote_code=True)
    assert (plugin / "imported").exists() and type(loaded.strategy).__name__ == "S"
    # Once imported (the user's own import does the same), the name resolves without the opt-in.
    assert get_strategy("lowrank_plugin:S") is type(loaded.strategy)
    assert LowRankConfig(strategy="lowrank_plugin:S").strategy == "lowrank_plugin:S"


def test_cli_train_imports_only_with_the_flag_and_finds_the_working_directory(plugin, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(plugin)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(plugin)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: clm\nlowrank:\n  strategy: lowrank_plugin:S\n")
    with pytest.raises(SystemExit) as e:
        main(["train", str(recipe)])
    assert e.value.code == 2 and "--trust_remote_code" in capsys.readouterr().err
    assert not (plugin / "imported").exists()
    _import_strategy(TrainOptions(config=str(recipe), trust_remote_code=True))  # what train --trust_remote_code does first
    assert (plugin / "imported").exists()
    assert RecipeOptions.from_yaml(recipe).lowrank_config.strategy == "lowrank_plugin:S"


# -- a corrupted config.json sizes nothing before it is checked ----------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"n_embd": 1048576}, r"builds transformer\.wte\.weight of shape \(96, 1048576\), but the weights hold \(96, 32\)"),  # 13 TB
        ({"vocab_size": 10**9}, r"builds transformer\.wte\.weight of shape \(1000000000, 32\)"),  # 256 GB
        ({"n_layer": 40}, r"builds transformer\.h\.2\.\S+ of shape .*, but the weights hold absent"),
    ],
)
def test_config_sizes_are_checked_against_the_weights_before_allocating(tmp_path, edit, message):
    _, folder = saved_with_strategy(tmp_path, "fixed")
    data = json.loads((folder / "lowrank_config.json").read_text())
    (folder / "lowrank_config.json").write_text(json.dumps({**data, "strategy_args": {}}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=message + r".*nothing was allocated"):
        LowRankModel.from_pretrained(folder)


def test_architectures_must_name_a_model_class(tmp_path, monkeypatch):
    _, folder = saved_with_strategy(tmp_path, "fixed")
    called = []
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: called.append(a))
    for arch in ("pipeline", "AutoConfig", "os"):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
        with pytest.raises(ValueError, match=rf"'architectures' names '{arch}', not a model class transformers' Auto mappings know"):
            LowRankModel.from_pretrained(folder)
    assert not called


# -- a saved config reused on another model keeps its weights' function ---------------------------


def test_a_saved_rank_pattern_on_a_new_model_keeps_the_function_it_can(tmp_path):
    """It used to go through set_spec, which set B = 0 without a word (||W|| 2.54 -> ||B A|| 0.0)."""
    saved = get_lowrank_model(build("gpt2"), LowRankConfig(target_modules=["c_fc"], rank=4))
    saved.save_pretrained(tmp_path / "m")
    config = LowRankConfig.from_pretrained(tmp_path / "m")
    plain = build("gpt2")
    dense = {n: m.weight.detach().t().clone() for n, m in plain.named_modules() if n.endswith("c_fc")}
    with pytest.warns(UserWarning, match=r"changed their weights by .*mode='residual'"):
        model = get_lowrank_model(plain, config)
    assert set(model.init_report) == set(dense)
    for name, layer in model.lowrank_layers().items():
        approx = layer.dense_weight()
        best = torch.linalg.svdvals(dense[name])[:4].square().sum().sqrt()  # the best rank-4 approximation's norm
        assert layer.rank == 4 and float(approx.norm()) == pytest.approx(float(best), rel=1e-4), "the SVD split, not B = 0"
    # At full rank the split is exact: the function is kept.
    full = {n: {**s, "rank": 32, "capacity": 32} for n, s in config.rank_pattern.items()}
    exact = LowRankConfig.from_dict({**config.to_dict(), "rank_pattern": full})
    ids = sample_ids()
    reference = logits(build("gpt2"), ids)
    torch.testing.assert_close(logits(get_lowrank_model(build("gpt2"), exact), ids), reference, atol=1e-4, rtol=1e-4)


# -- recipes: no alias bomb, no duplicate key, no value printed whole -----------------------------

BOMB = "lowrank:\n  target_modules: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  k{i}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    assert len(BOMB) < 600
    with pytest.raises(RecipeError, match=r"bomb\.yaml:3:\d+: invalid YAML \(alias \*a is not allowed in a recipe") as e:
        RecipeOptions.from_yaml(recipe)
    assert len(str(e.value)) < 300


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("task: clm\nmax_steps: 10\nlowrank:\n  rank: 4\nmax_steps: 20\n")
    with pytest.raises(RecipeError, match=r"twice\.yaml:5:1: invalid YAML \(key 'max_steps' is given twice \(lines 2 and 5\)"):
        RecipeOptions.from_yaml(recipe)


def test_errors_cut_huge_values():
    with pytest.raises(ValueError, match=r"LowRankConfig\.mode=\['x', .*\.\.\. \(\d+ characters\) is not allowed") as e:
        LowRankConfig(mode=["x"] * 100000)
    assert len(str(e.value)) < 400


def test_a_command_line_value_that_is_not_yaml_is_a_usage_error(capsys):
    expected = {
        "--lowrank.target_modules": "argument --lowrank.target_modules: invalid list of str, str or None value: '[c_fc'",
        "--lowrank.strategy_args.buffer": "argument --lowrank.strategy_args.buffer: '[c_fc' is not a valid YAML value",
    }
    for option, message in expected.items():
        with pytest.raises(SystemExit) as e:
            main(["train", "r.yaml", option, "[c_fc"])  # it was a raw yaml.scanner traceback
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err


# -- smaller: NaN weights, links out of the folder, bad numbers, bad configs ----------------------


def test_nan_weights_load_with_a_warning(tmp_path):
    model = get_lowrank_model(build("gpt2"), LowRankConfig(target_modules=["c_fc"], rank=4))
    with torch.no_grad():
        next(iter(model.lowrank_layers().values())).A[0, 0] = float("nan")
    saving.save(model, tmp_path / "m", True, True, False, saving.MAX_SHARD_SIZE, True)  # save_pretrained would be the same
    with pytest.warns(UserWarning, match=r"tensors \['transformer\.h\.0\.mlp\.c_fc\.A'\] hold NaN or Inf"):
        LowRankModel.from_pretrained(tmp_path / "m")


def test_a_weights_link_out_of_the_folder_is_refused(tmp_path):
    _, folder = saved_with_strategy(tmp_path, "fixed")
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match=r"model\.safetensors: a link to .*elsewhere\.safetensors, outside the folder"):
        LowRankModel.from_pretrained(folder)


def test_bad_numbers_and_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"init_scale=1e\+300 is not allowed; give a number in \(0, 1000\]"):
        LowRankConfig(init_scale=1e300)
    (tmp_path / "lowrank_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"lowrank_config\.json: holds a list, not a mapping of LowRankConfig fields"):
        LowRankConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"output_dir='' is not allowed"):
        RecipeOptions(task="clm", output_dir="")


@pytest.mark.parametrize(
    "config, message",
    [
        ([], r"holds a list, not a PEFT adapter config"),
        ({"peft_type": "LORA", "r": float("nan"), "lora_alpha": 16}, r"r=nan; expected a positive number"),
        ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"c_fc": "abc"}}, r"alpha_pattern\['c_fc'\]='abc'; expected a positive number"),
        ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"c_fc": 2.5}}, r"rank_pattern\['c_fc'\]=2\.5; expected an int >= 1"),
    ],
)
def test_a_bad_peft_adapter_config_is_named(tmp_path, config, message):
    from hf_lowrank.peft_interop import import_peft_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"adapter_config\.json: " + message):
        import_peft_adapter(build("gpt2"), tmp_path)


def test_a_peft_adapter_with_nan_weights_imports_with_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_lowrank.peft_interop import export_peft_adapter, import_peft_adapter

    model = get_lowrank_model(build("gpt2"), LowRankConfig(target_modules=["c_fc"], mode="residual", rank=4))
    export_peft_adapter(model, tmp_path, base_model_name_or_path="org/base")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match=r"lora_B'\] hold NaN or Inf"):
        import_peft_adapter(build("gpt2"), tmp_path)
