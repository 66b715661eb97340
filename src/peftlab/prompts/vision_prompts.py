"""Vision prompts: the image slot a processor expands, the image tensors each encoded example carries, and
how a batch's media and positions are laid out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from peftlab.core.errors import PeftlabError
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.vision_models import VisionArch, vision_arch
from peftlab.prompts.format import PromptFormat

# Processor outputs aligned with the text; everything else a processor returns belongs to the images.
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels"})


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
