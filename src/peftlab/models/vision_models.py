"""Vision-language models: a local checkpoint with its processor, what peftlab knows of each architecture, and
which parts of the model are the tower, the projector and the language side.

A vision-language model goes through every stage in the same objects as a text model. `load_model` returns a
`LoadedModel` whose `processor` is set. `prompts.encoding.format_for` returns a `VisionPromptFormat`
(`prompts.vision`), which writes the image slot into the prompt and lets the processor expand it. Each `Encoded`
example carries its image tensors in `media`, and `collate` and `generate` add them to the batch. Training,
scoring, generation and the run folder are the text code paths.

Methods adapt the language model by default. `method.vision: [projector]` or `[tower]` also adapts the image
projector or the vision encoder: every linear layer of it (LoRA, IA3) or every weight (full). Pairs that peft
cannot run correctly are refused up front with `NotSupported`; docs/vision.md has the table.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from peftlab.models.forward import _pad_aware_positions
from peftlab.models.hf_folder import LoadedModel, from_local

# Module names that mark the image projector and the vision encoder across transformers' VLMs. The projector is
# checked first: Qwen2-VL's projector (`visual.merger`) sits inside its vision encoder (`visual`).
PROJECTOR_NAMES = frozenset({"multi_modal_projector", "merger", "connector", "mm_projector"})
TOWER_NAMES = frozenset({"vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder"})


def _paligemma_text_only(text: str, tokenizer) -> str:
    # PaliGemma's processor writes `<image>...<bos>prompt\n`; a row without an image keeps the rest of that layout.
    return f"{tokenizer.bos_token or ''}{text}\n"


@dataclass(frozen=True)
class VisionArch:
    """What peftlab must know about one vision-language architecture beyond what transformers does for it."""

    label: str
    # First position id of a row. None: the model builds its own (Qwen2-VL's 3-D M-RoPE follows the image grid).
    first_position: int | None = 0
    # Prefix-LM attention (PaliGemma): image and prompt attend both ways; token_type_ids mark the target with 1.
    prefix_lm: bool = False
    # Qwen2-VL finds images for its rotary positions through mm_token_type_ids (1 on image tokens).
    mm_token_types: bool = False
    # Prompt text of a row without an image, for models without a chat template.
    text_only: Callable[[str, object], str] | None = None
    # method -> why peft cannot run it correctly on this architecture (the observations are in docs/vision.md).
    refuses: Mapping[str, str] = field(default_factory=dict)


# Observed with peft 0.21 and transformers 5.23 on a tiny Qwen2-VL (docs/vision.md has the whole table).
_PREFIX_MROPE = (
    "peft lengthens the attention mask by the prefix, and Qwen2-VL's 3-D rotary position builder (get_rope_index) "
    "does not expect that: the first forward pass fails with a shape mismatch"
)
_PROMPT_MROPE = (
    "peft passes the soft prompt as input embeddings without input ids, so Qwen2-VL cannot place the image tokens "
    "in its 3-D rotary positions: scores change with padding and generation fails with a shape mismatch"
)
ARCHS: dict[str, VisionArch] = {
    "qwen2_vl": VisionArch(
        "Qwen2-VL",
        first_position=None,
        mm_token_types=True,
        refuses={"prefix-tuning": _PREFIX_MROPE, "prompt-tuning": _PROMPT_MROPE, "p-tuning": _PROMPT_MROPE},
    ),
    "paligemma": VisionArch("PaliGemma", first_position=1, prefix_lm=True, text_only=_paligemma_text_only),
}


def vision_arch(config) -> VisionArch:
    """The architecture entry for a model config; unknown architectures get the generic defaults."""
    model_type = getattr(config, "model_type", "")
    return ARCHS.get(model_type) or VisionArch(model_type)


def is_vision_language(path: Path) -> bool:
    """Whether a local checkpoint is an image-text-to-text model (it has a vision config and a transformers class)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = json.loads((Path(path) / "config.json").read_text())
    return "vision_config" in config and config.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def vision_part(name: str) -> str:
    """'projector', 'tower' or 'language' for a module or parameter name of a vision-language model."""
    parts = set(name.split("."))
    if parts & PROJECTOR_NAMES:
        return "projector"
    if parts & TOWER_NAMES:
        return "tower"
    return "language"


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def image_only(cls: type) -> type:
    """A processor class like `cls` but without its video processor, for machines without torchvision.

    transformers builds every sub-processor a processor declares, and its video processors need torchvision, which
    a CPU-only torch install may lack. peftlab feeds images only. The subclass keeps the original's name and module,
    so what it saves loads with the original class anywhere.
    """
    attributes = [a for a in cls.get_attributes() if "video" not in a]
    members = {"__module__": cls.__module__, "get_attributes": classmethod(lambda c: attributes)}
    return type(cls.__name__, (cls,), members)


def load_processor(path: Path, model_type: str):
    """A checkpoint's processor (tokenizer, image processor, chat template), without video support if need be."""
    import transformers
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ImportError, OSError):  # no torchvision: no video processor class, or no video processor config
        if importlib.util.find_spec("torchvision") is not None or model_type not in PROCESSOR_MAPPING_NAMES:
            raise
    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    return image_only(cls).from_pretrained(path, local_files_only=True, trust_remote_code=False)


def _fill_inputs(arch: VisionArch, module, args, kwargs):
    """Inputs a caller left out (peft's prompt learning drops positions and token types), filled in consistently.

    Positions: `_pad_aware_positions`, shifted where they start at 1 (PaliGemma). Token types: a prefix-LM model
    without them may skip its attention mask and, with PaliGemma's bidirectional Gemma layers, attend to future
    tokens in a batch without padding; all-ones token types keep every position causal, batch or not.
    """
    if arch.first_position is not None:
        out = _pad_aware_positions(module, args, kwargs)
        if out is not None:
            args, kwargs = out
            kwargs["position_ids"] = kwargs["position_ids"] + arch.first_position
    if arch.prefix_lm and kwargs.get("token_type_ids") is None and kwargs.get("attention_mask") is not None:
        kwargs = {**kwargs, "token_type_ids": torch.ones_like(kwargs["attention_mask"])}
    return args, kwargs


def load_vision_model(
    name: str, path: Path, device: torch.device, dtype: torch.dtype, chat: bool | None, allow_pickle: bool,
    placement: dict,
) -> LoadedModel:
    """Load an image-text-to-text checkpoint and its processor from a local folder; never touches the network.

    `placement` holds extra `from_pretrained` arguments (QLoRA's quantization config and device map).
    """
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path, json.loads((path / "config.json").read_text()).get("model_type", ""))
    if "quantization_config" in placement:  # QLoRA quantizes the language model; the vision side stays as it is
        placement["quantization_config"].llm_int8_skip_modules = [
            "lm_head", *(f".*{part}" for part in sorted(TOWER_NAMES | PROJECTOR_NAMES))
        ]
    model = from_local(AutoModelForImageTextToText, path, device, dtype, allow_pickle, placement)
    arch = vision_arch(model.config)
    if arch.first_position is not None or arch.prefix_lm:  # not Qwen2-VL: it builds 3-D positions itself
        model.register_forward_pre_hook(partial(_fill_inputs, arch), with_kwargs=True)
        # peft warns that prompt learning drops positions and token types; `_fill_inputs` puts them back: noise.
        for dropped in ("Position ids", "Token type ids"):
            warnings.filterwarnings("ignore", message=f"{dropped} are not supported for parameter efficient tuning")
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = getattr(processor, "chat_template", None)
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template  # the processor's template, so prompts and end-of-turn agree
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    return LoadedModel(model, tokenizer, "causal", name, path, chat, processor=processor)
