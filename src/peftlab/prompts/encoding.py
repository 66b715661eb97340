"""From examples to token ids: the prompt format a model gets, truncation that never cuts the target, few-shot
demos, calibration prompts, and a mixture's sampled training set.

Every stage (training, evaluation, serving) encodes through here, so a prompt is the same text wherever it is used.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from peftlab.core.config import RunConfig
from peftlab.core.errors import PeftlabError
from peftlab.data.mixture import Part
from peftlab.data.tasks import Example, Task
from peftlab.models.local import LoadedModel
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.prompts.vision import VisionPromptFormat


def format_for(loaded: LoadedModel) -> PromptFormat:
    """The prompt format of a loaded model: a `VisionPromptFormat` when it has a processor (a VLM)."""
    if loaded.processor is not None:
        return VisionPromptFormat.of(loaded)
    return PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)


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
    if example.messages is not None:  # a chat example: its turns through the chat template, never cut
        ids, media = fmt.encode_messages(example.messages, shots)
        if len(ids) + len(target_ids) > max_length:
            raise PeftlabError(f"example {example.id}: the conversation is {len(ids) + len(target_ids)} tokens, over "
                               f"max_length {max_length}; raise data.max_length or shorten it")
        return Encoded(example.id, ids, target_ids, media=media)
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


def encode_split(
    cfg: RunConfig, task: Task, fmt: PromptFormat, examples: Sequence[Example], shots=(), template: int | None = None
) -> list[Encoded]:
    """Encode a split with the run's max_length and `template` (default: `data.template`)."""
    template = cfg.data.template if template is None else template
    return [encode(task, ex, fmt, cfg.data.max_length, template, shots) for ex in examples]


CONTENT_FREE = ("N/A", "[MASK]", "")  # Zhao et al.'s content-free inputs


def content_free_items(
    cfg: RunConfig, task: Task, fmt: PromptFormat, train: Sequence[Example], shots=(), template: int | None = None
) -> list[Encoded]:
    """With data.calibrate, the prompt with every input field content-free, same phrasing and demos (else none)."""
    if not cfg.data.calibrate or task.kind != "classification" or not train:
        return []
    examples = [
        Example(f"content-free-{i}", {k: text for k in train[0].inputs}, train[0].target, train[0].references)
        for i, text in enumerate(CONTENT_FREE)
    ]
    return encode_split(cfg, task, fmt, examples, shots, template)


def sample_train(parts: list[Part], fmt: PromptFormat, max_length: int, seed: int) -> tuple[list[Encoded], dict]:
    """The mixed, encoded training set and how many examples each task contributed."""
    rng = random.Random(seed)
    total = sum(len(p.splits["train"]) for p in parts)
    weights = sum(p.entry.weight for p in parts)
    out: list[Encoded] = []
    counts = {}
    for p in parts:
        n = round(total * p.entry.weight / weights)
        picks: list[Example] = []
        while len(picks) < n and p.splits["train"]:  # whole shuffled passes: every example before any repeats
            picks += rng.sample(p.splits["train"], len(p.splits["train"]))
        for ex in picks[:n]:
            item = encode(p.task, ex, fmt, max_length, rng.choice(p.entry.templates))
            out.append(dataclasses.replace(item, id=f"{p.key}:{ex.id}"))
        counts[p.key] = min(n, len(picks))
    return out, counts
