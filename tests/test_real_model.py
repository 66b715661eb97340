"""The one test on the real packaged model: SmolLM2-135M-Instruct scores PubMedQA items through `run_eval`.

It reuses the user's model cache (~/.cache/peftlab); on a fresh machine the first run converts the GGUF (~40 s).
"""

from __future__ import annotations

import json

import pytest

from peftlab.recipes.eval import EvalOptions, run_eval


@pytest.mark.slow
def test_smollm2_scores_pubmedqa(small_pubmedqa, tmp_path):
    out = tmp_path / "eval"
    opts = EvalOptions(task="pubmedqa", data=str(small_pubmedqa), split="test", limit=3, device="cpu")
    metrics = run_eval(opts, out)
    assert metrics["n"] == 3 and 0 <= metrics["accuracy"] <= 1 and "macro_f1" in metrics
    assert metrics["model"] == "smollm2-135m-instruct"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["prediction"] in ("yes", "no", "maybe")
        assert row["prediction"] == max(row["label_logprobs"], key=row["label_logprobs"].get)
        assert "<|im_start|>assistant" in row["prompt"]  # the instruct model is prompted through its chat template
    assert json.loads((out / "metrics.json").read_text())["n"] == 3
