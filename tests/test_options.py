"""RecipeOptions: YAML values as written, validated once by their owner, errors naming the file and the field."""

from typing import Union

import pytest

from hf_lowrank.options import RecipeError, RecipeOptions, text_parser, yaml_value


def _load(tmp_path, text, overrides=None):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return RecipeOptions.from_yaml(path, overrides)


def test_numbers_read_as_yaml_1_2(tmp_path):
    """``1e-3`` is a float (YAML 1.1, PyYAML's default, reads it as a string)."""
    opts = _load(tmp_path, "learning_rate: 1e-3\nweight_decay: 2E-2\nlowrank: {strategy: inrank, frobenius_decay: 1e-4}\n")
    assert opts.learning_rate == 1e-3 and opts.weight_decay == 0.02 and opts.lowrank["frobenius_decay"] == 1e-4
    assert yaml_value("4e-3") == 0.004 and yaml_value("2") == 2 and yaml_value("[c_fc, c_proj]") == ["c_fc", "c_proj"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_stepz: 3\n", r"bad.yaml: unknown option\(s\) \['max_stepz'\]"),
        ("lowrank: {rnak: 0.5}\n", r"bad.yaml: lowrank: unknown LowRankConfig field\(s\) \['rnak'\]"),
        ("lowrank: {strategy: inrank, strategy_args: {treshold: 0.8}}\n", r"bad.yaml: .*unknown key\(s\) \['treshold'\]"),
        ("lowrank: {rank: 7.5}\n", r"bad.yaml: .*LowRankConfig.rank=7.5 is not allowed"),
        # a quoted number stays the string it is, named as such (not converted to 8.0)
        ('lowrank: {rank: "8"}\n', r"bad.yaml: .*LowRankConfig.rank='8' is not allowed"),
        ("max_steps: 3.5\n", r"bad.yaml: max_steps=3.5 is not allowed; give int"),
        ("output_dir: 007\n", r"bad.yaml: output_dir=7 is not allowed; give str \(quote it in YAML"),
        ("learning_rate: .inf\n", r"bad.yaml: learning_rate=inf is not allowed; give a finite number > 0"),
        ("weight_decay: .nan\n", r"bad.yaml: weight_decay=nan is not allowed; give a finite number >= 0"),
        ("max_grad_norm: -1\n", r"bad.yaml: max_grad_norm=-1 is not allowed"),
        ("n_embd: 30\nn_head: 4\n", r"bad.yaml: n_embd=30 is not allowed; give a multiple of n_head=4"),
        ("bf16: true\nfp16: true\n", r"bad.yaml: fp16=True is not allowed; bf16 is true as well"),
        ("lowrank: null\n", r"bad.yaml: lowrank=None is not allowed; give mapping or bool"),
        ("lowrank: true\n", r"bad.yaml: lowrank=True is not allowed; give a mapping of LowRankConfig fields, or false"),
        ("lowrank: false\ncompare_full_rank: true\n", r"bad.yaml: compare_full_rank=True is not allowed; lowrank is false"),
        # transformers.TrainingArguments fields: its names and its types, flat or under training
        ("optimm: sgd\n", r"bad.yaml: unknown option\(s\) \['optimm'\] \(did you mean 'optim'\?\)"),
        ("training: {optimm: sgd}\n", r"bad.yaml: training.optimm='sgd' is not allowed; not a transformers.TrainingArguments field \(did you mean 'optim'\?\)"),
        ("adam_beta2: high\n", r"bad.yaml: adam_beta2='high' is not allowed; transformers.TrainingArguments.adam_beta2 takes float"),
        ("training: {optim_target_modules: 3}\n", r"optim_target_modules=3 is not allowed; transformers.TrainingArguments.optim_target_modules takes None, str or list of str"),
        ("optim: sgd\ntraining: {optim: adafactor}\n", r"bad.yaml: optim='sgd' is not allowed; training.optim is set too; keep one"),
        ("max_steps: 3\ntraining: {max_steps: 4}\n", r"bad.yaml: training.max_steps=4 is not allowed; max_steps is set at the top level too"),
        ("training: [optim]\n", r"bad.yaml: training=\['optim'\] is not allowed; give a mapping of transformers.TrainingArguments fields"),
        ("- just\n- a list\n", r"bad.yaml: expected a mapping of options at the top level, got list"),
    ],
)
def test_bad_values_name_the_file_and_field(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        _load(tmp_path, text)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    with pytest.raises(RecipeError, match=r"bad.yaml:2:\d+: invalid YAML \(mapping values are not allowed here\)"):
        _load(tmp_path, "max_steps: 3\n  max_grad_norm: 1\n")
    with pytest.raises(RecipeError, match="nope.yaml: config file not found"):
        RecipeOptions.from_yaml(tmp_path / "nope.yaml")


def test_overrides_reach_into_lowrank(tmp_path):
    opts = _load(
        tmp_path,
        "lowrank: {strategy: inrank}\n",
        {"max_steps": 50, "lowrank.rank": 2, "lowrank.strategy_args.stage2_at": 10, "lowrank.strategy_args.threshold": 0.8},
    )
    assert opts.max_steps == 50 and opts.lowrank["rank"] == 2
    assert opts.lowrank["strategy_args"] == {"stage2_at": 10, "threshold": 0.8}
    assert opts.lowrank_config.parsed_strategy_args.stage2_at == 10 and opts.source.endswith("bad.yaml")
    with pytest.raises(RecipeError, match=r"unknown option --max_stepz"):
        _load(tmp_path, "", {"max_stepz": 3})
    with pytest.raises(RecipeError, match=r"--lowrank.rank.x: rank=0.5 is not a mapping"):
        _load(tmp_path, "lowrank: {rank: 0.5}\n", {"lowrank.rank.x": 1})


def test_command_line_words_read_by_the_field_type():
    """The same spellings as the YAML file; a str field keeps the word, none/null give None where allowed."""
    assert text_parser(str)("007") == "007"
    assert text_parser(Union[int, None])("none") is None and text_parser(Union[int, None])("12") == 12
    assert text_parser(int)("ten") == "ten"  # left for the owner to refuse, naming the field
    assert text_parser(Union[int, float])("2") == 2 and isinstance(text_parser(Union[int, float])("0.25"), float)
    assert text_parser(Union[list[str], str, None])("[a.txt, b.txt]") == ["a.txt", "b.txt"]
    assert text_parser(Union[list[str], str, None])("a.txt") == "a.txt"
    assert text_parser(Union[bool, str, None])("true") is True and text_parser(Union[bool, str, None])("runs/x") == "runs/x"
    assert text_parser(bool)("false") is False


def test_every_training_arguments_field_flat_or_under_training(tmp_path):
    """A TrainingArguments field the options do not declare goes to ``training``; the recipe's own stay options."""
    from hf_lowrank.recipe_build import training_arguments

    opts = _load(
        tmp_path,
        "optim: galore_adamw\noptim_target_modules: [q_proj, up_proj]\n"
        "training: {optim_args: 'rank=8,update_proj_gap=50', adam_beta2: 0.95, learning_rate: 1.0e-3}\n",
        {"training.adam_epsilon": 1e-6, "dataloader_num_workers": 0, "training.max_steps": 7},
    )
    assert opts.training == {
        "optim": "galore_adamw", "optim_target_modules": ["q_proj", "up_proj"], "optim_args": "rank=8,update_proj_gap=50",
        "adam_beta2": 0.95, "adam_epsilon": 1e-6, "dataloader_num_workers": 0,
    }
    assert opts.learning_rate == 1e-3 and opts.max_steps == 7, "the recipe's own options, spelled under training, are its own"
    args = training_arguments(opts, str(tmp_path / "run"))
    assert args.optim == "galore_adamw" and args.optim_target_modules == ["q_proj", "up_proj"]
    assert (args.adam_beta2, args.adam_epsilon, args.learning_rate, args.max_steps) == (0.95, 1e-6, 1e-3, 7)
    # a value in training replaces what the recipe derives from its own options
    assert training_arguments(_load(tmp_path, "eval_steps: 5\n"), "x").eval_strategy == "steps"
    assert training_arguments(_load(tmp_path, "eval_steps: 5\neval_strategy: 'no'\n"), "x").eval_strategy == "no"


def test_training_fields_come_from_transformers_dataclass():
    import dataclasses

    import transformers

    from hf_lowrank.options import training_fields

    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    assert set(training_fields()) == names, "every field, none declared by hand"
    own = {f.name for f in dataclasses.fields(RecipeOptions)}
    assert own & names and "optim" not in own  # the recipe declares a few it sets defaults for, not the rest
