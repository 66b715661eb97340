"""A training run killed with SIGKILL mid-epoch resumes from its checkpoint to the same final result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml


def _config(tmp_path: Path, model: Path, data: Path, name: str) -> Path:
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model)},
        "data": {"task": "pubmedqa", "path": str(data), "max_length": 256, "limit_eval": 6},
        # dropout on purpose: resuming must restore the RNG too, or the masks (and the result) would differ
        "method": {"name": "lora", "dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 1, "seed": 3},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, *extra: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftlab", "train", str(config), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, tiny_causal, small_pubmedqa):
    reference = _config(tmp_path, tiny_causal, small_pubmedqa, "straight")
    assert _train(reference).wait(timeout=300) == 0

    interrupted = _config(tmp_path, tiny_causal, small_pubmedqa, "killed")
    run = tmp_path / "runs" / "killed"
    proc = _train(interrupted)
    deadline = time.time() + 240
    while not (run / "checkpoint.pt").exists():  # the first checkpoint lands after step 1 of 32
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.2)  # a few steps past it, mid-epoch, then kill it without warning
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "result.json").exists(), "the run finished before it could be killed; make it longer"

    resumed = _train(interrupted, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    straight = json.loads((tmp_path / "runs" / "straight" / "result.json").read_text())
    after = json.loads((run / "result.json").read_text())
    assert after["train_steps"] == straight["train_steps"]
    assert _losses(run) == _losses(tmp_path / "runs" / "straight")
    assert after["metrics"]["test_accuracy"] == straight["metrics"]["test_accuracy"]
    def logprobs(folder: Path) -> list[dict]:
        return [json.loads(x)["label_logprobs"] for x in (folder / "predictions.jsonl").read_text().splitlines()]

    assert logprobs(run) == logprobs(tmp_path / "runs" / "straight")
    assert not (run / "checkpoint.pt").exists()


def test_nan_loss_stops_with_the_step(tmp_path, tiny_causal, small_pubmedqa):
    config = _config(tmp_path, tiny_causal, small_pubmedqa, "nan")
    proc = _train(config, "train.lr=1e30", "train.max_grad_norm=0")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "at step" in err and "lower train.lr" in err and "Traceback" not in err
