"""Shared-prefix training runs the common prompt opening once per step and changes no loss and no gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import shared_rows

from peftlab.kernels.shared_prefix import MIN_PREFIX, common_prefix
from peftlab.models.loading import load_model
from peftlab.prompts.batches import shared_length, strip
from peftlab.prompts.format import Encoded
from peftlab.train.step import step_inputs, train_step


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5, 6], [5, 6]]) == 2
    assert common_prefix([[1], [2]]) == 0


def test_shared_length_keeps_one_prompt_token_per_row_and_skips_short_openings():
    assert shared_length(shared_rows(12)) == 12
    assert shared_length(shared_rows(MIN_PREFIX - 1)) == 0  # not worth a separate forward
    assert shared_length(shared_rows(12, n=1)) == 0  # one row: nothing repeats
    whole = Encoded("w", shared_rows(12)[0].prompt_ids[:12], [7, 8])  # a prompt that is all opening
    assert shared_length([whole, *shared_rows(12)]) == 11
    assert [e.prompt_ids for e in strip(shared_rows(12), 12)] == [e.prompt_ids[12:] for e in shared_rows(12)]


def _trained(loaded, method: str, items, pieces, share: bool) -> tuple[float, torch.Tensor]:
    """One real `train_step` (SGD, lr 1, no clipping) from a copy of the model: its loss and the weight change."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(loaded.model)
    if method == "lora":
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    micro, prefix_ids = step_inputs(items, pieces, "causal", loaded.tokenizer.pad_token_id, True, share)
    assert len(prefix_ids) == (12 if share else 0)
    loss = train_step(model, micro, "causal", Accelerator(cpu=True), params, optimizer, scheduler, 0.0, prefix_ids)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.config._attn_implementation == "sdpa"  # the prefix attention is switched back after the step
    return loss, before - torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_shared_prefix_step_has_the_same_loss_and_gradients(tiny_causal, method):
    loaded = load_model(str(tiny_causal), device="cpu")
    items = shared_rows(12, vocab=len(loaded.tokenizer) - 10)
    pieces = [[0, 2], [1], [3]]  # several micro-batches: the prefix's gradient is summed over all of them
    want_loss, want = _trained(loaded, method, items, pieces, share=False)
    got_loss, got = _trained(loaded, method, items, pieces, share=True)
    assert want.abs().sum() > 0
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
