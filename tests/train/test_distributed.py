"""Data-parallel training: `torchrun --nproc_per_node 2 -m peftlab train` on CPU (gloo) writes one complete run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml


def test_torchrun_two_processes(tiny_causal, small_pubmedqa, tmp_path):
    cfg = {
        "name": "ddp",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_causal), "device": "cpu"},
        "method": {"name": "lora"},
        "data": {"path": str(small_pubmedqa), "limit_train": 16, "limit_eval": 4, "max_length": 256},
        "train": {"max_steps": 4, "batch_size": 2, "warmup_ratio": 0, "lr": 4e-4, "threads": 1},
    }
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # --standalone picks a free rendezvous port, so parallel test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "peftlab", "train", str(tmp_path / "ddp.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too, not only the launcher
        proc.communicate()
        pytest.fail("torchrun did not finish in 300 s")
    assert proc.returncode == 0, stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["train_steps"] == 4 and result["method"] == "lora"
    steps = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # A linear decay over 4 steps: the schedule counts optimizer steps, not steps times processes.
    assert [r["lr"] for r in steps] == pytest.approx([3e-4, 2e-4, 1e-4, 0.0])
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
