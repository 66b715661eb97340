"""Scoring without generating: label-word scores for classification, and the validation loss.

Classification never generates: the prediction is the label whose tokens the model finds most likely right after
the prompt. With single-token labels that is one forward pass per batch, reading only the last position's logits.
Generation (`evaluate.generation`) runs length-sorted batches with the KV cache (`evaluate.decode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from tqdm.auto import tqdm

from peftlab.data.tasks import Example
from peftlab.methods.frozen_pass import decoder_layers, label_field, prompt_pass, stored_rows
from peftlab.models.forward import IGNORE, target_logits, target_loss
from peftlab.prompts.batches import collate, forward_tokens, right_padded_ok, token_batches
from peftlab.prompts.format import Encoded, PromptFormat


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def mean_loss(model, kind: str, items: Sequence[Encoded], pad_id: int, max_tokens: int | None = None) -> float:
    """Mean per-token target loss over `items` (the validation loss)."""
    total, count = 0.0, 0
    right = right_padded_ok(model, kind, items)
    for idx in token_batches(items, max_tokens or forward_tokens(_device(model)), max_rows=64):
        batch = collate([items[i] for i in idx], kind, pad_id, right_padded=right)
        loss, n = target_loss(model, kind, _to(batch, _device(model)))
        total, count = total + float(loss), count + n
    return total / max(count, 1)


@torch.inference_mode()
def label_scores(
    model, fmt: PromptFormat, items: Sequence[Encoded], labels: Sequence[str], max_tokens: int | None = None,
    progress=True, examples: Sequence[Example] | None = None, frozen: bool = False,
) -> torch.Tensor:
    """Log-likelihood of each label after each prompt: shape (len(items), len(labels)).

    `examples`, the items' source examples, are read only by a classifier head with text features. `frozen`: the
    model reads the unchanged base (zero-shot, few-shot, a linear head), so its pass over each prompt goes through
    the shared frozen-base store (`methods.frozen_pass`): computed only for prompts that no earlier run scored. A
    server answering requests leaves it off, so that it stores nothing.
    """
    if hasattr(model, "label_logprobs"):  # a classifier head (linear-head) scores its labels directly
        return model.label_logprobs(items, fmt.tokenizer.pad_token_id, progress, examples=examples, frozen=frozen)
    label_ids = [fmt.label_ids(label) for label in labels]
    single = all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(labels)
    # With distinct one-token labels, one pass over the prompts decides; otherwise score each label's tokens in full.
    candidates = [[ids[0]] for ids in label_ids] if single else label_ids
    max_tokens = max_tokens or forward_tokens(_device(model))
    pad_id = fmt.tokenizer.pad_token_id
    text_only = all(e.media is None for e in items)  # an image is not part of the store's key: never shared
    frozen = frozen and text_only
    if frozen and single and fmt.kind == "causal" and decoder_layers(model) is not None:
        # The one pass also pools every layer's states: a linear head on the same prompts reads them for free.
        compute = partial(prompt_pass, model, pad_id=pad_id, max_tokens=max_tokens,
                          label_ids=[ids[0] for ids in candidates], progress=progress)
    else:
        def compute(todo):
            return {label_field(candidates): _scores(model, fmt, todo, candidates, single, max_tokens, progress)}
    if frozen:
        return stored_rows(model, items, label_field(candidates), compute)
    return compute(list(items))[label_field(candidates)]


def _scores(model, fmt: PromptFormat, items: Sequence[Encoded], candidates: Sequence[Sequence[int]], single: bool,
            max_tokens: int, progress: bool) -> torch.Tensor:
    """Each candidate's token log-likelihood after each prompt: one pass for one-token labels, else one each."""
    scores = torch.zeros(len(items), len(candidates))
    passes = 1 if single else len(candidates)
    bar = tqdm(total=len(items) * passes, desc="scoring", unit="ex", disable=not progress, leave=False)
    for j in range(passes):
        probe = [Encoded(e.id, e.prompt_ids, candidates[j] if not single else [0], media=e.media) for e in items]
        for idx in token_batches(probe, max_tokens, max_rows=64):
            batch = _to(collate([probe[i] for i in idx], fmt.kind, fmt.tokenizer.pad_token_id), _device(model))
            logprobs = target_logits(model, fmt.kind, batch).float().log_softmax(-1)
            if single:
                first = torch.tensor([c[0] for c in candidates], device=logprobs.device)
                scores[idx] = logprobs[:, 0, first].cpu()
            else:
                tok = batch["labels"].clamp(min=0)
                picked = logprobs.gather(-1, tok.unsqueeze(-1)).squeeze(-1) * (batch["labels"] != IGNORE)
                scores[idx, j] = picked.sum(-1).cpu()
            bar.update(len(idx))
    bar.close()
    return scores


def probe_batches(model, fmt: PromptFormat, items: Sequence[Encoded], labels: Sequence[str] = (), rows: int = 64):
    """For a precision probe: a callable scoring the first scoring batch of `items` (to time), one scoring the
    first `rows` items (to compare answers), and the first batch's shape.

    Both callables return (rows, choices) scores whose argmax is each row's answer: the labels' first tokens for a
    classification task (`labels`), the whole vocabulary (the first greedy token) for generation.
    """
    device = _device(model)
    probe = [Encoded(e.id, e.prompt_ids, [0], media=e.media) for e in items[:rows]]
    batches = [_to(collate([probe[i] for i in idx], fmt.kind, fmt.tokenizer.pad_token_id), device)
               for idx in token_batches(probe, forward_tokens(device), max_rows=64)]
    columns = [fmt.label_ids(label)[0] for label in labels] or slice(None)

    def first() -> torch.Tensor:
        return target_logits(model, fmt.kind, batches[0])[:, 0, columns]

    def every() -> torch.Tensor:
        return torch.cat([target_logits(model, fmt.kind, batch)[:, 0, columns] for batch in batches])

    return first, every, tuple(batches[0]["input_ids"].shape)


def calibrate(scores: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration (Zhao et al., 2021): label log-probabilities with the prompt's own bias divided out.

    A prompt leans towards some labels whatever its content (an instruct model says "yes"). Scoring the same prompt
    with every input field replaced by content-free text ("N/A", ...) measures that lean; dividing each item's label
    probabilities by it, then renormalising, leaves what the content adds. Both arguments are (n, labels) log-probs.
    """
    bias = content_free.log_softmax(-1).exp().mean(0).log()  # the mean content-free label distribution
    return (scores.log_softmax(-1) - bias).log_softmax(-1)
