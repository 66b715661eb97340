"""Tasks: the shipped files load, splits are deterministic and stratified, custom YAML tasks, and data errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from builders import DIALOGSUM, PUBMEDQA

from peftlab.core.errors import PeftlabError
from peftlab.data.splits import kfold_examples, split_examples
from peftlab.data.tasks import Example, get_task

# ---- shipped tasks ----


def test_pubmedqa_loads_shipped_file():
    task = get_task("pubmedqa")
    examples = task.load(PUBMEDQA)
    assert len(examples) == 500
    assert {ex.target for ex in examples} == {"yes", "no", "maybe"}
    assert task.kind == "classification" and task.labels == ("yes", "no", "maybe")
    ex = examples[0]
    assert ex.inputs["question"] and ex.inputs["context"] and ex.references == (ex.target,)
    assert len({ex.id for ex in examples}) == 500


def test_pubmedqa_binary_drops_maybe():
    full = get_task("pubmedqa").load(PUBMEDQA)
    binary = get_task("pubmedqa-binary").load(PUBMEDQA)
    assert {ex.target for ex in binary} == {"yes", "no"}
    assert len(binary) == sum(ex.target != "maybe" for ex in full) < 500


def test_pubmedqa_explain_trains_on_the_answer_then_the_conclusion():
    plain, explain = get_task("pubmedqa"), get_task("pubmedqa-explain")
    examples = explain.load(PUBMEDQA)
    assert examples == plain.load(PUBMEDQA)  # same questions, labels and folds; only the training text differs
    ex = examples[0]
    assert explain.train_target(ex) == f"{ex.target}. {ex.extra['long_answer']}" and ex.extra["long_answer"]
    assert plain.train_target is None and explain.labels == plain.labels and explain.templates == plain.templates
    assert explain.train_target(Example("x", {}, "no", ("no",), extra={"long_answer": " "})) == "no"


def test_dialogsum_single_summary():
    examples = get_task("dialogsum").load(DIALOGSUM)
    assert len(examples) == 500
    assert all(len(ex.references) == 1 and ex.target == ex.references[0] for ex in examples)
    assert examples[0].id == "dev_0" and "#Person1#" in examples[0].inputs["dialogue"]


def test_dialogsum_multi_reference(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [{"fname": f"t{i}", "dialogue": f"#Person1#: hi {i}", "summary1": "a", "summary2": "b", "summary3": "c"}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = get_task("dialogsum").load(path)
    assert [ex.references for ex in examples] == [("a", "b", "c")] * 3
    assert examples[0].target == "a"


def test_unknown_task_lists_valid():
    with pytest.raises(PeftlabError, match="pubmedqa"):
        get_task("nosuch")


# ---- splits ----


def _fake(n_per_label: dict[str, int]) -> list[Example]:
    return [
        Example(id=f"{label}{i}", inputs={"x": "t"}, target=label, references=(label,))
        for label, n in n_per_label.items()
        for i in range(n)
    ]


def test_split_is_80_10_10_and_deterministic():
    examples = get_task("pubmedqa").load(PUBMEDQA)
    a = split_examples(examples, seed=0)
    b = split_examples(list(reversed(examples)), seed=0)  # input order must not matter
    # Rounding happens per class (to keep each class's ratio), so split sizes may be off by one.
    for name, size in (("train", 400), ("val", 50), ("test", 50)):
        assert abs(len(a[name]) - size) <= 1, (name, len(a[name]))
    assert {s: [e.id for e in v] for s, v in a.items()} == {s: [e.id for e in v] for s, v in b.items()}
    ids = [e.id for v in a.values() for e in v]
    assert len(ids) == len(set(ids)) == 500
    c = split_examples(examples, seed=1)
    assert [e.id for e in c["test"]] != [e.id for e in a["test"]]


def test_split_is_stratified():
    examples = get_task("pubmedqa").load(PUBMEDQA)
    totals = Counter(e.target for e in examples)
    splits = split_examples(examples, seed=3)
    for name, frac in zip(("train", "val", "test"), (0.8, 0.1, 0.1), strict=True):
        counts = Counter(e.target for e in splits[name])
        for label, total in totals.items():
            assert abs(counts[label] - total * frac) <= 1, (name, label, counts)


def test_split_stratifies_a_small_rare_class():
    splits = split_examples(_fake({"yes": 30, "no": 20, "maybe": 10}), seed=0)
    for name in ("val", "test"):
        assert Counter(e.target for e in splits[name]) == {"yes": 3, "no": 2, "maybe": 1}


def test_split_keeps_assigned_splits():
    examples = [Example("a", {"x": "t"}, "yes", ("yes",), split="test")] + _fake({"yes": 10})
    splits = split_examples(examples)
    assert "a" in [e.id for e in splits["test"]]


def test_kfold_covers_every_example_once_as_test():
    examples = _fake({"yes": 12, "no": 8})
    tests = [e.id for fold in range(4) for e in kfold_examples(examples, 4, fold)["test"]]
    assert sorted(tests) == sorted(e.id for e in examples)
    split = kfold_examples(examples, 4, 0)
    assert not {e.id for e in split["train"]} & {e.id for e in split["test"] + split["val"]}


# ---- custom YAML tasks ----


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sentiment(tmp_path):
    data = _write_jsonl(tmp_path / "reviews.jsonl", [
        {"id": "r1", "review": "great", "label": "positive"},
        {"id": "r2", "review": "awful", "label": "negative"},
    ])
    spec = tmp_path / "sentiment.yaml"
    spec.write_text(
        "name: sentiment\ninputs: [review]\ntarget: label\n"
        'template: "Review: {review}\\nPositive or negative?"\nmetric: accuracy\nlabels: [positive, negative]\n'
    )
    return spec, data


def test_custom_classification_task(sentiment):
    spec, data = sentiment
    task = get_task(str(spec))
    assert task.kind == "classification" and task.labels == ("positive", "negative")
    examples = task.load(data)
    assert [(e.id, e.target) for e in examples] == [("r1", "positive"), ("r2", "negative")]
    assert task.templates[0].render(examples[0].inputs) == "Review: great\nPositive or negative?"
    assert task.score(["positive", "positive"], [("positive",), ("negative",)])["accuracy"] == 0.5


def test_custom_generation_task(tmp_path):
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": "a long text", "headline": "short"}])
    spec = tmp_path / "headline.yaml"
    spec.write_text(
        'name: headline\ninputs: [text]\ntarget: headline\ntemplate: "{text}\\nHeadline:"\nmetric: rouge\n'
    )
    task = get_task(str(spec))
    assert task.kind == "generation" and task.primary_metric == "rouge1" and task.context_field == "text"
    (ex,) = task.load(data)
    assert ex.target == "short" and ex.id == "line1"


def test_custom_task_unknown_key(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text('name: x\ninputs: [a]\ntarget: b\ntemplate: "{a}"\nmetrc: rouge\n')
    with pytest.raises(PeftlabError, match="metrc") as err:
        get_task(str(spec))
    assert "bad.yaml" in str(err.value)


def test_custom_task_template_placeholder_must_be_an_input(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text('name: x\ninputs: [a]\ntarget: b\ntemplate: "{c}"\n')
    with pytest.raises(PeftlabError, match="'c'"):
        get_task(str(spec))


# ---- data errors name file, line and field ----


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"dialogue": "a", "summary": "b"}\n{"dialogue": "a", \n')
    with pytest.raises(PeftlabError, match=rf"{path}:2: malformed JSON"):
        get_task("dialogsum").load(path)


def test_missing_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "a", "summary": "b"}, {"summary": "b"}])
    with pytest.raises(PeftlabError, match=rf"{path}:2: field 'dialogue': missing"):
        get_task("dialogsum").load(path)


def test_empty_text(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "   ", "summary": "b"}])
    with pytest.raises(PeftlabError, match=rf"{path}:1: field 'dialogue': empty text"):
        get_task("dialogsum").load(path)


def test_unknown_label_in_custom_task(sentiment, tmp_path):
    spec, _ = sentiment
    rows = [{"review": "ok", "label": "positive"}, {"review": "x", "label": "meh"}]
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PeftlabError, match=rf"{data}:2: field 'label': unknown label 'meh'"):
        get_task(str(spec)).load(data)


def test_unknown_label_in_pubmedqa(tmp_path):
    items = dict(list(json.loads(PUBMEDQA.read_text()).items())[:2])
    pmid = next(iter(items))
    items[pmid]["final_decision"] = "perhaps"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(items))
    with pytest.raises(PeftlabError, match=rf"{path}: field '{pmid}.final_decision': unknown label 'perhaps'"):
        get_task("pubmedqa").load(path)


def test_malformed_pubmedqa_json_names_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{\n  "1": {\n    "QUESTION": "q",\n  }\n}\n')
    with pytest.raises(PeftlabError, match=rf"{path}:4: malformed JSON"):
        get_task("pubmedqa").load(path)
