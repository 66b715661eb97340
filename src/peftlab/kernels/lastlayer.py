"""The last decoder layer, run only where logits are wanted.

Training scores target tokens only, and prefill wants one next token per row, so the LM head already runs at
those positions alone (`logits_to_keep`). The last decoder layer can go the same way: the positions before the
first wanted one need its keys and values (later queries attend to them) but not its queries, attention output,
output projection or MLP, because nothing reads their results. With SmolLM2's 30 layers and DialogSum's 230-token
prompts under 30-token summaries, that is about 3% of a training step's matmuls and of prefill's.

`window(model)` gives a Llama model's last layer a forward that takes `last_layer_from=start` and runs the rest
of the layer from column `start` on; the columns before it pass through unchanged (and are never read). Without
the argument, or for models of other layouts, nothing changes. `window_kwargs(model, positions)` is what a caller
adds to the forward: the first column any row wants logits at.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

WINDOWED = "_peftlab_full_forward"  # set on a layer whose forward has been replaced (keeps the original)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary position embedding of one tensor (its `apply_rotary_pos_emb` takes queries and keys at the
    same positions; here the queries cover fewer)."""
    return x * cos + rotate_half(x) * sin


def _window_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, last_layer_from: int | None = None, **kwargs):
    full = getattr(self, WINDOWED)
    start = last_layer_from or 0
    float_mask = attention_mask is not None and attention_mask.dtype != torch.bool
    if start <= 0 or start >= hidden_states.shape[1] or float_mask:
        return full(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past_key_values, use_cache=use_cache,
                    position_embeddings=position_embeddings, **kwargs)
    attn = self.self_attn
    rows, width, _ = hidden_states.shape
    x = self.input_layernorm(hidden_states)
    # Keys and values at every column (later queries read them); queries only from `start` on.
    q = attn.q_proj(x[:, start:]).view(rows, width - start, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(rows, width, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(rows, width, -1, attn.head_dim).transpose(1, 2)
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    q, k = _rotate(q, cos[:, :, start:], sin[:, :, start:]), _rotate(k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, attn.layer_idx)
    # Causal over whatever the cache holds before this call: query i sits at key column past + start + i.
    past = k.shape[2] - width
    columns = torch.arange(k.shape[2], device=q.device)
    mask = columns[None, :] <= torch.arange(past + start, past + width, device=q.device)[:, None]
    if attention_mask is not None:  # transformers' own boolean mask (a cached prefix, padding) still applies
        mask = mask & attention_mask[..., start:, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling,
                                         dropout_p=attn.attention_dropout if self.training else 0.0,
                                         enable_gqa=q.shape[1] != k.shape[1])
    h = hidden_states[:, start:] + attn.o_proj(out.transpose(1, 2).reshape(rows, width - start, -1))
    h = h + self.mlp(self.post_attention_layernorm(h))
    return torch.cat([hidden_states[:, :start], h], dim=1)


def _last_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers[-1] if layers else None


def window(model: torch.nn.Module) -> bool:
    """Let a Llama model's last decoder layer run from a given column on (`last_layer_from`); returns whether it did.

    Only Llama's own layer class: its attention is plain rotary SDPA, with no sliding window, soft-capping or
    query/key norms that a rewritten forward would have to repeat.
    """
    layer = _last_layer(model)
    if type(layer).__name__ != "LlamaDecoderLayer":
        return False
    if not hasattr(layer, WINDOWED):
        setattr(layer, WINDOWED, layer.forward)
        layer.forward = types.MethodType(_window_forward, layer)
    return True


def window_kwargs(model: torch.nn.Module, positions: torch.Tensor) -> dict:
    """The forward argument that lets a windowed last layer skip the columns before `positions`' first one."""
    layer = _last_layer(model)
    if layer is None or not hasattr(layer, WINDOWED):
        return {}
    return {"last_layer_from": int(positions.min())}
