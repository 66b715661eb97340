"""The method registry: a name maps to what it trains, its default learning rate and how it adapts the base.

Adapter methods build a `peft` config (`methods.tuners`); `full` trains every weight; `linear-head` fits a
logistic regression on frozen states (`methods.head`); `zero-shot` and `few-shot` train nothing but go through
the same harness, so they sit in the same results table. Each entry also says how what it trains is saved in a
run folder and reloaded (`methods.storage`), and how many in-context demos it prompts with by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftlab.core.config import MethodConfig
from peftlab.core.errors import unknown_name
from peftlab.data.tasks import Task
from peftlab.methods import speed
from peftlab.methods import variants as v
from peftlab.methods.head import build
from peftlab.methods.lifecycle import remember_initial, save_adapter, start_schedule
from peftlab.methods.passthrough import any_tuner, peft_fields, with_extras
from peftlab.methods.speed import use_plain_path
from peftlab.methods.storage import ADAPTER, BASE, HEAD, MODEL, Storage
from peftlab.methods.tuners import (
    ia3_config,
    lora_config,
    p_tuning_config,
    prefix_tuning_config,
    prompt_tuning_config,
    qlora_config,
    wrap_peft,
)
from peftlab.methods.vision_methods import apply_vision_method
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.quant import stored_params

__all__ = ["METHODS", "Method", "apply_method", "count_params", "get_method", "plain_path_reason", "save_adapter",
           "start_schedule", "use_plain_path"]


@dataclass(frozen=True)
class Method:
    """A way to adapt the model. `peft_config` is None for full fine-tuning and the prompting baselines."""

    name: str
    trains: bool
    default_lr: float
    description: str
    peft_config: Callable[[MethodConfig, LoadedModel, Task], object] | None = None
    quantized: bool = False  # the base loads quantized (`method.quant`) and stays frozen: QLoRA
    lr_source: str = ""  # where default_lr comes from (docs/methods.md)
    peft_type: str | None = None  # the peft tuner a named method builds (None: not a peft method, or `peft`)
    # A method outside peft and the gradient loop (the linear head): builds its model, fits it, saves it.
    build: Callable[[LoadedModel, Task, MethodConfig], torch.nn.Module] | None = None
    default_shots: int = 0  # in-context demos per prompt when data.shots is 0 (few-shot's)
    storage: Storage = ADAPTER  # how what it trains is saved in the run folder and reloaded from it

    def shots(self, configured: int) -> int:
        """In-context demos per prompt: `data.shots` when set, else the method's own default."""
        return configured or self.default_shots

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
    def reads_frozen_base(self) -> bool:
        """Whether the model it scores with reads the base unchanged (zero-shot, few-shot, the linear head): its
        passes over prompts are shared with other runs (`methods.frozen_pass`)."""
        return not self.trains or self.build is not None

    @property
    def trains_base(self) -> bool:
        """Whether the base model's own weights train (full fine-tuning), not an adapter or head beside them."""
        return self.trains and self.peft_config is None and self.build is None


# Default learning rates. peft's method_comparison (MetaMathQA, Llama-3.2-3B, 5000 steps; `results/*.json`) trains
# LoRA at 1e-4, and most variants at that same rate; peftlab's LoRA default is 2e-4 (short budgets, a 135M model),
# so a variant gets 2e-4 times its method_comparison rate over LoRA's. Where method_comparison's rate did not train
# the method at all (test accuracy 0.0), peft's own example for it gives the rate.
_LORA_LR = "method_comparison trains it at LoRA's rate (1e-4): peftlab's LoRA default"
_MC = "method_comparison {exp}: {lr} = {x}x LoRA's rate"
NAMED_VARIANTS = (
    Method("dora", True, 2e-4, "LoRA with the weight split into magnitude and direction (DoRA)", v.dora_config,
           peft_type="LORA", lr_source=_LORA_LR + " (lora/llama-3.2-3B-rank32-dora)"),
    Method("rslora", True, 2e-4, "LoRA scaled by alpha / sqrt(r), so higher ranks keep learning (rsLoRA)",
           v.rslora_config, peft_type="LORA", lr_source=_LORA_LR + " (lora/llama-3.2-3B-rank64-rslora)"),
    Method("pissa", True, 2e-4, "LoRA started from the weights' principal singular vectors (PiSSA); SVD at start",
           v.pissa_config, peft_type="LORA",
           lr_source="not in method_comparison; PiSSA's paper and peft's example train it at LoRA's rate"),
    Method("olora", True, 2e-4, "LoRA started from an orthonormal QR basis of the weights (OLoRA)", v.olora_config,
           peft_type="LORA", lr_source="not in method_comparison; peft's olora example trains it at LoRA's rate"),
    Method("adalora", True, 2e-4, "LoRA in SVD form whose rank budget moves to the layers that matter (AdaLoRA)",
           v.adalora_config, peft_type="ADALORA", lr_source=_LORA_LR + " (adalora/llama-3.2-3B-rank32)"),
    Method("vera", True, 2e-3, "trained scaling vectors on frozen random low-rank matrices shared by all layers "
           "(VeRA)", v.vera_config, peft_type="VERA",
           lr_source=_MC.format(exp="vera/llama-3.2-3B-default", lr="1e-3", x=10)),
    Method("loha", True, 2e-4, "low-rank Hadamard product update (LoHa, LyCORIS)", v.loha_config,
           peft_type="LOHA", lr_source=_LORA_LR + " (loha/llama-3.2-3B-rank32)"),
    Method("lokr", True, 6e-3, "low-rank Kronecker product update (LoKr, LyCORIS)", v.lokr_config, peft_type="LOKR",
           lr_source=_MC.format(exp="lokr/llama-3.2-3B-rank32-factor4-lr0.003", lr="3e-3", x=30)),
    Method("oft", True, 2e-4, "trained block-diagonal orthogonal rotation of each weight (OFT)", v.oft_config,
           peft_type="OFT", lr_source=_LORA_LR + " (oft/llama-3.2-3B-rank32)"),
    Method("boft", True, 2e-4, "orthogonal rotation built from butterfly factors (BOFT)", v.boft_config,
           peft_type="BOFT", lr_source=_LORA_LR + " (boft/llama-3.2-3B-default)"),
    Method("hra", True, 2e-4, "orthogonal update as a chain of r Householder reflections (HRA)", v.hra_config,
           peft_type="HRA", lr_source=_LORA_LR + " (hra/llama-3.2-3B-rank32)"),
    Method("ln-tuning", True, 5e-2, "only the layer norms' weights train (LN-tuning)", v.ln_tuning_config,
           peft_type="LN_TUNING", lr_source="peft's examples/causal_language_modeling/peft_ln_tuning_clm.ipynb "
           "(method_comparison's 1e-4 scored 0.0)"),
    Method("fourierft", True, 6e-2, "a few trained spectral coefficients of each weight update (FourierFT)",
           v.fourierft_config, peft_type="FOURIERFT",
           lr_source="peft's examples/sequence_classification/FourierFT.ipynb (method_comparison's 1e-4 scored 0.0)"),
    Method("miss", True, 2e-4, "a shared shard matrix expanded over each weight (MiSS, peft's successor to Bone)",
           v.miss_config, peft_type="MISS", lr_source=_LORA_LR + " (miss/llama-3.2-3B-default)"),
    Method("lily", True, 2e-4, "low-rank projectors shared across layers, mixed per layer by a router (Lily)",
           v.lily_config, peft_type="LILY", lr_source=_LORA_LR + " (lily/llama-3.2-3B-rank140-mlp-a2-b2-s8.0)"),
    Method("shira", True, 6e-4, "a sparse set of the base weights train, at random positions (SHiRA)", v.shira_config,
           peft_type="SHIRA", lr_source=_MC.format(exp="shira/llama-3.2-3B-lr_0.0003-random_seed_42", lr="3e-4",
                                                   x=3)),
    Method("hira", True, 9e-3, "high-rank update: a low-rank matrix times the weight, elementwise (HiRA)",
           v.hira_config, peft_type="HIRA",
           lr_source=_MC.format(exp="hira/llama-3.2-3B-rank32-lr4.5e-3", lr="4.5e-3", x=45)),
)

_SHOTS = 3  # few-shot's demos per prompt unless data.shots says otherwise

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero-shot", False, 0.0, "the base model as is", storage=BASE),
        Method("few-shot", False, 0.0, f"in-context examples from the train split (data.shots, default {_SHOTS})",
               default_shots=_SHOTS, storage=BASE),
        Method("full", True, 5e-5, "every weight trains", storage=MODEL),
        Method("lora", True, 2e-4, "low-rank updates to chosen linear layers", lora_config),
        Method("qlora", True, 2e-4, "LoRA over a frozen 4-bit NF4 (or 8-bit) base, via bitsandbytes", qlora_config,
               quantized=True),
        Method("ia3", True, 5e-3, "learned rescaling of keys, values and feed-forward activations", ia3_config),
        Method("prompt-tuning", True, 3e-2, "a trained soft prompt of virtual tokens", prompt_tuning_config),
        Method("prefix-tuning", True, 1e-2, "trained key/value prefixes in every layer", prefix_tuning_config),
        Method("p-tuning", True, 1e-2, "virtual tokens produced by a small prompt encoder", p_tuning_config),
        Method("linear-head", True, 0.0, "logistic regression on the frozen model's mid-layer states", build=build,
               storage=HEAD),
        *NAMED_VARIANTS,
        Method("peft", True, 2e-4, "any peft tuner: method.peft {peft_type: ..., fields} or method.peft_config "
               "(an adapter_config.json)", any_tuner, lr_source="LoRA's default; set train.lr for other tuners"),
    )
}


def get_method(name: str) -> Method:
    """The registry's entry for a method name (`method.name`); an unknown name is an error listing the known."""
    if name not in METHODS:
        raise unknown_name("method", name, list(METHODS))
    return METHODS[name]


def apply_method(method: Method, loaded: LoadedModel, task: Task, cfg: MethodConfig) -> torch.nn.Module:
    """Return the model to train: a peft model with only adapter weights trainable, or the whole model for `full`.

    `method`: the registry's entry for `cfg.name`; `cfg` carries its settings.
    """
    model = loaded.model
    if getattr(loaded, "processor", None) is not None:  # a vision-language model: language side unless told
        return apply_vision_method(loaded, task, cfg, method)
    if method.build is not None:
        return method.build(loaded, task, cfg)
    if method.peft_config is None:
        for p in model.parameters():
            p.requires_grad_(method.trains)
        return model
    what = f"method '{method.name}' on {loaded.name} ({loaded.kind})"
    config = method.peft_config(cfg, loaded, task)
    if method.name != "peft":
        config = with_extras(config, cfg, loaded)
    # PiSSA/OLoRA run their SVD/QR here, inside the run's wall time; the initial adapter is kept for saving.
    wrapped = wrap_peft(model, config, what)
    remember_initial(wrapped)
    return wrapped


def plain_path_reason(method: Method, cfg: MethodConfig) -> str | None:
    """Why this method runs without some of peftlab's speed paths (`methods.speed`), or None (`cfg`: its settings,
    which name the tuner of `peft`)."""
    peft_type = peft_fields(cfg)[0] if method.name == "peft" else method.peft_type
    return speed.plain_path_reason(peft_type)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting the frozen base once (a 4-bit base at its unpacked size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(stored_params(p) for p in model.parameters())
    return trainable, total
