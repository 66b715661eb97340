"""DialogSum: summarise a two-person dialogue in a sentence or two.

Reads JSONL with `dialogue` and `summary`, or several references `summary1..summaryN` (the test split has 3), or
both: every reference field counts, `summary` first, and the first reference is the training target. Scored with
ROUGE against the first reference and as the max over references, plus sacreBLEU and output length.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from peftlab.core.errors import data_error
from peftlab.data.metrics import generation_metrics
from peftlab.data.tasks.base import Example, Task, Template, optional_id, read_jsonl, require_text

TEMPLATES = (
    Template("Summarize the dialogue in one or two sentences.", "{dialogue}\n\n{instruction}"),
    Template(
        "Write a short third-person summary of this conversation, naming the speakers #Person1# and #Person2#.",
        "{instruction}\n\n{dialogue}",
    ),
    Template("What happened in this conversation? Answer briefly.", "Dialogue:\n{dialogue}\n\n{instruction}"),
)

_NUMBERED = re.compile(r"^summary(\d+)$")


def _reference_keys(obj: dict) -> list[str]:
    """The row's reference fields in order: `summary`, then `summary1..summaryN` by number.

    A row may hold both (the dev split's `summary` beside added `summary2`, `summary3`): every one is a reference,
    or the max-over-references scores would miss the ones left out.
    """
    numbered = sorted((int(m.group(1)), k) for k in obj if (m := _NUMBERED.match(k)))
    return (["summary"] if "summary" in obj else []) + [k for _, k in numbered]


def _references(path: Path, lineno: int, obj: dict) -> tuple[str, ...]:
    keys = _reference_keys(obj)
    if not keys:
        raise data_error(path, lineno, "summary", "missing (expected 'summary' or 'summary1..summaryN')")
    return tuple(require_text(path, lineno, obj, key).strip() for key in keys)


def load(path: Path, labelled: bool = True) -> list[Example]:
    """Read DialogSum JSONL; ids come from `fname` (or `id`), else the line number. The first reference trains.

    `labelled=False` reads dialogues to summarise: the summaries may be missing.
    """
    examples = []
    for lineno, obj in read_jsonl(path):
        refs = _references(path, lineno, obj) if labelled or _reference_keys(obj) else ("",)
        examples.append(
            Example(
                id=optional_id(path, lineno, obj, ("fname", "id"), f"line{lineno}"),
                inputs={"dialogue": require_text(path, lineno, obj, "dialogue").strip()},
                target=refs[0],
                references=refs if refs[0] else (),
                extra={"topic": obj.get("topic")},
                source=f"{path}:{lineno}",
            )
        )
    return examples


def make_task() -> Task:
    return Task(
        name="dialogsum",
        kind="generation",
        load=load,
        templates=TEMPLATES,
        score=generation_metrics,
        primary_metric="rouge1",
        context_field="dialogue",
        max_new_tokens=60,
        description="DialogSum dialogue summarisation, ROUGE/BLEU",
        load_unlabelled=partial(load, labelled=False),
    )
