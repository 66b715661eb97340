"""Study folders made by hand for the decision and report tests: runs with known per-question answers, and a
mixed study (`make_study`) of three runs on two tasks."""

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


# The mixed study of the report tests: one zero-shot, one LoRA and one prefix-tuning run, on SST-2 and a summary task.
LONG_PROMPT = "Review: <script>alert('x')</script> " + "a truly wonderful film " * 30


def result_json(name: str, method: str, **overrides) -> dict:
    """A plausible result.json for an SST-2-like classification run on a small model."""
    result = {
        "name": name,
        "method": method,
        "task": "sst2",
        "model": "smollm2-135m",
        "task_kind": "classification",
        "primary_metric": "accuracy",
        "trainable_params": 0,
        "total_params": 134_515_008,
        "trainable_pct": 0.0,
        "adapter_bytes": 0,
        "train_steps": 0,
        "train_seconds": 0.0,
        "tokens_per_s": None,
        "peak_rss_mb": 812.4,
        "best_val_loss": None,
        "last_train_loss": None,
        "metrics": {},
        "versions": {"torch": "2.13.0", "peft": "0.17.0"},
    }
    result.update(overrides)
    return result


def write_run(study: Path, folder: str, result: dict, log: list[dict] | None, preds: list[dict]) -> None:
    run = study / folder
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps(result))
    if log is not None:
        (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (run / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))


def fake_preds(task_prefix: str, outputs: list[str], refs: list[str], prompt: str = "Review: fine.") -> list[dict]:
    return [
        {
            "id": f"{task_prefix}-{i}",
            "split": "test",
            "prompt": prompt if i == 0 else f"{prompt} #{i}",
            "prediction": out,
            "references": [ref],
            "score": float(out == ref),
        }
        for i, (out, ref) in enumerate(zip(outputs, refs, strict=True))
    ]


def _lora_log() -> list[dict]:
    log = []
    for step in range(10, 110, 10):
        log.append({"step": step, "epoch": step / 100, "loss": 0.9 - step / 200, "lr": 2e-4, "tokens_per_s": 5100.0})
        if step % 50 == 0:
            log.append({"step": step, "epoch": step / 100, "val_loss": 0.6 - step / 1000, "val_accuracy": 0.8})
    return log


def make_study(study: Path) -> Path:
    """Three runs: zero-shot (collapsed, no log), LoRA (classification) and prefix-tuning on a generation task."""
    labels = ["negative", "positive"]
    refs = ["positive", "negative", "positive", "negative"]
    zero = result_json(
        "zero-shot",
        "zero_shot",
        metrics={
            "test_accuracy": 0.5,
            "test_macro_f1": 0.33,
            "test_confusion_matrix": [[0, 50], [0, 50]],
            "test_labels": labels,
        },
    )
    write_run(study, "zero_shot", zero, None, fake_preds("sst2", ["positive"] * 4, refs, LONG_PROMPT))
    lora = result_json(
        "lora-r8",
        "lora",
        trainable_params=921_600,
        trainable_pct=0.685,
        adapter_bytes=3_690_000,
        train_steps=100,
        train_seconds=142.7,
        tokens_per_s=5100.0,
        peak_rss_mb=2310.0,
        best_val_loss=0.5,
        last_train_loss=0.41,
        metrics={
            "val_accuracy": 0.8,
            "test_accuracy": 0.86,
            "test_macro_f1": 0.859,
            "test_confusion_matrix": [[43, 7], [7, 43]],
            "test_labels": labels,
            "flip_rate": 0.04,
        },
    )
    write_run(
        study,
        "lora",
        lora,
        _lora_log(),
        fake_preds("sst2", ["positive", "negative", "negative", "negative"], refs, LONG_PROMPT),
    )
    # A crashed writer can leave a truncated last line; the report must still read the rest.
    with (study / "lora" / "train_log.jsonl").open("a") as f:
        f.write('{"step": 110, "lo')
    gen = result_json(
        "prefix-gen",
        "prefix_tuning",
        task="pubmed_summ",
        task_kind="generation",
        primary_metric="rouge1",
        trainable_params=30_720,
        trainable_pct=0.0228,
        adapter_bytes=123_000,
        train_steps=100,
        train_seconds=98.2,
        tokens_per_s=3900.0,
        peak_rss_mb=1900.0,
        best_val_loss=2.1,
        last_train_loss=2.3,
        metrics={
            "val_rouge1": 0.3,
            "test_rouge1": 0.31,
            "test_rouge2": 0.12,
            "test_rougeL": 0.27,
            "forget_delta_pubmedqa": -0.02,
        },
    )
    gen_log = [
        {"step": s, "epoch": s / 100, "loss": 3.0 - s / 100, "lr": 1e-3, "tokens_per_s": 3900.0}
        for s in range(10, 110, 10)
    ]
    write_run(study, "prefix_gen", gen, gen_log, fake_preds("summ", ["a summary"] * 3, ["a summary", "b", "c"]))
    (study / "not_a_run").mkdir()  # e.g. a cache folder: no result.json, must be skipped
    return study
