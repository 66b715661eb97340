"""How should the frozen layer-20 states be pooled, and how much of the abstract should they see? PubMedQA, 10-fold CV.

    .venv/bin/python -m research.pubmedqa_pooling_levers   # feature passes 448 s here, then the fits 725 s

The recipe's head (`examples/pubmedqa-best.yaml`) reads SmolLM2's layer-20 states mean-pooled over a prompt cut to
512 tokens. Two things about that were never measured:

- **the cut**: `data.encode` shortens a long context from its end, and a PubMedQA context ends with its RESULTS
  section, the part that says what was found. Here the prompts are also encoded whole (`--max-length`, default
  1024, cuts none of the 500);
- **the pooling**: a mean over 400 tokens weighs the background sentence as much as "did not differ
  significantly". Here the same states are also pooled over the context's last part, by max as well as mean, and
  by a learned attention: one scoring vector over the token states, softmax over the prompt, then the linear head,
  both trained per fold with the head's class weights and an L2 penalty matching its C.

Every readout is scored on `peftlab cv`'s folds (3 fold seeds x 10), by the same standardised, square-root-weighted
logistic regression as `research/pubmedqa_feature_levers.py` where it is linear (`research.cvkit.cross_validate`).
The passes are cached under runs/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from peftlab.models.loading import load_model
from peftlab.prompts.batches import collate, token_batches
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.prompts.weights import class_weights
from research.cvkit import cached, cross_validate, fold_scores, logistic, summarise, summary_cells, task_folds
from research.pubmedqa_readout_levers import question_starts

MODEL = "smollm2-135m-instruct"
LAYER = 20


@torch.inference_mode()
def token_pass(task, examples, max_length: int) -> dict:
    """Layer-`LAYER` states of every prompt token (fp16, one tensor per question), and where each question begins.

    Only the first `LAYER` decoder layers run: a hook takes the last one's output, so the rest are dropped.
    """
    loaded = load_model(MODEL, device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    if max_length == 512:
        items, starts = [encode(task, ex, fmt, 512, 0) for ex in examples], [0] * len(examples)
    else:
        items, starts = question_starts(task, examples, fmt, max_length)
    probe = [Encoded(e.id, e.prompt_ids, [0]) for e in items]
    model = loaded.model.eval()
    model.model.layers = model.model.layers[:LAYER]
    captured = {}
    model.model.layers[-1].register_forward_hook(lambda mod, args, out: captured.update(h=out))
    states: list[torch.Tensor | None] = [None] * len(items)
    done, started = 0, time.perf_counter()
    for idx in token_batches(probe, 1024, max_rows=32):
        b = collate([probe[i] for i in idx], "causal", fmt.tokenizer.pad_token_id)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
              logits_to_keep=1)
        h = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
        for r, i in enumerate(idx):  # rows are left-padded
            states[i] = h[r, h.shape[1] - len(items[i].prompt_ids) :].half().clone()
        done += len(idx)
        print(f"{max_length}-token pass: {done}/{len(items)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"states": states, "starts": starts, "cut": [e.truncated for e in items]}


def pooled(states: list[torch.Tensor], spans=None, how: str = "mean") -> np.ndarray:
    """Each question's states pooled over `spans` (first, end) (default: the whole prompt) by mean or max."""
    out = []
    for k, s in enumerate(states):
        part = s[slice(*spans[k])] if spans else s
        out.append(part.float().mean(0) if how == "mean" else part.float().amax(0))
    return torch.stack(out).numpy()


def tail_spans(starts: list[int], fraction: float) -> list[tuple[int, int]]:
    """The last `fraction` of each context (the tokens before its question)."""
    return [(int(q * (1 - fraction)), q) for q in starts]


def attention_pooling_cv(states, y, folds, labels, c: float, score_l2: float, steps: int = 60) -> dict:
    """A learned attention pooling and linear head per fold; mean and spread of test accuracy and macro-F1.

    softmax over the prompt of (standardised state . w), the pooled state standardised as the linear rows' mean
    pools are, then the linear head. w starts at 0, which is the mean pool, so the fit starts from the recipe's
    readout. The head's penalty is the logistic regression's at `c` (sklearn's C: sum of weighted losses +
    |W|^2 / 2C); `score_l2` holds w near mean pooling. Tokens are packed end to end, a question index per token.
    The joint fit stops after `steps` L-BFGS iterations, short of the head's optimum, so the head is then refitted
    to convergence (sklearn, as the linear rows) on the states pooled with the learned w.
    """
    from threadpoolctl import threadpool_limits

    accuracy, macro_f1 = [], []
    for train, test in folds:
        tokens = torch.cat([states[i] for i in train]).float()
        means = torch.stack([states[i].float().mean(0) for i in train])
        scale = (tokens.std(0) + 1e-6, means.mean(0), means.std(0) + 1e-6)  # tokens' std; the mean pools' mean, std
        del tokens
        pool = _fit_attention(_packed(states, train), torch.from_numpy(y[train]), scale, c, score_l2, steps)
        with torch.no_grad():
            x_train, x_test = pool(_packed(states, train)).numpy(), pool(_packed(states, test)).numpy()
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        head = logistic(c, y[train])
        with threadpool_limits(1):
            predicted = head.fit((x_train - mean) / std, y[train]).predict((x_test - mean) / std)
        acc, f1 = fold_scores(predicted, y[test], labels)
        accuracy.append(acc)
        macro_f1.append(f1)
    return summarise(accuracy, macro_f1)


def _packed(states, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tokens of `rows` end to end, the position in `rows` of each token's question)."""
    x = torch.cat([states[i] for i in rows]).float()
    segment = torch.cat([torch.full((len(states[i]),), k) for k, i in enumerate(rows)])
    return x, segment


def _fit_attention(packed, y, scale, c: float, score_l2: float, steps: int):
    """Full-batch L-BFGS on the class-weighted loss; returns packed tokens -> states pooled with the learned w."""
    token_std, pool_mean, pool_std = scale
    weights = class_weights(y, 3, 0.5)
    sample_w = torch.tensor([weights[int(k)] for k in y])
    w = torch.zeros(packed[0].shape[-1], requires_grad=True)
    head = torch.nn.Linear(packed[0].shape[-1], 3)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)

    def pool(tokens):
        x, segment = tokens
        n = int(segment[-1]) + 1
        scores = x @ (w / token_std)  # standardised states . w, less a constant a softmax ignores
        top = torch.full((n,), float("-inf")).scatter_reduce(0, segment, scores.detach(), "amax")
        e = (scores - top[segment]).exp()  # a softmax within each question, shifted by its own max
        total = torch.zeros(n).index_add(0, segment, e)
        return torch.zeros(n, x.shape[1]).index_add(0, segment, e[:, None] * x) / total[:, None]

    def logits(tokens):
        return head((pool(tokens) - pool_mean) / pool_std)

    opt = torch.optim.LBFGS([w, *head.parameters()], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(logits(packed), y, reduction="none") * sample_w).sum()
        loss = loss + head.weight.square().sum() / (2 * c) + score_l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    task, examples, y, folds = task_folds("pubmedqa", args.repeats)
    started = time.perf_counter()
    cut = cached(Path("runs/pubmedqa-tokens-L20-512.pt"), lambda: token_pass(task, examples, 512))
    whole = cached(Path(f"runs/pubmedqa-tokens-L20-{args.max_length}.pt"),
                   lambda: token_pass(task, examples, args.max_length))
    passes = time.perf_counter() - started
    lengths = [len(s) for s in whole["states"]]
    print(f"feature passes {passes:.0f} s (0 when cached); prompts cut at 512: {sum(map(bool, cut['cut']))}; "
          f"at {args.max_length}: {sum(map(bool, whole['cut']))}; whole prompts {min(lengths)}-{max(lengths)} "
          f"tokens, mean {statistics.fmean(lengths):.0f}", flush=True)
    lines = ["| readout | accuracy | std | macro-F1 | std |", "|---|---|---|---|---|"]

    def row(name: str, s: dict) -> None:
        lines.append(f"| {name} | {summary_cells(s)} |")
        print(lines[-1], flush=True)

    def linear(name: str, x: np.ndarray, c: float = 0.01, some=None) -> None:
        row(f"{name}, C={c}", cross_validate(x, y, some or folds, task.labels, c, 0.5))

    states, starts = whole["states"], whole["starts"]
    linear("mean L20, prompt cut at 512 tokens (the recipe)", pooled(cut["states"]))
    mean = pooled(states)
    linear(f"mean L20, whole prompt ({args.max_length})", mean)
    for fraction in (0.5, 0.25):
        tail = pooled(states, tail_spans(starts, fraction))
        linear(f"mean L20 over the context's last {fraction:.0%}", tail)
        linear(f"whole-prompt mean + mean over the context's last {fraction:.0%}", np.concatenate([mean, tail], 1),
               0.003)
    linear("whole-prompt mean + max", np.concatenate([mean, pooled(states, how="max")], 1), 0.003)
    linear(f"mean L20, whole prompt ({args.max_length}), 10 folds", mean, some=folds[:10])
    for score_l2 in (1.0, 100.0):  # one fold seed (10 folds): each fit passes over 200k token states per step
        t0 = time.perf_counter()
        fit = attention_pooling_cv(states, y, folds[:10], task.labels, 0.01, score_l2)
        row(f"learned attention pooling, head C=0.01, scoring-vector L2 {score_l2} (10 folds, "
            f"{time.perf_counter() - t0:.0f} s)", fit)
    print(f"\npubmedqa, {MODEL}, {args.repeats} x 10 folds, {time.perf_counter() - started:.0f} s in all "
          f"({passes:.0f} s feature passes)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
