"""Greedy decoding for evaluation, built for throughput on a CPU.

`model.generate` on a left-padded batch spends its time in places that do not change the answer:

- **padding**: one batch pads every prompt to its longest, so a wide batch is mostly pad tokens. Here prompts are
  prefilled packed end to end, a token budget's worth per forward with no pad token at all (`packed_sdpa` keeps
  each prompt's attention to itself), and only then merged into one wide decode batch;
- **masked prefill**: a padding mask forces SDPA's masked kernel, which copies each key/value head for every query
  head it serves. Here each packed prompt's attention reads the key/value heads in place, and its states are
  copied to the left-padded decode layout afterwards. Models on another attention implementation run
  right-padded groups unmasked instead, and models that cannot take per-row logit positions left-padded ones;
- **repeated openings**: every prompt starts with the same chat-template turn and instruction. Here that opening
  runs once (`shared_prefix.SharedPrefix`) and each prefill group starts from its cached keys and values;
- **finished rows**: a row that has emitted its stop token keeps being computed until the whole batch stops. Here
  finished rows leave the batch (and the KV cache) once they are an eighth of it;
- **a wide LM head**: the 49k-column head of a 64-row decode step is the slowest matmul shape there is (one
  GEMM writing a 12 MB block of logits). Here it runs in slices of `HEAD_COLUMNS` columns, the same dot products
  (`column_blocks`);
- **cache growth and padded attention**: the default cache concatenates every new key onto the old ones, and a
  decode step's attention, which does little but read that cache, reads the left padding too. Here the cache is
  preallocated, and attention runs per group of length-sorted rows over only the columns they filled
  (`peftlab.kvcache`).

The tokens are the ones greedy `generate` picks: the same argmax over the same logits, checked against
`model.generate` in the tests and in `peftlab bench eval`. Only plain causal LMs (with or without LoRA, IA3 or full
fine-tuning) take this path; prompt-learning adapters and vision-language models keep `model.generate`, which knows
how to splice their virtual tokens and images in.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from peftlab.data import budget_groups, forward_tokens
from peftlab.kvcache import GROUPED_ATTENTION, BufferLayer, row_groups
from peftlab.lastlayer import window_kwargs
from peftlab.models import cache_kwarg, sdpa_variant, takes_unmasked_rows
from peftlab.shared_prefix import SharedPrefix, opening_length

PACKED_ATTENTION = "peftlab_packed_sdpa"
PACK_PREFILL = True  # prefill packs prompts end to end (see packed_sdpa); else right-pads them per group


def packed_sdpa(module, query, key, value, attention_mask, scaling=None, row_spans=None, prefix: int = 0, **kwargs):
    """SDPA over prompts packed end to end in one sequence: each attends to the `prefix` cached columns and itself.

    `row_spans` lists each prompt's (start, end) among the packed queries; its keys are the cached prefix followed
    by its own columns. Packing leaves no padding for the matmuls to compute; attention runs per prompt, so none
    sees another. Without `row_spans` (the opening's own forward) this is plain SDPA.
    """
    if row_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    outputs = []
    for start, end in row_spans:
        cols = slice(prefix + start, prefix + end)
        k = torch.cat([key[:, :, :prefix], key[:, :, cols]], dim=2) if prefix else key[:, :, cols]
        v = torch.cat([value[:, :, :prefix], value[:, :, cols]], dim=2) if prefix else value[:, :, cols]
        mask = _prefix_causal_mask(end - start, prefix, window, query.device) if prefix or window else None
        outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], k, v, attn_mask=mask,
                                                      is_causal=mask is None, scale=scaling,
                                                      enable_gqa=query.shape[1] != key.shape[1]))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _prefix_causal_mask(n: int, prefix: int, window: int | None, device) -> torch.Tensor:
    """Which of `prefix + n` keys each of `n` queries (at positions prefix..) sees: causal, within `window`."""
    keys, queries = torch.arange(prefix + n, device=device), torch.arange(prefix, prefix + n, device=device)[:, None]
    mask = keys <= queries
    return mask & (keys > queries - window) if window else mask


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
AttentionMaskInterface.register(PACKED_ATTENTION, lambda *args, **kwargs: None)  # packed_sdpa masks each row


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `prompts`, padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


def _prefill(model, prompts, pad_id: int, capacity: int, max_tokens: int, device):
    """Run the prompts through the model in groups; return (next tokens, merged cache, mask).

    Every group's keys and values are copied to the right edge of the widest prompt in one preallocated cache, so
    the decode steps run all rows in one batch behind a mask of their left padding. Positions are counted from
    each row's first real token, so a row's states are the ones it would get alone.
    """
    width = max(len(p) for p in prompts)
    n_layers = model.config.get_text_config().num_hidden_layers
    merged = Cache(layers=[BufferLayer(capacity) for _ in range(n_layers)])
    first: list[torch.Tensor] = []
    right = takes_unmasked_rows(model)
    # The opening all prompts share (chat template, instruction) runs once; each group starts from its cache.
    skip = opening_length(prompts) if right else 0
    opening = SharedPrefix(model, prompts[0][:skip], cache_kwarg(model)) if skip else None
    pack = right and PACK_PREFILL
    with sdpa_variant(model, PACKED_ATTENTION) if pack else contextlib.nullcontext(False) as packed:
        run_group = partial(_prefill_packed if packed else _prefill_right, skip=skip) if right else _prefill_left
        lengths = [len(p) - skip for p in prompts]
        groups = packed_groups(lengths, max_tokens) if packed else budget_groups(lengths, max_tokens)
        for group in groups:
            rows = [prompts[i] for i in group]
            cache = Cache(layers=[DynamicLayer() for _ in range(n_layers)])
            if opening:
                cache = opening.cache(1 if packed else len(rows))
            logits, plan = run_group(model, rows, pad_id, cache, device)
            first.append(logits.argmax(-1))
            for buffer, cached in zip(merged.layers, cache.layers, strict=True):
                if not buffer.is_initialized:
                    buffer.allocate(len(prompts), cached.keys)
                for row, segments in zip(group, plan, strict=True):
                    pieces = [(cached.keys[b, :, a : a + n], cached.values[b, :, a : a + n]) for b, a, n in segments]
                    buffer.write_row(row, pieces, width)
    _, mask = left_padded(prompts, pad_id)
    return torch.cat(first), merged, mask.to(device)


def packed_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of positions in `lengths` whose summed length stays within `max_tokens` (packed rows)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(lengths):
        if groups[-1] and total + n > max_tokens:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def _prefill_packed(model, rows, pad_id: int, cache, device, skip: int = 0):
    """The rows end to end in one sequence, no padding: each row attends to the cached opening and to itself
    (`packed_sdpa`). Returns each row's next-token logits and where its keys and values lie in the group's cache,
    as (batch row, first column, length) segments."""
    own = [p[skip:] for p in rows]
    ends = list(itertools.accumulate(len(p) for p in own))
    spans = list(zip([0, *ends[:-1]], ends, strict=True))
    ids = torch.tensor([[t for p in own for t in p]], device=device)
    positions = torch.tensor([[skip + j for p in own for j in range(len(p))]], device=device)
    last = torch.tensor([end - 1 for end in ends], device=device)
    out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=last,
                **{cache_kwarg(model): cache}, row_spans=spans, prefix=skip)
    opening = [(0, 0, skip)] if skip else []
    return out.logits[0], [[*opening, (0, skip + a, b - a)] for a, b in spans]


def _prefill_right(model, rows, pad_id: int, cache, device, skip: int = 0):
    """Right-padded rows with no mask: SDPA's causal kernel on grouped key/value heads (`models.takes_unmasked_rows`).

    With `skip`, `cache` already holds the rows' shared first `skip` tokens and only the rest run. Returns each row's
    next-token logits and where its keys and values lie in the group's cache (see `_prefill_packed`).
    """
    lengths = torch.tensor([len(p) for p in rows])
    ids = torch.full((len(rows), int(lengths.max()) - skip), pad_id, dtype=torch.long)
    for row, p in enumerate(rows):
        ids[row, : len(p) - skip] = torch.tensor(p[skip:], dtype=torch.long)
    last = (lengths - skip - 1)[:, None].to(device)
    out = model(input_ids=ids.to(device), use_cache=True, logits_to_keep=last, **{cache_kwarg(model): cache},
                **window_kwargs(model, last))
    return out.logits[:, -1], [[(r, 0, len(p))] for r, p in enumerate(rows)]


def _prefill_left(model, rows, pad_id: int, cache, device):
    """Left-padded rows behind an attention mask, for models that cannot take per-row logit positions."""
    ids, mask = left_padded(rows, pad_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return out.logits[:, -1], [[(r, ids.shape[1] - len(p), len(p))] for r, p in enumerate(rows)]


HEAD_COLUMNS = 4096  # the LM head runs in slices of this many vocabulary columns (see column_blocks)


def _sliced_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, width: int) -> torch.Tensor:
    blocks = [F.linear(x, weight[i : i + width], None if bias is None else bias[i : i + width])
              for i in range(0, weight.shape[0], width)]
    return torch.cat(blocks, dim=-1)


@contextlib.contextmanager
def column_blocks(model, width: int | None = None):
    """Run the model's LM head in slices of `width` output columns (default `HEAD_COLUMNS`).

    Each logit is the same dot product over the same hidden state, so the logits are the same; only the GEMM's
    shape changes. On this CPU a 64 x 576 x 49,152 head ran 27.6 against 33.1 ms in 4096-column slices, because a
    slice's output block stays in cache. Only a plain `nn.Linear` head is sliced (a LoRA-wrapped head is not).
    """
    head = model.get_output_embeddings()
    width = width or HEAD_COLUMNS
    # A forward already replaced on the instance (accelerate's offload hooks) is left alone.
    if type(head) is not torch.nn.Linear or head.out_features <= width or "forward" in vars(head):
        yield
        return
    head.forward = partial(_sliced_linear, head.weight, head.bias, width=width)
    try:
        yield
    finally:
        del head.forward


COMPACT_FRACTION = 8  # finished rows leave the batch once they are 1/8 of it (see greedy_decode)


@torch.inference_mode()
def greedy_decode(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
    prefill_tokens: int | None = None,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids), stop token excluded; all rows decode as one batch.

    `prompts` should be sorted by length (the prefill groups are consecutive rows, see `data.budget_groups`), each
    group within `prefill_tokens` padded tokens (default: `data.forward_tokens`, what suits the device).
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    prefill_tokens = prefill_tokens or forward_tokens(device)
    with column_blocks(model):
        token, cache, mask = _prefill(model, prompts, pad_id, width + max_new_tokens, prefill_tokens, device)
        with sdpa_variant(model, GROUPED_ATTENTION) as grouped:
            return _decode_steps(model, token, cache, mask, max_new_tokens, stop_ids, width, grouped)


def _decode_steps(model, token, cache, mask, max_new_tokens: int, stop_ids, width: int, grouped: bool):
    """The decode loop after prefill: one token per running row per step, finished rows compacted away."""
    device = token.device
    stops = torch.tensor(sorted(stop_ids), device=device)
    cache_kw = cache_kwarg(model)
    outputs: list[list[int]] = [[] for _ in range(len(token))]
    active = torch.arange(len(token), device=device)  # original row of each batch row
    running = torch.ones(len(token), dtype=torch.bool, device=device)  # batch rows still generating
    position = mask.sum(-1)  # the next position of each row, counted from its first real token
    lengths = position.clone()  # prompt lengths, for the attention groups

    def attention_kwargs() -> dict:
        return {"row_groups": row_groups(lengths, width)} if grouped else {}

    extra = attention_kwargs()
    for step in range(max_new_tokens):
        running &= ~torch.isin(token, stops)
        for row, tok in zip(active[running].tolist(), token[running].tolist(), strict=True):
            outputs[row].append(tok)
        n_running = int(running.sum())
        if step == max_new_tokens - 1 or n_running == 0:
            break
        # Finished rows leave the batch and the cache once they are an eighth of it. Removing rows copies the
        # whole cache, so dropping each as it stops costs more than computing a few idle rows for a few steps.
        if len(active) - n_running >= max(1, len(active) // COMPACT_FRACTION):
            keep = running.nonzero().squeeze(-1)
            active, token, mask, position = active[keep], token[keep], mask[keep], position[keep]
            running, lengths = running[keep], lengths[keep]
            cache.batch_select_indices(keep)
            extra = attention_kwargs()
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True,
                    **{cache_kw: cache}, **extra)
        token, position = out.logits[:, -1].argmax(-1), position + 1
    return outputs
