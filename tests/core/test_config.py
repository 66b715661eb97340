"""Run configuration: unknown keys, override parsing, value and type checks, round trip."""

from __future__ import annotations

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
    with pytest.raises(PeftlabError, match="train.lr must be positive"):
        load_config(None, ["train.lr=-1e-4"])


def test_string_where_int_expected_is_a_type_error():
    with pytest.raises(PeftlabError, match=r"train\.epochs.*expected int"):
        load_config(None, ["train.epochs=three"])


def test_bool_is_not_an_int():
    with pytest.raises(PeftlabError, match="train.batch_size"):
        load_config(None, ["train.batch_size=true"])


def test_override_without_equals_is_an_error():
    with pytest.raises(PeftlabError, match="key=value"):
        load_config(None, ["train.lr"])


def test_split_must_sum_to_one():
    with pytest.raises(PeftlabError, match="data.split"):
        load_config(None, ["data.split=[0.5,0.2,0.2]"])


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
    with pytest.raises(PeftlabError, match=r"train\.lr.*expected float"):
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
