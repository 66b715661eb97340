"""Every named tuner through peftlab's speed paths gives the loss and the update of the plain peft forward.

The fast side is what a run trains: the base from peftlab's loader (the windowed last layer), lean SwiGLU and fused
RMSNorm installed before the tuner (so LN-tuning copies the fused norms), right-padded unmasked rows and the shared
prompt opening as a KV cache. The plain side is the same tuner from `get_peft_model` on a base straight from
`AutoModelForCausalLM.from_pretrained`, fed left-padded rows behind an attention mask. Both start from the same
adapter weights (randomised, so every adapter path carries signal), take one real `train_step` (SGD), and must agree.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from builders import shared_rows
from trainkit import adapt

from peftlab.core.config import MethodConfig, TrainConfig
from peftlab.data.tasks import get_task
from peftlab.kernels.lastlayer import WINDOWED
from peftlab.kernels.memory import fused_rmsnorm, lean_swiglu
from peftlab.methods.registry import NAMED_VARIANTS, get_method, plain_path_reason, use_plain_path
from peftlab.methods.speed import BATCH_MIXING, CHECKED
from peftlab.models.loading import load_model
from peftlab.train.step import step_inputs, train_step

# LoRA and IA3 ran these paths before the variants came; here every tuner in `methods.speed.CHECKED` but prompt
# learning (which keeps its masked layout) is checked the same way.
NAMED = ["lora", "ia3", *(m.name for m in NAMED_VARIANTS)]
# Every module kind the speed paths touch is adapted: the last layer's attention and MLP projections (window,
# lean SwiGLU) and, for LN-tuning, the norms (fused RMSNorm).
ALL_LINEAR = "all-linear"


def _randomise(model: torch.nn.Module) -> None:
    """Move every trainable weight off its init (zero B matrices, identity rotations) by the same seeded noise."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _step(model, items, pieces, pad: int, right: bool, share: bool) -> tuple[float, torch.Tensor]:
    from accelerate import Accelerator

    model.train()
    params = [p for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]
    before = torch.cat([p.detach().flatten() for p in params])
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    micro, prefix = step_inputs(items, pieces, "causal", pad, right=right, share=share)
    assert bool(prefix) == share and all(("label_positions" in b) == right for b in micro)
    loss = train_step(model, micro, "causal", Accelerator(cpu=True), params, optimizer, scheduler, 0.0, prefix)
    return loss, before - torch.cat([p.detach().flatten() for p in params])


def test_every_checked_tuner_is_tested():
    tested = {"LORA", "IA3", *(m.peft_type for m in NAMED_VARIANTS)}
    assert CHECKED - {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"} == tested - set(BATCH_MIXING)


@pytest.mark.parametrize("method", NAMED)
def test_speed_paths_give_the_plain_peft_loss_and_update(method, tiny_causal):
    """A checked tuner through every path; a batch-mixing one (Lily) through what its fallback leaves on."""
    from transformers import AutoModelForCausalLM

    cfg = MethodConfig(name=method, target_modules=ALL_LINEAR, dropout=0.0)
    task = get_task("pubmedqa")
    fast = load_model(str(tiny_causal), device="cpu")
    plain = dataclasses.replace(fast, model=AutoModelForCausalLM.from_pretrained(tiny_causal))
    reason = plain_path_reason(get_method(method), cfg)
    if reason is None:
        assert lean_swiglu(fast.model) and fused_rmsnorm(fast.model)
    else:  # the fallback run_training takes: no window, no shared prefix, right-padded rows kept
        train = TrainConfig()
        use_plain_path(fast.model, reason, train)
        assert train.shared_prefix is False and not hasattr(fast.model.model.layers[-1], WINDOWED)
    torch.manual_seed(0)  # SHiRA's random positions and the like: the same on both sides
    fast_model = adapt(fast, task, cfg)
    torch.manual_seed(0)
    plain_model = adapt(plain, task, cfg)
    peft_type = fast_model.peft_config["default"].peft_type.value
    assert (peft_type in CHECKED) == (reason is None) and (reason is None or peft_type in BATCH_MIXING)
    assert hasattr(fast.model.model.layers[-1], WINDOWED) == (reason is None)
    _randomise(fast_model)
    _randomise(plain_model)

    items = shared_rows(12, vocab=len(fast.tokenizer) - 10)
    pieces = [[0, 2], [1], [3]]  # several micro-batches: the opening's gradient is summed over all of them
    pad = fast.tokenizer.pad_token_id
    # A batch-mixing tuner's plain forward depends on the padding, so its reference pads the same way.
    want_loss, want = _step(plain_model, items, pieces, pad, right=reason is not None, share=False)
    got_loss, got = _step(fast_model, items, pieces, pad, right=True, share=reason is None)
    assert got_loss == pytest.approx(want_loss, rel=1e-4)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
