"""The one test on the real packaged model: SmolLM2-135M-Instruct scores PubMedQA items through `run_eval`.

It reuses the user's model cache (~/.cache/peftlab); on a fresh machine the first run converts the GGUF (~40 s).
"""

from __future__ import annotations

import json

import pytest

from peftlab.recipes.eval_run import EvalOptions, run_eval

# Measured with this test's settings (fp32, 2-core AMD EPYC Zen 4, torch 2.13.0, 2026-12-07): the label
# log-probabilities of the first six questions of data/. The smallest yes/no margin among them is 0.08, so a CPU whose
# fp32 sums round differently (AVX2 against AVX-512) moves no prediction; the tolerance is well under that margin.
EXPECTED = {
    "10808977": ("yes", {"yes": -3.9567, "no": -4.1477, "maybe": -10.641}),
    "23831910": ("yes", {"yes": -4.8371, "no": -5.3759, "maybe": -12.7706}),
    "17113061": ("no", {"yes": -5.0115, "no": -4.9308, "maybe": -13.5579}),
    "10966337": ("yes", {"yes": -3.9942, "no": -4.0944, "maybe": -10.9742}),
    "25432938": ("yes", {"yes": -3.3691, "no": -3.9052, "maybe": -10.6615}),
    "18847643": ("yes", {"yes": -3.4967, "no": -3.7479, "maybe": -10.4144}),  # the gold answer is no
}


@pytest.mark.slow
def test_smollm2_scores_pubmedqa(small_pubmedqa, tmp_path):
    out = tmp_path / "eval"
    opts = EvalOptions(task="pubmedqa", data=str(small_pubmedqa), split="all", limit=6, device="cpu")
    metrics = run_eval(opts, out)
    assert metrics["n"] == 6 and metrics["model"] == "smollm2-135m-instruct"
    assert metrics["accuracy"] == pytest.approx(5 / 6)  # zero-shot SmolLM2 misses only 18847643
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {row["id"]: row["prediction"] for row in rows} == {k: v[0] for k, v in EXPECTED.items()}
    for row in rows:
        assert row["label_logprobs"] == pytest.approx(EXPECTED[row["id"]][1], abs=0.02)
        assert "<|im_start|>assistant" in row["prompt"]  # the instruct model is prompted through its chat template
    assert json.loads((out / "metrics.json").read_text())["n"] == 6
