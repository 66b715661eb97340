"""Token-budget batches and collation: length-bucketed batches sized by padded tokens, the right-padded
unmasked layout for causal text models, the masked left-padded one for the rest, and the shared opening of a
step's rows.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch

from peftlab.kernels.shared_prefix import opening_length
from peftlab.models.forward import IGNORE, takes_unmasked_rows
from peftlab.prompts.format import Encoded
from peftlab.prompts.vision_prompts import add_media


def shared_length(items: Sequence[Encoded]) -> int:
    """How many leading prompt tokens one step's rows can share (`opening_length` of their prompts)."""
    return opening_length([e.prompt_ids for e in items])


def strip(items: Sequence[Encoded], n: int) -> list[Encoded]:
    """The rows without their first `n` prompt tokens (what a micro-batch runs behind the shared cache)."""
    return [dataclasses.replace(e, prompt_ids=e.prompt_ids[n:]) for e in items]


def token_batches(
    items: Sequence[Encoded], max_tokens: int, max_rows: int, seed: int | None = None, bucket: int = 64
) -> list[list[int]]:
    """Group item indices into batches of at most `max_tokens` padded tokens and `max_rows` rows.

    Batches are sized by tokens, not rows, because memory and time scale with padded tokens. Items are sorted by
    length inside buckets of `bucket * max_rows` items, so little compute goes on padding. With a seed, the items
    are shuffled first and the batch order is shuffled after, so every epoch sees a different order.
    """
    order = list(range(len(items)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    span = bucket * max_rows
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: items[i].length)
        groups = budget_groups([items[i].length for i in chunk], max_tokens, max_rows)
        batches += [[chunk[j] for j in g] for g in groups]
    if seed is not None:
        rng.shuffle(batches)
    return batches


def forward_tokens(device: torch.device | str) -> int:
    """Padded tokens per no-grad forward pass (scoring, validation loss, features, decode prefill).

    On a CPU, small passes are faster: at 1024 tokens a layer's activations stay in cache, and SmolLM2's DialogSum
    prefill ran 0.36 s per dialogue against 0.41 at 4096 and 0.50 at 8192 (PubMedQA label scoring: 1.77 against
    1.54 items/s at 8192). A GPU wants wide passes to fill its cores.
    """
    return 1024 if torch.device(device).type == "cpu" else 16384


def budget_groups(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Consecutive groups of positions in `lengths` whose padded size (rows x longest) stays within `max_tokens`.

    A row longer than the budget gets a group of its own. Pass lengths sorted, so little goes on padding.
    """
    groups: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        full = groups and (len(groups[-1]) == max_rows or max(longest, n) * (len(groups[-1]) + 1) > max_tokens)
        if not groups or full:
            groups.append([])
            longest = 0
        groups[-1].append(i)
        longest = max(longest, n)
    return groups


def collate_causal(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts and right-pad targets, so every row's target starts at the same column.

    With targets aligned, the LM head only needs the last T positions (`logits_to_keep`): on DialogSum the prompt is
    about 85% of the tokens, and the 49k-wide head is a fifth of the model's FLOPs. The last target token is never an
    input, so it is left out.
    """
    p_len = max(len(e.prompt_ids) for e in batch)
    t_len = max(len(e.target_ids) for e in batch)
    width = p_len + t_len - 1
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), t_len), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        p, t = len(e.prompt_ids), len(e.target_ids)
        input_ids[row, p_len - p : p_len] = torch.tensor(e.prompt_ids)
        input_ids[row, p_len : p_len + t - 1] = torch.tensor(e.target_ids[:-1])
        attention_mask[row, p_len - p : p_len + t - 1] = 1
        labels[row, :t] = torch.tensor(e.target_ids)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}
    if batch[0].media is not None:  # a vision-language model: image tensors and token types join the batch

        out = add_media(out, batch, p_len)
    return out


def collate_causal_right(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad whole rows and pass no attention mask: the training layout for causal text models.

    Pad tokens sit only after a row's last real token, so causal attention alone keeps them out of every real
    position and no mask is needed. With no mask, SDPA takes its causal kernel (it skips the upper triangle) and
    reads grouped key/value heads in place instead of copying them per query head, which is faster and keeps
    less for backward than the masked kernel of `collate_causal`. Positions are 0, 1, ... in every row.

    Targets no longer share a column, so `label_positions` (batch, target_len) holds, for each label, the input
    position whose logits predict it; the model's `logits_to_keep` takes it and runs the LM head there only.
    """
    t_len = max(len(e.target_ids) for e in batch)
    width = max(e.length for e in batch) - 1
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t_len), IGNORE, dtype=torch.long)
    label_positions = torch.zeros((len(batch), t_len), dtype=torch.long)
    for row, e in enumerate(batch):
        p, t = len(e.prompt_ids), len(e.target_ids)
        input_ids[row, : p + t - 1] = torch.tensor(e.prompt_ids + e.target_ids[:-1])
        labels[row, :t] = torch.tensor(e.target_ids)
        # Position p-1+j predicts target token j; ignored label slots point at the last prompt token, harmlessly.
        label_positions[row] = torch.arange(p - 1, p - 1 + t_len).clamp(max=p + t - 2)
    return {"input_ids": input_ids, "labels": labels, "label_positions": label_positions}


def collate_seq2seq(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoder inputs and decoder labels (the model shifts labels into decoder inputs itself)."""
    p_len = max(len(e.prompt_ids) for e in batch)
    t_len = max(len(e.target_ids) for e in batch)
    input_ids = torch.full((len(batch), p_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), p_len), dtype=torch.long)
    labels = torch.full((len(batch), t_len), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        input_ids[row, : len(e.prompt_ids)] = torch.tensor(e.prompt_ids)
        attention_mask[row, : len(e.prompt_ids)] = 1
        labels[row, : len(e.target_ids)] = torch.tensor(e.target_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate(batch: Sequence[Encoded], kind: str, pad_id: int, right_padded: bool = False) -> dict[str, torch.Tensor]:
    """Collate for the model kind; `right_padded` picks the unmasked causal layout (`collate_causal_right`)."""
    if kind == "seq2seq":
        return collate_seq2seq(batch, pad_id)
    return collate_causal_right(batch, pad_id) if right_padded else collate_causal(batch, pad_id)


def right_padded_ok(model: torch.nn.Module, kind: str, items: Sequence[Encoded]) -> bool:
    """Whether target losses can use the unmasked right-padded layout (`prompts.batches.collate_causal_right`)."""
    return kind == "causal" and all(e.media is None for e in items) and takes_unmasked_rows(model)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real input tokens in a collated batch (for tokens/s)."""
    if "label_positions" in batch:  # a row's last real input is the one that predicts its last target token
        return int((batch["label_positions"].amax(-1) + 1).sum())
    return int(batch["attention_mask"].sum())
