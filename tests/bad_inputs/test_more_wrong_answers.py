"""Issue 39, the cases of its "wrong answer with exit 0" kind that it did not list: CSV cells read as guessed types,
labels that differ only in Unicode form or inner space, teacher outputs matched by an id that two rows share, a
served classifier that ignored n/temperature/stream and unknown input fields, and a study report that paired runs
scored on different test examples.

Every row runs the real CLI (`cli.main()`) or the real server on the tiny model; its comment says what happened
before the fix.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest
from badkit import cli_error
from fastapi.testclient import TestClient

from peftlab import cli
from peftlab.deploy.serve import create_app
from peftlab.models.loading import load_model


def _cli(argv: list[str], monkeypatch, capsys) -> list[str]:
    """Run a CLI command that must succeed; its warning lines on stderr."""
    monkeypatch.setattr(sys, "argv", ["peftlab", *argv])
    cli.main()
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _read(path: Path):
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)


def _train(tmp_path: Path, model: Path, name: str, *overrides: str) -> list[str]:
    config = tmp_path / "run.yaml"
    config.write_text("method: {name: lora}\n")
    return ["train", str(config), f"name={name}", f"model.name={model}", "train.max_steps=1",
            f"output_dir={tmp_path}/study", *overrides]


# ---------------------------------------------------------------------------------------------------------------------
# CSV cells are the text they hold
# ---------------------------------------------------------------------------------------------------------------------

def test_csv_cells_are_text_as_written(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: pandas guessed the types: the ids 007/008 came back as "7"/"8", and an input of "NA" or "None" was read
    # as a missing value, so the row was scored without its context.
    rows = "".join(f"00{i},Is item {i} good?,{'NA' if i % 2 else 'None'},{'yes' if i % 2 else 'no'}\n"
                   for i in range(1, 9))
    data = tmp_path / "d.csv"
    data.write_text("id,instruction,input,output\n" + rows)
    _cli(["eval", "--task", "alpaca", "--data", str(data), "--model", str(tiny_causal), "--out", str(tmp_path / "o")],
         monkeypatch, capsys)
    preds = {r["id"]: r for r in _read(tmp_path / "o" / "predictions.jsonl")}
    assert set(preds) == {f"00{i}" for i in range(1, 9)}
    assert "NA" in preds["001"]["prompt"] and "None" in preds["002"]["prompt"]


# ---------------------------------------------------------------------------------------------------------------------
# Labels equal up to Unicode form and inner space are one label
# ---------------------------------------------------------------------------------------------------------------------

def test_labels_differing_in_unicode_form_or_inner_space_are_one(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: four classes, 'café' (composed), 'café' (e + combining accent), 'not sure' and 'not  sure', with no
    # warning: two spellings that look the same split a class, and a right answer scored wrong.
    composed = "café"
    decomposed = unicodedata.normalize("NFD", composed)
    outputs = [composed] * 3 + [decomposed] * 2 + ["not sure"] * 3 + ["not  sure"] * 2
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": f"Item {i}?", "output": o} for i, o in enumerate(outputs)])
    warnings = _cli(["eval", "--task", "alpaca", "--data", str(data), "--model", str(tiny_causal), "--out",
                     str(tmp_path / "o")], monkeypatch, capsys)
    assert len(warnings) == 1 and "were merged" in warnings[0]
    metrics = _read(tmp_path / "o" / "metrics.json")
    assert metrics["labels"] == [composed, "not sure"]
    assert {r["references"][0] for r in _read(tmp_path / "o" / "predictions.jsonl")} == {composed, "not sure"}


# ---------------------------------------------------------------------------------------------------------------------
# data.target: outputs are matched by id, so an id must say which row
# ---------------------------------------------------------------------------------------------------------------------

def _teacher_case(tmp_path: Path, data_ids: list[str], teacher: list[tuple[str, str]]) -> tuple[Path, Path]:
    data = _jsonl(tmp_path / "d.jsonl", [{"id": i, "instruction": f"Question {n}?", "output": "an answer"}
                                         for n, i in enumerate(data_ids)])
    outputs = _jsonl(tmp_path / "t.jsonl", [{"id": i, "output": o} for i, o in teacher])
    return data, outputs


def test_teacher_file_with_two_outputs_for_one_id(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: exit 0; the later output silently replaced the earlier one, and an example trained on the wrong text.
    ids = [str(i) for i in range(10)]
    data, outputs = _teacher_case(tmp_path, ids, [(i, f"teacher {i}") for i in ids] + [("3", "another text")])
    line = cli_error(_train(tmp_path, tiny_causal, "r", "data.task=alpaca", f"data.path={data}",
                             f"data.target={outputs}"), monkeypatch, capsys)
    assert line == f"error: {outputs}:11: field 'id': id '3' has another output on line 4"


def test_teacher_outputs_for_rows_sharing_an_id(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: exit 0; both rows with id '1' trained on the one teacher output written for id '1'.
    ids = [str(i % 5) for i in range(10)]
    data, outputs = _teacher_case(tmp_path, ids, [(str(i), f"teacher {i}") for i in range(5)])
    line = cli_error(_train(tmp_path, tiny_causal, "r", "data.task=alpaca", f"data.path={data}",
                             f"data.target={outputs}"), monkeypatch, capsys)
    assert line.startswith(f"error: {data}:") and line.endswith(
        "; data.target matches outputs to rows by id, so ids must be unique")
    assert "is also the id of " in line


# ---------------------------------------------------------------------------------------------------------------------
# The study report pairs runs only on the same test examples
# ---------------------------------------------------------------------------------------------------------------------

def test_report_does_not_pair_runs_on_different_files(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: both files number their rows row1, row2, ... with the same labels, so the test ids and references
    # matched, and the report drew a paired verdict ("Tied with it ...") between runs on different questions.
    for name in ("a", "b"):
        _jsonl(tmp_path / f"{name}.jsonl", [{"instruction": f"{name} question {i}?", "output": ["yes", "no"][i % 2]}
                                            for i in range(20)])
        _cli(_train(tmp_path, tiny_causal, f"r{name}", "data.task=alpaca", f"data.path={tmp_path}/{name}.jsonl"),
             monkeypatch, capsys)
    _cli(["report", str(tmp_path / "study")], monkeypatch, capsys)
    md = (tmp_path / "study" / "results.md").read_text()
    assert "## Verdict" not in md and not (tmp_path / "study" / "decision.json").exists()
    assert (f"Warning: The runs were not scored on the same test examples (ra: data.path={tmp_path}/a.jsonl; rb: "
            f"data.path={tmp_path}/b.jsonl): their test metrics are not a comparison") in md
    assert "not scored on the same test examples" in (tmp_path / "study" / "report.html").read_text()


def test_report_does_not_pair_a_run_on_an_edited_file(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: a test label was corrected between the two runs; the ids stayed, so the old run was paired with the new
    # one on a verdict, though the two were scored against different answers.
    train = _jsonl(tmp_path / "train.jsonl", [{"instruction": f"Question {i}?", "output": ["yes", "no"][i % 2]}
                                              for i in range(12)])
    test = tmp_path / "test.jsonl"
    for name, first in (("a", "yes"), ("b", "no")):
        _jsonl(test, [{"instruction": f"Test {i}?", "output": [first, "no", "yes", "no"][i]} for i in range(4)])
        _cli(_train(tmp_path, tiny_causal, f"r{name}", "data.task=alpaca", f"data.train={train}",
                    f"data.test={test}"), monkeypatch, capsys)
    _cli(["report", str(tmp_path / "study")], monkeypatch, capsys)
    md = (tmp_path / "study" / "results.md").read_text()
    assert "## Verdict" not in md
    assert "ra and rb have different test ids or references (a data file changed between runs?)" in md


# ---------------------------------------------------------------------------------------------------------------------
# A served classifier (linear head): what it cannot honour is refused, as for generation
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head_server(tiny_causal, tmp_path_factory):
    """The server on tiny_causal with a linear-head run on alpaca yes/no data."""
    tmp = tmp_path_factory.mktemp("head")
    data = _jsonl(tmp / "d.jsonl", [{"instruction": f"Is item {i} good?", "input": f"Item {i} is fine.",
                                     "output": ["yes", "no"][i % 2]} for i in range(16)])
    config = tmp / "run.yaml"
    config.write_text("name: head\nmethod: {name: linear-head, head_layer: 1}\n")
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["peftlab", "train", str(config), f"model.name={tiny_causal}", "model.device=cpu",
                             "data.task=alpaca", f"data.path={data}", f"output_dir={tmp}/runs"])
    cli.main()
    mp.undo()
    app = create_app(load_model(str(tiny_causal), device="cpu"), {}, heads={"head": tmp / "runs" / "head"})
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n", 3, "only n=1 is supported"),
    ("temperature", 0.8, "only greedy decoding is supported: send temperature 0 or leave it out"),
    ("stream", True, "streaming is not supported"),
])
def test_head_completion_refuses_what_it_cannot_honour(head_server, field, value, message):
    # was: 200 with one greedy label, n, temperature and stream silently ignored.
    answer = head_server.post("/v1/completions", json={"model": "head", "prompt": "Is item 3 good?", field: value})
    assert answer.status_code == 400 and answer.json()["error"]["message"] == message


def test_classify_refuses_an_unknown_input_field(head_server):
    # was: 200; "inputs" (a typo for "input") was dropped and the question classified without its context.
    body = {"model": "head", "inputs": {"instruction": "Is item 3 good?", "inputs": "Item 3 is broken."}}
    answer = head_server.post("/v1/classify", json=body)
    assert answer.status_code == 400
    message = "inputs: unknown field 'inputs'; this classifier reads instruction, input"
    assert answer.json()["error"]["message"] == message
    good = {"instruction": "Is item 3 good?", "input": "Fine."}
    ok = head_server.post("/v1/classify", json={**body, "inputs": good})
    assert ok.status_code == 200 and ok.json()["label"] in ("yes", "no")
