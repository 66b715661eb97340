"""The layer-by-layer decode step computes what the model's own forward computes, adapters included."""

from __future__ import annotations

import copy

import pytest
import torch

import peftlab.decode as decode
from peftlab.decode_step import LAYER_STEPS, lean_step
from peftlab.kvcache import GROUPED_ATTENTION, row_groups
from peftlab.models import load_model, sdpa_variant


@pytest.fixture
def llama(tiny_causal):
    """The tiny Llama with weights large enough that its logits differ clearly between prompts."""
    model = load_model(str(tiny_causal), device="cpu").model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def _adapted(model, method: str):
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    if method == "lora":  # random B, so the adapter really changes every projection it wraps
        return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type=TaskType.CAUSAL_LM,
                                                init_lora_weights=False))
    if method == "ia3":
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                           task_type=TaskType.CAUSAL_LM)
        adapted = get_peft_model(model, config)
        with torch.no_grad():  # IA3 starts at ones (a no-op); move it off
            for name, p in adapted.named_parameters():
                if "ia3_l" in name:
                    p.uniform_(0.5, 1.5)
        return adapted
    return model


@pytest.mark.parametrize("method", ["none", "lora", "ia3"])
def test_lean_step_equals_the_model_forward_on_left_padded_rows(llama, method):
    model = _adapted(llama, method)
    torch.manual_seed(0)
    prompts = [torch.randint(3, 500, (n,)).tolist() for n in (5, 9, 12, 17)]  # sorted, so the groups are cropped
    width = max(map(len, prompts))
    with torch.inference_mode(), sdpa_variant(model, GROUPED_ATTENTION) as grouped:
        assert grouped
        token, cache, mask = decode._prefill(model, prompts, 0, width + 4, 10**6, torch.device("cpu"))
        position = mask.sum(-1)
        groups = row_groups(position, width, n_groups=3)
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
        twin = copy.deepcopy(cache)
        lean = lean_step(model)(token, position, mask, cache, groups)
        full = decode._forward_step(model, grouped=True)(token, position, mask, twin, groups)
    torch.testing.assert_close(lean, full, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(cache.layers, twin.layers, strict=True):  # the new keys and values went in alike
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)
    assert lean.std() > 0.5  # logits that could tell a wrong step apart


def test_lean_step_declines_what_it_does_not_know(llama, tiny_seq2seq, monkeypatch):
    assert lean_step(llama) is not None
    llama.set_attn_implementation("eager")  # the grouped attention replaces SDPA only
    assert lean_step(llama) is None
    llama.set_attn_implementation("sdpa")
    assert lean_step(load_model(str(tiny_seq2seq), device="cpu").model) is None
    monkeypatch.setattr("peftlab.decode_step.LAYER_STEPS", {})
    assert lean_step(llama) is None


def test_greedy_decode_takes_the_lean_step_and_the_forward_when_switched_off(llama, monkeypatch):
    calls = []
    layer_step = LAYER_STEPS["LlamaDecoderLayer"]
    monkeypatch.setitem(LAYER_STEPS, "LlamaDecoderLayer", lambda *a: calls.append(1) or layer_step(*a))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    lean = decode.greedy_decode(llama, prompts, 6, [], 0)
    assert len(calls) == 5 * llama.config.num_hidden_layers  # the first token comes from prefill
    monkeypatch.setattr(decode, "lean_step", lambda model: None)
    assert decode.greedy_decode(llama, prompts, 6, [], 0) == lean and len(calls) == 10
