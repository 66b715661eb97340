"""One optimizer step: a batch cut into micro-batches, the shared prompt prefix, backward, clipping, update.

`train.loop.fit` runs these steps in order; the benchmark's math check runs the same `train_step` on the reference's
batches, so what it checks is what trains.

    batch rows -> split_rows (pieces under train.micro_tokens) -> step_inputs (collate, cut the shared opening)
    -> train_step (the opening's forward, each piece's forward and backward, the opening's backward, clip, step)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from peftlab.core.config import RunConfig
from peftlab.kernels.shared_prefix import PREFIX_ATTENTION, SharedPrefix
from peftlab.models.forward import cache_kwarg, sdpa_variant, target_loss, weighted_targets
from peftlab.prompts.batches import budget_groups, collate, shared_length, strip
from peftlab.prompts.format import Encoded


def split_rows(items: list[Encoded], idx: list[int], max_tokens: int) -> list[list[int]]:
    """Split one batch's rows into length-sorted pieces of at most `max_tokens` padded tokens (one row may exceed it).

    The loss is summed over every piece and divided by the batch's target tokens, so the gradient is the batch's;
    only the activations kept for backward shrink, to those of one piece. Sorting keeps the padding in a piece small.
    """
    if not max_tokens:
        return [idx]
    rows = sorted(idx, key=lambda i: items[i].length)
    return [[rows[j] for j in g] for g in budget_groups([items[i].length for i in rows], max_tokens)]


def micro_tokens(setting: int | None, device) -> int:
    """Padded tokens per forward/backward piece: `train.micro_tokens` if set, else by device (0: never split).

    On a CPU, 512-token pieces keep a layer's activations in cache and bound memory (LoRA peak RSS 1.48x inference,
    bench/RESULTS.md). On a GPU a piece is a full set of kernel launches: SmolLM2's 4096-token PubMedQA batches in
    512-token pieces trained at 2,000-2,900 tokens/s per run on an H200 shared by six runs (2026-12-04), so a GPU
    takes each batch whole.
    """
    if setting is not None:
        return setting
    return 512 if torch.device(device).type == "cpu" else 0


def shares_prefix(cfg: RunConfig, right_padded: bool, world: int = 1, device="cpu") -> bool:
    """Whether training runs each step's shared prompt opening once (`train.shared_prefix`, where it can).

    The prefix's backward runs after the last micro-batch's, where a data-parallel wrapper has already
    all-reduced, and transformers turns the KV cache off under activation checkpointing. Unset, it is on for a
    CPU, which saves the opening's FLOPs, and off for a GPU: there a small model's step costs its kernel launches,
    and the prefix is one more pass of them.
    """
    tc = cfg.train
    wanted = tc.shared_prefix if tc.shared_prefix is not None else torch.device(device).type == "cpu"
    return wanted and right_padded and world == 1 and tc.activation_checkpointing in (False, "off")


def step_inputs(
    items: list[Encoded], pieces: list[list[int]], kind: str, pad: int, right: bool, share: bool
) -> tuple[list[dict], list[int]]:
    """One step's micro-batches (one per piece of row indices) and the prompt opening they share (maybe none).

    With `share`, the rows lose the opening that all of them start with (`prompts.batches.shared_length`): it runs
    once, in `train_step`, as a KV cache in front of every micro-batch.
    """
    rows = [items[i] for piece in pieces for i in piece]
    n = shared_length(rows) if share else 0
    micro = [collate(strip([items[i] for i in piece], n), kind, pad, right_padded=right) for piece in pieces]
    return micro, rows[0].prompt_ids[:n]


def train_step(
    model, micro: list[dict], kind: str, accelerator, params, optimizer, scheduler, max_grad_norm,
    prefix_ids: Sequence[int] = (), autocast: torch.dtype | None = None,
) -> float:
    """One optimizer step over `micro` micro-batches; returns the mean loss per target token.

    `prefix_ids`: the prompt opening the micro-batches' rows were cut from (`step_inputs`); it runs once here.
    `autocast`: the dtype the forward passes compute in (`train.runtime.precision`); backward follows the forward's
    dtypes.
    """
    n_tok = sum(weighted_targets(b) for b in micro)
    loss_sum = 0.0
    raw = accelerator.unwrap_model(model)

    def forward_dtype():
        return torch.autocast(accelerator.device.type, dtype=autocast) if autocast is not None else nullcontext()

    with sdpa_variant(raw, PREFIX_ATTENTION) if prefix_ids else nullcontext():
        with forward_dtype():
            prefix = SharedPrefix(raw, prefix_ids, cache_kwarg(raw)) if prefix_ids else None
        for i, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # Gradients are all-reduced once per optimizer step, not once per micro-batch.
            with accelerator.no_sync(model) if i < len(micro) - 1 else nullcontext():
                with forward_dtype():
                    loss, _ = target_loss(model, kind, batch, prefix)
                accelerator.backward(loss / n_tok)
            loss_sum += float(loss.detach())
        if prefix is not None:
            prefix.backward()
    if not math.isfinite(loss_sum):
        optimizer.zero_grad(set_to_none=True)
        return loss_sum
    if max_grad_norm:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / n_tok
