"""PubMedQA (PQA-L): answer a biomedical research question yes / no / maybe from the abstract's context.

Reads the dataset's original JSON, `{pmid: {QUESTION, CONTEXTS, final_decision, LONG_ANSWER, ...}}`. The model is
scored by comparing its likelihood of each label word right after the prompt, in one forward pass: free generation
would have to be parsed, and small models wander. `pubmedqa-binary` drops the "maybe" items. `pubmedqa-explain`
trains on the answer word followed by LONG_ANSWER, the abstract's conclusion, as an auxiliary target; the prompt and
the scoring stay those of `pubmedqa`, so the conclusion is never an input.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from peftlab.core.errors import data_error
from peftlab.data.metrics import classification_metrics
from peftlab.data.tasks.base import Example, Task, Template, read_json, require_text

LABELS = ("yes", "no", "maybe")

TEMPLATES = (
    Template(
        "Answer the question with yes, no or maybe.",
        "Context: {context}\n\nQuestion: {question}\n\n{instruction}",
    ),
    Template(
        "Based on the abstract, is the answer yes, no or maybe?",
        "Abstract: {context}\n\n{question}\n{instruction}",
    ),
    Template(
        "Reply with one word: yes, no or maybe.",
        "Read this research summary and answer the question.\n\n{context}\n\nQuestion: {question}\n{instruction}",
    ),
)


def load(path: Path, labels: tuple[str, ...] = LABELS, labelled: bool = True) -> list[Example]:
    """Read PubMedQA's original JSON; items whose label is not in `labels` are dropped only for the binary variant.

    `labelled=False` reads questions to predict: `final_decision` may be missing, and every item is kept.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise data_error(path, None, None, "expected an object {pmid: item} (PubMedQA's original format)")
    examples = []
    for pmid, item in data.items():
        where = f"item {pmid}"
        if not isinstance(item, dict):
            raise data_error(path, None, where, "expected an object")
        decision = item.get("final_decision")
        if decision is None and not labelled:
            decision = ""
        elif decision is None:
            raise data_error(path, None, f"{pmid}.final_decision", "missing")
        elif decision not in LABELS:
            raise data_error(
                path, None, f"{pmid}.final_decision", f"unknown label {decision!r}; valid: {', '.join(LABELS)}"
            )
        if labelled and decision not in labels:
            continue
        question = require_text(path, None, item, "QUESTION", f"{pmid}.QUESTION")
        context = require_text(path, None, item, "CONTEXTS", f"{pmid}.CONTEXTS")  # a list of paragraphs, joined
        contexts = item["CONTEXTS"] if isinstance(item["CONTEXTS"], list) else [item["CONTEXTS"]]
        long_answer = item.get("LONG_ANSWER") or ""
        if not isinstance(long_answer, str):
            raise data_error(path, None, f"{pmid}.LONG_ANSWER", "expected text")
        examples.append(
            Example(
                id=str(pmid),
                inputs={"question": question.strip(), "context": context.strip()},
                target=decision,
                references=(decision,) if decision else (),
                extra={"long_answer": long_answer, "contexts": contexts},
                source=f"{path}: item {pmid}",
            )
        )
    return examples


def _score(labels: tuple[str, ...], predictions, references) -> dict:
    return classification_metrics(predictions, [r[0] for r in references], labels)


def explained(example: Example) -> str:
    """The answer word, then the abstract's conclusion: "no. The effect was not significant ..."."""
    conclusion = example.extra.get("long_answer", "").strip()
    return f"{example.target}. {conclusion}" if conclusion else example.target


def make_task(name: str = "pubmedqa", labels: tuple[str, ...] = LABELS, explain: bool = False) -> Task:
    return Task(
        name=name,
        kind="classification",
        load=partial(load, labels=labels),
        templates=TEMPLATES,
        score=partial(_score, labels),
        primary_metric="accuracy",
        labels=labels,
        context_field="context",
        max_new_tokens=2,
        description="PubMedQA PQA-L, " + "/".join(labels) + ", label-word scoring"
        + (", trained on the answer and the abstract's conclusion" if explain else ""),
        train_target=explained if explain else None,
        load_unlabelled=partial(load, labels=labels, labelled=False),
    )
