"""Greedy decoding for evaluation, built for throughput on a CPU.

`model.generate` on a left-padded batch spends its time in places that do not change the answer:

- **padding**: one batch pads every prompt to its longest, so a wide batch is mostly pad tokens. Here prompts are
  prefilled in length-sorted groups under a token budget, and only then merged into one wide decode batch;
- **masked prefill**: a padding mask forces SDPA's masked kernel, which copies each key/value head for every query
  head it serves. Here a group is right-padded and runs unmasked (the causal kernel, key/value heads read in
  place), and its states are copied to the left-padded decode layout afterwards;
- **repeated openings**: every prompt starts with the same chat-template turn and instruction. Here that opening
  runs once (`shared_prefix.SharedPrefix`) and each prefill group starts from its cached keys and values;
- **finished rows**: a row that has emitted its stop token keeps being computed until the whole batch stops. Here
  finished rows leave the batch (and the KV cache) once they are an eighth of it;
- **a wide LM head**: the 49k-column head of a 64-row decode step is the slowest matmul shape there is (one
  GEMM writing a 12 MB block of logits). Here it runs in slices of `HEAD_COLUMNS` columns, the same dot products
  (`column_blocks`);
- **cache growth and padded attention**: the default cache concatenates every new key onto the old ones, and a
  decode step's attention, which does little but read that cache, reads the left padding too. Here the cache is
  preallocated, and attention runs per group of length-sorted rows over only the columns they filled, on a CPU
  as two GEMMs shaped for a single query (`peftlab.kernels.kvcache`).

The tokens are the ones greedy `generate` picks: the same argmax over the same logits, checked against
`model.generate` in the tests and in `peftlab bench eval`. Only plain causal LMs (with or without LoRA, IA3 or full
fine-tuning) take this path; prompt-learning adapters and vision-language models keep `model.generate`, which knows
how to splice their virtual tokens and images in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from peftlab.kernels.kvcache import GROUPED_ATTENTION, BufferLayer, expose, row_groups
from peftlab.kernels.lastlayer import window_kwargs
from peftlab.kernels.shared_prefix import PREFIX_ATTENTION, SharedPrefix, opening_length
from peftlab.models.forward import cache_kwarg, sdpa_variant, takes_unmasked_rows
from peftlab.prompts.batches import budget_groups, forward_tokens


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
    run_group = partial(_prefill_right, skip=skip) if right else _prefill_left
    with sdpa_variant(model, PREFIX_ATTENTION) if opening else contextlib.nullcontext():
        for group in budget_groups([len(p) for p in prompts], max_tokens):
            rows = [prompts[i] for i in group]
            cache = opening.cache(len(rows)) if opening else Cache(layers=[DynamicLayer() for _ in range(n_layers)])
            logits, spans = run_group(model, rows, pad_id, cache, device)
            first.append(logits.argmax(-1))
            for buffer, cached in zip(merged.layers, cache.layers, strict=True):
                if not buffer.is_initialized:
                    buffer.allocate(len(prompts), cached.keys)
                for b, (row, (a, n)) in enumerate(zip(group, spans, strict=True)):
                    buffer.write_row(row, cached.keys[b, :, a : a + n], cached.values[b, :, a : a + n], width)
    _, mask = left_padded(prompts, pad_id)
    return torch.cat(first), merged, mask.to(device)


def _prefill_right(model, rows, pad_id: int, cache, device, skip: int = 0):
    """Right-padded rows with no mask: SDPA's causal kernel on grouped key/value heads
    (`models.forward.takes_unmasked_rows`).

    With `skip`, `cache` already holds the rows' shared first `skip` tokens and only the rest run. Returns each row's
    next-token logits and where each row's keys and values lie in its cache row: (first column, length).
    """
    lengths = torch.tensor([len(p) for p in rows])
    ids = torch.full((len(rows), int(lengths.max()) - skip), pad_id, dtype=torch.long)
    for row, p in enumerate(rows):
        ids[row, : len(p) - skip] = torch.tensor(p[skip:], dtype=torch.long)
    last = (lengths - skip - 1)[:, None].to(device)
    out = model(input_ids=ids.to(device), use_cache=True, logits_to_keep=last, **{cache_kwarg(model): cache},
                **window_kwargs(model, last))
    return out.logits[:, -1], [(0, len(p)) for p in rows]


def _prefill_left(model, rows, pad_id: int, cache, device):
    """Left-padded rows behind an attention mask, for models that cannot take per-row logit positions."""
    ids, mask = left_padded(rows, pad_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
                use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return out.logits[:, -1], [(ids.shape[1] - len(p), len(p)) for p in rows]


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

    `prompts` should be sorted by length (the prefill groups are consecutive rows, see
    `prompts.batches.budget_groups`), each group within `prefill_tokens` padded tokens (default:
    `prompts.batches.forward_tokens`, what suits the device).
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    prefill_tokens = prefill_tokens or forward_tokens(device)
    with column_blocks(model):
        token, cache, mask = _prefill(model, prompts, pad_id, width + max_new_tokens, prefill_tokens, device)
        with sdpa_variant(model, GROUPED_ATTENTION) as grouped:
            step = decode_step(model, grouped)
            return _decode_steps(step, token, cache, mask, max_new_tokens, stop_ids, width, grouped)


def decode_step(model, grouped: bool):
    """`step(token, position, mask, cache, groups) -> next-token logits`: one decode step through `model(...)`.

    `token` and `position` are (rows,), `mask` the (rows, columns) padding mask including the new column, `groups`
    `kvcache.row_groups`, passed to the attention when it is the grouped one. (`research/decode_levers.py` measures
    a step written out layer by layer against it.)
    """
    cache_kw = cache_kwarg(model)

    def step(token, position, mask, cache, groups) -> torch.Tensor:
        extra = {"row_groups": groups} if grouped else {}
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True,
                    **{cache_kw: cache}, **extra)
        return out.logits[:, -1]

    return step


def _readable(cache, lengths: torch.Tensor, width: int, grouped: bool) -> list[tuple[int, int, int]]:
    """The attention's row groups (`kvcache.row_groups`), with the cache zeroed wherever they read padding.

    Prefill leaves each row's left padding unwritten, and the columns an attention reads must hold finite values
    (`kvcache.BufferLayer.expose`). Without groups, attention reads every column."""
    groups = row_groups(lengths, width)
    expose(cache, groups if grouped else [(0, len(lengths), 0)])
    return groups


def _decode_steps(step, token, cache, mask, max_new_tokens: int, stop_ids, width: int, grouped: bool = True):
    """The decode loop after prefill: one token per running row per step, finished rows compacted away."""
    device = token.device
    stops = torch.tensor(sorted(stop_ids), device=device)
    outputs: list[list[int]] = [[] for _ in range(len(token))]
    active = torch.arange(len(token), device=device)  # original row of each batch row
    running = torch.ones(len(token), dtype=torch.bool, device=device)  # batch rows still generating
    position = mask.sum(-1)  # the next position of each row, counted from its first real token
    lengths = position.clone()  # prompt lengths, for the attention groups
    groups = _readable(cache, lengths, width, grouped)
    for i in range(max_new_tokens):
        running &= ~torch.isin(token, stops)
        for row, tok in zip(active[running].tolist(), token[running].tolist(), strict=True):
            outputs[row].append(tok)
        n_running = int(running.sum())
        if i == max_new_tokens - 1 or n_running == 0:
            break
        # Finished rows leave the batch and the cache once they are an eighth of it. Removing rows moves every
        # row behind the first removed one, so dropping each as it stops costs more than a few idle rows' steps.
        if len(active) - n_running >= max(1, len(active) // COMPACT_FRACTION):
            keep = running.nonzero().squeeze(-1)
            active, token, mask, position = active[keep], token[keep], mask[keep], position[keep]
            running, lengths = running[keep], lengths[keep]
            cache.batch_select_indices(keep)
            groups = _readable(cache, lengths, width, grouped)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
        token, position = step(token, position, mask, cache, groups).argmax(-1), position + 1
    return outputs
