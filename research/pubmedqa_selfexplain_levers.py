"""Does SmolLM2's own written conclusion help it answer PubMedQA? Repeated 10-fold CV.

    .venv/bin/python -m research.pubmedqa_feature_levers                # SmolLM2 feature cache first (~6 min)
    .venv/bin/python -m research.pubmedqa_selfexplain_levers            # generation and rows below, ~7 min

Hypothesis, written before the run: the abstract's own conclusion (LONG_ANSWER) carries the answer far better than
the mean-pooled context (0.677 / 0.524 against 0.541 / 0.426, docs/results.md), but it is not a test-time input.
The model can write one: asked what the study concludes, SmolLM2 restates the abstract's results sentence in a
few words, with the "no", "not" or "no difference" that a mean over 400 token states blurs. Its sentence's layer-20
features, beside the recipe's, add 1-2 points of both accuracy and macro-F1.

Steps: every question's context and question are prompted (chat template, context cut to fit 512 tokens, as the
recipe does) with "In one sentence, what does the study conclude?"; `peftlab.evaluate.generate` writes up to 40
greedy tokens; the sentence is read back as "Conclusion: <sentence>" and mean-pooled at layer 20, exactly as
`research/pubmedqa_readout_levers.py` reads LONG_ANSWER. The model sees nothing but the test-time inputs, and no
label: the sentences are the same whichever fold a question is in. Rows: the sentence's features alone, beside
the recipe's (concatenated), and the two heads' log-probabilities summed; same folds, same class-weighted
logistic regression as the other lever scripts (`research.cvkit`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from peftlab.data.tasks.base import Template
from peftlab.evaluate.generation import generate
from peftlab.models.loading import load_model
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import PromptFormat
from research.cvkit import FEATURES, cross_validate, fused_cv, score_cells, standardised, summary_cells, task_folds
from research.pubmedqa_readout_levers import conclusion_features

MODEL, LAYER = "smollm2-135m-instruct", 20
ASK = Template("In one sentence, what does the study conclude?", "Context: {context}\n\nQuestion: {question}\n\n"
               "{instruction}")


@torch.inference_mode()
def written_conclusions(task, examples, loaded, fmt) -> list[str]:
    """SmolLM2's greedy one-sentence conclusion of each question's abstract."""
    asking = dataclasses.replace(task, templates=(ASK,))
    items = [encode(asking, ex, fmt, 512, target="") for ex in examples]
    return generate(loaded.model.eval(), fmt, items, max_new_tokens=40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("runs/pubmedqa-selfconclusions.json"))
    args = parser.parse_args()
    task, examples, y, folds = task_folds("pubmedqa", args.repeats)
    loaded = load_model(MODEL, device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    started = time.perf_counter()
    if args.cache.is_file():
        texts = json.loads(args.cache.read_text())
    else:
        texts = written_conclusions(task, examples, loaded, fmt)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        args.cache.write_text(json.dumps(texts, indent=1))
    written = time.perf_counter() - started
    sentence = conclusion_features(texts, loaded.model, fmt, LAYER).numpy()
    read = time.perf_counter() - started - written
    print(f"conclusions written in {written:.0f} s (0 when cached), read in {read:.0f} s; "
          f"mean {statistics.fmean(len(t.split()) for t in texts):.1f} words")
    for i in range(3):
        print(f"  [{examples[i].target}] {texts[i]}")
    mean20 = torch.load(FEATURES, weights_only=True)["mean"][LAYER].numpy()
    lines = ["| readout (square-root class weights) | accuracy | std | macro-F1 | std |", "|---|---|---|---|---|"]

    def row(name: str, scores: list) -> None:
        lines.append(f"| {name} | {score_cells(scores)} |")
        print(lines[-1], flush=True)

    def linear(name: str, x: np.ndarray, c: float) -> None:
        s = cross_validate(x, y, folds, task.labels, c, 0.5)
        lines.append(f"| {name}, C={c} | {summary_cells(s)} |")
        print(lines[-1], flush=True)

    linear("mean L20 (the recipe's features)", mean20, 0.01)
    for c in (0.003, 0.01, 0.1):
        linear("the written conclusion's mean L20", sentence, c)
    linear("the recipe's features and the written conclusion's, concatenated", np.concatenate([mean20, sentence], 1),
           0.01)
    heads = [(standardised(mean20), 0.01), (standardised(sentence), 0.01)]
    row("the recipe's head + the written conclusion's head, log-probabilities summed, C=0.01",
        fused_cv(heads, y, folds, task.labels, 0.5)[0])
    print(f"\npubmedqa, {args.repeats} x 10 folds, {time.perf_counter() - started:.0f} s in all\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
