"""Issue 39, cases 4, 5 and 11's data wording: configs and studies that are not a mapping, empty files, `train
key=value` without a config file, YAML read as 1.2 everywhere, and the decision naming the user's own files.

Each CLI row runs the real command (`cli.main()`); its comment says what happened before the fix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from badkit import cli_error

from peftlab import cli
from peftlab.core.config import config_and_overrides, deep_merge, load_config, save_config
from peftlab.core.errors import PeftlabError
from peftlab.core.yamlio import YamlSyntaxError, dump_yaml, parse_yaml, read_yaml
from peftlab.recipes.study import load_study
from peftlab.recipes.sweep import parse_sweep


def _ok(argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["peftlab", *argv])
    cli.main()
    return capsys.readouterr().out


RUN = "runs: [{method: {name: lora}}]\n"
MAPPING = "expected a mapping of config sections (name, model, data, method, train, ...)"
NO_RUNS = "no runs to compare; list them under runs: (e.g. runs: [{method: {name: lora}}]) or grids:"
SWEEP = "a sweep needs a `sweep:` mapping with a `space:` (see docs/experiments.md)"
TUNE = "tune: expected a mapping (with trials, space, methods, select; see docs/experiments.md)"
SPACE = "sweep: {space: {train.lr: {low: 1e-3, high: 0.1}}"

# (case, command, file text, the message after `error: <file>: `, or after `error: <file>:` when it opens with the
# line). The file is written to <tmp>/f.yaml with output_dir <tmp>/out (a study), so no row leaves a folder elsewhere.
FILE_CASES = [
    # 4: all of these ended in a traceback (AttributeError / TypeError) except where the comment says otherwise.
    ("config is a list", "train", "- name: a\n- name: b\n", f"{MAPPING}, got a list"),
    ("config is a scalar", "train", "lora\n", f"{MAPPING}, got the text 'lora'"),
    ("cv config is a list", "cv", "- a\n", f"{MAPPING}, got a list"),
    # was: a 50-step default PubMedQA run, exit 0
    ("empty config", "train", "",
     "empty config; give at least the settings that differ from the defaults (e.g. method: {name: lora}), or train "
     "on the defaults with key=value overrides only"),
    ("config of comments only", "train", "# name: x\n",
     "empty config; give at least the settings that differ from the defaults (e.g. method: {name: lora}), or train "
     "on the defaults with key=value overrides only"),
    # was: a multi-line PyYAML message on stderr
    ("malformed config", "train", "train:\n  lr: 1e-3\n  epochs: [1\n",
     "4: malformed YAML (expected ',' or ']', but got '<stream end>', column 1)"),
    # was: the second value silently won
    ("duplicate key", "train", "name: a\nname: b\n",
     "2: malformed YAML (found duplicate key \"name\" with value \"b\" (original value: \"a\"), column 1)"),
    ("study is a list", "compare", "- method: {name: lora}\n",
     "expected a study mapping (name, base, runs, ...), got a list"),
    ("study is empty", "compare", "", "empty study; expected a mapping with base: and runs: (see examples/)"),
    # was: an empty study folder and a traceback
    ("study with 0 runs", "compare", "runs: []\n", NO_RUNS),
    ("study without runs:", "compare", "base: {method: {name: lora}}\n", NO_RUNS),
    ("study run that is a name", "compare", "runs: [lora]\n",
     "runs[0]: expected a mapping (a run config, e.g. {method: {name: lora}}), got the text 'lora'"),
    ("study base that is a list", "compare", f"base: [1]\n{RUN}",
     "base: expected a mapping (the run config every run starts from), got a list"),
    # was: KeyError: 'name'
    ("grid without a name", "compare", "grids: [{params: {train.lr: [0.1]}}]\n",
     "grids[0].name: expected text (the grid's name), got nothing"),
    ("grid values not a list", "compare", "grids: [{name: g, params: {train.lr: 0.1}}]\n",
     "grids[0].params.train.lr: expected a list, got the number 0.1"),
    # was: "method: expected a mapping" without the file or run
    ("run's method is text", "compare", "runs: [{name: a, method: lora}]\n",
     "run 'a': method: expected a mapping, got the text 'lora'"),
    ("tune is a list", "compare", f"{RUN}tune: [1]\n", f"{TUNE}, got a list"),
    ("tune space is a list", "compare", f"{RUN}tune: {{space: [1]}}\n", "tune.space: expected a mapping, got a list"),
    ("tune trials is text", "compare", f"{RUN}tune: {{trials: many}}\n",
     "tune.trials: expected a whole number >= 1, got the text 'many'"),
    ("sweep is a list", "sweep", "sweep: [1]\n", f"{SWEEP}, got a list"),
    ("sweep without sweep:", "sweep", "base: {method: {name: lora}}\n", f"{SWEEP}, it has none"),
    # was: ValueError: invalid literal for int()
    ("sweep trials is text", "sweep", f"{SPACE}, trials: many}}\n",
     "sweep.trials: expected a whole number >= 1, got the text 'many'"),
    ("sweep space is a list", "sweep", "sweep: {space: [1]}\n",
     "sweep.space: expected a mapping (config keys, e.g. train.lr, to {low, high} or {choices}), got a list"),
    # The sections' pydantic models: one line naming the dotted key, before any folder is made.
    ("run name that is a list", "compare", "runs: [{name: [a]}]\n", "runs[0].name: expected text, got a list"),
    ("unknown study key", "compare", f"{RUN}tunes: {{}}\n", "unknown study key 'tunes'; valid: base, executor, "
     "grids, metric, name, output_dir, repeats, runs, select_teacher, sweep, teachers, tune"),
    ("unknown tune key", "compare", f"{RUN}tune: {{trails: 3}}\n", "unknown study key 'tune.trails'; valid: methods, "
     "metric, pruner, seed, select, space, startup_trials, trials"),
    ("tune factor of 1", "compare", f"{RUN}tune: {{space: {{train.lr: {{factor: 1}}}}}}\n",
     "tune.space.train.lr.factor must be > 1, got 1"),
    ("repeats with seeds and folds", "compare", f"{RUN}repeats: {{seeds: [0], folds: 3}}\n",
     "repeats: expected {seeds: [0, 1, 2]} or {folds: 5}, optionally with race: true and alpha: 0.05"),
    ("repeats alpha of 1", "compare", f"{RUN}repeats: {{seeds: [0], alpha: 1}}\n", "repeats.alpha must be < 1, got 1"),
    ("executor of 0 workers", "compare", f"{RUN}executor: {{workers: 0}}\n", "executor.workers must be >= 1, got 0"),
    ("unknown sweep key", "sweep", f"{SPACE}, trails: 3}}\n", "unknown study key 'sweep.trails'; valid: direction, "
     "pruner, seed, space, startup_trials, trials"),
    ("sweep space entry of no shape", "sweep", "sweep: {space: {train.lr: {low: 0.1}}}\n",
     "sweep.space.train.lr: expected {choices: [...]} or {low, high, log?, step?}"),
    ("sweep pruner", "sweep", f"{SPACE}, pruner: hyperband}}\n",
     "sweep.pruner must be median or none, got 'hyperband'"),
]


@pytest.mark.parametrize("case,command,text,message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_config_and_study_files(case, command, text, message, tmp_path, monkeypatch, capsys):
    path = tmp_path / "f.yaml"
    study = command in ("compare", "sweep") and text and not text.startswith("-")
    path.write_text(f"output_dir: {tmp_path / 'out'}\n{text}" if study else text)
    monkeypatch.chdir(tmp_path)  # a default run or study would land here, where the test can see it
    where = f"{path}:" if message[0].isdigit() else f"{path}: "
    assert cli_error([command, str(path)], monkeypatch, capsys) == f"error: {where}{message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.yaml"]  # no study or run folder was made


def test_a_misspelt_peft_field_stops_a_study_before_any_run(tmp_path, monkeypatch, capsys):
    # The method stage checks method.peft when the study's configs load (recipes.runner.load_run_config).
    path = tmp_path / "s.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\n"
                    "runs: [{name: v, method: {name: peft, peft: {peft_type: VERA, rr: 4}}}]\n")
    line = cli_error(["compare", str(path)], monkeypatch, capsys)
    assert line.startswith(f"error: {path}: run 'v': unknown config key 'method.peft.rr' for VeraConfig; valid: ")
    assert not (tmp_path / "out").exists()


def test_only_names_an_unknown_run(tmp_path, monkeypatch, capsys):
    # was: `--only lroa` ran nothing and exited 0
    path = tmp_path / "s.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\nruns: [{{method: {{name: lora}}}}, {{name: b}}]\n")
    line = cli_error(["compare", str(path), "--only", "lroa"], monkeypatch, capsys)
    assert line == "error: --only: no run 'lroa' in the study; its runs: lora, b"
    assert not (tmp_path / "out").exists()


def test_train_with_overrides_and_no_config_file(tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    # was: "error: model.name=...: no such config file"; the first override was read as the config's path
    _ok(["train", f"model.name={tiny_causal}", f"data.path={small_pubmedqa}", "method.name=lora",
         "train.max_steps=1", "train.lr=1e-3", "data.limit_eval=4", "name=r", f"output_dir={tmp_path}"],
        monkeypatch, capsys)
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert (tmp_path / "r" / "result.json").is_file()
    assert saved.model.name == str(tiny_causal) and saved.train.lr == 1e-3 and saved.method.name == "lora"


def test_train_override_shaped_first_argument_still_reads_an_existing_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "lr=3.yaml"  # a config file whose name looks like an override is still the config file
    path.write_text("")
    assert cli_error(["train", str(path)], monkeypatch, capsys).startswith(f"error: {path}: empty config;")


@pytest.mark.parametrize("first,rest,want", [
    ("train.lr=1", ["method.r=4"], (None, ["train.lr=1", "method.r=4"])),
    ("configs/lr=3.yaml", ["x=1"], (Path("configs/lr=3.yaml"), ["x=1"])),  # a path, not a key: reported missing
    ("c.yaml", [], (Path("c.yaml"), [])),
])
def test_config_and_overrides_splits_the_arguments(first, rest, want):
    assert config_and_overrides(first, rest) == want


# ---------------------------------------------------------------------------------------------------------------------
# Case 5: YAML 1.2 everywhere
# ---------------------------------------------------------------------------------------------------------------------


def test_task_yaml_with_unquoted_yes_no_labels(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: TypeError: sequence item 0: expected str instance, bool found (YAML 1.1 read yes/no as booleans)
    spec = tmp_path / "task.yaml"
    spec.write_text("name: yn\ninputs: [text]\ntarget: label\ntemplate: '{text}'\nmetric: accuracy\n"
                    "labels: [yes, no]\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i}", "label": "yes" if i % 2 else "no"}) + "\n"
                            for i in range(4)))
    _ok(["eval", "--task", str(spec), "--data", str(data), "--model", str(tiny_causal), "--out",
         str(tmp_path / "out")], monkeypatch, capsys)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["labels"] == ["yes", "no"] and metrics["n"] == 4 and "f1_yes" in metrics


@pytest.mark.parametrize("text,message", [
    ("labels: [1, 2]", "field 'labels': expected a list of text, got the number 1 (quote it: '1')"),
    ("labels: [true]", "field 'labels': expected a list of text, got the boolean true"),
    ("max_new_tokens: lots", "field 'max_new_tokens': expected a whole number >= 1, got the text 'lots'"),
    ("id_field: [key]", "field 'id_field': expected text, got a list"),
])
def test_task_yaml_values_of_the_wrong_type(text, message, tmp_path, tiny_causal, monkeypatch, capsys):
    # was: a TypeError or AttributeError later, when the labels were joined or the template rendered
    spec = tmp_path / "task.yaml"
    spec.write_text(f"name: t\ninputs: [text]\ntarget: label\ntemplate: '{{text}}'\n{text}\n")
    argv = ["eval", "--task", str(spec), "--data", str(tmp_path / "d.jsonl"), "--model", str(tiny_causal), "--out",
            str(tmp_path / "out")]
    assert cli_error(argv, monkeypatch, capsys) == f"error: {spec}: {message}"


@pytest.mark.parametrize("text", ["", "- name: t\n"])
def test_task_yaml_that_is_not_a_mapping(text, tmp_path, tiny_causal, monkeypatch, capsys):
    # was: "field 'name': missing" for an empty file, a TypeError for a list
    spec = tmp_path / "task.yaml"
    spec.write_text(text)
    argv = ["eval", "--task", str(spec), "--data", str(tmp_path / "d.jsonl"), "--model", str(tiny_causal), "--out",
            str(tmp_path / "out")]
    got = "an empty file" if not text else "a list"
    assert cli_error(argv, monkeypatch, capsys) == (f"error: {spec}: expected a task mapping (name, format, inputs, "
                                                f"target, template, metric, ...), got {got}")


def test_config_values_read_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: 2024-05-01\ntrain:\n  lr: 1e-3\n  mixed_precision: no\ndata:\n  labels: [yes, no, on]\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.mixed_precision == "no" and cfg.data.labels == ["yes", "no", "on"]
    assert cfg.name == "2024-05-01"  # the 1.2 core schema has no dates: a date-like name stays a name
    assert load_config(None, ["train.lr=1e-3", "train.mixed_precision=no"]).train.lr == 1e-3


def test_an_empty_section_is_the_defaults(tmp_path):
    # was: "train: expected a mapping, got None", and in a study a run's empty `train:` wiped the base's
    path = tmp_path / "c.yaml"
    path.write_text("method: {name: lora}\ntrain:\n  # lr: 1e-3\n")
    assert load_config(path).train == load_config(None).train
    study = tmp_path / "s.yaml"
    study.write_text("base: {train: {epochs: 3}}\nruns:\n- name: a\n  train:\n")
    header, runs = load_study(study)
    assert load_config(None, base=deep_merge(header.base, runs[0].raw)).train.epochs == 3


def test_a_quoted_number_is_text_now():
    # The removed YAML 1.1 patches accepted the text '1e-3' for a float and turned false into "no"; under 1.2 a
    # value is what it was written as, so these are type errors that say what they got.
    with pytest.raises(PeftlabError, match=r"^train\.lr: expected a number > 0, got the text '1e-3'$"):
        load_config(None, ["train.lr='1e-3'"])
    with pytest.raises(PeftlabError, match=r"^train\.mixed_precision must be auto, no or bf16, got false$"):
        load_config(None, ["train.mixed_precision=false"])
    with pytest.raises(PeftlabError, match=r"^sweep\.space\.train\.lr\.low: expected a number, got the text '1e-3'$"):
        parse_sweep({"space": {"train.lr": {"low": "1e-3", "high": 0.1}}})


def test_saved_config_round_trips_text_that_looks_like_other_values(tmp_path):
    words = ["no", "yes", "on", "off", "1e-3", "null", "~", "true", "2024-05-01", "0x1F", "017", "1_000", ".inf", "-_"]
    cfg = load_config(None, ["name='1e-3'", "train.mixed_precision=no"])
    cfg.data.labels = words
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["labels"] == words  # and under YAML 1.1


def test_grid_values_are_set_as_read(tmp_path):
    # Grid values were dumped to YAML text and parsed again as overrides; now they are set as they were read.
    path = tmp_path / "s.yaml"
    path.write_text("grids:\n- name: g\n  params: {train.lr: [1e-3], data.labels: [[yes, no]]}\n")
    _, runs = load_study(path)
    assert runs[0].raw == {"train": {"lr": 1e-3}, "data": {"labels": ["yes", "no"]}}


# ---------------------------------------------------------------------------------------------------------------------
# The loader itself
# ---------------------------------------------------------------------------------------------------------------------


def _types(value) -> set[type]:
    if isinstance(value, dict):
        return {dict}.union(*(_types(v) for v in value.values()), *(_types(k) for k in value))
    if isinstance(value, list):
        return {list}.union(*(_types(v) for v in value))
    return {type(value)}


def test_loader_returns_plain_python_types():
    text = "a: {b: [1, 2.5, yes, null, true, {c: d}]}\ne: [[f]]\ng: 2024-05-01\n"
    value = parse_yaml(text, "x.yaml")
    assert value == {"a": {"b": [1, 2.5, "yes", None, True, {"c": "d"}]}, "e": [["f"]], "g": "2024-05-01"}
    assert _types(value) <= {dict, list, str, int, float, bool, type(None)}  # no CommentedMap, no datetime


@pytest.mark.parametrize("text,line,problem", [
    ("a: b: c\n", 1, "mapping values are not allowed here, column 5"),
    ("a:\n  - b\n c: d\n", 3, "expected <block end>, but found '<block mapping start>', column 2"),
    ("x: !!python/object:os.system y\n", 1,
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system', column 4"),
    ("a: \x1f\n", None, "unacceptable character #x001f: special characters are not allowed"),
])
def test_loader_names_file_line_and_problem(text, line, problem, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(YamlSyntaxError) as err:
        read_yaml(path)
    where = f"{path}:{line}" if line else str(path)
    assert str(err.value) == f"{where}: malformed YAML ({problem})"
    assert (err.value.line, err.value.problem) == (line, problem)


def test_loader_reads_a_byte_order_mark_and_refuses_other_encodings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfa: 1\n")
    assert read_yaml(path) == {"a": 1}
    path.write_bytes(b"a: \xff\n")
    with pytest.raises(PeftlabError, match=r"c\.yaml: not UTF-8 text \(byte 3\)"):
        read_yaml(path)


def test_number_like_text_that_is_no_number_stays_text():
    # ruamel's number patterns allow `_`; `-_` matched the int one and raised ValueError instead of reading as text
    assert parse_yaml("a: -_\nb: ._\nc: 1_000", "x") == {"a": "-_", "b": "._", "c": 1000}
    assert parse_yaml(dump_yaml({"a": "-_"}), "x") == {"a": "-_"}


# ---------------------------------------------------------------------------------------------------------------------
# Case 11: a decision on the user's own files named data/
# ---------------------------------------------------------------------------------------------------------------------


def _decided_run(study: Path, name: str, right: int, data: dict) -> None:
    run = study / name
    run.mkdir(parents=True)
    labels = ["yes", "no"]
    rows = [{"id": f"q{i}", "split": "test", "prediction": labels[i % 2] if i < right else labels[(i + 1) % 2],
             "references": [labels[i % 2]]} for i in range(20)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "result.json").write_text(json.dumps({
        "name": name, "method": "lora", "task": "alpaca", "primary_metric": "accuracy", "trainable_params": 10,
        "train_seconds": 1.0, "metrics": {"test_accuracy": right / 20, "test_labels": labels, "test_n": 20}}))
    (run / "config.yaml").write_text(dump_yaml({"name": name, "data": {"task": "alpaca", **data}}))


@pytest.mark.parametrize("data,phrase", [
    ({"train": "/home/me/reviews.jsonl"}, "this test split, drawn from /home/me/reviews.jsonl, not"),
    ({"train": "/home/me/reviews.jsonl", "test": "/home/me/test.jsonl"}, "this test split, read from /home/me/test"),
    ({"path": "mine.csv"}, "this test split, drawn from mine.csv, not"),
])
def test_decision_names_the_users_own_files(data, phrase, tmp_path, monkeypatch, capsys):
    # was: "They describe this test split, drawn from the data in data/, ..." whatever the data was
    study = tmp_path / "s"
    _decided_run(study, "a", 18, data)
    _decided_run(study, "b", 10, data)
    _ok(["report", str(study)], monkeypatch, capsys)
    md = (study / "results.md").read_text()
    assert phrase in md and "data/" not in md
