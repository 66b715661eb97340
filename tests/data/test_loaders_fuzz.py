"""Property tests of every data loader: a file either loads into the texts it holds, or fails with one
`PeftlabError` that names the file, the row and the field. Never another exception, and never a silent coercion of a
number, object or null into prompt text.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import get_task

# How many examples, and whether they are drawn at random, is the profile's (tests/conftest.py: ci or dev).
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow])

TEXT = st.text(min_size=0, max_size=40)  # any Unicode, empty and whitespace-only included
HUGE = st.builds(lambda n: "word " * n, st.integers(10_000, 30_000))
NOT_TEXT = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.dictionaries(TEXT, TEXT, max_size=2),
    st.lists(st.integers(), min_size=1, max_size=3), st.just([]),
)
VALUE = st.one_of(TEXT, HUGE, NOT_TEXT, st.lists(TEXT, min_size=1, max_size=3))
MISSING = object()  # the field is left out of the row
FIELD = st.one_of(VALUE, st.just(MISSING))


def _is_text(value) -> bool:
    """What a loader may accept as prompt text: a non-blank string, or a non-empty list of strings with text."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value) and bool(
        " ".join(v.strip() for v in value).strip()
    )


def _bad_id(value) -> bool:
    """An id a loader must refuse: present, not empty, and neither text nor an integer."""
    if value is MISSING or value is None or value == "":
        return False
    return isinstance(value, bool) or not isinstance(value, str | int)


def _as_text(value) -> str:
    return value.strip() if isinstance(value, str) else " ".join(v.strip() for v in value).strip()


# One folder for the whole module, each example overwriting the last one's file: a folder per example left
# thousands of folders in the system temp folder after a 2,000-example run.
SCRATCH = Path(tempfile.mkdtemp(prefix="peftlab-fuzz-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)


def _write(rows: list[str], bom: bool, crlf: bool, suffix: str) -> Path:
    end = "\r\n" if crlf else "\n"
    data = ("\ufeff" if bom else "") + end.join(rows) + end
    path = SCRATCH / f"data{suffix}"
    path.write_text(data, encoding="utf-8", newline="")
    return path


def _row(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not MISSING}


def _check_error(err: PeftlabError, path: Path) -> None:
    message = str(err)
    assert str(path) in message and "\n" not in message, message
    assert "field '" in message or "malformed JSON" in message or "no examples" in message, message


def _references(row: dict) -> list:
    """A DialogSum row's reference values in the loader's order: `summary`, then `summary1..N` by number."""
    return [row[k] for k in ("summary", "summary2") if row[k] is not MISSING]


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"dialogue": FIELD, "summary": FIELD, "summary2": FIELD, "fname": FIELD}),
                     min_size=1, max_size=4),
       bom=st.booleans(), crlf=st.booleans())
# Issue 39: a row with `summary` and `summary2` kept only `summary`, so max-over-references scores missed one.
@example(rows=[{"dialogue": "hi", "summary": "a", "summary2": "b", "fname": MISSING}], bom=False, crlf=False)
def test_dialogsum_loads_texts_or_names_the_row_and_field(rows, bom, crlf):
    path = _write([json.dumps(_row(r)) for r in rows], bom, crlf, ".jsonl")
    try:
        examples = get_task("dialogsum").load(path)
    except PeftlabError as err:
        _check_error(err, path)
        assert any(not _is_text(r["dialogue"]) or not _references(r) or not all(map(_is_text, _references(r)))
                   or _bad_id(r["fname"]) for r in rows), str(err)
        return
    assert len(examples) == len(rows)
    for ex, r in zip(examples, rows, strict=True):
        refs = [_as_text(v) for v in _references(r)]
        assert _is_text(r["dialogue"]) and refs and all(map(_is_text, _references(r)))
        assert ex.inputs["dialogue"] == _as_text(r["dialogue"])
        assert list(ex.references) == refs and ex.target == refs[0]  # every reference counts; the first trains


@FUZZ
@given(items=st.lists(st.fixed_dictionaries({"QUESTION": FIELD, "CONTEXTS": FIELD, "LONG_ANSWER": FIELD,
                                             "final_decision": st.one_of(st.sampled_from(["yes", "no", "maybe"]),
                                                                         VALUE, st.just(MISSING))}),
                      min_size=1, max_size=4),
       bom=st.booleans())
# A fresh clone's CI drew this and failed: a QUESTION given as a list of strings is joined, as CONTEXTS are.
@example(items=[{"QUESTION": ["0"], "CONTEXTS": "0", "LONG_ANSWER": "", "final_decision": "yes"}], bom=False)
# The dev profile found this one: a label holding a line break made a two-line error.
@example(items=[{"QUESTION": None, "CONTEXTS": [], "LONG_ANSWER": [], "final_decision": "\n"}], bom=False)
def test_pubmedqa_loads_texts_or_names_the_item_and_field(items, bom):
    path = _write([json.dumps({str(i): _row(item) for i, item in enumerate(items)})], bom, False, ".json")
    try:
        examples = get_task("pubmedqa").load(path)
    except PeftlabError as err:
        _check_error(err, path)
        return
    assert len(examples) == len(items)
    for ex, item in zip(examples, items, strict=True):
        assert _is_text(item["QUESTION"]) and _is_text(item["CONTEXTS"])
        assert item["final_decision"] in ("yes", "no", "maybe")
        assert ex.inputs["question"] == _as_text(item["QUESTION"])
        assert ex.inputs["context"] == _as_text(item["CONTEXTS"])


SPLIT = st.one_of(st.sampled_from(["train", "val", "test", "Test", "dev", ""]), NOT_TEXT, st.just(MISSING))


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"instruction": FIELD, "output": FIELD, "split": SPLIT}), min_size=1,
                     max_size=4),
       bom=st.booleans(), crlf=st.booleans())
def test_custom_task_loads_texts_and_exact_splits_or_names_the_field(rows, bom, crlf):
    spec = SCRATCH / "task.yaml"
    spec.write_text("name: fuzz\ninputs: [instruction]\ntarget: output\ntemplate: '{instruction}'\n")
    path = _write([json.dumps(_row(r)) for r in rows], bom, crlf, ".jsonl")
    try:
        examples = get_task(str(spec)).load(path)
    except PeftlabError as err:
        _check_error(err, path)
        return
    for ex, r in zip(examples, rows, strict=True):
        assert _is_text(r["instruction"]) and _is_text(r["output"])
        assert r["split"] in (MISSING, None, "train", "val", "test")  # "Test" and "dev" are refused, not re-split
        assert ex.split == (None if r["split"] is MISSING else r["split"])
        # An input named `instruction` renders as the example's own text (it used to crash str.format).
        assert get_task(str(spec)).template(0).render(ex.inputs) == ex.inputs["instruction"]


@FUZZ
@given(lines=st.lists(st.one_of(TEXT, st.just("{"), st.just("[1, 2]"), st.just("null")), min_size=1, max_size=4))
def test_malformed_lines_name_the_line(lines):
    path = _write(lines, False, False, ".jsonl")
    try:
        get_task("dialogsum").load(path)
    except PeftlabError as err:
        message = str(err)
        assert message.startswith(f"{path}:") and "\n" not in message, message
