"""Levers of the linear head on PubMedQA, under repeated 10-fold cross-validation.

    .venv/bin/python scripts/head_levers.py --layers 12 16 20 --repeats 4

One feature pass per layer (through `peftlab.heads.extract`, the method's own code), then every combination of
layer, L2 strength and class weighting is scored on the same folds as `peftlab cv` (`kfold_examples`, fold k test,
the other folds but k+1 train), repeated over several fold seeds: one 10-fold run moves by a few points with the
seed, so a lever is only worth its row if it wins on average. Prints a markdown table, best first.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

from peftlab.config import MethodConfig
from peftlab.data import PromptFormat, encode
from peftlab.heads import build, extract, fit_logistic
from peftlab.metrics import classification_metrics
from peftlab.models import load_model
from peftlab.tasks import DEFAULT_DATA, get_task, kfold_examples


def features(model: str, task_name: str, layers: list[int], max_length: int, template: int):
    """{layer: (n, hidden) features} for every example, and the examples."""
    task = get_task(task_name)
    examples = task.load(Path(DEFAULT_DATA[task.name]))
    loaded = load_model(model, device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    items = [encode(task, ex, fmt, max_length, template) for ex in examples]
    out = {}
    for layer in layers:
        head = build(loaded, task, MethodConfig(name="linear-head", head_layer=layer))
        out[layer] = extract(head, items, fmt.tokenizer.pad_token_id)
    return task, examples, out


def score(task, examples, x: torch.Tensor, c: float, balance: float, repeats: int) -> dict[str, float]:
    """Mean test accuracy and macro-F1 over `repeats` seeds x 10 folds."""
    index = {ex.id: i for i, ex in enumerate(examples)}
    y = torch.tensor([task.labels.index(ex.target) for ex in examples])
    accuracy, macro_f1 = [], []
    for seed, fold in itertools.product(range(repeats), range(10)):
        split = kfold_examples(examples, 10, fold, seed)
        train = [index[ex.id] for ex in split["train"]]
        test = [index[ex.id] for ex in split["test"]]
        head = fit_logistic(x[train], y[train], len(task.labels), c, balance)
        logits = (x[test] - head["mean"]) / head["scale"] @ head["linear.weight"].T + head["linear.bias"]
        m = classification_metrics([task.labels[i] for i in logits.argmax(-1)],
                                   [task.labels[i] for i in y[test]], task.labels)
        accuracy.append(m["accuracy"])
        macro_f1.append(m["macro_f1"])
    return {"accuracy": statistics.fmean(accuracy), "acc_std": statistics.stdev(accuracy),
            "macro_f1": statistics.fmean(macro_f1), "f1_std": statistics.stdev(macro_f1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="pubmedqa")
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 16, 20])
    parser.add_argument("--c", type=float, nargs="+", default=[0.03, 0.1])
    parser.add_argument("--balance", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--template", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    task, examples, feats = features(args.model, args.task, args.layers, args.max_length, args.template)
    extracted = time.perf_counter() - started
    rows = [
        (layer, c, balance, score(task, examples, feats[layer], c, balance, args.repeats))
        for layer, c, balance in itertools.product(args.layers, args.c, args.balance)
    ]
    rows.sort(key=lambda r: -(r[3]["accuracy"] + r[3]["macro_f1"]))
    print(f"{args.task}, {args.model}, {len(examples)} examples, {args.repeats} x 10 folds; "
          f"feature passes {extracted:.0f} s, fits {time.perf_counter() - started - extracted:.0f} s")
    print("| head_layer | head_c | class_balance | accuracy | std | macro-F1 | std |\n|---|---|---|---|---|---|---|")
    for layer, c, balance, s in rows:
        print(f"| {layer} | {c} | {balance} | {s['accuracy']:.3f} | {s['acc_std']:.3f} | {s['macro_f1']:.3f} "
              f"| {s['f1_std']:.3f} |")


if __name__ == "__main__":
    main()
