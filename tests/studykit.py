"""Study folders made by hand for the decision and report tests: runs with known per-question answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

LABELS = ["yes", "no", "maybe"]


def fake_run(study: Path, name: str, method: str, correct: np.ndarray, params: int, seconds: float,
             ids: list[str] | None = None) -> None:
    """A finished classification run folder (result.json, predictions.jsonl, config.yaml, train_log.jsonl) whose
    test questions are `ids` (default q000, q001, ...), answered right where `correct` is true."""
    run = study / name
    run.mkdir(parents=True)
    refs = [LABELS[i % 3] for i in range(len(correct))]
    preds = [r if ok else LABELS[(LABELS.index(r) + 1) % 3] for r, ok in zip(refs, correct, strict=True)]
    ids = ids or [f"q{i:03d}" for i in range(len(correct))]
    rows = [{"id": ids[i], "split": "test", "prediction": p, "references": [r], "score": float(p == r)}
            for i, (p, r) in enumerate(zip(preds, refs, strict=True))]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"name": name, "method": method, "task": "pubmedqa", "model": "tiny", "task_kind": "classification",
              "primary_metric": "accuracy", "trainable_params": params, "total_params": 1000,
              "adapter_bytes": params * 4,
              "train_steps": 3, "train_seconds": seconds, "peak_rss_mb": 500.0 + params / 100, "wall_seconds": 9.0,
              "last_train_loss": 1.0, "versions": {"torch": "2.13.0", "peft": "0.17.0"},
              "metrics": {"test_accuracy": float(np.mean(correct)), "test_labels": LABELS, "test_n": len(rows)}}
    (run / "result.json").write_text(json.dumps(result))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "method": {"name": method}}))
    (run / "train_log.jsonl").write_text(json.dumps({"step": 1, "epoch": 1.0, "loss": 1.2, "tokens_per_s": 99.0})
                                         + "\n" + json.dumps({"step": 3, "epoch": 1, "val_loss": 1.1,
                                                              "val_accuracy": 0.5}) + "\n")
