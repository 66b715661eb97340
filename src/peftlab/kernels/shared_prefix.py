"""Shared-prefix training: the prompt tokens that every row of an optimizer step starts with run once, not per row.

Instruction data repeats itself: the chat template's system turn and a task's fixed opening start every prompt
(29 of a DialogSum row's 260 tokens with SmolLM2's template). Under causal attention those tokens never see what
follows them, so within one step, with the weights fixed, their states are the same in every row. Here they run once:

1. the prefix runs through the decoder alone, and its per-layer keys and values are kept, graph and all;
2. each micro-batch gets them as a KV cache (detached leaves, expanded over its rows, no copy) and runs only its
   rows' own tokens, whose positions start after the prefix;
3. each micro-batch's backward leaves the gradient of those keys and values on the leaves, summed over the step;
4. one backward at the end of the step sends that sum through the prefix's graph.

The loss and every gradient are those of running each row whole; only the prefix's repeated forward and backward
go. One difference with dropout on (LoRA's `method.dropout`): the prefix's tokens draw one dropout mask per step,
shared by the step's rows, where whole rows would each draw their own.

It needs the unmasked right-padded layout (`prompts.batches.collate_causal_right`), a KV cache in training (so no
activation checkpointing, where transformers turns the cache off) and one process (a data-parallel wrapper all-reduces
at the last micro-batch's backward, before the prefix's own).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

MIN_PREFIX = 8  # shorter shared openings are not worth a separate forward


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix that all `rows` share."""
    shortest = min(len(r) for r in rows)
    first = rows[0]
    for i in range(shortest):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return shortest


def opening_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens the prompts can share (0: not worth it).

    Every prompt keeps at least one token of its own: the one whose logits predict what follows it.
    """
    if len(prompts) < 2:
        return 0
    n = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
    return n if n >= MIN_PREFIX else 0


PREFIX_ATTENTION = "peftlab_prefix_sdpa"


def prefix_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA that reads grouped key/value heads in place even behind a mask.

    Rows that run behind a cached prefix have more keys than queries, so transformers builds a causal mask for
    them, and its SDPA path then copies every key/value head once per query head. torch's CPU kernel takes the
    mask with grouped heads as they are. Without a mask (the prefix itself, or whole rows) this is plain SDPA.
    """
    if attention_mask is None or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=grouped)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PREFIX_ATTENTION, prefix_sdpa)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


class SharedPrefix:
    """One step's shared prefix: its forward (at construction), the caches micro-batches read, its backward.

    Generation's prefill uses it too, under no-grad: the prompts' common opening runs once for all groups.
    """

    def __init__(self, model, prefix_ids: Sequence[int], cache_kwarg: str):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        n_layers = base.config.get_text_config().num_hidden_layers
        cache = Cache(layers=[DynamicLayer() for _ in range(n_layers)])
        device = next(base.parameters()).device
        # The decoder alone: the prefix predicts no target, so the LM head has nothing to do here.
        base.get_decoder()(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True,
                           **{cache_kwarg: cache})
        self.length = len(prefix_ids)
        self.cache_kwarg = cache_kwarg
        self.states = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        self.leaves = [t.detach().requires_grad_(t.requires_grad) for t in self.states]

    def cache(self, rows: int) -> Cache:
        """A fresh KV cache that holds the prefix for each of `rows` rows."""
        cache = Cache(layers=[DynamicLayer() for _ in range(len(self.leaves) // 2)])
        for i, layer in enumerate(cache.layers):
            keys, values = self.leaves[2 * i], self.leaves[2 * i + 1]
            layer.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
        return cache

    def backward(self) -> None:
        """Send the gradient the micro-batches left on the cached keys and values through the prefix, once."""
        pairs = [(s, leaf.grad) for s, leaf in zip(self.states, self.leaves, strict=True) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])
