"""From examples to token ids: prompt formatting, truncation that never cuts the target, and batching.

Prompts are written the way the model expects them: the chat template for instruct models, plain text for base
models, the encoder input for seq2seq models. Every stage (training, evaluation, serving) encodes through here, so
a prompt is the same text wherever it is used.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from peftlab.errors import PeftlabError
from peftlab.tasks import Example, Task

IGNORE = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class Encoded:
    """One example as token ids. The loss covers `target_ids` only; `truncated` counts context tokens cut.

    `media` is set for vision-language models only (a `vision.Media`: the example's image tensors).
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

    @classmethod
    def for_model(cls, loaded) -> PromptFormat:
        """The format for a loaded model: a `vision.VisionPromptFormat` when it has a processor (a VLM)."""
        if getattr(loaded, "processor", None) is not None:
            from peftlab.vision import VisionPromptFormat

            return VisionPromptFormat.of(loaded)
        return cls(loaded.tokenizer, loaded.kind, loaded.chat)

    def encode_prompt(self, user_text: str, shots: Sequence[tuple[str, str]] = (), image: str | None = None):
        """(prompt ids, media). A text model reads no image, so it gets the question and hint alone."""
        return self.prompt_ids(self.prompt_text(user_text, shots)), None

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


def encode(
    task: Task,
    example: Example,
    fmt: PromptFormat,
    max_length: int,
    template: int = 0,
    shots: Sequence[tuple[str, str]] = (),
    target: str | None = None,
) -> Encoded:
    """Encode one example; if it is too long, cut the task's context field, never the question or the target."""
    tpl = task.template(template)
    if target is None:
        target = task.train_target(example) if task.train_target else example.target
    target_ids = fmt.target_ids(target)
    inputs = dict(example.inputs)
    ids, media = fmt.encode_prompt(tpl.render(inputs), shots, example.image)
    over = len(ids) + len(target_ids) - max_length
    if over <= 0:
        return Encoded(example.id, ids, target_ids, media=media)
    if task.context_field is None:
        raise PeftlabError(f"example {example.id}: {len(ids) + len(target_ids)} tokens exceed max_length {max_length}")
    context = fmt.tokenizer(inputs[task.context_field], add_special_tokens=False).input_ids
    keep = len(context)
    for _ in range(4):  # re-tokenising at the cut can shift a token or two, so tighten until it fits
        keep = max(keep - over, 0)
        inputs[task.context_field] = fmt.tokenizer.decode(context[:keep])
        ids, media = fmt.encode_prompt(tpl.render(inputs), shots, example.image)
        over = len(ids) + len(target_ids) - max_length
        if over <= 0:
            return Encoded(example.id, ids, target_ids, truncated=len(context) - keep, media=media)
    raise PeftlabError(
        f"example {example.id}: the prompt without its {task.context_field} is already "
        f"{len(ids) + len(target_ids)} tokens, over max_length {max_length}"
    )


def few_shot_demos(task: Task, pool: Sequence[Example], k: int, seed: int, template: int = 0, max_words: int = 120):
    """K in-context (prompt, answer) pairs from the train split, drawn with the seed; long contexts are shortened."""
    if k <= 0:
        return []
    if k > len(pool):
        raise PeftlabError(f"--shots {k} asks for more examples than the train split has ({len(pool)})")
    picked = random.Random(seed).sample(list(pool), k)
    demos = []
    for ex in picked:
        inputs = dict(ex.inputs)
        if task.context_field:
            words = inputs[task.context_field].split()
            inputs[task.context_field] = " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")
        demos.append((task.template(template).render(inputs), ex.target))
    return demos


def token_batches(
    items: Sequence[Encoded], max_tokens: int, max_rows: int, seed: int | None = None, bucket: int = 64
) -> list[list[int]]:
    """Group item indices into batches of at most `max_tokens` padded tokens and `max_rows` rows.

    Batches are sized by tokens, not rows, because memory and time scale with padded tokens. Items are sorted by
    length inside buckets of `bucket * max_rows` items, so little compute goes on padding. With a seed, the items
    are shuffled first and the batch order is shuffled after, so every epoch sees a different order.
    """
    order = list(range(len(items)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    span = bucket * max_rows
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: items[i].length)
        groups = budget_groups([items[i].length for i in chunk], max_tokens, max_rows)
        batches += [[chunk[j] for j in g] for g in groups]
    if seed is not None:
        rng.shuffle(batches)
    return batches


def forward_tokens(device: torch.device | str) -> int:
    """Padded tokens per no-grad forward pass (scoring, validation loss, features, decode prefill).

    On a CPU, small passes are faster: at 1024 tokens a layer's activations stay in cache, and SmolLM2's DialogSum
    prefill ran 0.36 s per dialogue against 0.41 at 4096 and 0.50 at 8192 (PubMedQA label scoring: 1.77 against
    1.54 items/s at 8192). A GPU wants wide passes to fill its cores.
    """
    return 1024 if torch.device(device).type == "cpu" else 16384


def budget_groups(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Consecutive groups of positions in `lengths` whose padded size (rows x longest) stays within `max_tokens`.

    A row longer than the budget gets a group of its own. Pass lengths sorted, so little goes on padding.
    """
    groups: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        full = groups and (len(groups[-1]) == max_rows or max(longest, n) * (len(groups[-1]) + 1) > max_tokens)
        if not groups or full:
            groups.append([])
            longest = 0
        groups[-1].append(i)
        longest = max(longest, n)
    return groups


def collate_causal(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts and right-pad targets, so every row's target starts at the same column.

    With targets aligned, the LM head only needs the last T positions (`logits_to_keep`): on DialogSum the prompt is
    about 85% of the tokens, and the 49k-wide head is a fifth of the model's FLOPs. The last target token is never an
    input, so it is left out.
    """
    p_len = max(len(e.prompt_ids) for e in batch)
    t_len = max(len(e.target_ids) for e in batch)
    width = p_len + t_len - 1
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), t_len), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        p, t = len(e.prompt_ids), len(e.target_ids)
        input_ids[row, p_len - p : p_len] = torch.tensor(e.prompt_ids)
        input_ids[row, p_len : p_len + t - 1] = torch.tensor(e.target_ids[:-1])
        attention_mask[row, p_len - p : p_len + t - 1] = 1
        labels[row, :t] = torch.tensor(e.target_ids)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}
    if batch[0].media is not None:  # a vision-language model: image tensors and token types join the batch
        from peftlab.vision import add_media

        out = add_media(out, batch, p_len)
    return out


def collate_causal_right(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad whole rows and pass no attention mask: the training layout for causal text models.

    Pad tokens sit only after a row's last real token, so causal attention alone keeps them out of every real
    position and no mask is needed. With no mask, SDPA takes its causal kernel (it skips the upper triangle) and
    reads grouped key/value heads in place instead of copying them per query head, which is faster and keeps
    less for backward than the masked kernel of `collate_causal`. Positions are 0, 1, ... in every row.

    Targets no longer share a column, so `label_positions` (batch, target_len) holds, for each label, the input
    position whose logits predict it; the model's `logits_to_keep` takes it and runs the LM head there only.
    """
    t_len = max(len(e.target_ids) for e in batch)
    width = max(e.length for e in batch) - 1
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t_len), IGNORE, dtype=torch.long)
    label_positions = torch.zeros((len(batch), t_len), dtype=torch.long)
    for row, e in enumerate(batch):
        p, t = len(e.prompt_ids), len(e.target_ids)
        input_ids[row, : p + t - 1] = torch.tensor(e.prompt_ids + e.target_ids[:-1])
        labels[row, :t] = torch.tensor(e.target_ids)
        # Position p-1+j predicts target token j; ignored label slots point at the last prompt token, harmlessly.
        label_positions[row] = torch.arange(p - 1, p - 1 + t_len).clamp(max=p + t - 2)
    return {"input_ids": input_ids, "labels": labels, "label_positions": label_positions}


def collate_seq2seq(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoder inputs and decoder labels (the model shifts labels into decoder inputs itself)."""
    p_len = max(len(e.prompt_ids) for e in batch)
    t_len = max(len(e.target_ids) for e in batch)
    input_ids = torch.full((len(batch), p_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), p_len), dtype=torch.long)
    labels = torch.full((len(batch), t_len), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        input_ids[row, : len(e.prompt_ids)] = torch.tensor(e.prompt_ids)
        attention_mask[row, : len(e.prompt_ids)] = 1
        labels[row, : len(e.target_ids)] = torch.tensor(e.target_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate(batch: Sequence[Encoded], kind: str, pad_id: int, right_padded: bool = False) -> dict[str, torch.Tensor]:
    """Collate for the model kind; `right_padded` picks the unmasked causal layout (`collate_causal_right`)."""
    if kind == "seq2seq":
        return collate_seq2seq(batch, pad_id)
    return collate_causal_right(batch, pad_id) if right_padded else collate_causal(batch, pad_id)


def input_tokens(batch: Sequence[Encoded]) -> int:
    """Real tokens a causal batch feeds the model (the last target token is never an input)."""
    return sum(e.length - 1 for e in batch)


def class_weights(y: torch.Tensor, n_classes: int, power: float) -> dict[int, float]:
    """(n / (k * count)) ** power per class: 1 is fully balanced, 0 is unweighted, between is a softer correction."""
    counts = torch.bincount(y, minlength=n_classes).clamp(min=1).float()
    weights = (len(y) / (n_classes * counts)) ** power
    return {c: float(w) for c, w in enumerate(weights)}


def example_weights(task: Task, fmt: PromptFormat, items: list[Encoded], power: float) -> list[float] | None:
    """Per-item loss weights that lift the rare classes of a classification task: (n / (k * count)) ** power.

    A run that learns the label prior instead of the task collapses to the majority answer (naive LoRA on PubMedQA
    answered "yes" 498 times of 500); weighting the loss makes every class pull as hard (power 1) or part way
    (0.5). The class of an item is the label word its target begins with; items whose target begins with none weigh 1.
    None when there is nothing to weight (power 0, or not a classification task).
    """
    if not power or task.kind != "classification" or not task.labels:
        return None
    whole = {tuple(fmt.target_ids(label)): k for k, label in enumerate(task.labels)}
    words = [tuple(fmt.label_ids(label)) for label in task.labels]
    classes = [_label_of(tuple(e.target_ids), whole, words) for e in items]
    known = torch.tensor([c for c in classes if c is not None], dtype=torch.long)
    if len(known) == 0:
        return None
    weights = class_weights(known, len(task.labels), power)
    return [1.0 if c is None else weights[c] for c in classes]


def _label_of(target: tuple[int, ...], whole: dict[tuple[int, ...], int], words: list[tuple[int, ...]]) -> int | None:
    """The class whose whole target (label word and end of turn) is `target`, or else the one class whose label word
    begins it (an answer followed by its reasoning, `Task.train_target`); None if none, or more than one, fits."""
    if target in whole:
        return whole[target]
    begins = [k for k, word in enumerate(words) if target[: len(word)] == word]
    return begins[0] if len(begins) == 1 else None
