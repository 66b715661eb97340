"""Evaluation: label-word scoring for classification, batched greedy generation for everything else.

Classification never generates: the prediction is the label whose tokens the model finds most likely right after
the prompt. With single-token labels that is one forward pass per batch, reading only the last position's logits.
Generation runs length-sorted batches with the KV cache (`peftlab.decode`): prompts are prefilled in groups that
waste little on padding, and a row leaves the batch as soon as it stops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from peftlab.data import IGNORE, Encoded, PromptFormat, budget_groups, collate, forward_tokens, token_batches
from peftlab.decode import greedy_decode, left_padded
from peftlab.kvcache import kv_cache_tokens
from peftlab.lastlayer import window_kwargs
from peftlab.metrics import per_example_rouge1
from peftlab.models import takes_unmasked_rows
from peftlab.shared_prefix import SharedPrefix
from peftlab.tasks import Example, Task


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """Whether the model is a peft prompt-learning model (prompt, prefix or P-tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def target_logits(
    model: torch.nn.Module, kind: str, batch: dict[str, torch.Tensor], prefix: SharedPrefix | None = None
) -> torch.Tensor:
    """Logits at the positions that predict the target tokens only: shape (batch, target_len, vocab).

    With `prefix`, the rows are the step's rows without their shared opening, which enters as a KV cache.
    """
    labels = batch["labels"]
    if kind == "seq2seq":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    if "label_positions" in batch:  # the right-padded, unmasked layout (`data.collate_causal_right`)
        positions = batch["label_positions"]
        past = {} if prefix is None else {prefix.cache_kwarg: prefix.cache(len(batch["input_ids"]))}
        return model(input_ids=batch["input_ids"], logits_to_keep=positions, **past,
                     **window_kwargs(model, positions)).logits
    # Everything but labels and positions goes in: ids and mask, plus a vision-language model's image tensors.
    kwargs = {k: v for k, v in batch.items() if k not in ("labels", "position_ids", "row_weights")}
    if not is_prompt_learning(model) and "position_ids" in batch:  # Qwen2-VL's batches leave them to the model
        # peft ignores position ids for prompt tuning; RoPE only sees relative offsets, so left padding is harmless.
        kwargs["position_ids"] = batch["position_ids"]
    return model(**kwargs, logits_to_keep=labels.shape[1]).logits


def target_loss(
    model: torch.nn.Module, kind: str, batch: dict[str, torch.Tensor], prefix: SharedPrefix | None = None
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens, and the number of target tokens (prompt tokens carry no loss).

    With `row_weights` in the batch (class-weighted training, see `data.example_weights`), each row's tokens count
    that many times in the sum; the caller divides by the matching weighted count (`weighted_targets`). `prefix`:
    as in `target_logits`.
    """
    logits = target_logits(model, kind, batch, prefix)
    labels = batch["labels"]
    per_token = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    if "row_weights" in batch:
        per_token = per_token * batch["row_weights"][:, None]
    return per_token.sum(), int((labels != IGNORE).sum())


def weighted_targets(batch: dict[str, torch.Tensor]) -> float:
    """The target tokens of a batch, each row's counted `row_weights` times (plain count without weights)."""
    tokens = (batch["labels"] != IGNORE).sum(-1).float()
    weights = batch.get("row_weights")
    return float(tokens.sum() if weights is None else (tokens * weights).sum())


def right_padded_ok(model: torch.nn.Module, kind: str, items: Sequence[Encoded]) -> bool:
    """Whether target losses can use the unmasked right-padded layout (`data.collate_causal_right`)."""
    return kind == "causal" and all(e.media is None for e in items) and takes_unmasked_rows(model)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real input tokens in a collated batch (for tokens/s)."""
    if "label_positions" in batch:  # a row's last real input is the one that predicts its last target token
        return int((batch["label_positions"].amax(-1) + 1).sum())
    return int(batch["attention_mask"].sum())


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
    progress=True, examples: Sequence[Example] | None = None,
) -> torch.Tensor:
    """Log-likelihood of each label after each prompt: shape (len(items), len(labels)).

    `examples`, the items' source examples, are read only by a classifier head with text features.
    """
    if hasattr(model, "label_logprobs"):  # a classifier head (linear-head) scores its labels directly
        return model.label_logprobs(items, fmt.tokenizer.pad_token_id, progress, examples=examples)
    label_ids = [fmt.label_ids(label) for label in labels]
    single = all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(labels)
    # With distinct one-token labels, one pass over the prompts decides; otherwise score each label's tokens in full.
    candidates = [[ids[0]] for ids in label_ids] if single else label_ids
    scores = torch.zeros(len(items), len(labels))
    passes = 1 if single else len(labels)
    bar = tqdm(total=len(items) * passes, desc="scoring", unit="ex", disable=not progress, leave=False)
    max_tokens = max_tokens or forward_tokens(_device(model))
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


def calibrate(scores: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration (Zhao et al., 2021): label log-probabilities with the prompt's own bias divided out.

    A prompt leans towards some labels whatever its content (an instruct model says "yes"). Scoring the same prompt
    with every input field replaced by content-free text ("N/A", ...) measures that lean; dividing each item's label
    probabilities by it, then renormalising, leaves what the content adds. Both arguments are (n, labels) log-probs.
    """
    bias = content_free.log_softmax(-1).exp().mean(0).log()  # the mean content-free label distribution
    return (scores.log_softmax(-1) - bias).log_softmax(-1)


def _decodes_fast(model, fmt: PromptFormat, items: Sequence[Encoded]) -> bool:
    """Whether `decode.greedy_decode` can run this model: a causal text LM without virtual tokens."""
    return fmt.kind == "causal" and not is_prompt_learning(model) and all(e.media is None for e in items)


@torch.inference_mode()
def generate(
    model, fmt: PromptFormat, items: Sequence[Encoded], max_new_tokens: int, max_rows: int = 64, progress=True,
    max_tokens: int | None = None,
) -> list[str]:
    """Greedy generation in length-sorted batches with the KV cache; returns texts in the order of `items`.

    Causal text models decode through `peftlab.decode.greedy_decode` (up to `max_rows` rows and `max_tokens` cached
    tokens per batch, by default as many as 2 GB of keys and values hold: `kvcache.kv_cache_tokens`; finished rows
    leave the batch). Seq2seq, prompt-learning and vision-language models go through
    `model.generate` on left-padded batches of 16.
    """
    tok = fmt.tokenizer
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids))
    outputs: list[str] = [""] * len(items)
    fast = _decodes_fast(model, fmt, items)
    if fast:  # the KV cache of a group (rows x longest sequence) stays within max_tokens (default: 2 GB of it)
        max_tokens = max_tokens or kv_cache_tokens(model)
        lengths = [len(items[i].prompt_ids) + max_new_tokens for i in order]
        groups = [[order[j] for j in g] for g in budget_groups(lengths, max_tokens, max_rows)]
    else:
        groups = [order[s : s + 16] for s in range(0, len(order), 16)]
    bar = tqdm(total=len(items), desc="generating", unit="ex", disable=not progress)
    for idx in groups:
        if fast:
            prompts = [items[i].prompt_ids for i in idx]
            new = greedy_decode(model, prompts, max_new_tokens, fmt.stop_token_ids, tok.pad_token_id)
        else:
            new = _generate_batch(model, fmt, [items[i] for i in idx], max_new_tokens)
        for row, i in enumerate(idx):
            outputs[i] = tok.decode(new[row], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return outputs


def _generate_batch(model, fmt: PromptFormat, rows: Sequence[Encoded], max_new_tokens: int) -> torch.Tensor:
    """`model.generate` on one left-padded (seq2seq: right-padded) batch; returns the new tokens of each row."""
    tok = fmt.tokenizer
    prompts = [e.prompt_ids for e in rows]
    width = max(len(p) for p in prompts)
    if fmt.kind != "seq2seq":  # decoder-only models continue from the right edge, so pad on the left
        input_ids, mask = left_padded(prompts, tok.pad_token_id)
    else:
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, : len(p)], mask[row, : len(p)] = torch.tensor(p), 1
    media = _media(model, rows, input_ids, width)
    out = model.generate(
        input_ids=input_ids.to(_device(model)),
        attention_mask=mask.to(_device(model)),
        **{k: v.to(_device(model)) for k, v in media.items()},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=fmt.stop_token_ids,
        pad_token_id=tok.pad_token_id,
    )
    return out[:, width:] if fmt.kind != "seq2seq" else out


def _media(model, rows: Sequence[Encoded], input_ids: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """A vision-language model's image tensors and token types for a generation batch (empty for text models)."""
    if rows[0].media is None:
        return {}
    from peftlab.vision import media_inputs

    return media_inputs(rows, input_ids, width, prompt_learning=is_prompt_learning(model))


def evaluate(
    model,
    fmt: PromptFormat,
    task: Task,
    examples: Sequence[Example],
    items: Sequence[Encoded],
    split: str = "test",
    max_tokens: int | None = None,
    progress: bool = True,
    content_free: Sequence[Encoded] = (),
) -> tuple[dict, list[dict]]:
    """Score `examples` (already encoded as `items`): returns flat metrics and one prediction row per example.

    With `content_free` prompts (classification only), predictions are contextually calibrated: see `calibrate`.
    """
    model.eval()
    references = [ex.references for ex in examples]
    if task.kind == "classification":
        scores = label_scores(model, fmt, items, task.labels, max_tokens, progress, examples=examples)
        raw = scores
        if content_free:
            bias = label_scores(model, fmt, content_free, task.labels, max_tokens, progress=False)
            scores = calibrate(scores, bias)
        predictions = [task.labels[int(i)] for i in scores.argmax(-1)]
        per_example = [float(p == r[0]) for p, r in zip(predictions, references, strict=True)]
    else:
        predictions = generate(model, fmt, items, task.max_new_tokens, progress=progress)
        per_example = [per_example_rouge1(p, r) for p, r in zip(predictions, references, strict=True)]
    metrics = {"task": task.name, "split": split, "n": len(examples), **task.score(predictions, references)}
    if task.kind == "classification" and content_free:  # what calibration changed, side by side
        before = task.score([task.labels[int(i)] for i in raw.argmax(-1)], references)
        metrics.update({f"uncalibrated_{k}": before[k] for k in ("accuracy", "macro_f1") if k in before})
    metrics["truncated_examples"] = sum(1 for e in items if e.truncated)
    rows = [
        {
            "id": ex.id,
            "split": split,
            "prompt": fmt.tokenizer.decode(e.prompt_ids),
            "prediction": pred,
            "references": list(ex.references),
            "score": score,
        }
        for ex, e, pred, score in zip(examples, items, predictions, per_example, strict=True)
    ]
    if task.kind == "classification":
        for row, s in zip(rows, raw.tolist(), strict=True):
            row["label_logprobs"] = dict(zip(task.labels, s, strict=True))
    return metrics, rows
