"""k-fold cross-validation: the summary arithmetic, and a 3-fold run that tests every example exactly once."""

from __future__ import annotations

import json

import pytest
from builders import PUBMEDQA
from trainkit import tiny_cfg

from peftlab.core.errors import PeftlabError
from peftlab.core.result import RunResult
from peftlab.recipes.cv import cv_markdown, run_cv, summarize


def _result(acc: float, seconds: float) -> RunResult:
    return RunResult(name="fold", method="lora", metrics={"test_accuracy": acc, "test_n": 2, "val_accuracy": 0.0},
                     wall_seconds=seconds, train_seconds=seconds / 2)


def test_summarize_means_spreads_and_pools():
    results = [_result(0.5, 10), _result(1.0, 20), _result(0.0, 30)]
    predictions = [
        [{"prediction": "yes", "references": ["yes"]}, {"prediction": "yes", "references": ["no"]}],
        [{"prediction": "no", "references": ["no"]}, {"prediction": "yes", "references": ["yes"]}],
        [{"prediction": "no", "references": ["yes"]}, {"prediction": "yes", "references": ["no"]}],
    ]
    s = summarize(results, predictions, ("yes", "no"))
    assert s["folds"] == 3 and set(s["metrics"]) == {"test_accuracy", "test_n"}  # val metrics are not the protocol
    assert s["metrics"]["test_accuracy"]["mean"] == pytest.approx(0.5)
    assert s["metrics"]["test_accuracy"]["std"] == pytest.approx(0.5)  # sample std of 0.5, 1, 0
    assert s["wall_seconds"] == 60 and s["train_seconds"] == 30
    assert s["pooled"]["accuracy"] == pytest.approx(3 / 6)
    assert s["pooled"]["confusion_matrix"] == [[2, 1], [2, 1]]
    table = cv_markdown("x", s)
    assert "| test_accuracy | 0.5000 | 0.5000 | 0.0000 | 1.0000 |" in table and "| yes | 2 | 1 |" in table


def test_three_fold_linear_head_tests_every_example_once_and_resumes(tiny_causal, tmp_path):
    cfg = tiny_cfg(tiny_causal, "linear-head", tmp_path, "cv", PUBMEDQA, "data.limit_train=null",
                   "data.limit_eval=null", "data.max_length=256", "method.head_layer=1")
    summary = run_cv(cfg, folds=3)
    study = tmp_path / "cv"
    total = len(json.loads(PUBMEDQA.read_text()))
    assert sum(map(sum, summary["pooled"]["confusion_matrix"])) == total
    assert sum(summary["metrics"]["test_n"]["values"]) == total
    ids = [json.loads(line)["id"] for k in range(3) for line in (study / f"fold-{k}" / "predictions.jsonl").open()]
    assert len(set(ids)) == total
    assert json.loads((study / "cv.json").read_text())["folds"] == 3
    assert (study / "cv.md").exists() and (study / "report.html").exists()
    # A second call finds every fold finished and trains nothing.
    stamps = [(study / f"fold-{k}" / "result.json").stat().st_mtime_ns for k in range(3)]
    assert run_cv(cfg, folds=3)["metrics"] == summary["metrics"]
    assert stamps == [(study / f"fold-{k}" / "result.json").stat().st_mtime_ns for k in range(3)]


def test_cv_needs_three_folds(tiny_causal, tmp_path):
    with pytest.raises(PeftlabError, match="at least 3 folds"):
        run_cv(tiny_cfg(tiny_causal, "linear-head", tmp_path), folds=2)


def test_methods_that_do_not_train_get_the_val_fold_as_demo_pool(small_pubmedqa):
    from peftlab.core.config import load_config
    from peftlab.methods.registry import get_method
    from peftlab.recipes.train_run import task_parts

    def splits(method: str) -> dict:
        cfg = load_config(None, base={"data": {"path": str(small_pubmedqa), "fold": 2, "folds": 5},
                                      "method": {"name": method}})
        return task_parts(cfg, get_method(method))[0].splits

    trained, shots = splits("lora"), splits("few-shot")
    assert trained["val"] and not shots["val"]  # no model selection, so no scoring of a val fold
    assert shots["test"] == trained["test"]
    assert {e.id for e in shots["train"]} == {e.id for e in trained["train"] + trained["val"]}
