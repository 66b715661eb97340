"""The method registry: a name maps to what it trains, its default learning rate and how it adapts the base.

Adapter methods build a `peft` config (`methods.tuners`); `full` trains every weight; `linear-head` fits a
logistic regression on frozen states (`methods.head`); `zero-shot` and `few-shot` train nothing but go through
the same harness, so they sit in the same results table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftlab.core.config import MethodConfig
from peftlab.core.errors import unknown_name
from peftlab.data.tasks import Task
from peftlab.methods.head import build
from peftlab.methods.tuners import _ia3, _lora, _p_tuning, _prefix_tuning, _prompt_tuning, _qlora, wrap_peft
from peftlab.methods.vision import apply_vision_method
from peftlab.models.local import LoadedModel
from peftlab.models.quant import stored_params


@dataclass(frozen=True)
class Method:
    """A way to adapt the model. `peft_config` is None for full fine-tuning and the prompting baselines."""

    name: str
    trains: bool
    default_lr: float
    description: str
    peft_config: Callable[[MethodConfig, LoadedModel, Task], object] | None = None
    quantized: bool = False  # the base loads quantized (`method.quant`) and stays frozen: QLoRA
    # A method outside peft and the gradient loop (the linear head): builds its model, fits it, saves it.
    build: Callable[[LoadedModel, Task, MethodConfig], torch.nn.Module] | None = None

    @property
    def trained_part(self) -> str:
        """What the method trains, in words (for `peftlab methods`)."""
        if not self.trains:
            return "nothing"
        if self.build is not None:
            return "a head"
        if self.peft_config is None:
            return "all weights"
        return "an adapter"

    @property
    def trains_base(self) -> bool:
        """Whether the base model's own weights train (full fine-tuning), not an adapter or head beside them."""
        return self.trains and self.peft_config is None and self.build is None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero-shot", False, 0.0, "the base model as is"),
        Method("few-shot", False, 0.0, "in-context examples from the train split (data.shots, default 3)"),
        Method("full", True, 5e-5, "every weight trains"),
        Method("lora", True, 2e-4, "low-rank updates to chosen linear layers", _lora),
        Method("qlora", True, 2e-4, "LoRA over a frozen 4-bit NF4 (or 8-bit) base, via bitsandbytes", _qlora,
               quantized=True),
        Method("ia3", True, 5e-3, "learned rescaling of keys, values and feed-forward activations", _ia3),
        Method("prompt-tuning", True, 3e-2, "a trained soft prompt of virtual tokens", _prompt_tuning),
        Method("prefix-tuning", True, 1e-2, "trained key/value prefixes in every layer", _prefix_tuning),
        Method("p-tuning", True, 1e-2, "virtual tokens produced by a small prompt encoder", _p_tuning),
        Method(
            "linear-head", True, 0.0, "logistic regression on the frozen model's mid-layer states", build=build
        ),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown_name("method", name, list(METHODS))
    return METHODS[name]


def apply_method(loaded: LoadedModel, task: Task, cfg: MethodConfig) -> torch.nn.Module:
    """Return the model to train: a peft model with only adapter weights trainable, or the whole model for `full`."""
    method = get_method(cfg.name)
    model = loaded.model
    if getattr(loaded, "processor", None) is not None:  # a vision-language model: language side unless told

        return apply_vision_method(loaded, task, cfg, method)
    if method.build is not None:
        return method.build(loaded, task, cfg)
    if method.peft_config is None:
        for p in model.parameters():
            p.requires_grad_(method.trains)
        return model
    what = f"method '{cfg.name}' on {loaded.name} ({loaded.kind})"
    return wrap_peft(model, method.peft_config(cfg, loaded, task), what)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting the frozen base once (a 4-bit base at its unpacked size)."""

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(stored_params(p) for p in model.parameters())
    return trainable, total
