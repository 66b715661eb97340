"""Issue 39, the cases of the same kinds that nobody listed: tracebacks, file system faults, and signals or lost work
across the commands the first pass did not cover (probe, report, distill, export, merge, sweep, serve, cv, bench).

Every row runs the real CLI (`cli.main()`, or `python -m peftlab` where a process group is needed); its comment says
what happened before the fix. The read-only simulation and the one-line check are the ones of test_faults.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from badkit import cli_error, must_not_load, read_only


def _run_copy(tiny_lora_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_lora_run, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------------------------
# Files that are not what they should be: one line naming the file (and the line), before any work
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,task,where", [
    # was: a UnicodeDecodeError traceback for each
    ("bin.jsonl", b"\xff\xfe\x00\x81 binary", "dialogsum", "1: not UTF-8 text (byte 0xff)"),
    ("latin1.jsonl", b'{"dialogue": "hi", "summary": "x"}\n{"dialogue": "caf\xe9", "summary": "x"}\n', "dialogsum",
     "2: not UTF-8 text (byte 0xe9)"),
    ("bin.json", b"\xef\xbb\xbf{\n\x00\x80 zip", "pubmedqa", "2: not UTF-8 text (byte 0x80)"),  # after a BOM
])
def test_a_data_file_that_is_not_utf8(name, content, task, where, tmp_path, tiny_causal, monkeypatch, capsys):
    data = tmp_path / name
    data.write_bytes(content)
    message = cli_error(["eval", "--task", task, "--data", str(data), "--model", str(tiny_causal),
                          "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert message == f"error: {data}:{where}; save the file as UTF-8"


def test_a_teacher_output_csv_that_is_not_utf8(tmp_path, small_pubmedqa, monkeypatch, capsys):
    # was: UnicodeDecodeError traceback from the CSV reader
    outputs = tmp_path / "teacher.csv"
    outputs.write_bytes(b"id,output\n1,s\xed\n")
    message = cli_error(["distill", "--teacher", str(outputs), "--task", "pubmedqa", "--data", str(small_pubmedqa),
                          "--out", str(tmp_path / "t.jsonl")], monkeypatch, capsys)
    assert message == f"error: {outputs}:2: not UTF-8 text (byte 0xed); save the file as UTF-8"
    assert not (tmp_path / "t.jsonl").exists()


def test_eval_of_a_run_whose_config_was_cut_off(tmp_path, tiny_lora_run, monkeypatch, capsys):
    # was: the missing sections were filled with the defaults and the run scored as another run: exit 0 on predict,
    # or "data/pubmedqa/pqal_trainval.json: no such data file" (the default task's file) on eval
    run = _run_copy(tiny_lora_run, tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text[: text.index("\ndata:") + 1])
    message = f"error: {run}/config.yaml: no 'data' section; a run writes every section, so the file was cut off " \
              "or edited: train the run again"
    for argv in (["eval", str(run), "--out", str(tmp_path / "o")], ["merge", str(run), "--out", str(tmp_path / "m")],
                 ["predict", str(run), "--input", str(tiny_lora_run.parent / "pubmedqa.json"),
                  "--out", str(tmp_path / "p.jsonl")]):
        assert cli_error(argv, monkeypatch, capsys) == message


def test_probe_of_a_run_whose_result_json_was_cut_off(tmp_path, tiny_lora_run, monkeypatch, capsys):
    # was: a JSONDecodeError traceback, after every test prompt had been perturbed and scored
    run = _run_copy(tiny_lora_run, tmp_path)
    (run / "result.json").write_text((run / "result.json").read_text()[:50])
    must_not_load(monkeypatch, "peftlab.recipes.probe_run.load_run")
    line = cli_error(["probe", str(run)], monkeypatch, capsys)
    assert line.startswith(f"error: {run}/result.json: not readable JSON (Expecting ")
    assert line.endswith("); the file may have been cut off or overwritten")
    assert not (run / "probe.json").exists()


def test_probe_of_a_read_only_run_folder(tmp_path, tiny_lora_run, monkeypatch, capsys):
    # was: a traceback writing probe.json, after the probe's work
    run = _run_copy(tiny_lora_run, tmp_path)
    read_only(monkeypatch, run)
    must_not_load(monkeypatch, "peftlab.recipes.probe_run.load_run")
    assert cli_error(["probe", str(run)], monkeypatch, capsys) == (
        f"error: {run}: cannot write here (read-only file system); copy the run folder somewhere writable and probe "
        "the copy")


def test_train_resume_from_a_cut_off_checkpoint(tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    # was: "error: Invalid argument" (torch.load's OSError, naming no file); an empty file: an EOFError traceback
    config = tmp_path / "run.yaml"
    config.write_text(f"name: r\noutput_dir: {tmp_path}/runs\nmethod: {{name: lora}}\n")
    argv = ["train", str(config), f"model.name={tiny_causal}", f"data.path={small_pubmedqa}", "data.limit_train=4",
            "data.limit_eval=2", "data.max_length=128", "train.max_steps=2", "--resume"]
    ckpt = tmp_path / "runs" / "r" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    for content, reason in ((b"", "EOFError"), (b"PK\x03\x04" + b"\x00" * 64, None)):
        ckpt.write_bytes(content)
        line = cli_error(argv, monkeypatch, capsys)
        assert line.startswith(f"error: {ckpt}: not a checkpoint of this run ("), line
        assert line.endswith("); rerun without --resume to train from step 0 (it replaces the checkpoint)")
        assert reason is None or f"({reason})" in line
        assert not (tmp_path / "runs" / "r" / "result.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# report: an empty folder, and one bad result.json among good ones
# ---------------------------------------------------------------------------------------------------------------------


def test_report_of_an_empty_folder(tmp_path, monkeypatch, capsys):
    # was: ValueError traceback "no run folder with result.json in ..."
    (tmp_path / "study" / "not-a-run").mkdir(parents=True)
    assert cli_error(["report", str(tmp_path / "study")], monkeypatch, capsys) == (
        f"error: {tmp_path}/study: no run folder with a result.json here; give a study folder (or a run folder) "
        "that holds finished runs")


@pytest.mark.parametrize("content,problem", [
    (b'{"name": "bad", "method"', "not readable JSON (Expecting ':' delimiter: line 1 column 25 (char 24)); "
                                  "the file may have been cut off or overwritten"),  # was: JSONDecodeError traceback
    (b"[1, 2]", "not a run result (a JSON object); delete it and rerun that run, or move its folder out of the "
                "study"),  # was: AttributeError traceback ('list' object has no attribute 'get')
])
def test_report_with_one_bad_result_among_good_ones(content, problem, tmp_path, tiny_lora_run, monkeypatch, capsys):
    study = tmp_path / "study"
    shutil.copytree(tiny_lora_run, study / "good")
    shutil.copytree(tiny_lora_run, study / "bad")
    (study / "bad" / "result.json").write_bytes(content)
    assert cli_error(["report", str(study)], monkeypatch, capsys) == f"error: {study}/bad/result.json: {problem}"
    assert not (study / "results.md").exists() and not (study / "good" / "peft_result.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Options: limits, counts and outputs that were read as something else
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_limit_below_one_on_probe_and_distill(limit, tmp_path, tiny_lora_run, tiny_causal, small_pubmedqa,
                                              monkeypatch, capsys):
    # was: probe --limit 0 probed the default 50 examples and -1 said "the test split is empty"; distill --limit 0
    # distilled every example and -1 all but the last, exit 0
    message = f"error: --limit must be >= 1 (leave it out to score every example), got {limit}"
    assert cli_error(["probe", str(tiny_lora_run), "--limit", limit], monkeypatch, capsys) == message
    out = tmp_path / "t.jsonl"
    assert cli_error(["distill", "--teacher", str(tiny_causal), "--task", "pubmedqa", "--data", str(small_pubmedqa),
                       "--out", str(out), "--limit", limit], monkeypatch, capsys) == message
    assert not out.exists()


def test_probe_limit_below_one_in_a_config(tmp_path, monkeypatch, capsys):
    # was: experiments.probe_limit: 0 probed nothing, and -1 every test example but the last
    line = cli_error(["train", "experiments.probe=true", "experiments.probe_limit=0", f"output_dir={tmp_path}"],
                      monkeypatch, capsys)
    assert line == "error: experiments.probe_limit must be >= 1, got 0"


def test_distill_and_export_outputs_that_are_folders(tmp_path, tiny_lora_run, tiny_causal, small_pubmedqa,
                                                     monkeypatch, capsys):
    # was: distill: "is a directory; the previous version of this file was kept", after the teacher had answered
    # every example; export: "cannot write the GGUF file (is a directory)", after the merge
    must_not_load(monkeypatch, "peftlab.experiments.distill._predict", "peftlab.deploy.export.merged_model")
    assert cli_error(["distill", "--teacher", str(tiny_causal), "--task", "pubmedqa", "--data", str(small_pubmedqa),
                       "--out", str(tmp_path)], monkeypatch, capsys) == (
        f"error: {tmp_path}: is a folder; --out names the file to write, e.g. {tmp_path}/teacher.jsonl")
    assert cli_error(["export", str(tiny_lora_run), "--gguf", str(tmp_path)], monkeypatch, capsys) == (
        f"error: {tmp_path}: is a folder; --gguf names the file to write, e.g. {tmp_path}/model.gguf")


def test_merge_out_that_is_a_file(tmp_path, tiny_lora_run, monkeypatch, capsys):
    # was: "error: FILE: Not a directory"
    out = tmp_path / "merged"
    out.write_text("x")
    assert cli_error(["merge", str(tiny_lora_run), "--out", str(out)], monkeypatch, capsys) == (
        f"error: {out}: is a file; --out names the folder to save the merged model in")


def test_predict_reads_its_input_before_loading_the_model(tmp_path, tiny_lora_run, monkeypatch, capsys):
    # was: the run's base model and adapter loaded first, then "no such data file"
    must_not_load(monkeypatch, "peftlab.recipes.eval_run.load_run")
    line = cli_error(["predict", str(tiny_lora_run), "--input", str(tmp_path / "nope.jsonl"),
                       "--out", str(tmp_path / "p.jsonl")], monkeypatch, capsys)
    assert line.startswith(f"error: {tmp_path}/nope.jsonl: no such data file")


def _sweep_file(tmp_path: Path, model: Path, data: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "sw", "output_dir": str(tmp_path / "runs"),
        "base": {"model": {"name": str(model)}, "data": {"path": str(data)}, "train": {"max_steps": 1}},
        "sweep": {"trials": 2, "space": {"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}}},
    }))
    return path


@pytest.mark.parametrize("argv,message", [
    # was: --trials 0 ran the study's 2 trials, and -1 ran none, both with exit 0
    (["--trials", "0"], "error: --trials: expected an integer >= 1, got 0"),
    (["--trials", "-1"], "error: --trials: expected an integer >= 1, got -1"),
    # was: a SQLAlchemy ArgumentError traceback, and an empty study folder left behind
    (["--storage", "not-a-url"], "error: --storage 'not-a-url': not a database URL Optuna can use (Could not parse "
                                 "SQLAlchemy URL from given URL string); e.g. sqlite:///runs/sweep.db or "
                                 "postgresql://user@host/db"),
    # was: an OperationalError traceback (500 lines)
    (["--storage", "sqlite:////nonexistent/x.db"], "error: --storage 'sqlite:////nonexistent/x.db': cannot open the "
                                                   "database (unable to open database file)"),
])
def test_sweep_bad_options(argv, message, tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    path = _sweep_file(tmp_path, tiny_causal, small_pubmedqa)
    assert cli_error(["sweep", str(path), *argv], monkeypatch, capsys) == message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_port_out_of_range(port, monkeypatch, capsys):
    # was: OverflowError traceback from socket.bind
    line = cli_error(["serve", "--port", port], monkeypatch, capsys)
    assert line == f"error: --port must be 0 to 65535, got {port}"


def test_cv_with_zero_folds(tmp_path, monkeypatch, capsys):
    # was: --folds 0 ran the default 10 folds
    assert cli_error(["cv", f"output_dir={tmp_path}", "--folds", "0"], monkeypatch, capsys) == (
        "error: cross-validation needs at least 3 folds (test, val, train), got 0")


def test_bench_with_no_methods(monkeypatch, capsys):
    # was: exit 0 after benchmarking nothing, with an empty table
    assert cli_error(["bench", "train", "--smoke", "--methods", ","], monkeypatch, capsys) == (
        "error: bench train: --methods names no method; choose from ['full', 'lora', 'prompt-tuning']")


# ---------------------------------------------------------------------------------------------------------------------
# Signals: SIGTERM to `peftlab cv` (a real process group), then a rerun that goes on from the fold's checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def _cv(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftlab", "cv", str(config), "--folds", "3"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _shown_lines(out: str) -> list[str]:
    """What a terminal shows: the last redraw of each line, less the progress bars."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in out.split("\n")]
    return [line for line in lines if line and not re.search(r"\|.*\[\d+:\d+", line)]


def test_sigterm_stops_cv_and_a_rerun_goes_on_from_the_checkpoint(tmp_path, tiny_causal, small_pubmedqa):
    # was: the fold's own line "rerun with --resume", which `peftlab cv` does not have; a rerun trained the fold from
    # step 0 and overwrote its checkpoint. The line was also glued to the progress bar, after two lines of a peft
    # FutureWarning.
    config = tmp_path / "cv.yaml"
    config.write_text(yaml.safe_dump({
        "name": "cv", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_causal)},
        "data": {"path": str(small_pubmedqa), "max_length": 256},
        "train": {"epochs": 2, "batch_size": 2, "checkpoint_every": 1, "threads": 1}}))
    fold = tmp_path / "runs" / "cv" / "fold-0"
    proc = _cv(config)
    deadline = time.time() + 120
    while not (fold / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the group is left
    errors = [line for line in _shown_lines(out) if "error" in line.lower() or "warn" in line.lower()]
    assert errors == ["error: cross-validation stopped by SIGTERM; 0 of 3 folds finished; rerun the same command "
                      "to go on"], out
    assert (fold / "checkpoint.pt").exists() and not (fold / "result.json").exists()

    again = _cv(config)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert int(re.search(r"resuming fold-0 from \S+ at step (\d+)", out).group(1)) >= 1  # not trained from step 0
    assert (tmp_path / "runs" / "cv" / "cv.md").is_file()
