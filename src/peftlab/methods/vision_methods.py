"""Methods on vision-language models: the language side by default, the projector and tower on request
(`method.vision`), and the method/architecture pairs peft cannot run, refused with the reason.
"""

from __future__ import annotations

import torch

from peftlab.core.errors import NotSupported, PeftlabError
from peftlab.methods.tuners import wrap_peft
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.vision_models import VisionArch, vision_arch, vision_part

VISION_PARTS = ("tower", "projector")


# ---------------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------------


def check_pair(arch: VisionArch, method: str, model_name: str) -> None:
    """Refuse a method that peft cannot run correctly on this architecture, saying why."""
    reason = arch.refuses.get(method)
    if reason:
        raise NotSupported(
            f"method '{method}' is not supported on {arch.label} ({model_name}): {reason}. "
            "docs/vision.md lists the method/architecture pairs that work"
        )


def vision_parts(cfg) -> set[str]:
    """The vision parts `method.vision` asks to adapt, checked."""
    wanted = set(cfg.vision)
    unknown = wanted - set(VISION_PARTS)
    if unknown:
        raise PeftlabError(f"method.vision: unknown part(s) {sorted(unknown)}; valid: {', '.join(VISION_PARTS)}")
    return wanted


def _retarget(peft_config, model: torch.nn.Module, parts: set[str]) -> None:
    """Point LoRA/IA3 at the language model's matching layers, plus every linear layer of the chosen vision parts.

    Name suffixes alone would also hit the vision encoder: SigLIP, PaliGemma's encoder, has q_proj and v_proj too.
    """
    wanted = peft_config.target_modules
    every = wanted == "all-linear"

    def chosen(name: str) -> bool:
        part = vision_part(name)
        if part != "language":
            return part in parts
        return name != "lm_head" and (every or name.rsplit(".", 1)[-1] in wanted)

    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and chosen(n)}
    if not names:
        raise PeftlabError(f"method.target_modules {sorted(wanted)} match no linear layer of the language model")
    peft_config.target_modules = names
    feedforward = getattr(peft_config, "feedforward_modules", None)
    if feedforward is not None:  # IA3: its feed-forward layers must be among the targets, named the same way
        short = set(feedforward) if not isinstance(feedforward, str) else set()
        peft_config.feedforward_modules = {
            n for n in names if vision_part(n) == "language" and n.rsplit(".", 1)[-1] in short
        }


def apply_vision_method(loaded: LoadedModel, task, cfg, method) -> torch.nn.Module:
    """`methods.registry.apply_method` for a vision-language model: the language side by default, vision parts on
    request."""
    arch = vision_arch(loaded.model.config)
    check_pair(arch, method.name, loaded.name)
    if getattr(method, "build", None) is not None:  # methods outside peft and the gradient loop read text states
        raise NotSupported(f"method '{method.name}' is not supported on vision-language models ({loaded.name})")
    parts = vision_parts(cfg)
    model = loaded.model
    if method.peft_config is None:  # full fine-tuning, or a prompting baseline that trains nothing
        for name, p in model.named_parameters():
            p.requires_grad_(method.trains and vision_part(name) in {"language", *parts})
        return model

    peft_config = method.peft_config(cfg, loaded, task)
    if peft_config.is_prompt_learning:
        if parts:
            raise PeftlabError(
                f"method.vision {sorted(parts)} needs lora, qlora, ia3 or full: '{method.name}' adds virtual tokens "
                "to the language model and changes no weight inside it"
            )
    else:
        _retarget(peft_config, model, parts)

    return wrap_peft(model, peft_config, f"method '{method.name}' on {arch.label} ({loaded.name})")
