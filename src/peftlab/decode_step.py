"""One greedy decode step written out layer by layer, for decoder layers whose math is known.

A decode step computes one token per row, so its matrix products are small, and the model's generic forward
costs a noticeable share of the step around them: every step builds a 4D attention mask, and every layer routes
its arguments through keyword dispatch, output records and the attention registry. For the layer classes
registered here, `lean_step` runs the same modules in the same order on the same tensors (the projections, norms
and MLP are called as modules, so LoRA, IA3 and full fine-tuning apply exactly as in `model(...)`), with the mask
kept as a boolean tensor that grows one column a step and the attention going straight to `kvcache.grouped_sdpa`.
Models whose layers are not registered return None from `lean_step`, and `peftlab.decode` calls `model(...)`.

The tokens are those of `model.generate`, checked in tests/test_decode_step.py; the time it saves is measured by
`scripts/decode_levers.py` ("decode steps through the model's forward") and recorded in bench/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from peftlab import kvcache

# (layer, hidden states, (cos, sin), cache layer, boolean mask (rows, 1, 1, columns), row groups) -> hidden states
LayerStep = Callable[..., torch.Tensor]
LAYER_STEPS: dict[str, LayerStep] = {}


def register(layer_class: str) -> Callable[[LayerStep], LayerStep]:
    """Register a decode step for the decoder-layer class named `layer_class`."""

    def add(fn: LayerStep) -> LayerStep:
        LAYER_STEPS[layer_class] = fn
        return fn

    return add


@register("LlamaDecoderLayer")
def llama_layer(layer, hidden, rope, cache_layer, mask, groups) -> torch.Tensor:
    """`LlamaDecoderLayer.forward` for one new token per row: pre-norm attention, then the pre-norm MLP."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    heads = (x.shape[0], 1, -1, attn.head_dim)  # (rows, 1 token, heads, head size), then heads first
    q = attn.q_proj(x).view(heads).transpose(1, 2)
    k = attn.k_proj(x).view(heads).transpose(1, 2)
    v = attn.v_proj(x).view(heads).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rope)
    keys, values = cache_layer.update(k, v)
    out, _ = kvcache.grouped_sdpa(attn, q, keys, values, mask, row_groups=groups, scaling=attn.scaling)
    hidden = hidden + attn.o_proj(out.reshape(x.shape[0], 1, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _parts(model):
    """(causal-LM wrapper, decoder stack) of a plain text model, or None if it is not laid out as Llama's is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    needed = ("embed_tokens", "rotary_emb", "layers", "norm")
    if getattr(base, "lm_head", None) is None or not all(hasattr(inner, name) for name in needed):
        return None
    return base, inner


def lean_step(model) -> Callable | None:
    """A decode step `step(token, position, mask, cache, groups) -> next-token logits` for `model`, or None.

    `token` and `position` are (rows,), `mask` the (rows, columns) padding mask including the new column, `cache` a
    `transformers.cache_utils.Cache` of `kvcache.BufferLayer`s, `groups` `kvcache.row_groups`. None unless every
    decoder layer's class is registered and the model runs SDPA (the grouped attention replaces SDPA only).
    """
    parts = _parts(model)
    if parts is None:
        return None
    base, inner = parts
    steps = [LAYER_STEPS.get(type(layer).__name__) for layer in inner.layers]
    if None in steps or getattr(base.config, "_attn_implementation", None) not in ("sdpa", kvcache.GROUPED_ATTENTION):
        return None

    def step(token, position, mask, cache, groups) -> torch.Tensor:
        hidden = inner.embed_tokens(token[:, None])
        rope = inner.rotary_emb(hidden, position[:, None])
        mask = mask.bool()[:, None, None, :]
        for layer, layer_step, cache_layer in zip(inner.layers, steps, cache.layers, strict=True):
            hidden = layer_step(layer, hidden, rope, cache_layer, mask, groups)
        return base.lm_head(inner.norm(hidden))[:, -1]

    return step
