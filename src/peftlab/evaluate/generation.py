"""Batched greedy generation: the fast decoder for causal text models, `model.generate` for the rest.

Outputs are the tokens one-at-a-time `model.generate` picks (greedy, same stop tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from peftlab.evaluate.decode import greedy_decode, left_padded
from peftlab.evaluate.scoring import _device
from peftlab.kernels.kvcache import kv_cache_tokens
from peftlab.models.forward import is_prompt_learning
from peftlab.prompts.batches import budget_groups
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.prompts.vision_prompts import media_inputs


def _decodes_fast(model, fmt: PromptFormat, items: Sequence[Encoded]) -> bool:
    """Whether `decode.greedy_decode` can run this model: a causal text LM without virtual tokens."""
    return fmt.kind == "causal" and not is_prompt_learning(model) and all(e.media is None for e in items)


@torch.inference_mode()
def generate(
    model, fmt: PromptFormat, items: Sequence[Encoded], max_new_tokens: int, max_rows: int = 64, progress=True,
    max_tokens: int | None = None,
) -> list[str]:
    """Greedy generation in length-sorted batches with the KV cache; returns texts in the order of `items`.

    Causal text models decode through `evaluate.decode.greedy_decode` (up to `max_rows` rows and `max_tokens`
    cached tokens per batch, by default as many as 2 GB of keys and values hold: `kvcache.kv_cache_tokens`;
    finished rows leave the batch). Seq2seq, prompt-learning and vision-language models go through `model.generate`
    on left-padded batches of 16.
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

    return media_inputs(rows, input_ids, width, prompt_learning=is_prompt_learning(model))
