"""Does another readout of frozen models get past the linear head's plateau on PubMedQA? Repeated 10-fold CV.

    .venv/bin/python -m research.pubmedqa_feature_levers                                  # SmolLM2 cache first
    .venv/bin/python -m research.pubmedqa_feature_levers --model gemma-3-270m --layers 6 9 12 14 16 18 \\
        --cache runs/pubmedqa-features-gemma.pt                                           # Gemma cache (optional)
    .venv/bin/python -m research.pubmedqa_readout_levers                                  # the rows below

`research/pubmedqa_feature_levers.py` found the best linear readout of SmolLM2 (mean-pooled layer 20: about
0.54 / 0.43). This script scores the levers that might lift it, each on the same 3 x 10 folds with the same
standardised, square-root-weighted logistic regression (`research.cvkit`):

- **question-span pooling**: the question comes after the abstract, so its tokens' states have read the whole
  context; pooled over the question alone, or beside the context's own mean;
- **LONG_ANSWER as privileged information** (the abstract's conclusion: in training only, never a test input).
  A classifier on the conclusion's features gives the reasoning-free bound; the context's features then learn
  from it by a ridge map into conclusion space, or from its cross-fitted soft labels (distillation);
- **ensembles**: SmolLM2's features beside Gemma-3-270M's; three SmolLM2 layers; and three instruction phrasings
  (`data.template` 0-2), one head each with their probabilities averaged, when their feature caches exist:
  `-m research.pubmedqa_feature_levers --template 1 --layers 20 --cache runs/pubmedqa-features-t1.pt` (and 2).

Each extra feature pass is cached under runs/, so reruns only fit.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from peftlab.models.loading import load_model
from peftlab.prompts.batches import collate, token_batches
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.prompts.weights import class_weights
from research.cvkit import (
    FEATURES,
    GEMMA_FEATURES,
    cached,
    cross_validate,
    fold_scores,
    logistic,
    score_cells,
    standardised,
    summary_cells,
    task_folds,
)

MODEL = "smollm2-135m-instruct"


def question_starts(task, examples, fmt, max_length: int = 512) -> tuple[list, list[int]]:
    """Encoded prompts (template 0, `max_length` tokens) and where each one's question begins.

    The start is where the prompt's tokens first differ from the same prompt with a marker for the question, so
    it holds for any template that puts the question after the context.
    """
    items, starts = [], []
    for ex in examples:
        e = encode(task, ex, fmt, max_length, 0)
        marked = encode(task, replace(ex, inputs={**ex.inputs, "question": "\u00a7\u00a7 marker"}), fmt, max_length, 0)
        n = 0
        while e.prompt_ids[n] == marked.prompt_ids[n]:
            n += 1
        items.append(e)
        starts.append(n)
    return items, starts


@torch.inference_mode()
def span_pass(task, examples) -> dict[str, torch.Tensor]:
    """Every layer's states mean-pooled over the question span and, separately, over everything before it."""
    loaded = load_model(MODEL, device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    items, starts = question_starts(task, examples, fmt)
    probe = [Encoded(e.id, e.prompt_ids, [0]) for e in items]
    model = loaded.model.eval()
    layers, hidden = model.config.num_hidden_layers + 1, model.config.hidden_size
    out = {"question": torch.zeros(layers, len(items), hidden), "context": torch.zeros(layers, len(items), hidden)}
    for idx in token_batches(probe, 1024, max_rows=32):
        b = collate([probe[i] for i in idx], "causal", fmt.tokenizer.pad_token_id)
        res = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                    output_hidden_states=True, logits_to_keep=1)
        width = b["input_ids"].shape[1]
        qmask, cmask = torch.zeros(len(idx), width), torch.zeros(len(idx), width)
        for r, i in enumerate(idx):
            left = width - len(items[i].prompt_ids)  # rows are left-padded
            qmask[r, left + starts[i] :] = 1
            cmask[r, left : left + starts[i]] = 1
        for layer, h in enumerate(res.hidden_states):
            out["question"][layer, idx] = (h * qmask[..., None]).sum(1) / qmask.sum(1, keepdim=True)
            out["context"][layer, idx] = (h * cmask[..., None]).sum(1) / cmask.sum(1, keepdim=True)
    return out


@torch.inference_mode()
def long_answer_pass(examples, layer: int = 20) -> torch.Tensor:
    """Layer-`layer` mean-pooled states of each question's LONG_ANSWER (its conclusion), as a chat prompt."""
    loaded = load_model(MODEL, device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    return conclusion_features([ex.extra["long_answer"] for ex in examples], loaded.model, fmt, layer)


@torch.inference_mode()
def conclusion_features(texts: list[str], model, fmt: PromptFormat, layer: int = 20) -> torch.Tensor:
    """Layer-`layer` mean-pooled states of each "Conclusion: <text>", as a chat prompt."""
    probe = [Encoded(str(i), fmt.encode_prompt("Conclusion: " + t)[0], [0]) for i, t in enumerate(texts)]
    model = model.eval()
    feats = torch.zeros(len(probe), model.config.hidden_size)
    for idx in token_batches(probe, 1024, max_rows=32):
        b = collate([probe[i] for i in idx], "causal", fmt.tokenizer.pad_token_id)
        res = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                    output_hidden_states=True, logits_to_keep=1)
        m = b["attention_mask"].unsqueeze(-1).float()
        feats[idx] = (res.hidden_states[layer] * m).sum(1) / m.sum(1)
    return feats


def privileged_rows(x: np.ndarray, z: np.ndarray, y: np.ndarray, folds, labels) -> dict[str, list]:
    """LONG_ANSWER features `z` used in training only; the test side sees the context features `x` alone."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from threadpoolctl import threadpool_limits

    rows: dict[str, list] = {k: [] for k in ("bound", "ridge", "soft", "both")}
    for train, test in folds:
        tr, te = np.array(train), np.array(test)
        xs = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
        zs = (z - z[tr].mean(0)) / (z[tr].std(0) + 1e-6)
        with threadpool_limits(1):
            on_conclusion = logistic(0.01, y[tr]).fit(zs[tr], y[tr])
            rows["bound"].append(fold_scores(on_conclusion.predict(zs[te]), y[te], labels))
            ridge = Ridge(alpha=3000.0).fit(xs[tr], zs[tr])
            rows["ridge"].append(fold_scores(on_conclusion.predict(ridge.predict(xs[te])), y[te], labels))
            # Soft labels cross-fitted in 5 parts, so no training question is labelled by a model that saw it.
            soft = np.zeros((len(tr), 3))
            for k in range(5):
                part = np.arange(len(tr)) % 5 == k
                soft[part] = logistic(0.01, y[tr][~part]).fit(zs[tr][~part], y[tr][~part]).predict_proba(zs[tr][part])
            mix = 0.5 * soft + 0.5 * np.eye(3)[y[tr]]
            weight = class_weights(torch.from_numpy(y[tr]), 3, 0.5)
            yy = np.repeat(np.arange(3), len(tr))
            ww = mix.T.reshape(-1) * np.array([weight[k] for k in yy])
            student = LogisticRegression(C=0.01, max_iter=3000).fit(np.concatenate([xs[tr]] * 3), yy, sample_weight=ww)
            rows["soft"].append(fold_scores(student.predict(xs[te]), y[te], labels))
            both = np.concatenate([xs, ridge.predict(xs)], 1)
            on_both = logistic(0.01, y[tr]).fit(both[tr], y[tr])
            rows["both"].append(fold_scores(on_both.predict(both[te]), y[te], labels))
    return rows


def phrasing_ensemble(features: list[np.ndarray], y: np.ndarray, folds, labels, c: float = 0.01) -> list:
    """One head per instruction phrasing (the same questions, other prompt wording); their probabilities averaged."""
    from threadpoolctl import threadpool_limits

    rows = []
    for train, test in folds:
        probs = np.zeros((len(test), 3))
        for x in features:
            x_train, x_test = standardised(x)(train, test)
            with threadpool_limits(1):
                probs += logistic(c, y[train]).fit(x_train, y[train]).predict_proba(x_test)
        rows.append(fold_scores(probs.argmax(1), y[test], labels))
    return rows


def summary(name: str, scores: list) -> str:
    return f"| {name} | {score_cells(scores)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    task, examples, y, folds = task_folds("pubmedqa", args.repeats)
    started = time.perf_counter()
    base = torch.load(FEATURES, weights_only=True)  # research.pubmedqa_feature_levers
    spans = cached(Path("runs/pubmedqa-qfeatures.pt"), lambda: span_pass(task, examples))
    conclusion = cached(Path("runs/pubmedqa-longanswer-features.pt"), lambda: long_answer_pass(examples))
    print(f"feature passes {time.perf_counter() - started:.0f} s (0 when cached)", flush=True)
    lines = ["| readout | accuracy | std | macro-F1 | std |", "|---|---|---|---|---|"]

    def linear(name: str, x: np.ndarray, c: float = 0.003) -> None:
        s = cross_validate(x, y, folds, task.labels, c, 0.5)
        lines.append(f"| {name}, C={c} | {summary_cells(s)} |")
        print(lines[-1], flush=True)

    mean20 = base["mean"][20].numpy()
    linear("mean L20 (the recipe's features)", mean20, 0.01)
    for layer in (16, 20):
        q, ctx = spans["question"][layer].numpy(), spans["context"][layer].numpy()
        linear(f"question-span mean L{layer}", q)
        linear(f"context mean L{layer}", ctx)
        linear(f"question-span + context mean L{layer}", np.concatenate([q, ctx], 1))
    rows = privileged_rows(mean20, conclusion.numpy(), y, folds, task.labels)
    for key, name in (("bound", "LONG_ANSWER features -> label (reasoning-free bound; not a test-time input)"),
                      ("ridge", "context -> ridge map to LONG_ANSWER features -> their classifier"),
                      ("soft", "context, distilled from the LONG_ANSWER classifier's soft labels"),
                      ("both", "context + its ridge-predicted LONG_ANSWER features")):
        lines.append(summary(name, rows[key]))
        print(lines[-1], flush=True)
    linear("mean L16 + L20 + L22", np.concatenate([base["mean"][k].numpy() for k in (16, 20, 22)], 1))
    gemma = GEMMA_FEATURES
    if gemma.is_file():
        g = torch.load(gemma, weights_only=True)
        linear("SmolLM2 mean L20 + Gemma-3-270M mean L9", np.concatenate([mean20, g["mean"][9].numpy()], 1))
        linear("SmolLM2 mean L20 + Gemma-3-270M last-token L12", np.concatenate([mean20, g["last"][12].numpy()], 1))
    phrasings = [Path(f"runs/pubmedqa-features-t{t}.pt") for t in (1, 2)]
    if all(p.is_file() for p in phrasings):  # research.pubmedqa_feature_levers --template 1 / 2 --cache <these>
        per_template = [mean20] + [torch.load(p, weights_only=True)["mean"][20].numpy() for p in phrasings]
        for t, x in enumerate(per_template[1:], start=1):
            linear(f"mean L20, phrasing {t} alone", x, 0.01)
        lines.append(summary("mean L20, three phrasings' heads averaged", phrasing_ensemble(per_template, y, folds,
                                                                                            task.labels)))
        print(lines[-1], flush=True)
        linear("mean L20 of three phrasings, concatenated", np.concatenate(per_template, 1))
    print(f"\npubmedqa, {MODEL}, {args.repeats} x 10 folds, {time.perf_counter() - started:.0f} s\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
