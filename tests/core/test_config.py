"""Run configuration: unknown keys, override parsing, value and type checks, round trip."""

from __future__ import annotations

import contextlib

import pytest
from builders import REPO

from peftlab.core.config import load_config, save_config
from peftlab.core.errors import PeftlabError


def test_defaults():
    cfg = load_config(None)
    assert cfg.method.name == "lora" and cfg.train.lr is None and cfg.data.split == [0.8, 0.1, 0.1]


def test_unknown_key_error_names_the_key():
    with pytest.raises(PeftlabError, match=r"train\.lrr"):
        load_config(None, ["train.lrr=1e-3"])


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("method:\n  name: lora\n  rank: 4\n")
    with pytest.raises(PeftlabError, match=r"method\.rank"):
        load_config(path)


def test_override_parses_floats_bools_and_lists():
    cfg = load_config(None, ["train.lr=3e-4", "model.chat=false", "method.target_modules=[q_proj,k_proj]"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.chat is False
    assert cfg.method.target_modules == ["q_proj", "k_proj"]


def test_int_given_for_float_becomes_float():
    cfg = load_config(None, ["train.lr=1"])
    assert isinstance(cfg.train.lr, float)


def test_negative_lr_is_an_error():
    with pytest.raises(PeftlabError, match=r"^train\.lr must be > 0, got -0\.0001$"):
        load_config(None, ["train.lr=-1e-4"])


def test_string_where_int_expected_is_a_type_error():
    with pytest.raises(PeftlabError, match=r"^train\.epochs: expected a whole number >= 1, got the text 'three'$"):
        load_config(None, ["train.epochs=three"])


def test_bool_is_not_an_int():
    with pytest.raises(PeftlabError, match=r"^train\.batch_size: expected a whole number >= 1, got the boolean true$"):
        load_config(None, ["train.batch_size=true"])


def test_override_without_equals_is_an_error():
    with pytest.raises(PeftlabError, match="key=value"):
        load_config(None, ["train.lr"])


def test_split_must_sum_to_one():
    with pytest.raises(PeftlabError) as err:
        load_config(None, ["data.split=[0.5,0.2,0.2]"])
    assert str(err.value) == "data.split must be three fractions summing to 1, got [0.5, 0.2, 0.2]"


def test_missing_config_file(tmp_path):
    with pytest.raises(PeftlabError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_then_overrides_and_round_trip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: a\ntrain:\n  lr: 0.001\n  epochs: 2\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert (cfg.name, cfg.train.lr, cfg.train.epochs) == ("a", 1e-3, 3)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_string_where_float_expected_is_a_type_error():
    with pytest.raises(PeftlabError, match=r"^train\.lr: expected a number > 0, got the text 'fast'$"):
        load_config(None, ["train.lr=fast"])


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: 3e-4\n")  # YAML 1.2: a number (PyYAML's 1.1 read it as a string)
    assert load_config(path).train.lr == pytest.approx(3e-4)


def test_yaml_bare_no_is_the_word_for_a_text_field(tmp_path):
    # YAML 1.2 reads `no` and `off` as the words they are (1.1 read them as False, which a patch turned into "no";
    # `off` is now the word 'off', which mixed_precision does not take).
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    path.write_text("train:\n  mixed_precision: off\n")
    with pytest.raises(PeftlabError, match="train.mixed_precision must be auto, no or bf16, got 'off'"):
        load_config(path)
    with pytest.raises(PeftlabError, match="train.mixed_precision must be auto, no or bf16, got 'yes'"):
        load_config(None, ["train.mixed_precision=yes"])


@pytest.mark.parametrize("value,want", [("false", False), ("true", True), ("selective", "selective"),
                                        ("full", "full")])
def test_activation_checkpointing_takes_a_bool_or_a_mode(value, want):
    assert load_config(None, [f"train.activation_checkpointing={value}"]).train.activation_checkpointing == want


def test_unknown_checkpointing_mode_is_an_error():
    with pytest.raises(PeftlabError, match="must be false, true, selective or full, got 'some'"):
        load_config(None, ["train.activation_checkpointing=some"])


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_opens_with_its_command_and_loads(path):
    """Docs and code in step: each example names the command that runs it, and that command's loader accepts it."""
    from peftlab.recipes.compare import load_study

    command = path.read_text().splitlines()[0]
    assert command.startswith("# ") and f"examples/{path.name}" in command
    verb = command.split(f"examples/{path.name}")[0].split()[-1]
    if verb in ("train", "cv"):
        load_config(path)
    else:
        assert verb in ("compare", "sweep"), command
        _, runs = load_study(path)
        assert runs or verb == "sweep"


@pytest.mark.parametrize("override,message", [
    # a list or text: neither fits a number, so the message says what each takes
    ("method.target_modules=5", "method.target_modules: expected a list of text or text, got the number 5"),
    # a list whose item is wrong: the item is named
    ("method.target_modules=[q_proj, 5]", "method.target_modules[1]: expected text, got the number 5"),
    ("model.dtype=fp8", "model.dtype must be auto, float32, bfloat16 or float16, got 'fp8'"),
    ("method.quant=nf5", "method.quant must be nf4, fp4 or int8, got 'nf5'"),
    ("method.prompt_init=zeros", "method.prompt_init must be random or text, got 'zeros'"),
    ("model.chat=yes", "model.chat must be false or true, got 'yes'"),
    ("train=5", "train: expected a mapping, got the number 5"),
    ("train.epochs=null", "train.epochs: expected a whole number >= 1, got nothing"),
    ("data.max_length=4", "data.max_length must be >= 8, got 4"),
    ("data.shots=-1", "data.shots must be >= 0, got -1"),
    ("data.mixture=[pubmedqa]", "data.mixture[0]: expected a mapping, got the text 'pubmedqa'"),
    ("method.peft=[r]", "method.peft: expected a mapping, got a list"),
])
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(PeftlabError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_a_section_mapping_left_empty_takes_its_default():
    # `peft:` with every field commented out is YAML's null: no extra fields, as before the pydantic config
    assert load_config(None, ["method.peft=null", "experiments.forgetting_data=null"]).method.peft == {}


def test_an_unknown_key_lists_the_keys_of_its_section():
    with pytest.raises(PeftlabError) as err:
        load_config(None, base={"model": {"nmae": "x"}})
    assert str(err.value) == "unknown config key 'model.nmae'; valid: allow_pickle, chat, device, dtype, name"


def test_every_key_has_help_that_train_help_lists(monkeypatch, capsys):
    from peftlab import cli
    from peftlab.core.config import SECTIONS, RunConfig, config_help
    from peftlab.core.schema import fields_of

    lines = config_help().splitlines()
    keys = [f"{s}.{k}" for s in SECTIONS for k in fields_of(fields_of(RunConfig)[s].annotation)]
    assert len(lines) == len(keys) + 2 and all(line.split(": ", 1)[1] for line in lines)  # + name, output_dir
    assert "train.lr (default null): peak learning rate; default: the method's" in lines
    monkeypatch.setattr("sys.argv", ["peftlab", "train", "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    with contextlib.suppress(SystemExit):
        cli.main()
    shown = capsys.readouterr().out
    assert all(f" {key} (default " in shown for key in keys)
    assert 'method.target_modules (default ["q_proj", "v_proj"])' in shown  # brackets are text, not markup
