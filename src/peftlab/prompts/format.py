"""How prompts and targets are written for one model: the chat template for instruct models, plain text for
base models, the encoder input for seq2seq models; and `Encoded`, one example as token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class Encoded:
    """One example as token ids. The loss covers `target_ids` only; `truncated` counts context tokens cut.

    `media` is set for vision-language models only (a `prompts.vision_prompts.Media`: the example's image tensors).
    """

    id: str
    prompt_ids: list[int]
    target_ids: list[int]
    truncated: int = 0
    media: Any = field(default=None, compare=False)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


@dataclass
class PromptFormat:
    """How prompts and targets are written for one model: chat template, plain text, or seq2seq."""

    tokenizer: object
    kind: str  # "causal" | "seq2seq"
    chat: bool

    def encode_prompt(self, user_text: str, shots: Sequence[tuple[str, str]] = (), image: str | None = None):
        """(prompt ids, media). A text model reads no image, so it gets the question and hint alone."""
        return self.prompt_ids(self.prompt_text(user_text, shots)), None

    def encode_messages(self, turns: Sequence[dict[str, str]], shots: Sequence[tuple[str, str]] = ()):
        """(prompt ids, media) of a conversation (a chat example's turns before the answer)."""
        return self.prompt_ids(self.messages_text(turns, shots)), None

    def messages_text(self, turns: Sequence[dict[str, str]], shots: Sequence[tuple[str, str]] = ()) -> str:
        """A conversation as the model reads it: its chat template, or `role: content` lines for a plain model."""
        demos = [m for u, a in shots for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        if self.kind == "causal" and self.chat:
            return self.tokenizer.apply_chat_template([*demos, *turns], tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role']}: {m['content']}" for m in [*demos, *turns]]
        return "\n".join(lines) + "\nassistant:"

    def prompt_text(self, user_text: str, shots: Sequence[tuple[str, str]] = ()) -> str:
        if self.kind == "seq2seq":
            demos = "".join(f"{u}\nAnswer: {a}\n\n" for u, a in shots)
            return demos + user_text
        if self.chat:
            messages = []
            for u, a in shots:
                messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": user_text})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        demos = "".join(f"{u}\nAnswer: {a}\n\n" for u, a in shots)
        return f"{demos}{user_text}\nAnswer:"

    @cached_property
    def end_of_turn(self) -> str:
        """The text that closes an answer: the chat template's end-of-turn marker, else the EOS token."""
        if self.kind == "causal" and self.chat:
            marker = "XQZJ"
            messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}]
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False)
            end = rendered.split(marker, 1)[1].strip()
            if end:
                return end
        return self.tokenizer.eos_token or ""

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end generation."""
        ids = {self.tokenizer.eos_token_id}
        end = self.tokenizer(self.end_of_turn, add_special_tokens=False).input_ids
        if len(end) == 1:
            ids.add(end[0])
        return sorted(i for i in ids if i is not None)

    def prompt_ids(self, text: str) -> list[int]:
        # Chat templates already hold the special tokens; seq2seq encoders and plain prompts want the tokenizer's own.
        add_special = self.kind == "seq2seq" or not self.chat
        return self.tokenizer(text, add_special_tokens=add_special).input_ids

    def target_ids(self, target: str) -> list[int]:
        if self.kind == "seq2seq":
            return self.tokenizer(text_target=target).input_ids  # ends with the tokenizer's EOS
        text = target if self.chat else " " + target
        return self.tokenizer(text + self.end_of_turn, add_special_tokens=False).input_ids

    def label_ids(self, label: str) -> list[int]:
        """Token ids of a label word as it would begin the answer (without the end-of-turn)."""
        if self.kind == "seq2seq":
            return self.tokenizer(text_target=label, add_special_tokens=False).input_ids
        return self.tokenizer(label if self.chat else " " + label, add_special_tokens=False).input_ids
