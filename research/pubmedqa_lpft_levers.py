"""Does LP-FT on PubMedQA (the recipe's linear head, then LoRA fine-tuned through it) beat the head alone? 10-fold CV.

    .venv/bin/python -m research.pubmedqa_lpft_levers [--folds 10] [--epochs 2] [--lr 1e-4] [--bf16]

The recipe (`examples/pubmedqa-best.yaml`) reads SmolLM2's frozen layer-20 states, mean-pooled over the prompt, with
an L2 logistic regression: 0.550 / 0.424 under 10-fold CV. Every readout of those frozen states since has landed on
the same plateau (docs/results.md), and LoRA trained on the answer word learned only the label prior. What was not
tried is the usual way a classifier is fine-tuned: the encoder trained through a classification head, on the
class-weighted cross-entropy of the three answers. With 400 training questions, Kumar et al.'s LP-FT ("Fine-Tuning
can Distort Pretrained Features", ICLR 2022) is the careful form: fit the linear probe first, start the head there,
then fine-tune. The head starts at the probe's optimum, so the first gradients reach the adapter instead of
tearing the features up to fit a random head; and with LoRA's B = 0 the fine-tuned model starts as exactly the
recipe.

**Hypothesis, written before the run:** the layer-20 states were shaped for next-token prediction; fine-tuning
their lower layers through the probe lets them separate "no" and "maybe" abstracts that the frozen states blur:
+2-4 points of both scores over the probe on the same folds (toward 0.57-0.59 / 0.44-0.46), with the risk that
450 questions are too few and it overfits (learned attention pooling, 576 weights, lost 8 points).

Per fold (fold k tests, the other nine train; the validation fold `peftlab cv` keeps apart is not needed, as nothing
is selected on it): the probe is `head.fit_logistic` on the frozen features (C=0.01, square-root class weights, as
the recipe), then LoRA r8 on q and v of layers 1-20 and the head train together for `--epochs` epochs, batches of 8
questions, AdamW at `--lr`, the same square-root class weights in the loss. Only layers 1-20 run: the head reads
layer 20. `--bf16` computes under bf16 autocast (fast on CPUs with AMX); the probe's features stay fp32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from peftlab.methods.head import fit_logistic
from peftlab.models.loading import load_model
from peftlab.prompts.batches import collate, token_batches
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.prompts.weights import class_weights
from research.cvkit import cached, fold_scores, task_folds

MODEL, LAYER, MAX_LENGTH, C, BALANCE = "smollm2-135m-instruct", 20, 512, 0.01, 0.5


def truncated_model():
    """SmolLM2's decoder up to layer `LAYER`, returning that layer's output (no final norm), and its prompts."""
    loaded = load_model(MODEL, device="cpu")
    model = loaded.model.model  # the decoder without the LM head
    model.layers = model.layers[:LAYER]
    model.norm = torch.nn.Identity()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)


def pooled(model, items: list[Encoded], pad_id: int, autocast: bool) -> torch.Tensor:
    """Mean-pooled layer-20 states of each prompt (padding excluded), with gradients if the caller allows them."""
    batch = collate(items, "causal", pad_id)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return ((h * mask).sum(1) / mask.sum(1)).float()


@torch.inference_mode()
def features(model, items: list[Encoded], pad_id: int, autocast: bool = False) -> torch.Tensor:
    out = torch.zeros(len(items), model.config.hidden_size)
    for idx in token_batches(items, 1024, max_rows=32):
        out[idx] = pooled(model, [items[i] for i in idx], pad_id, autocast)
    return out


def finetune(base, probe: dict, items: list[Encoded], y: torch.Tensor, pad_id: int, args, seed: int):
    """LoRA on a copy of `base` and a head started at the probe, trained on class-weighted cross-entropy."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                               target_modules=["q_proj", "v_proj"]), copy.deepcopy(base))
    head = torch.nn.Linear(probe["linear.weight"].shape[1], probe["linear.weight"].shape[0])
    head.load_state_dict({"weight": probe["linear.weight"], "bias": probe["linear.bias"]})
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    weights = torch.tensor(list(class_weights(y, 3, BALANCE).values()), dtype=torch.float32)
    steps = args.epochs * -(-len(items) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.0, 1 - s / steps))
    model.train()
    losses, gen = [], torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        if epoch:
            print(f"  epoch {epoch}: mean loss {np.mean(losses):.3f}, {time.perf_counter() - started:.0f} s")
        order = torch.randperm(len(items), generator=gen).tolist()
        for start in range(0, len(order), args.batch):
            rows = order[start : start + args.batch]
            total = float(weights[y[rows]].sum())
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for idx in token_batches([items[r] for r in rows], 1024, max_rows=8):  # pieces that stay in cache
                part = [rows[i] for i in idx]
                logits = head((pooled(model, [items[r] for r in part], pad_id, args.bf16) - probe["mean"])
                              / probe["scale"])
                # the batch's class-weighted mean, however it is cut into pieces
                loss = torch.nn.functional.cross_entropy(logits, y[part], weight=weights, reduction="sum") / total
                loss.backward()
                loss_sum += loss.item()
            opt.step()
            sched.step()
            losses.append(loss_sum)
    model.eval()
    return model, head, losses


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=10, help="run folds 0..N-1 of fold seed 0")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the fine-tuning and its test pass")
    parser.add_argument("--cache", type=Path, default=Path("runs/pubmedqa-lpft-frozen.pt"))
    args = parser.parse_args()

    task, examples, y_all, folds = task_folds("pubmedqa", 1)
    base, fmt = truncated_model()
    pad_id = fmt.tokenizer.pad_token_id
    items = [encode(task, ex, fmt, MAX_LENGTH, 0) for ex in examples]
    probe_items = [Encoded(e.id, e.prompt_ids, [0]) for e in items]
    started = time.perf_counter()
    frozen = cached(args.cache, lambda: features(base, probe_items, pad_id))
    print(f"frozen features: {time.perf_counter() - started:.0f} s", flush=True)
    y = torch.from_numpy(y_all)
    rows = {"probe": [], "lpft": []}
    for k, (train, test) in enumerate(folds[: args.folds]):
        fitted = fit_logistic(frozen[train], y[train], 3, C, BALANCE)
        probe_pred = ((frozen[test] - fitted["mean"]) / fitted["scale"] @ fitted["linear.weight"].T
                      + fitted["linear.bias"]).argmax(-1)
        t0 = time.perf_counter()
        model, head, losses = finetune(base, fitted, [probe_items[i] for i in train], y[train], pad_id, args, k)
        train_s = time.perf_counter() - t0
        with torch.inference_mode():
            x = features(model, [probe_items[i] for i in test], pad_id, args.bf16)
            pred = head((x - fitted["mean"]) / fitted["scale"]).argmax(-1)
        for name, p in (("probe", probe_pred), ("lpft", pred)):
            rows[name].append(fold_scores(p.tolist(), y[test].tolist(), task.labels))
        counts = torch.bincount(pred, minlength=3).tolist()
        print(f"fold {k}: probe {rows['probe'][-1][0]:.3f} / {rows['probe'][-1][1]:.3f}; "
              f"LP-FT {rows['lpft'][-1][0]:.3f} / {rows['lpft'][-1][1]:.3f} "
              f"(answers yes/no/maybe {counts}); train {train_s:.0f} s, loss first 5 steps "
              f"{np.mean(losses[:5]):.3f}, last 5 {np.mean(losses[-5:]):.3f}", flush=True)
    print(f"\n{args.folds} folds of fold seed 0; {args.epochs} epochs, lr {args.lr}, batch {args.batch}, "
          f"bf16 autocast {args.bf16}\n")
    print("| readout | accuracy | std | macro-F1 | std |\n|---|---|---|---|---|")
    for name, pairs in rows.items():
        acc, f1 = [a for a, _ in pairs], [f for _, f in pairs]
        mean_acc, mean_f1 = statistics.fmean(acc), statistics.fmean(f1)
        print(f"| {name} | {mean_acc:.3f} | {_sd(acc):.3f} | {mean_f1:.3f} | {_sd(f1):.3f} |")


if __name__ == "__main__":
    main()
