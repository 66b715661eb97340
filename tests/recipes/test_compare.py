"""Studies: a grid expands to runs, every run lands in the table, and a rerun skips finished runs."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from trainkit import start_compare

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


def _quality(csv: Path) -> pd.DataFrame:
    """results.csv without the columns that measure the machine (time, speed, memory)."""
    table = pd.read_csv(csv)
    return table[[c for c in table.columns if not re.search(r"seconds|tokens_per_s|rss|gpu_mb|wall", c)]]


def test_a_study_killed_mid_training_resumes_the_run_and_ends_as_an_uninterrupted_one(tmp_path, tiny_causal,
                                                                                       small_pubmedqa):
    straight = start_compare(_crash_study(tmp_path, tiny_causal, small_pubmedqa, "straight"))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    path = _crash_study(tmp_path, tiny_causal, small_pubmedqa, "killed")
    run = tmp_path / "killed" / "crash" / "a"
    proc = start_compare(path)
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

    again = start_compare(path)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    resumed_at = int(re.search(r"resuming a from \S+ at step (\d+)", out).group(1))
    assert resumed_at >= 1  # not trained again from step 0
    study = tmp_path / "killed" / "crash"
    pd.testing.assert_frame_equal(_quality(study / "results.csv"), _quality(tmp_path / "straight/crash/results.csv"))
    assert not (run / "checkpoint.pt").exists()


def _decision_study(tmp_path: Path, model: Path, data: Path) -> Path:
    study = {
        "name": "dec",
        "output_dir": str(tmp_path / "runs"),
        "metric": "macro_f1",
        "base": {"model": {"name": str(model), "device": "cpu"},
                 "data": {"path": str(data), "limit_train": 8, "split": [0.6, 0.2, 0.2]},
                 "train": {"epochs": 2, "batch_size": 4, "threads": 1}},
        "runs": [{"name": "zs", "method": {"name": "zero-shot"}},
                 {"name": "head", "method": {"name": "linear-head", "head_layer": 1}},
                 {"name": "pt", "method": {"name": "prompt-tuning", "num_virtual_tokens": 2}}],
        "tune": {"trials": 2, "metric": "macro_f1", "startup_trials": 1, "space": {"train.lr": {"factor": 10}},
                 "select": {"linear-head": {"method.head_c": [0.1, 1.0]}}},
        "repeats": {"seeds": [0, 1], "race": True},  # racing rounds (test_executors covers the unraced batch)
    }
    path = tmp_path / "dec.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_decision_study_plans_tunes_repeats_decides_and_resumes(tmp_path, tiny_causal, small_pubmedqa, capsys):
    path = _decision_study(tmp_path, tiny_causal, small_pubmedqa)
    run_study(path, plan=True)  # the dry run: counts and a time measured on this machine, nothing trained
    out = capsys.readouterr().out
    assert "| pt (prompt-tuning) | 2 | 2 |" in out and "| head (linear-head) | 2 | 1 |" in out
    assert re.search(r"total: 8 runs, about \d+:\d\d:\d\d", out) and "tokens/s" in out
    assert re.search(r"racing \(alpha 0.05\): worst case as above \(no method stops\); best case about \d", out)
    assert not (tmp_path / "runs" / "dec").exists()

    study_dir = run_study(path)
    out = capsys.readouterr().out
    assert "3 methods, 0 already tuned; 4 final runs, 0 already done, 4 to run" in out
    # One bar over the whole study, with the runs done and in flight
    assert re.search(r"study: 100%\|#+\| elapsed \S+ ETA 00:00 \| \d+ done, 0 in flight", out)
    manifest = json.loads((study_dir / "study.json").read_text())
    # Zero-shot and the linear head do not depend on the train seed: one run stands for both seeds.
    assert {k: g["runs"] for k, g in manifest["groups"].items()} == {
        "zs": ["zs-seed0"], "head": ["head-seed0"], "pt": ["pt-seed0", "pt-seed1"]}
    chosen = json.loads((study_dir / "tune" / "pt" / "chosen.json").read_text())
    assert chosen["trials"] == 2 and 3e-3 <= chosen["params"]["train.lr"] <= 3e-1  # prompt tuning's 3e-2 x/÷ 10
    head = json.loads((study_dir / "tune" / "head" / "chosen.json").read_text())
    # the grid point with the higher val macro-F1 is chosen; on a tie, the first one
    val = [json.loads((study_dir / "tune" / "head" / f"select-{i}" / "result.json").read_text())["metrics"]
           ["val_macro_f1"] for i in (0, 1)]
    assert head["params"]["method.head_c"] == (0.1 if val[0] >= val[1] else 1.0) and head["trials"] == 2
    assert head["value"] == pytest.approx(max(val))
    final = yaml.safe_load((study_dir / "pt-seed1" / "config.yaml").read_text())
    assert final["train"]["lr"] == pytest.approx(chosen["params"]["train.lr"]) and final["train"]["seed"] == 1
    trial_metrics = json.loads((study_dir / "tune" / "pt" / "trial-0" / "result.json").read_text())["metrics"]
    assert "val_macro_f1" in trial_metrics and not any(k.startswith("test_") for k in trial_metrics)
    md = (study_dir / "results.md").read_text()
    assert md.startswith("## Verdict") and "Cheapest within 1 point" in md and "(95% interval" in md
    race = manifest["race"]
    assert race["rounds"] == 2 and race["total_runs"] == 4 and 0 <= race["saved_runs"] <= 1
    assert "Raced out (paired test against the leader after each round, Holm-corrected, alpha 0.05)" in md
    assert (study_dir / "pt-seed0" / "peft_result.json").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in study_dir.rglob("result.json")}
    run_study(path)
    out = capsys.readouterr().out
    assert "3 methods, 3 already tuned; 4 final runs, 4 already done, 0 to run" in out
    assert {p: p.stat().st_mtime_ns for p in study_dir.rglob("result.json")} == stamps  # nothing ran again

