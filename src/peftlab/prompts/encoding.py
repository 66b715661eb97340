"""From examples to token ids: the prompt format a model gets, truncation that never cuts the target, few-shot
demos, calibration prompts, and a mixture's sampled training set.

Every stage (training, evaluation, serving) encodes through here, so a prompt is the same text wherever it is used.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from peftlab.core.config import DataConfig
from peftlab.core.errors import PeftlabError
from peftlab.data.mixture import Part
from peftlab.data.tasks import Example, Task
from peftlab.models.hf_folder import LoadedModel
from peftlab.prompts.format import Encoded, PromptFormat
from peftlab.prompts.vision_prompts import VisionPromptFormat


def format_for(loaded: LoadedModel) -> PromptFormat:
    """The prompt format of a loaded model: a `VisionPromptFormat` when it has a processor (a VLM)."""
    if loaded.processor is not None:
        return VisionPromptFormat.of(loaded)
    return PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)


# A token covers at most this many characters on average in any tokenizer peftlab has met (long runs of spaces in
# code vocabularies come closest); `clip_text` grows its window when a text beats it, so it is a speed bound only.
CHARS_PER_TOKEN = 32


class TooLong(PeftlabError):
    """A row that does not fit max_length even cut: what is never cut (the target, the question) is over.

    A training split drops such rows under `data.too_long: cut` (`encode_train`); anywhere else it is an error.
    """


def row_name(example: Example) -> str:
    """How an error names a row: its file and line when known, else its id."""
    return example.source or f"example {example.id}"


def clip_text(tokenizer, text: str, tokens: int, keep_end: bool = False) -> str:
    """The start (or with `keep_end` the end) of `text`, long enough to hold more than `tokens` tokens; the whole
    text when it is shorter.

    Tokenizing a 100 MB row only to keep its first 512 tokens took 13.7 GB and 204 s: a window of `tokens *
    CHARS_PER_TOKEN` characters is enough, and it grows only if its tokens fall short. The window's cut edge may
    split a word, but more tokens than are kept lie before it, so the edge is always cut away again.
    """
    size = tokens * CHARS_PER_TOKEN
    while size < len(text):
        window = text[-size:] if keep_end else text[:size]
        if len(tokenizer(window, add_special_tokens=False).input_ids) > tokens:
            return window
        size *= 4
    return text


def encode(
    task: Task,
    example: Example,
    fmt: PromptFormat,
    max_length: int,
    template: int = 0,
    shots: Sequence[tuple[str, str]] = (),
    target: str | None = None,
    too_long: str = "cut",
) -> Encoded:
    """Encode one example; if it is too long, cut the task's context field, never the question or the target.

    A chat example loses its oldest turns first (`too_long="error"`: a conversation over max_length is an error).
    A row that cannot fit even cut raises `TooLong` (with `too_long="error"`, a plain `PeftlabError`).
    """
    tpl = task.template(template)
    if target is None:
        target = task.train_target(example) if task.train_target else example.target
    fail = TooLong if too_long == "cut" else PeftlabError
    if clip_text(fmt.tokenizer, target, max_length) != target:
        raise fail(f"{row_name(example)}: the target alone is over data.max_length {max_length} tokens")
    target_ids = fmt.target_ids(target)
    if example.messages is not None:  # a chat example: its turns through the chat template
        return _encode_chat(example, fmt, max_length, shots, target_ids, too_long)
    inputs = dict(example.inputs)
    for key, text in inputs.items():  # bounded before any tokenizing, so memory does not grow with the row
        inputs[key] = clip_text(fmt.tokenizer, text, max_length)
        if key != task.context_field and inputs[key] != text:
            raise fail(f"{row_name(example)}: field '{key}' alone is over data.max_length {max_length} tokens, and "
                       f"only the {task.context_field or 'context'} is ever cut")
    return _encode_cut_context(task, example, fmt, max_length, tpl, shots, target_ids, inputs, fail)


def _encode_cut_context(task, example, fmt, max_length, tpl, shots, target_ids, inputs, fail) -> Encoded:
    """The prompt with its context field (already clipped to a window) cut at its end until it all fits."""
    clipped = inputs.get(task.context_field) != example.inputs.get(task.context_field)
    ids, media = fmt.encode_prompt(tpl.render(inputs), shots, example.image)
    over = len(ids) + len(target_ids) - max_length
    if over <= 0:
        return Encoded(example.id, ids, target_ids, truncated=int(clipped), media=media)
    if task.context_field is None:
        raise fail(f"{row_name(example)}: {len(ids) + len(target_ids)} tokens exceed data.max_length {max_length}")
    context = fmt.tokenizer(inputs[task.context_field], add_special_tokens=False).input_ids
    keep = len(context)
    for _ in range(4):  # re-tokenising at the cut can shift a token or two, so tighten until it fits
        keep = max(keep - over, 0)
        inputs[task.context_field] = fmt.tokenizer.decode(context[:keep])
        ids, media = fmt.encode_prompt(tpl.render(inputs), shots, example.image)
        over = len(ids) + len(target_ids) - max_length
        if over <= 0:
            return Encoded(example.id, ids, target_ids, truncated=len(context) - keep, media=media)
    raise fail(
        f"{row_name(example)}: the prompt without its {task.context_field} is already "
        f"{len(ids) + len(target_ids)} tokens, over data.max_length {max_length}"
    )


def _encode_chat(example, fmt, max_length, shots, target_ids, too_long) -> Encoded:
    """A conversation cut from its oldest end until it fits: whole turns first (the kept part starts on a user
    turn), then the system turn, then the start of the last turn's text.

    The system turn outlives the older exchanges: it sets the rules every answer follows and is short. It goes
    before the last question is cut, because the answer answers that question.
    """
    turns = [{**t, "content": clip_text(fmt.tokenizer, t["content"], max_length, keep_end=True)}
             for t in example.messages]
    clipped = any(t["content"] != m["content"] for t, m in zip(turns, example.messages, strict=True))
    ids, media = fmt.encode_messages(turns, shots)
    full = len(ids)
    if full + len(target_ids) <= max_length and not clipped:
        return Encoded(example.id, ids, target_ids, media=media)
    if too_long == "error":
        size = f"more than {full + len(target_ids)}" if clipped else str(full + len(target_ids))
        raise PeftlabError(f"{row_name(example)}: the conversation is {size} tokens, over data.max_length "
                           f"{max_length}; raise it, or set data.too_long: cut")
    budget = max_length - len(target_ids)
    system = turns[:1] if turns[0]["role"] == "system" and len(turns) > 1 else []
    rest = turns[len(system):]
    starts = [i for i, t in enumerate(rest) if t["role"] == "user" or i == len(rest) - 1]
    lo, hi = 0, len(starts) - 1  # the fewest turns dropped that fit, by bisection: fewer turns, fewer tokens
    while lo < hi:
        mid = (lo + hi) // 2
        fits = len(fmt.encode_messages(system + rest[starts[mid]:], shots)[0]) <= budget
        lo, hi = (lo, mid) if fits else (mid + 1, hi)
    ids, media = fmt.encode_messages(system + rest[starts[lo]:], shots)
    if len(ids) > budget:
        ids, media = _cut_last_turn(example, fmt, rest[-1], shots, budget, len(target_ids), max_length)
    return Encoded(example.id, ids, target_ids, truncated=max(full - len(ids), 1), media=media)


def _cut_last_turn(example, fmt, turn, shots, budget, target_len, max_length):
    """(ids, media) of the last turn alone, the start of its text cut until it fits `budget` tokens."""
    content = fmt.tokenizer(turn["content"], add_special_tokens=False).input_ids
    keep = len(content)
    for _ in range(5):  # as for a context: re-tokenising at the cut can shift a token, so tighten until it fits
        text = fmt.tokenizer.decode(content[len(content) - keep:]) if keep else ""
        ids, media = fmt.encode_messages([{**turn, "content": text}], shots)
        if len(ids) <= budget:
            return ids, media
        if not keep:
            break
        keep = max(keep - (len(ids) - budget), 0)
    ids, _ = fmt.encode_messages([{**turn, "content": ""}], shots)
    raise TooLong(f"{row_name(example)}: the answer alone is {len(ids) + target_len} tokens with the chat framing, "
                  f"over data.max_length {max_length}")


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
            # maxsplit: a huge context is not split into millions of words only to keep the first few
            words = inputs[task.context_field].split(maxsplit=max_words)
            inputs[task.context_field] = " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")
        demos.append((task.template(template).render(inputs), ex.target))
    return demos


def encode_split(
    data: DataConfig, task: Task, fmt: PromptFormat, examples: Sequence[Example], shots=(), template: int | None = None
) -> list[Encoded]:
    """Encode a split with the run's max_length and `template` (default: `data.template`)."""
    template = data.template if template is None else template
    return [encode(task, ex, fmt, data.max_length, template, shots, too_long=data.too_long) for ex in examples]


def encode_train(data: DataConfig, task: Task, fmt: PromptFormat, examples: Sequence[Example]
                 ) -> tuple[list[Encoded], list[Example]]:
    """The training split encoded, and the examples behind the items. Under `data.too_long: cut` a row that does
    not fit even cut (`TooLong`) is left out: one such row in thousands should not stop the run. The caller counts
    them (`len(examples)` less the kept)."""
    items, kept = [], []
    for ex in examples:
        try:
            items.append(encode(task, ex, fmt, data.max_length, data.template, too_long=data.too_long))
        except TooLong:
            continue
        kept.append(ex)
    return items, kept


CONTENT_FREE = ("N/A", "[MASK]", "")  # Zhao et al.'s content-free inputs


def content_free_items(
    data: DataConfig, task: Task, fmt: PromptFormat, train: Sequence[Example], shots=(), template: int | None = None
) -> list[Encoded]:
    """With data.calibrate, the prompt with every input field content-free, same phrasing and demos (else none)."""
    if not data.calibrate or task.kind != "classification" or not train:
        return []
    examples = [
        Example(f"content-free-{i}", {k: text for k in train[0].inputs}, train[0].target, train[0].references)
        for i, text in enumerate(CONTENT_FREE)
    ]
    return encode_split(data, task, fmt, examples, shots, template)


def sample_train(parts: list[Part], fmt: PromptFormat, max_length: int, seed: int, too_long: str = "cut"
                 ) -> tuple[list[Encoded], dict]:
    """The mixed, encoded training set and how many examples were drawn from each task.

    A draw that does not fit even cut (`TooLong`) is left out under `too_long="cut"`, so the set can hold fewer
    items than the counts add up to.
    """
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
            try:
                item = encode(p.task, ex, fmt, max_length, rng.choice(p.entry.templates), too_long=too_long)
            except TooLong:
                continue
            out.append(dataclasses.replace(item, id=f"{p.key}:{ex.id}"))
        counts[p.key] = min(n, len(picks))
    return out, counts
