"""Memory levers change what backward keeps, never the gradients."""

from __future__ import annotations

import pytest
import torch
from builders import DIALOGSUM

from peftlab.data.tasks import get_task
from peftlab.kernels.memory import enable_checkpointing, fused_rmsnorm, lean_swiglu, swiglu
from peftlab.models.forward import target_loss
from peftlab.models.loading import load_model
from peftlab.prompts.batches import collate
from peftlab.prompts.encoding import encode
from peftlab.prompts.format import PromptFormat


def test_swiglu_matches_autograd_and_keeps_two_tensors():
    torch.manual_seed(0)
    gate, up = torch.randn(3, 5, 7, requires_grad=True), torch.randn(3, 5, 7, requires_grad=True)
    grad = torch.randn(3, 5, 7)
    want = torch.autograd.grad(torch.nn.functional.silu(gate) * up, (gate, up), grad)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = swiglu(gate, up)
    got = torch.autograd.grad(out, (gate, up), grad)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert len(kept) == 2  # gate and up; plain autograd keeps silu(gate) as well


def _grads(path, method: str, mode=None, lean=False) -> torch.Tensor:
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(path), device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    if mode:
        enable_checkpointing(loaded.model, mode)
    if lean:
        assert lean_swiglu(loaded.model) == loaded.model.config.num_hidden_layers
        assert fused_rmsnorm(loaded.model) == 2 * loaded.model.config.num_hidden_layers + 1  # two a layer, one final
    model = loaded.model
    if method == "lora":
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    task = get_task("dialogsum")
    items = [encode(task, ex, fmt, 130 + 25 * i) for i, ex in enumerate(task.load(DIALOGSUM)[:3])]
    loss, _ = target_loss(model, "causal", collate(items, "causal", fmt.tokenizer.pad_token_id, right_padded=True))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("mode,lean", [(None, True), ("selective", False), ("selective", True), ("full", False)])
def test_levers_keep_the_gradients(tiny_causal, method, mode, lean):
    want = _grads(tiny_causal, method)
    got = _grads(tiny_causal, method, mode, lean)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


class GemmaStyleRMSNorm(torch.nn.Module):
    """Scales by (1 + weight), as Gemma's norms do: not what `F.rms_norm` computes."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(size))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_fused_rmsnorm_changes_only_norms_it_reproduces():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        llama.weight.normal_()
    model = torch.nn.ModuleList([llama, GemmaStyleRMSNorm(16)])
    x = torch.randn(2, 5, 16)
    want = [m(x) for m in model]
    assert fused_rmsnorm(model) == 1
    assert "forward" in vars(llama) and "forward" not in vars(model[1])
    for m, w in zip(model, want, strict=True):
        torch.testing.assert_close(m(x), w)
