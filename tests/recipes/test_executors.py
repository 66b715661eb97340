"""Executors: a study's runs on 1 or 2 local workers, or on a 2-node Ray cluster, give the same results; a run
is a function call with a typed result."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from peftlab.core.errors import PeftlabError
from peftlab.core.result import RunResult, read_result, write_result
from peftlab.recipes.compare import run_study
from peftlab.recipes.executors import ExecutorSpec, parse_executor

QUALITY = ["name", "method", "trainable_params", "train_steps"]


def _study(tmp_path: Path, model: Path, data: Path, out: str) -> Path:
    """Tuning (2 trials) and 2 seeds: 6 final runs. `train.threads` is left unset, so 1 worker trains on every
    core and 2 workers on one core each: the sums run in another order."""
    study = {
        "name": "ex",
        "output_dir": str(tmp_path / out),
        "metric": "accuracy",
        "base": {"model": {"name": str(model), "device": "cpu"},
                 "data": {"path": str(data), "limit_train": 8, "limit_eval": 6, "max_length": 256},
                 "train": {"epochs": 1, "batch_size": 4}},
        "runs": [{"name": "zs", "method": {"name": "zero-shot"}},
                 {"name": "pt", "method": {"name": "prompt-tuning", "num_virtual_tokens": 2}},
                 {"name": "lora", "method": {"name": "lora", "r": 2}}],
        "tune": {"trials": 2, "startup_trials": 1, "space": {"train.lr": {"factor": 10}}},
        "repeats": {"seeds": [0, 1]},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _results(study_dir: Path) -> pd.DataFrame:
    return pd.read_csv(study_dir / "results.csv").sort_values("name").reset_index(drop=True)


def _assert_same_results(a: Path, b: Path) -> None:
    left, right = _results(a), _results(b)
    metrics = [c for c in left.columns if c.startswith(("test_", "val_")) and "loss" not in c]
    pd.testing.assert_frame_equal(left[QUALITY + metrics], right[QUALITY + metrics])
    for loss in [c for c in left.columns if "loss" in c]:
        assert right[loss].to_numpy() == pytest.approx(left[loss].to_numpy(), rel=1e-4, nan_ok=True), loss


def test_run_result_round_trips(tmp_path):
    result = RunResult(name="a", method="lora", task="pubmedqa", trainable_params=12, train_seconds=1.5,
                       metrics={"test_accuracy": 0.5, "test_labels": ["yes", "no"]}, versions={"torch": "2.13.0"},
                       extra={"probe_flip_rate": 0.1})
    write_result(tmp_path, result)
    assert read_result(tmp_path) == result


def test_executor_section_and_flags():
    assert parse_executor(None) == ExecutorSpec()
    assert parse_executor({"kind": "ray", "workers": 4}, workers=2) == ExecutorSpec("ray", 2)
    with pytest.raises(PeftlabError, match="^executor.workers must be >= 1, got 0$"):
        parse_executor({"workers": 0})
    with pytest.raises(PeftlabError, match="^unknown study key 'executor.gpus'; valid: address, kind, workers$"):
        parse_executor({"gpus": 1})
    with pytest.raises(PeftlabError, match="^executor.address is for kind ray, got 'auto'$"):
        parse_executor({"address": "auto"})
    assert parse_executor({"address": "auto"}, kind="ray").address == "auto"  # the flag's kind counts


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, tiny_causal, small_pubmedqa_module) -> Path:
    tmp = tmp_path_factory.mktemp("w1")
    return run_study(_study(tmp, tiny_causal, small_pubmedqa_module, "w1"), workers=1)


def test_two_local_workers_give_the_results_of_one(one_worker, tiny_causal, small_pubmedqa_module, tmp_path,
                                                   capsys):
    two = run_study(_study(tmp_path, tiny_causal, small_pubmedqa_module, "w2"), workers=2)
    out = capsys.readouterr().out
    assert "| 0 done, 2 in flight |" in out  # two runs did train at once
    assert (two / "lora-seed1" / "worker.log").is_file()  # each worker's output in its run folder
    assert (two / "tune" / "lora" / "trial-1" / "worker.log").is_file()  # tuning trials ran as tasks on the pool
    _assert_same_results(one_worker, two)


def test_a_two_node_ray_cluster_without_a_shared_folder_gives_the_same_results(
        one_worker, tiny_causal, small_pubmedqa_module, tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Two nodes of one CPU each, each training in its own scratch folder: only the object store joins them.
    scratch = [tmp_path / "node0", tmp_path / "node1"]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "env_vars": {"PEFTLAB_SCRATCH": str(scratch[0])}})
    cluster.add_node(num_cpus=1, env_vars={"PEFTLAB_SCRATCH": str(scratch[1])})
    try:
        ray.init(address=cluster.address)
        on_ray = run_study(_study(tmp_path, tiny_causal, small_pubmedqa_module, "ray"), executor_kind="ray",
                           workers=2)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert all((s / "peftlab-scratch").is_dir() for s in scratch)  # both nodes trained
    left = [path for s in scratch for path in (s / "peftlab-scratch").iterdir()]
    assert not left  # each node sent its finished folders back and kept no copy, not even an empty folder
    _assert_same_results(one_worker, on_ray)
    assert (on_ray / "lora-seed1" / "adapter" / "adapter_config.json").is_file()


def _kill_when_checkpointed(scratch: Path, run: str, killed: list[int], deadline: float) -> None:
    """SIGKILL the Ray worker that trains `run` as soon as its first checkpoint is on disk (its PID is in the run
    folder's lock file)."""
    while time.time() < deadline and not killed:
        for ckpt in scratch.glob(f"peftlab-scratch/*/{run}/checkpoint.pt"):
            pid = (ckpt.parent / ".lock").read_text().strip()
            if pid:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.02)


def test_a_ray_worker_killed_mid_training_is_retried_from_its_checkpoint(tiny_causal, small_pubmedqa_module,
                                                                          tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    study = {"name": "kill", "output_dir": str(tmp_path / "out"),
             "base": {"model": {"name": str(tiny_causal), "device": "cpu"},
                      "data": {"path": str(small_pubmedqa_module), "limit_train": 16, "limit_eval": 4},
                      "train": {"epochs": 4, "batch_size": 1, "checkpoint_every": 2, "threads": 1}},
             "runs": [{"name": "lora", "method": {"name": "lora", "r": 2}}]}
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(study))
    monkeypatch.setenv("PEFTLAB_SCRATCH", str(tmp_path / "scratch"))  # the local Ray's workers inherit it
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_when_checkpointed,
                               args=(tmp_path / "scratch", "lora", killed, time.time() + 300), daemon=True)
    watcher.start()
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        study_dir = run_study(path, executor_kind="ray", workers=1)
    finally:
        ray.shutdown()
        watcher.join()
    assert killed, "the worker was never seen with a checkpoint"
    result = read_result(study_dir / "lora")
    assert result.done and result.train_steps == 64
    assert result.resumed_at and result.resumed_at[0] >= 2  # the retry went on from the killed attempt's checkpoint
