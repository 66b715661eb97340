"""Issue 39, cases 2, 3, 9, 10 and 11's label inference: data rows that gave a wrong answer with exit 0 or stopped a
whole run. Labels that differ only in case, DialogSum rows with several reference fields, chat conversations over
data.max_length, a huge row, and `eval --task alpaca` without a run.

Every row runs the real CLI (`cli.main()`) on the tiny model; its comment says what happened before the fix.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from badkit import cli_error
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from peftlab import cli
from peftlab.core.config import load_config
from peftlab.recipes.train_run import run_training


def _cli(argv: list[str], monkeypatch, capsys) -> list[str]:
    """Run a CLI command that must succeed; its warning lines on stderr (the progress bars left out)."""
    monkeypatch.setattr(sys, "argv", ["peftlab", *argv])
    cli.main()
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(tmp_path: Path, model: Path, *overrides: str) -> list[str]:
    config = tmp_path / "run.yaml"
    config.write_text("name: r\nmethod: {name: lora}\n")
    return ["train", str(config), f"model.name={model}", "train.max_steps=1", f"output_dir={tmp_path}/runs",
            *overrides]


def _read(run: Path, name: str):
    text = (run / name).read_text()
    return [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)


# ---------------------------------------------------------------------------------------------------------------------
# Case 2: the inferred label set is case-insensitive
# ---------------------------------------------------------------------------------------------------------------------

def _yes_no_rows(spellings: list[str], split: str | None = None) -> list[dict]:
    return [{"id": f"{split or 'r'}{i}", "instruction": f"Is item {i} good?", "output": label,
             **({"split": split} if split else {})} for i, label in enumerate(spellings)]


def test_labels_differing_only_in_case_are_one_label(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: four classes, 'No', 'Yes', 'no', 'yes', with no warning; a right answer in the other case scored wrong.
    train = ["Yes"] * 3 + ["yes"] * 5 + ["No"] * 2 + ["no"] * 4
    data = _jsonl(tmp_path / "train.jsonl", _yes_no_rows(train, "train") + _yes_no_rows(["YES", "no", "No "], "test")
                  + _yes_no_rows(["yes", "No"], "val"))
    err = _cli(_train(tmp_path, tiny_causal, "data.task=alpaca", f"data.path={data}"), monkeypatch, capsys)
    # The label set is inferred from the whole file (as training always has), so val and test rows count too.
    assert err == [f"warning: {data}: labels differing only in case/space were merged: 'No' (4), 'no' (5) -> 'no'; "
                   "'YES' (1), 'Yes' (3), 'yes' (6) -> 'yes'"]
    run = tmp_path / "runs" / "r"
    assert _read(run, "result.json")["task_kind"] == "classification"
    assert load_config(run / "config.yaml").data.labels == ["no", "yes"]
    # Every split's rows read as the label set's spelling, so accuracy and macro-F1 compare like with like.
    assert {r["id"]: r["references"] for r in _read(run, "predictions.jsonl")} == {
        "test0": ["yes"], "test1": ["no"], "test2": ["no"]}
    assert set(_read(run, "metrics.json")["test_pred_counts"]) == {"no", "yes"}


def test_given_labels_match_rows_up_to_case(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: error "unknown label 'YES'; valid: yes, no" for a row that only shouts the label.
    data = _jsonl(tmp_path / "d.jsonl", _yes_no_rows(["YES", "no", "yes", "No"] * 3))
    _cli(["eval", "--task", "alpaca", "--data", str(data), "--model", str(tiny_causal), "--out", str(tmp_path / "o")],
         monkeypatch, capsys)
    rows = _read(tmp_path / "o", "predictions.jsonl")
    assert {r["references"][0] for r in rows} == {"yes", "no"}


# ---------------------------------------------------------------------------------------------------------------------
# Case 11: `eval --task alpaca` without a run infers labels as training does
# ---------------------------------------------------------------------------------------------------------------------

def test_eval_without_a_run_scores_a_two_label_file_by_accuracy(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: a two-label file scored with ROUGE (rouge1, bleu) instead of accuracy and macro-F1.
    data = _jsonl(tmp_path / "d.jsonl", _yes_no_rows(["yes", "no"] * 4))
    _cli(["eval", "--task", "alpaca", "--data", str(data), "--model", str(tiny_causal), "--out", str(tmp_path / "o")],
         monkeypatch, capsys)
    metrics = _read(tmp_path / "o", "metrics.json")
    assert {"accuracy", "macro_f1"} <= set(metrics) and "rouge1" not in metrics
    assert metrics["labels"] == ["no", "yes"]


# ---------------------------------------------------------------------------------------------------------------------
# Case 3: every DialogSum reference field counts
# ---------------------------------------------------------------------------------------------------------------------

def test_dialogsum_summary_and_numbered_summaries_are_all_references(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: a row with `summary` and `summary2`/`summary3` kept only `summary`; the max-over-references ROUGE and
    # BLEU missed the other two.
    rows = [{"fname": f"d{i}", "dialogue": f"#Person1#: the patients {i}", "summary": f"first {i}",
             "summary3": f"third {i}", "summary2": f"second {i}"} for i in range(3)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    _cli(["eval", "--task", "dialogsum", "--data", str(data), "--model", str(tiny_causal), "--out",
          str(tmp_path / "o")], monkeypatch, capsys)
    assert [r["references"] for r in _read(tmp_path / "o", "predictions.jsonl")] == [
        [f"first {i}", f"second {i}", f"third {i}"] for i in range(3)]


# ---------------------------------------------------------------------------------------------------------------------
# Case 9: chat conversations over data.max_length are cut from their oldest end; a row is dropped only when its
# answer alone does not fit
# ---------------------------------------------------------------------------------------------------------------------

def _conversation(i: int, turns: int, answer: str = "A short answer.") -> dict:
    messages = [{"role": "system", "content": "Be brief."}]
    for k in range(turns):
        messages += [{"role": "user", "content": f"Old question {k} about the patients and the weather."},
                     {"role": "assistant", "content": f"Old answer {k} about the patients."}]
    messages += [{"role": "user", "content": f"Final question {i}?"}, {"role": "assistant", "content": answer}]
    return {"id": f"c{i}", "messages": messages}


def _chat_file(tmp_path: Path) -> Path:
    rows = [_conversation(i, 1) for i in range(8)]
    rows[2] = _conversation(2, 12)  # far over 128 tokens: its oldest turns go
    rows[5] = _conversation(5, 0, answer="a long answer about the patients " * 12)  # over 128 on its answer alone
    for row, split in zip(rows, ["train"] * 6 + ["val", "test"], strict=True):
        row["split"] = split
    return _jsonl(tmp_path / "chat.jsonl", rows)


def test_long_conversations_are_cut_and_counted(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: "error: example c2: the conversation is 338 tokens, over max_length 128" stopped the whole run.
    data = _chat_file(tmp_path)
    err = _cli(_train(tmp_path, tiny_causal, "data.task=chat", f"data.path={data}", "data.max_length=128"),
               monkeypatch, capsys)
    assert err == ["warning: 1 training row(s) left out: over data.max_length 128 even cut (set data.too_long: error "
                   "to stop on them instead)"]
    result = _read(tmp_path / "runs" / "r", "result.json")
    assert result["truncated_examples"] == 1 and result["dropped_examples"] == 1
    assert result["train_mix"] == {"chat": 5}


def test_too_long_error_keeps_the_old_behaviour_and_names_the_row(tmp_path, tiny_causal, monkeypatch, capsys):
    # was: "example c2: ..." named neither the file nor the row.
    data = _chat_file(tmp_path)
    line = cli_error(_train(tmp_path, tiny_causal, "data.task=chat", f"data.path={data}", "data.max_length=128",
                             "data.too_long=error"), monkeypatch, capsys)
    match = re.fullmatch(rf"error: {re.escape(str(data))}:3: the conversation is (\d+) tokens, over data.max_length "
                         "128; raise it, or set data.too_long: cut", line)
    assert match and int(match.group(1)) > 128, line


def test_an_eval_row_whose_answer_cannot_fit_is_an_error(tmp_path, tiny_causal, monkeypatch, capsys):
    # An eval row is never dropped: the score would silently cover fewer rows than the file holds.
    data = _jsonl(tmp_path / "d.jsonl", [_conversation(0, 0, "a long answer about the patients " * 12)])
    line = cli_error(["eval", "--task", "chat", "--data", str(data), "--model", str(tiny_causal), "--out",
                       str(tmp_path / "o"), "--max-length", "64"], monkeypatch, capsys)
    assert re.fullmatch(rf"error: {re.escape(str(data))}:1: the answer alone is \d+ tokens with the chat framing, "
                        "over data.max_length 64", line), line
    assert not (tmp_path / "o").exists()


def test_too_long_takes_cut_or_error(tmp_path, tiny_causal, monkeypatch, capsys):
    line = cli_error(_train(tmp_path, tiny_causal, "data.too_long=drop"), monkeypatch, capsys)
    assert line == "error: data.too_long must be cut or error, got 'drop'"


# ---------------------------------------------------------------------------------------------------------------------
# Case 10: a huge row is bounded before it is tokenized
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dialogsum_run(tiny_causal, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    data = _jsonl(folder / "d.jsonl", [{"dialogue": f"#Person1#: hello {i}", "summary": "They greet."}
                                       for i in range(10)])
    return run_training(load_config(None, [f"model.name={tiny_causal}", "data.task=dialogsum", f"data.path={data}",
                                           "data.max_length=256", "train.max_steps=1", f"output_dir={folder}/runs",
                                           "name=big"]))


def test_a_huge_row_is_cut_before_it_is_tokenized(dialogsum_run, tmp_path, monkeypatch, capsys):
    # was: one 100 MB row took 13.7 GB and 204 s in `predict`: the whole text went through the tokenizer.
    huge = "#Person1#: " + "the patients were well " * 900_000  # about 20 MB
    rows = _jsonl(tmp_path / "rows.jsonl", [{"dialogue": huge}, {"dialogue": "#Person1#: hi"}])
    longest = []
    call = PreTrainedTokenizerBase.__call__

    def spy(self, text=None, *args, **kwargs):
        longest.append(max((len(t) for t in (text, kwargs.get("text_target")) if isinstance(t, str)), default=0))
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy)
    _cli(["predict", str(dialogsum_run), "--input", str(rows), "--out", str(tmp_path / "p.jsonl")],
         monkeypatch, capsys)
    assert len(_read(tmp_path, "p.jsonl")) == 2
    # At most a window of max_length x 32 characters (plus the template) is ever tokenized, not 20 MB.
    assert 0 < max(longest) <= 256 * 32 + 1000, max(longest)
