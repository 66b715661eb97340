"""The peft tuners: LoRA and QLoRA, IA3, prompt, prefix and P-tuning, each a peft config built from
`method.*`, and the wrapper that applies one with a clear error where peft cannot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peftlab.core.config import MethodConfig
from peftlab.core.errors import NotSupported, PeftlabError
from peftlab.data.tasks import Task
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.quant import require_quantized

if TYPE_CHECKING:
    from peft import PeftConfig, TaskType


def peft_task_type(loaded: LoadedModel) -> TaskType:
    """The peft task type of a loaded model: seq2seq or causal LM."""
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if loaded.kind == "seq2seq" else TaskType.CAUSAL_LM


def target_names(cfg: MethodConfig, loaded: LoadedModel) -> list[str] | str:
    """`method.target_modules` as the model names them (T5's q/k/v/o for the Llama names); a missing one is an
    error that lists the model's modules."""
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


def lora_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """LoRA with `method.r`, `alpha`, `dropout` and `target_modules`."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=peft_task_type(loaded),
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_names(cfg, loaded),
    )


def qlora_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """LoRA's config over a base that must have been loaded quantized."""
    require_quantized(loaded)  # the quantization itself happens at load time (`Method.quantized`)
    return lora_config(cfg, loaded, task)


def ia3_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """IA3 on `method.target_modules`, the feed-forward ones among them marked as such."""
    from peft import IA3Config

    targets = target_names(cfg, loaded)
    if targets == "all-linear":
        return IA3Config(task_type=peft_task_type(loaded), target_modules="all-linear", feedforward_modules=[])
    # IA3 rescales keys, values and the feed-forward input; peft needs to know which targets are feed-forward.
    ff = [m for m in targets if m in ("down_proj", "wo", "fc2", "c_proj")]
    return IA3Config(task_type=peft_task_type(loaded), target_modules=targets, feedforward_modules=ff)


def prompt_tuning_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """A soft prompt of `method.num_virtual_tokens`, started at random or from the task's instruction text."""
    from peft import PromptTuningConfig, PromptTuningInit

    if cfg.prompt_init not in ("random", "text"):
        raise PeftlabError(f"method.prompt_init must be random or text, got '{cfg.prompt_init}'")
    from_text = cfg.prompt_init == "text"
    return PromptTuningConfig(
        task_type=peft_task_type(loaded),
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=task.templates[0].instruction if from_text else None,
        tokenizer_name_or_path=str(loaded.path) if from_text else None,
    )


def prefix_tuning_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """Key/value prefixes of `method.num_virtual_tokens`, optionally re-parameterised through an MLP."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=peft_task_type(loaded),
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )


def p_tuning_config(cfg: MethodConfig, loaded: LoadedModel, task: Task) -> PeftConfig:
    """P-tuning: `method.num_virtual_tokens` produced by a prompt encoder MLP."""
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type=peft_task_type(loaded),
        num_virtual_tokens=cfg.num_virtual_tokens,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )


def wrap_peft(model: torch.nn.Module, peft_config, what: str) -> torch.nn.Module:
    """`peft.get_peft_model`, with peft's refusals turned into one clear error naming the method and model."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except (ValueError, TypeError, NotImplementedError, AttributeError, RuntimeError) as err:
        # A study lists the run as not run here, with peft's reason (its first line: the error is one line).
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NotSupported(f"peft does not support {what}: {first}") from err
