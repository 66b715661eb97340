"""Forward helpers every stage above shares: logits and loss at target positions only, the unmasked
right-padded layout where a model takes it, the KV-cache keyword, and positions for left-padded rows.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from peftlab.kernels.lastlayer import window_kwargs
from peftlab.kernels.shared_prefix import SharedPrefix

PLAIN_PATH = "peftlab_plain_path"  # set on a base model that must run without the speed paths, with the reason


def _pad_aware_positions(module, args, kwargs):
    """Give left-padded rows positions that start at their first real token when the caller passes none.

    peft's prompt tuning and prefix tuning drop `position_ids`, so a left-padded row would sit further from the
    virtual tokens than the same row unpadded and RoPE would see other distances: the loss would depend on padding.
    Counting positions along the attention mask (as `generate` does) keeps padded and unpadded rows identical.
    """
    mask = kwargs.get("attention_mask")
    if kwargs.get("position_ids") is not None or mask is None or mask.dim() != 2:
        return None
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1] :]
    return args, {**kwargs, "position_ids": positions}


@contextlib.contextmanager
def sdpa_variant(model: torch.nn.Module, name: str):
    """Run a model that uses SDPA with the registered attention function `name` instead; yield whether it does.

    Models on another attention implementation (eager, flash) are left as they are.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    base.set_attn_implementation(name)
    try:
        yield True
    finally:
        base.set_attn_implementation("sdpa")


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: `cache` in recent transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def takes_unmasked_rows(model: torch.nn.Module) -> bool:
    """Whether a causal text model can run right-padded rows with no attention mask and per-row logit positions.

    With pads only after each row's real tokens, causal attention alone keeps them out, so no mask is needed and
    SDPA runs its causal kernel on grouped key/value heads in place. That needs a forward that takes a
    (batch, positions) tensor as `logits_to_keep` (transformers' `slice_logits_to_keep`; a few model classes still
    slice with an int only), no virtual tokens (peft's prompt learning shifts every position by its prefix), and no
    vision tower (a VLM lays out rope positions around its image tokens).
    """
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, PLAIN_PATH, None):  # a tuner not checked against this layout (`methods.speed`)
        return False
    if getattr(base.config, "vision_config", None) is not None:
        return False
    return _slices_logits_per_row(type(base))


@functools.cache
def _slices_logits_per_row(model_class: type) -> bool:
    try:
        return "slice_logits_to_keep(" in inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False

IGNORE = -100  # label value that cross-entropy skips


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
    if "label_positions" in batch:  # the right-padded, unmasked layout (`prompts.batches.collate_causal_right`)
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

    With `row_weights` in the batch (class-weighted training, see `prompts.weights.example_weights`), each row's
    tokens count that many times in the sum; the caller divides by the matching weighted count (`weighted_targets`).
    `prefix`: as in `target_logits`.
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
