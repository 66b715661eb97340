"""The method registry: a name maps to how it adapts the base model.

Adapter methods build a `peft` config (LoRA, IA3, prompt, prefix and P-tuning all come from the peft library);
`full` trains every weight; `zero-shot` and `few-shot` train nothing but go through the same harness, so they sit
in the same results table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftlab.config import MethodConfig
from peftlab.errors import PeftlabError, unknown_name
from peftlab.models import LoadedModel
from peftlab.tasks import Task


def _task_type(loaded: LoadedModel):
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if loaded.kind == "seq2seq" else TaskType.CAUSAL_LM


def _target_modules(cfg: MethodConfig, loaded: LoadedModel) -> list[str] | str:
    if cfg.target_modules == "all-linear":
        return "all-linear"
    names = {name.rsplit(".", 1)[-1] for name, _ in loaded.model.named_modules()}
    wanted = [cfg.target_modules] if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    # T5-style models call the projections q/k/v/o; accept the Llama names and map them, so one study fits both.
    aliases = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
    resolved = [m if m in names else aliases.get(m, m) for m in wanted]
    missing = [m for m in resolved if m not in names]
    if missing:
        raise PeftlabError(
            f"method.target_modules {missing} not found in {loaded.name}; modules include {sorted(names)[:12]}"
        )
    return resolved


def _lora(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    from peft import LoraConfig

    return LoraConfig(
        task_type=_task_type(loaded),
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_target_modules(cfg, loaded),
    )


def _qlora(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    from peftlab.quant import require_quantized

    require_quantized(loaded)  # the quantization itself happens at load time (`Method.quantized`)
    return _lora(cfg, loaded, task)


def _ia3(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    from peft import IA3Config

    targets = _target_modules(cfg, loaded)
    if targets == "all-linear":
        return IA3Config(task_type=_task_type(loaded), target_modules="all-linear", feedforward_modules=[])
    # IA3 rescales keys, values and the feed-forward input; peft needs to know which targets are feed-forward.
    ff = [m for m in targets if m in ("down_proj", "wo", "fc2", "c_proj")]
    return IA3Config(task_type=_task_type(loaded), target_modules=targets, feedforward_modules=ff)


def _prompt_tuning(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    from peft import PromptTuningConfig, PromptTuningInit

    if cfg.prompt_init not in ("random", "text"):
        raise PeftlabError(f"method.prompt_init must be random or text, got '{cfg.prompt_init}'")
    from_text = cfg.prompt_init == "text"
    return PromptTuningConfig(
        task_type=_task_type(loaded),
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=task.templates[0].instruction if from_text else None,
        tokenizer_name_or_path=str(loaded.path) if from_text else None,
    )


def _prefix_tuning(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=_task_type(loaded),
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )


def _p_tuning(cfg: MethodConfig, loaded: LoadedModel, task: Task):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type=_task_type(loaded),
        num_virtual_tokens=cfg.num_virtual_tokens,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )


def _linear_head(loaded: LoadedModel, task: Task, cfg: MethodConfig) -> torch.nn.Module:
    from peftlab.heads import build

    return build(loaded, task, cfg)


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
            "linear-head", True, 0.0, "logistic regression on the frozen model's mid-layer states", build=_linear_head
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
        from peftlab.vision import apply_vision_method

        return apply_vision_method(loaded, task, cfg, method)
    if method.build is not None:
        return method.build(loaded, task, cfg)
    if method.peft_config is None:
        for p in model.parameters():
            p.requires_grad_(method.trains)
        return model
    what = f"method '{cfg.name}' on {loaded.name} ({loaded.kind})"
    return wrap_peft(model, method.peft_config(cfg, loaded, task), what)


def wrap_peft(model: torch.nn.Module, peft_config, what: str) -> torch.nn.Module:
    """`peft.get_peft_model`, with peft's refusals turned into one clear error naming the method and model."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except (ValueError, TypeError, NotImplementedError, AttributeError) as err:
        raise PeftlabError(f"peft does not support {what}: {err}") from err


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting the frozen base once (a 4-bit base at its unpacked size)."""
    from peftlab.quant import stored_params

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(stored_params(p) for p in model.parameters())
    return trainable, total
