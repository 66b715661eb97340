"""A run is a model: `eval RUN` reproduces the run's own scores for every method kind, `predict` answers as `eval`
does, and runs train from the user's own alpaca and chat files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import PUBMEDQA
from trainkit import tiny_cfg

from peftlab.core.config import load_config
from peftlab.core.errors import PeftlabError
from peftlab.recipes.eval_run import EvalOptions, eval_run, predict_run
from peftlab.recipes.train_run import run_training

OWN = Path(__file__).resolve().parents[2] / "examples" / "own-data"
KINDS = {  # method -> extra overrides
    "zero-shot": [],
    "few-shot": ["data.shots=1", "data.calibrate=true", "data.max_length=1024"],
    "lora": [],
    "prompt-tuning": ["method.num_virtual_tokens=4"],
    "full": [],
    "linear-head": ["method.head_layer=1", "method.head_text=[words]", "data.limit_train=16"],
}


@pytest.fixture(scope="module")
def runs(tiny_causal, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("eval-runs")
    return {m: run_training(tiny_cfg(tiny_causal, m, out, m, PUBMEDQA, *extra)) for m, extra in KINDS.items()}


@pytest.mark.parametrize("method", list(KINDS))
def test_eval_run_reproduces_the_run_own_test_scores(method, runs, tmp_path):
    run = runs[method]
    metrics = eval_run(run, EvalOptions(device="cpu"), tmp_path / "eval")
    own = json.loads((run / "metrics.json").read_text())
    scored = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert scored and all(own[f"test_{k}"] == v for k, v in scored.items() if f"test_{k}" in own), (scored, own)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    trained = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in trained]


@pytest.mark.parametrize("method", ["lora", "linear-head"])
def test_predict_answers_as_eval_does(method, runs, tmp_path, small_pubmedqa):
    preds = predict_run(runs[method], small_pubmedqa, tmp_path / "p.jsonl", limit=6, device="cpu")
    eval_run(runs[method], EvalOptions(data=str(small_pubmedqa), limit=6, device="cpu"), tmp_path / "e")
    rows = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == [r["prediction"] for r in rows]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in preds)


def test_a_flag_that_contradicts_the_run_needs_force(runs, tmp_path):
    with pytest.raises(PeftlabError, match=r"--template 2 contradicts the run's data.template \(0\)"):
        eval_run(runs["lora"], EvalOptions(template=2, device="cpu"), tmp_path)
    metrics = eval_run(runs["lora"], EvalOptions(template=2, device="cpu"), tmp_path, force=True)
    assert metrics["n"] > 0


@pytest.mark.parametrize("config,kind", [("reviews-lora.yaml", "classification"), ("support-chat.yaml", "generation")])
def test_own_alpaca_and_chat_files_train(config, kind, tiny_causal, tmp_path):
    cfg = load_config(OWN / config, [f"model.name={tiny_causal}", f"output_dir={tmp_path}", "train.max_steps=2",
                                     "data.limit_eval=4", "train.threads=1"])
    run = run_training(cfg)
    result = json.loads((run / "result.json").read_text())
    assert result["task_kind"] == kind
    saved = (run / "config.yaml").read_text()
    assert ("- negative\n  - positive" in saved) == (kind == "classification")  # the label set the run used
    assert eval_run(run, EvalOptions(device="cpu"), tmp_path / "again")["n"] == 4
