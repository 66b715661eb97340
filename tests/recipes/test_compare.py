"""Studies: a grid expands to runs, every run lands in the table, and a rerun skips finished runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from peftlab.recipes.compare import load_study, run_study


def _study(tmp_path: Path, model: Path, data: Path) -> Path:
    study = {
        "name": "s",
        "output_dir": str(tmp_path / "runs"),
        "base": {"model": {"name": str(model)}, "data": {"path": str(data), "limit_train": 8, "limit_eval": 4},
                 "train": {"max_steps": 1, "threads": 1}},
        "runs": [{"name": "zs", "method": {"name": "zero-shot"}}],
        "grids": [{"name": "pt", "config": {"method": {"name": "prompt-tuning"}},
                   "params": {"method.num_virtual_tokens": [2, 4]}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_grid_expands(tmp_path, tiny_causal, small_pubmedqa):
    _, runs = load_study(_study(tmp_path, tiny_causal, small_pubmedqa))
    assert [r.name for r in runs] == ["zs", "pt-num_virtual_tokens2", "pt-num_virtual_tokens4"]


def test_study_resumes_skipping_finished_runs(tmp_path, tiny_causal, small_pubmedqa, capsys):
    path = _study(tmp_path, tiny_causal, small_pubmedqa)
    study_dir = run_study(path)
    assert "3 runs, 0 already done, 3 to run" in capsys.readouterr().out
    table = (study_dir / "results.md").read_text()
    assert all(name in table for name in ("zs", "pt-num_virtual_tokens2", "pt-num_virtual_tokens4"))
    finished = (study_dir / "zs" / "result.json").stat().st_mtime_ns
    (study_dir / "pt-num_virtual_tokens4" / "result.json").unlink()  # as if the study died during this run
    run_study(path)
    assert "3 runs, 2 already done, 1 to run" in capsys.readouterr().out
    assert (study_dir / "zs" / "result.json").stat().st_mtime_ns == finished
    assert (study_dir / "pt-num_virtual_tokens4" / "result.json").exists()


def _crash_study(tmp_path: Path, model: Path, data: Path, out: str) -> Path:
    study = {
        "name": "crash",
        "output_dir": str(tmp_path / out),
        "base": {"model": {"name": str(model)}, "data": {"path": str(data), "max_length": 256, "limit_eval": 6},
                 "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 1, "seed": 3}},
        # dropout on purpose: a resumed run must restore the RNG to match the uninterrupted one
        "runs": [{"name": "a", "method": {"name": "lora", "dropout": 0.1}},
                 {"name": "zs", "method": {"name": "zero-shot"}}],
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _compare(path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftlab", "compare", str(path)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _quality(csv: Path) -> pd.DataFrame:
    """results.csv without the columns that measure the machine (time, speed, memory)."""
    table = pd.read_csv(csv)
    return table[[c for c in table.columns if not re.search(r"seconds|tokens_per_s|rss|gpu_mb|wall", c)]]


def test_a_study_killed_mid_training_resumes_the_run_and_ends_as_an_uninterrupted_one(tmp_path, tiny_causal,
                                                                                       small_pubmedqa):
    straight = _compare(_crash_study(tmp_path, tiny_causal, small_pubmedqa, "straight"))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    path = _crash_study(tmp_path, tiny_causal, small_pubmedqa, "killed")
    run = tmp_path / "killed" / "crash" / "a"
    proc = _compare(path)
    deadline = time.time() + 240
    while not (run / "checkpoint.pt").exists():  # run `a` has checkpointed at least one step
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its training process, without warning
    proc.wait()
    assert not (run / "result.json").exists(), "the run finished before it could be killed; make it longer"
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert logged and logged[0]["step"] == 1  # the steps before the kill are in the log already

    again = _compare(path)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    resumed_at = int(re.search(r"resuming a from \S+ at step (\d+)", out).group(1))
    assert resumed_at >= 1  # not trained again from step 0
    study = tmp_path / "killed" / "crash"
    pd.testing.assert_frame_equal(_quality(study / "results.csv"), _quality(tmp_path / "straight/crash/results.csv"))
    assert not (run / "checkpoint.pt").exists()
