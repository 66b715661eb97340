"""Which frozen features of SmolLM2 carry the PubMedQA answer? Repeated 10-fold CV of linear heads on every layer.

    .venv/bin/python -m research.pubmedqa_feature_levers                # one feature pass (~7 min here), then fits
    .venv/bin/python -m research.pubmedqa_feature_levers --layers 12 16 --c 0.01 --balance 0.5

One full forward pass per question (`output_hidden_states`) gives, at every layer, the prompt's mean-pooled states
and the last prompt token's state, plus the zero-shot log-probabilities of "yes", "no" and "maybe" at the answer
position. The pass is cached in `--cache`, so later runs only fit. Each candidate feature set is scored by a
standardised, class-weighted L2 logistic regression (`research.cvkit.cross_validate`) on the folds `peftlab cv`
uses (`kfold_examples`, via `research.cvkit.task_folds`), repeated over `--repeats` fold seeds, because one
10-fold split moves by a few points with its seed. Prints a markdown table, best first (by accuracy + macro-F1).

This explores what `linear-head` (mean pooling at one layer) could read out; it is not a method of its own.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from peftlab.models.loading import load_model
from peftlab.prompts.batches import collate, token_batches
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import Encoded, PromptFormat
from research.cvkit import FEATURES, cached, cross_validate, summary_cells, task_folds


@torch.inference_mode()
def feature_pass(model_name: str, task, examples, template: int, max_length: int) -> dict[str, torch.Tensor]:
    """Mean-pooled and last-token states at every layer, and the label-word log-probs, for every example."""
    loaded = load_model(model_name, device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    items = [encode(task, ex, fmt, max_length, template) for ex in examples]
    probe = [Encoded(e.id, e.prompt_ids, [0]) for e in items]
    label_ids = [fmt.label_ids(label)[0] for label in task.labels]
    model, n = loaded.model.eval(), len(items)
    layers, hidden = model.config.num_hidden_layers + 1, model.config.hidden_size
    out = {"mean": torch.zeros(layers, n, hidden), "last": torch.zeros(layers, n, hidden), "lp": torch.zeros(n, 3)}
    done, started = 0, time.perf_counter()
    for idx in token_batches(probe, 8192, max_rows=32):
        batch = collate([probe[i] for i in idx], "causal", fmt.tokenizer.pad_token_id)
        res = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], output_hidden_states=True, logits_to_keep=1)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        for layer, h in enumerate(res.hidden_states):
            out["mean"][layer, idx] = (h * mask).sum(1) / mask.sum(1)
            out["last"][layer, idx] = h[:, -1]
        out["lp"][idx] = res.logits[:, -1].float().log_softmax(-1)[:, label_ids]
        done += len(idx)
        print(f"features {done}/{n} ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def candidates(feats: dict[str, torch.Tensor], layers: list[int]) -> dict[str, np.ndarray]:
    """Named feature matrices: each layer's mean and last-token states, the label log-probs, and a few mixes."""
    out: dict[str, np.ndarray] = {"label log-probs (zero-shot; fitted: a prior correction)": feats["lp"].numpy()}
    for layer in layers:
        out[f"mean L{layer}"] = feats["mean"][layer].numpy()
        out[f"last-token L{layer}"] = feats["last"][layer].numpy()
        out[f"mean L{layer} + last-token L{layer} + log-probs"] = np.concatenate(
            [feats["mean"][layer].numpy(), feats["last"][layer].numpy(), feats["lp"].numpy()], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="pubmedqa")
    parser.add_argument("--template", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 12, 16, 20, 24, 30])
    parser.add_argument("--c", type=float, nargs="+", default=[0.003, 0.01, 0.1])
    parser.add_argument("--balance", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=FEATURES)
    args = parser.parse_args()
    task, examples, y, folds = task_folds(args.task, args.repeats)
    started = time.perf_counter()
    feats = cached(args.cache, lambda: feature_pass(args.model, task, examples, args.template, args.max_length))
    extracted = time.perf_counter() - started
    rows = []
    for (name, x), c, balance in itertools.product(candidates(feats, args.layers).items(), args.c, args.balance):
        rows.append((name, c, balance, cross_validate(x, y, folds, task.labels, c, balance)))
        print(f"{name}, C={c}, balance={balance}: {rows[-1][3]}", flush=True)
    rows.sort(key=lambda r: -(r[3]["accuracy"] + r[3]["macro_f1"]))
    print(f"\n{args.task}, {args.model}, template {args.template}, {len(examples)} examples, {args.repeats} x 10 "
          f"folds; feature pass {extracted:.0f} s, fits {time.perf_counter() - started - extracted:.0f} s\n")
    print("| features | C | class_balance | accuracy | std | macro-F1 | std |\n|---|---|---|---|---|---|---|")
    for name, c, balance, s in rows:
        print(f"| {name} | {c} | {balance} | {summary_cells(s)} |")


if __name__ == "__main__":
    main()
