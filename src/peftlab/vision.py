"""Vision-language models: a local checkpoint with its processor, prompts with image slots, image tensors in batches,
and which methods apply to which architecture.

A vision-language model goes through every stage in the same objects as a text model. `load_model` returns a
`LoadedModel` whose `processor` is set. `PromptFormat.for_model` returns a `VisionPromptFormat`, which writes the
image slot into the prompt and lets the processor expand it. Each `Encoded` example carries its image tensors in
`media`, and `collate` and `generate` add them to the batch. Training, scoring, generation and the run folder are
the text code paths.

Methods adapt the language model by default. `method.vision: [projector]` or `[tower]` also adapts the image
projector or the vision encoder: every linear layer of it (LoRA, IA3) or every weight (full). Pairs that peft
cannot run correctly are refused up front with `NotSupported`; docs/vision.md has the table.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import torch

from peftlab.data import PromptFormat
from peftlab.errors import NotSupported, PeftlabError
from peftlab.models import LoadedModel, _pad_aware_positions, from_local

VISION_PARTS = ("tower", "projector")
# Module names that mark the image projector and the vision encoder across transformers' VLMs. The projector is
# checked first: Qwen2-VL's projector (`visual.merger`) sits inside its vision encoder (`visual`).
PROJECTOR_NAMES = frozenset({"multi_modal_projector", "merger", "connector", "mm_projector"})
TOWER_NAMES = frozenset({"vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder"})
# Processor outputs aligned with the text; everything else a processor returns belongs to the images.
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels"})


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


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and batches
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Media:
    """The image side of one encoded example. A text-only example of a vision-language model has no tensors but
    still carries the architecture, so its batch gets the same token types as a batch with images."""

    tensors: dict[str, torch.Tensor]
    arch: VisionArch
    image_token_id: int | None


def open_image(path: str | Path):
    """An image file as RGB; a missing or unreadable file is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise PeftlabError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise PeftlabError(f"{path}: not a readable image ({err})") from None


@dataclass
class VisionPromptFormat(PromptFormat):
    """A `PromptFormat` that puts an image slot in the prompt and lets the processor expand it to image tokens."""

    processor: object = None
    arch: VisionArch = field(default_factory=lambda: VisionArch("generic"))

    @classmethod
    def of(cls, loaded: LoadedModel) -> VisionPromptFormat:
        return cls(loaded.tokenizer, loaded.kind, loaded.chat, loaded.processor, vision_arch(loaded.model.config))

    @cached_property
    def image_token_id(self) -> int | None:
        token_id = getattr(self.processor, "image_token_id", None)
        token = getattr(self.processor, "image_token", None)
        return token_id if token_id is not None else (self.tokenizer.convert_tokens_to_ids(token) if token else None)

    def _messages(self, user_text: str, shots: Sequence[tuple[str, str]], image: bool) -> list[dict]:
        # Content as a list of parts, the form every VLM chat template reads; demos stay text-only.
        def text(t: str) -> list[dict]:
            return [{"type": "text", "text": t}]

        messages = []
        for u, a in shots:
            messages += [{"role": "user", "content": text(u)}, {"role": "assistant", "content": text(a)}]
        slot = [{"type": "image"}] if image else []
        return [*messages, {"role": "user", "content": slot + text(user_text)}]

    def prompt_text(self, user_text: str, shots: Sequence[tuple[str, str]] = (), image: bool = False) -> str:
        if self.chat:
            messages = self._messages(user_text, shots, image)
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = super().prompt_text(user_text, shots)
        if image:
            return self.processor.image_token + text
        return self.arch.text_only(text, self.tokenizer) if self.arch.text_only else text

    @cached_property
    def end_of_turn(self) -> str:
        if self.chat:
            marker = "XQZJ"
            turns = [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": marker}]}]
            end = self.tokenizer.apply_chat_template(turns, tokenize=False).split(marker, 1)[1].strip()
            if end:
                return end
        return self.tokenizer.eos_token or ""

    def encode_prompt(self, user_text: str, shots: Sequence[tuple[str, str]] = (), image: str | None = None):
        """Prompt token ids with the image slot expanded to the image's tokens, and the image tensors."""
        if image is None:
            return self.prompt_ids(self.prompt_text(user_text, shots)), Media({}, self.arch, self.image_token_id)
        out = self.processor(
            text=[self.prompt_text(user_text, shots, image=True)],
            images=[open_image(image)],
            return_tensors="pt",
            add_special_tokens=not self.chat,  # as `prompt_ids`: chat templates hold their special tokens
        )
        tensors = {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}
        return out["input_ids"][0].tolist(), Media(tensors, self.arch, self.image_token_id)


def media_inputs(
    batch: Sequence, input_ids: torch.Tensor, prompt_width: int, prompt_learning: bool = False
) -> dict[str, torch.Tensor]:
    """What a vision-language batch adds to input ids and mask: the image tensors of its rows and token types.

    Image tensors are concatenated along dim 0 in row order, the layout the models expect (one entry per image).
    Prompt learning gets no prefix-LM token types: peft drops them in training, so generation must too.
    """
    first = batch[0].media
    out = {}
    for key in dict.fromkeys(k for e in batch for k in e.media.tensors):
        out[key] = torch.cat([e.media.tensors[key] for e in batch if key in e.media.tensors])
    if first.arch.mm_token_types and first.image_token_id is not None:
        out["mm_token_type_ids"] = (input_ids == first.image_token_id).int()
    if first.arch.prefix_lm and not prompt_learning:
        types = torch.zeros_like(input_ids)
        types[:, prompt_width:] = 1  # prompt columns are the bidirectional prefix, target columns the causal suffix
        out["token_type_ids"] = types
    return out


def add_media(out: dict[str, torch.Tensor], batch: Sequence, prompt_width: int) -> dict[str, torch.Tensor]:
    """A collated causal batch with its rows' media added and positions set the way the architecture counts them."""
    out = {**out, **media_inputs(batch, out["input_ids"], prompt_width)}
    first = batch[0].media.arch.first_position
    if first is None:
        out.pop("position_ids")
    elif first:
        out["position_ids"] = out["position_ids"] + first
    return out


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
    """`methods.apply_method` for a vision-language model: the language side by default, vision parts on request."""
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
    from peftlab.methods import wrap_peft

    return wrap_peft(model, peft_config, f"method '{method.name}' on {arch.label} ({loaded.name})")
