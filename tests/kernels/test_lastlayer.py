"""The windowed last layer gives the same logits and gradients where logits are wanted."""

from __future__ import annotations

import pytest
import torch
from builders import shared_rows

from peftlab.kernels.lastlayer import window, window_kwargs
from peftlab.kernels.shared_prefix import SharedPrefix
from peftlab.models.loading import load_model
from peftlab.prompts.batches import collate, strip


def _logits_and_grads(model, batch, windowed: bool, prefix_ids=()):
    model.zero_grad(set_to_none=True)
    positions = batch["label_positions"]
    extra = window_kwargs(model, positions) if windowed else {}
    if prefix_ids:
        prefix = SharedPrefix(model, prefix_ids, "past_key_values")
        extra["past_key_values"] = prefix.cache(len(positions))
    logits = model(input_ids=batch["input_ids"], logits_to_keep=positions, **extra).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    if prefix_ids:
        prefix.backward()
    return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("shared", [0, 12])
def test_windowed_last_layer_matches_the_full_layer(tiny_causal, shared):
    loaded = load_model(str(tiny_causal), device="cpu")
    model = loaded.model.train()
    assert window(model)  # load_model already windowed it; a second call changes nothing
    rows = shared_rows(12, vocab=len(loaded.tokenizer) - 10)
    items = strip(rows, shared)
    batch = collate(items, "causal", loaded.tokenizer.pad_token_id, right_padded=True)
    assert window_kwargs(model, batch["label_positions"])["last_layer_from"] > 0
    prefix_ids = rows[0].prompt_ids[:shared]
    want_logits, want_grads = _logits_and_grads(model, batch, False, prefix_ids)
    got_logits, got_grads = _logits_and_grads(model, batch, True, prefix_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grads, want_grads, rtol=1e-4, atol=1e-6)


def test_other_layouts_are_left_alone(tiny_seq2seq):
    loaded = load_model(str(tiny_seq2seq), device="cpu")
    assert not window(loaded.model)
    assert window_kwargs(loaded.model, torch.tensor([[3]])) == {}
