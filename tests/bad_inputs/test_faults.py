"""Issue 39, cases 6, 8 and three of 11's wording bugs: the file system (read-only, full, permission denied) under
eval, predict, train, studies and the model cache; SIGTERM and Ctrl-C to `peftlab compare`; and lines that said
what did not happen.

Every row runs the real CLI (`cli.main()`, or `python -m peftlab` where a process group is needed); its comment says
what happened before the fix. The tests run as root, where chmod does not stop a write, so a read-only folder is
simulated: `_read_only` makes every create and write under it fail with the errno a read-only mount gives.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from badkit import cli_error, must_not_load, read_only
from safetensors import SafetensorError
from trainkit import start_compare

from peftlab import cli
from peftlab.core import files


def _lora_copy(tiny_lora_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_lora_run, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------------------------
# Case 6: read-only and permission-denied output folders are refused before the work
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_eval_out_on_a_read_only_folder(code, reason, tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    # was: an OSError traceback from write_json, after every example had been scored
    read_only(monkeypatch, tmp_path / "ro", code)
    must_not_load(monkeypatch, "peftlab.recipes.eval_run.load_for_inference")
    line = cli_error(["eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model", str(tiny_causal),
                       "--out", str(tmp_path / "ro" / "out")], monkeypatch, capsys)
    assert line == f"error: {tmp_path}/ro/out: cannot write here ({reason}); choose another --out"


def test_predict_out_on_a_read_only_folder(tmp_path, tiny_lora_run, small_pubmedqa, monkeypatch, capsys):
    # was: an OSError traceback from write_jsonl, after every row had been answered
    read_only(monkeypatch, tmp_path / "ro")
    must_not_load(monkeypatch, "peftlab.recipes.eval_run.load_run")
    line = cli_error(["predict", str(tiny_lora_run), "--input", str(small_pubmedqa),
                       "--out", str(tmp_path / "ro" / "p.jsonl")], monkeypatch, capsys)
    assert line == f"error: {tmp_path}/ro: cannot write here (read-only file system); choose another --out"


def test_predict_out_that_is_a_folder(tmp_path, tiny_lora_run, small_pubmedqa, monkeypatch, capsys):
    # was: IsADirectoryError traceback from os.replace, after every row had been answered
    line = cli_error(["predict", str(tiny_lora_run), "--input", str(small_pubmedqa), "--out", str(tmp_path)],
                      monkeypatch, capsys)
    assert line == (f"error: {tmp_path}: is a folder; --out names the JSONL file to write, e.g. "
                    f"{tmp_path}/predictions.jsonl")


def test_eval_of_a_read_only_run_folder(tmp_path, tiny_lora_run, monkeypatch, capsys):
    # was: an OSError traceback writing RUN/eval/test/metrics.json, after scoring
    run = _lora_copy(tiny_lora_run, tmp_path)
    read_only(monkeypatch, run)
    line = cli_error(["eval", str(run)], monkeypatch, capsys)
    assert line == f"error: {run}/eval/test: cannot write here (read-only file system); choose another --out"
    # The advice works: the run is only read, and --out elsewhere scores it.
    monkeypatch.setattr(sys, "argv", ["peftlab", "eval", str(run), "--out", str(tmp_path / "elsewhere")])
    cli.main()
    assert {p.name for p in (tmp_path / "elsewhere").iterdir()} == {"metrics.json", "predictions.jsonl"}
    assert not (run / "eval").exists()


def _train_argv(tmp_path: Path, model: Path, data: Path, *overrides: str) -> list[str]:
    config = tmp_path / "run.yaml"
    config.write_text("name: r\nmethod: {name: lora}\n")
    return ["train", str(config), f"model.name={model}", f"data.path={data}", "data.limit_train=4",
            "data.limit_eval=2", "data.max_length=128", "train.max_steps=2", "train.checkpoint_every=1",
            f"output_dir={tmp_path}/runs", *overrides]


def test_train_into_a_read_only_output_dir(tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    # was: an OSError traceback from the run folder lock, after the model had loaded
    read_only(monkeypatch, tmp_path / "runs")
    must_not_load(monkeypatch, "peftlab.recipes.train_run.load_model")
    line = cli_error(_train_argv(tmp_path, tiny_causal, small_pubmedqa), monkeypatch, capsys)
    assert line == f"error: {tmp_path}/runs/r: cannot write here (read-only file system); set output_dir to a " \
                   "writable folder"


def test_study_into_a_read_only_output_dir(tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    # was: an OSError traceback creating the study folder
    study = tmp_path / "s.yaml"
    base = {"model": {"name": str(tiny_causal)}, "data": {"path": str(small_pubmedqa)}}
    study.write_text(yaml.safe_dump({"name": "s", "output_dir": str(tmp_path / "ro"), "base": base,
                                     "runs": [{"name": "zs", "method": {"name": "zero-shot"}}]}))
    read_only(monkeypatch, tmp_path / "ro")
    line = cli_error(["compare", str(study)], monkeypatch, capsys)
    assert line == (f"error: {tmp_path}/ro/s: cannot write here (read-only file system); set output_dir in the "
                    "study to a writable folder")


def test_read_only_model_cache(tmp_path, small_pubmedqa, monkeypatch, capsys):
    # was: an OSError traceback from the GGUF conversion, after 40 s of dequantizing
    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "home"))
    read_only(monkeypatch, tmp_path / "home")
    must_not_load(monkeypatch, "peftlab.models.packaged._convert_gguf")
    line = cli_error(["eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model",
                       "smollm2-135m-instruct", "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert line == (f"error: {tmp_path}/home/models/smollm2-135m-instruct: cannot write here (read-only file "
                    "system); set PEFTLAB_HOME to a writable folder with room for the converted model "
                    "(4 bytes a parameter)")


def test_merge_into_a_read_only_folder(tmp_path, tiny_lora_run, monkeypatch, capsys):
    # was: an OSError traceback creating the output folder, after the merge
    read_only(monkeypatch, tmp_path / "ro")
    must_not_load(monkeypatch, "peftlab.deploy.export.merged_model")
    line = cli_error(["merge", str(tiny_lora_run), "--out", str(tmp_path / "ro" / "merged")], monkeypatch, capsys)
    assert line == f"error: {tmp_path}/ro/merged: cannot write here (read-only file system); choose another --out"


# ---------------------------------------------------------------------------------------------------------------------
# Case 6: a full disk while saving: one line, nothing half-written, no finished work lost
# ---------------------------------------------------------------------------------------------------------------------


def test_train_whose_adapter_save_fills_the_disk_resumes_without_training(tmp_path, tiny_causal, small_pubmedqa,
                                                                          monkeypatch, capsys):
    # was: a SafetensorError traceback; the run folder had a cut-off adapter and no result.json, and the checkpoint
    # was already deleted, so the whole training was lost
    import peft.peft_model

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # the part that fitted
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    run = tmp_path / "runs" / "r"
    line = cli_error(_train_argv(tmp_path, tiny_causal, small_pubmedqa), monkeypatch, capsys)
    assert line == (f"error: {run}/adapter: cannot save it (disk full); nothing was saved. The finished training is "
                    f"kept in {run}/checkpoint.pt: once that is fixed, rerun with --resume, which saves it without "
                    "training again")
    assert not (run / "adapter").exists() and not (run / "result.json").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".saving")]  # no half-written folder left
    monkeypatch.undo()  # the disk has room again

    monkeypatch.setattr(sys, "argv", ["peftlab", *_train_argv(tmp_path, tiny_causal, small_pubmedqa), "--resume"])
    cli.main()
    out = capsys.readouterr().out
    assert f"resuming r from {run}/checkpoint.pt at step 2; training had finished" in out
    result = json.loads((run / "result.json").read_text())
    assert result["train_steps"] == 2 and result["adapter_bytes"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size == result["adapter_bytes"]
    assert not (run / "checkpoint.pt").exists()  # deleted once result.json is written


def test_train_resume_with_other_settings_than_its_checkpoint_stops_with_one_line(tmp_path, tiny_causal,
                                                                                  small_pubmedqa, monkeypatch, capsys):
    # was: the resume restored the optimizer and schedule with the old learning rate and trained on with it, while
    # config.yaml and result.json recorded the new one
    import peft.peft_model

    def full_disk(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)  # training finishes; its checkpoint stays
    cli_error(_train_argv(tmp_path, tiny_causal, small_pubmedqa), monkeypatch, capsys)
    monkeypatch.undo()
    ckpt = tmp_path / "runs" / "r" / "checkpoint.pt"
    line = cli_error(_train_argv(tmp_path, tiny_causal, small_pubmedqa, "train.lr=1e-3", "train.threads=2",
                                 "--resume"), monkeypatch, capsys)
    assert line == (f"error: {ckpt}: trained with train.lr None, this run has 0.001; resume with the settings it was "
                    "trained with, or rerun without --resume to train from step 0 (it replaces the checkpoint)")
    assert ckpt.exists() and not (tmp_path / "runs" / "r" / "result.json").exists()


def _fsync_fails_on(monkeypatch, name: str) -> None:
    """A full disk that shows when the file `name` is flushed."""
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)


def test_eval_out_on_a_full_disk_writes_both_files_or_neither(tmp_path, tiny_causal, small_pubmedqa, monkeypatch,
                                                              capsys):
    # was: metrics.json written, then predictions.jsonl failed: a metrics.json with no predictions beside it
    argv = ["eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model", str(tiny_causal)]
    out = tmp_path / "out"
    _fsync_fails_on(monkeypatch, "metrics.json")
    line = cli_error([*argv, "--limit", "4", "--out", str(out)], monkeypatch, capsys)
    assert line == f"error: {out}/metrics.json: disk full; nothing was written"
    assert not out.exists() or not list(out.iterdir())

    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["peftlab", *argv, "--limit", "4", "--out", str(out)])
    cli.main()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fsync_fails_on(monkeypatch, "predictions.jsonl")  # an earlier eval in the folder: it stays whole
    line = cli_error([*argv, "--limit", "2", "--out", str(out)], monkeypatch, capsys)
    assert line == f"error: {out}/predictions.jsonl: disk full; the previous version of this file was kept"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_os_error_nobody_caught_is_one_line(tmp_path, tiny_lora_run, monkeypatch, capsys):
    # was: a traceback for any OSError no code path turned into its own message
    def disk_gone(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "p.jsonl"))

    monkeypatch.setattr("peftlab.recipes.eval_run.predict_run", disk_gone)
    line = cli_error(["predict", str(tiny_lora_run), "--input", "x", "--out", str(tmp_path / "p.jsonl")],
                      monkeypatch, capsys)
    assert line == f"error: {tmp_path}/p.jsonl: Input/output error"


# ---------------------------------------------------------------------------------------------------------------------
# Case 11: lines that said what did not happen
# ---------------------------------------------------------------------------------------------------------------------


def test_a_failed_write_of_a_new_file_says_nothing_was_written(tmp_path, monkeypatch):
    # was: "disk full; the previous version of this file was kept" when there was no previous version
    from peftlab.core.errors import PeftlabError

    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(PeftlabError) as err:
        files.write_json(tmp_path / "new.json", {"a": 1})
    assert str(err.value) == f"{tmp_path}/new.json: disk full; nothing was written"
    assert list(tmp_path.iterdir()) == []


def _fake_run(study: Path, name: str, correct: list[bool], params: int) -> None:
    run = study / name
    run.mkdir(parents=True)
    rows = [{"id": f"q{i}", "split": "test", "prediction": "yes" if ok else "no", "references": ["yes"],
             "score": float(ok)} for i, ok in enumerate(correct)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "result.json").write_text(json.dumps({
        "name": name, "method": name, "task": "pubmedqa", "model": "tiny", "task_kind": "classification",
        "primary_metric": "accuracy", "trainable_params": params, "total_params": 1000, "train_seconds": 1.0,
        "metrics": {"test_accuracy": float(np.mean(correct)), "test_labels": ["yes", "no"], "test_n": len(rows)}}))


def test_size_warning_never_asks_for_the_examples_there_are(tmp_path, monkeypatch, capsys):
    # was: "about 2 test examples would be needed to separate a 1-point gap" with 2 test examples, for two methods
    # that answer alike (a 0-wide interval sizes nothing)
    study = tmp_path / "s"
    _fake_run(study, "lora", [True, False], 100)
    _fake_run(study, "ia3", [True, False], 10)
    monkeypatch.setattr(sys, "argv", ["peftlab", "report", str(study)])
    cli.main()
    md = (study / "results.md").read_text()
    assert "would be needed" not in md
    assert ("Warning: lora and ia3 score alike on every resample of the 2 test examples (an interval 0 wide), so "
            "this split cannot say how many examples would separate them.") in md


def test_a_failed_run_is_not_reported_done(tmp_path, tiny_causal, small_pubmedqa, capsys):
    # was: "study [...] | bad done" printed, then "run bad failed (exit 2); continuing"
    from peftlab.core.errors import PeftlabError
    from peftlab.recipes.compare import run_study

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "name": "s", "output_dir": str(tmp_path / "runs"),
        "base": {"model": {"name": str(tiny_causal)}, "data": {"path": str(small_pubmedqa), "limit_train": 4,
                                                               "limit_eval": 2, "max_length": 128},
                 "train": {"max_steps": 1, "threads": 1}},
        # the study resolves every config before training; the missing data file stops the run's own process
        "runs": [{"name": "bad", "method": {"name": "lora"}, "data": {"path": str(tmp_path / "missing.json")}}]}))
    with pytest.raises(PeftlabError, match=r"1 run\(s\) failed: bad"):
        run_study(study)
    out = capsys.readouterr().out
    assert "bad done" not in out
    assert out.index("run bad failed: ") < out.index("| bad failed")
    assert f"run bad failed: {tmp_path / 'missing.json'}: no such data file" in out  # the run's own reason


# ---------------------------------------------------------------------------------------------------------------------
# Case 8: SIGTERM and Ctrl-C to `peftlab compare`
# ---------------------------------------------------------------------------------------------------------------------


def _signal_study(tmp_path: Path, model: Path, data: Path) -> Path:
    study = {
        "name": "sig", "output_dir": str(tmp_path / "runs"),
        "base": {"model": {"name": str(model)}, "data": {"path": str(data), "max_length": 256, "limit_eval": 4},
                 "train": {"epochs": 2, "batch_size": 2, "checkpoint_every": 1, "threads": 1}},
        "runs": [{"name": "zs", "method": {"name": "zero-shot"}}, {"name": "a", "method": {"name": "lora"}}],
    }
    path = tmp_path / "sig.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop_mid_training(tmp_path: Path, proc: subprocess.Popen, send) -> tuple[int, str]:
    """Wait until run `a` has checkpointed a step, `send` the signal, and return the study's exit code and output."""
    run = tmp_path / "runs" / "sig" / "a"
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    send()
    out = proc.communicate(timeout=120)[0]
    return proc.returncode, out


def test_sigterm_stops_the_whole_study_and_a_rerun_completes_it(tmp_path, tiny_causal, small_pubmedqa):
    # was: the study died at once, its training child ran on to the end; a rerun then failed on the run lock and
    # wrote a results.md without that run
    path = _signal_study(tmp_path, tiny_causal, small_pubmedqa)
    study, run = tmp_path / "runs" / "sig", tmp_path / "runs" / "sig" / "a"
    proc = start_compare(path)
    code, out = _stop_mid_training(tmp_path, proc, lambda: proc.send_signal(signal.SIGTERM))  # the study alone
    assert _group_is_gone(proc.pid), "a peftlab process outlived the study"
    assert code == 143, out
    assert out.strip().splitlines()[-1] == ("error: study stopped by SIGTERM; 1 of 2 runs finished; rerun the same "
                                            "command to resume")
    assert re.search(r"a: stopped by SIGTERM after step \d+; its checkpoint is \S+checkpoint.pt: rerun with "
                     r"--resume to continue from there", out), out
    assert "Traceback" not in out
    assert not (study / "results.md").exists() and not (run / "result.json").exists()
    assert (run / "checkpoint.pt").exists()

    again = start_compare(path)
    out = again.communicate(timeout=180)[0]
    assert again.returncode == 0, out
    assert "2 runs, 1 already done, 1 to run" in out
    assert int(re.search(r"resuming a from \S+ at step (\d+)", out).group(1)) >= 1  # not trained from step 0
    table = (study / "results.md").read_text()
    assert "| zs " in table and "| a " in table


def test_ctrl_c_stops_the_whole_study(tmp_path, tiny_causal, small_pubmedqa):
    # was: a KeyboardInterrupt traceback from each process; a child in training could leave no checkpoint of its
    # last steps
    path = _signal_study(tmp_path, tiny_causal, small_pubmedqa)
    proc = start_compare(path)
    # A terminal's Ctrl-C goes to the whole foreground process group: the study and its training child.
    code, out = _stop_mid_training(tmp_path, proc, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert _group_is_gone(proc.pid), "a peftlab process outlived the study"
    assert code == 130, out
    assert out.strip().splitlines()[-1] == ("error: study stopped by SIGINT; 1 of 2 runs finished; rerun the same "
                                            "command to resume")
    assert "Traceback" not in out and not (tmp_path / "runs" / "sig" / "results.md").exists()

