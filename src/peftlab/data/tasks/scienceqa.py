"""ScienceQA: multiple-choice science questions, many with an image, each with a lecture and an explanation.

Reads ScienceQA's own `problems.json` (`{pid: {question, choices, answer, hint, image, lecture, solution, split}}`,
images at `images/<split>/<pid>/<image>`), or JSONL with the same fields plus an `id`, so the real files load
unchanged. Two targets: `scienceqa` trains on the answer letter, `scienceqa-explain` on "The answer is B." followed
by the explanation (ScienceQA's `solution`; a teacher's explanations come in through `data.target` as for any task).

Both are generation tasks. The answer is parsed from the free text ("B", "(B)", "The answer is B", or the option's
own words), because a model that explains first still answers. Scores: accuracy, accuracy on the questions with and
without an image, the fraction of outputs an answer could be read from, and, for the explain target, ROUGE-L of the
explanation against the reference solution.
"""

from __future__ import annotations

import re
import string
from functools import partial
from pathlib import Path

from peftlab.core.errors import data_error
from peftlab.data.metrics import rouge_metrics
from peftlab.data.tasks.base import Example, Task, Template, read_json, read_jsonl, require_split

LETTERS = string.ascii_uppercase

TEMPLATES = (
    Template(
        "Answer with the option's letter.",
        "Question: {question}\nContext: {context}\nOptions:\n{options}\n{instruction}",
    ),
    Template("Choose the correct option and reply with its letter only.", "{context}\n\n{question}\n{options}\n\n"
             "{instruction}"),
)
EXPLAIN_TEMPLATES = (
    Template(
        "Answer with the option's letter, then explain why.",
        "Question: {question}\nContext: {context}\nOptions:\n{options}\n{instruction}",
    ),
    Template("Pick the correct option, say its letter, and explain the reasoning.", "{context}\n\n{question}\n"
             "{options}\n\n{instruction}"),
)


class Reference(str):
    """A reference text that also knows the question's answer letter, options, image and solution.

    `Task.score` receives only predictions and references, and the score needs all four, so they ride along on the
    reference string itself; everywhere else (prediction files, ROUGE) it is the plain reference text.
    """

    letter: str
    choices: tuple[str, ...]
    has_image: bool
    solution: str

    def __new__(cls, text: str, letter: str, choices: tuple[str, ...], has_image: bool, solution: str) -> Reference:
        ref = super().__new__(cls, text)
        ref.letter, ref.choices, ref.has_image, ref.solution = letter, choices, has_image, solution
        return ref


def answer_target(letter: str, solution: str, explain: bool) -> str:
    """The training target: the letter alone, or the answer sentence followed by the explanation."""
    if not explain:
        return letter
    return f"The answer is {letter}. {solution}".strip()


_STATED = re.compile(r"(?i:\banswer(?:\s+is)?)\s*[:\-]?\s*\(?([A-Z])\)?(?![\w'])")
_LEADING = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:[.):,]|\s*$))")


def parse_answer(text: str, choices: tuple[str, ...] = ()) -> str | None:
    """The option letter a free-text answer gives, or None.

    In order: a stated answer ("The answer is (B)", "Answer: B"), a leading letter ("B", "(B) ...", "B. ..."), then
    the option whose words appear first in the text. A bare leading "A" needs punctuation after it, so the article
    in "A cat ..." is not read as an answer.
    """
    valid = set(LETTERS[: len(choices)]) if choices else set(LETTERS)
    for pattern in (_STATED, _LEADING):
        match = pattern.search(text)
        if match:
            letter = next(g for g in match.groups() if g)
            if letter in valid:
                return letter
    found = []
    for i, choice in enumerate(choices):
        hit = re.search(rf"(?<!\w){re.escape(choice.strip())}(?!\w)", text, re.IGNORECASE) if choice.strip() else None
        if hit:
            found.append((hit.start(), -len(choice), LETTERS[i]))
    return min(found)[2] if found else None


def _without_answer(text: str) -> str:
    """The explanation part of an output: the text after a leading "The answer is X." sentence."""
    return re.sub(r"^\s*(?i:the\s+)?(?i:answer)(?:\s+is)?\s*[:\-]?\s*\(?[A-Z]\)?[.:]?\s*", "", text)


def score(explain: bool, predictions, references) -> dict:
    """Answer accuracy (overall, with image, without image), parse rate, and ROUGE-L of the explanation."""
    refs = [r[0] for r in references]
    picked = [parse_answer(p, getattr(r, "choices", ())) for p, r in zip(predictions, refs, strict=True)]
    gold = [getattr(r, "letter", None) or parse_answer(r) for r in refs]
    correct = [float(p is not None and p == g) for p, g in zip(picked, gold, strict=True)]
    metrics = {"accuracy": sum(correct) / len(correct), "parsed": sum(p is not None for p in picked) / len(picked)}
    for key, flag in (("accuracy_image", True), ("accuracy_no_image", False)):
        group = [c for c, r in zip(correct, refs, strict=True) if getattr(r, "has_image", None) is flag]
        if group:  # a split without such questions has no such score, rather than a misleading 0
            metrics[key] = sum(group) / len(group)
    if explain:
        pairs = [(_without_answer(p), r.solution) for p, r in zip(predictions, refs, strict=True)
                 if getattr(r, "solution", "")]
        if pairs:
            metrics["explanation_rougeL"] = rouge_metrics([p for p, _ in pairs], [[s] for _, s in pairs])["rougeL"]
    return metrics


def _image_path(path: Path, pid: str, item: dict) -> str | None:
    """Where ScienceQA keeps a problem's image: images/<split>/<pid>/<name>, images/<pid>/<name>, or a path."""
    name = item.get("image")
    if not name:
        return None
    root = path.parent
    split = item.get("split") or ""
    for candidate in (root / "images" / split / pid / name, root / "images" / pid / name, root / name):
        if candidate.is_file():
            return str(candidate)
    raise data_error(path, None, f"{pid}.image", f"no image file '{name}' under {root / 'images'}")


def _example(path: Path, line: int | None, pid: str, item: dict, explain: bool) -> Example:
    where = f"{pid}." if line is None else ""  # problems.json has no lines: name the problem instead
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        raise data_error(path, line, f"{where}question", "missing or empty text")
    question = question.strip()
    choices = item.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or not all(
        isinstance(c, str) and c.strip() for c in choices
    ):
        raise data_error(path, line, f"{where}choices", "expected a list of at least 2 non-empty option texts")
    answer = item.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise data_error(path, line, f"{where}answer", f"expected an option index 0..{len(choices) - 1}, got "
                         f"{answer!r}")
    letter, solution = LETTERS[answer], str(item.get("solution") or "").strip()
    image = _image_path(path, pid, item)
    target = answer_target(letter, solution, explain)
    options = "\n".join(f"({LETTERS[i]}) {c.strip()}" for i, c in enumerate(choices))
    return Example(
        id=pid,
        inputs={"question": question, "context": str(item.get("hint") or "").strip() or "none", "options": options},
        target=target,
        references=(Reference(target, letter, tuple(c.strip() for c in choices), image is not None, solution),),
        split=require_split(path, line, item, f"{where}split"),
        extra={k: item.get(k) for k in ("lecture", "solution", "subject", "grade", "skill") if item.get(k)},
        image=image,
    )


def load(path: Path, explain: bool = False) -> list[Example]:
    """Read ScienceQA's problems.json (a dict by problem id) or JSONL records with an `id`."""
    if path.suffix == ".jsonl":
        return [_example(path, n, str(obj.get("id", f"line{n}")), obj, explain) for n, obj in read_jsonl(path)]
    data = read_json(path)
    if not isinstance(data, dict):
        raise data_error(path, None, None, "expected an object {pid: problem} (ScienceQA's problems.json)")
    for pid, item in data.items():
        if not isinstance(item, dict):
            raise data_error(path, None, f"problem {pid}", "expected an object")
    return [_example(path, None, str(pid), item, explain) for pid, item in data.items()]


def make_task(name: str = "scienceqa", explain: bool = False) -> Task:
    return Task(
        name=name,
        kind="generation",
        load=partial(load, explain=explain),
        templates=EXPLAIN_TEMPLATES if explain else TEMPLATES,
        score=partial(score, explain),
        primary_metric="accuracy",
        context_field="context",
        max_new_tokens=128 if explain else 8,
        description="ScienceQA multiple choice, " + ("answer and explanation" if explain else "answer letter"),
    )
