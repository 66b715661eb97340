"""ScienceQA: the loader reads ScienceQA's own layout, the synthetic set's labels are true of its pictures, answers
are parsed from free text, and the scores split by image."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from builders import REPO
from PIL import Image
from trainkit import tiny_cfg, train_losses

from peftlab.core.errors import PeftlabError
from peftlab.core.files import read_json
from peftlab.data.tasks import get_task
from peftlab.data.tasks.scienceqa import Reference, parse_answer
from peftlab.recipes.train_run import run_training

SYNTH = REPO / "data" / "scienceqa-synthetic" / "problems.json"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_set_loads_in_scienceqa_layout():
    examples = get_task("scienceqa").load(SYNTH)
    assert len(examples) == 200
    assert {s: sum(e.split == s for e in examples) for s in ("train", "val", "test")} == {
        "train": 120, "val": 40, "test": 40}
    with_image = [e for e in examples if e.image]
    assert len(with_image) == 140 and all(Path(e.image).is_file() for e in with_image)
    assert all(Path(e.image).parts[-4:] == ("images", e.split, e.id, "image.png") for e in with_image)
    ex = with_image[0]
    ref = ex.references[0]
    assert isinstance(ref, Reference) and ref.has_image and ex.target == ref.letter == ref
    assert "(A) " in ex.inputs["options"] and ex.inputs["context"] == "none"


def _cells(image: Image.Image, rgb: tuple[int, int, int]) -> dict[int, int]:
    """Pixels of one exact colour in each of the 3x3 grid cells."""
    counts: dict[int, int] = {}
    for i, pixel in enumerate(image.getdata()):
        if pixel == rgb:
            x, y = i % 64, i // 64
            cell = min(y // 21, 2) * 3 + min(x // 21, 2)
            counts[cell] = counts.get(cell, 0) + 1
    return counts


def test_synthetic_labels_are_true_of_the_pictures():
    """Recover each answer from the picture's pixels alone: a wrong label or a mis-drawn picture would fail."""
    gen = _script("make_synthetic_scienceqa")
    area = {s: sum(p != (255, 255, 255) for p in gen.draw([("red", s, 0)]).getdata()) for s in gen.SHAPES}
    assert len(set(area.values())) == 3  # the three shapes are told apart by their area
    problems = json.loads(SYNTH.read_text())
    checked = 0
    for pid, p in problems.items():
        if not p["image"]:
            continue
        image = Image.open(SYNTH.parent / "images" / p["split"] / pid / "image.png").convert("RGB")
        words = p["question"].rstrip("?").split()
        answer = p["choices"][p["answer"]]
        if p["skill"] == "count":
            color, shape = words[2], words[3][:-1]
            found = sum(n == area[shape] for n in _cells(image, gen.COLORS[color]).values())
            assert str(found) == answer, (pid, p["question"])
        elif p["skill"] == "color":
            shape = words[-1]
            assert area[shape] in _cells(image, gen.COLORS[answer]).values(), pid
        elif p["skill"] == "shape":
            assert list(_cells(image, gen.COLORS[words[4]]).values()) == [area[answer]], pid
        else:
            first, second = _cells(image, gen.COLORS[words[2]]), _cells(image, gen.COLORS[words[-2]])
            (a,), (b,) = first, second
            relation = {(True, False): "left", (False, False): "right"}.get((a % 3 < b % 3, a % 3 == b % 3))
            relation = relation or ("above" if a < b else "below")
            assert relation == answer, pid
        checked += 1
    assert checked == 140


def _write_release(root: Path) -> Path:
    """Two problems exactly as ScienceQA's release stores them (one with a picture under images/<split>/<pid>/)."""
    (root / "images" / "train" / "4").mkdir(parents=True)
    Image.new("RGB", (40, 30), "blue").save(root / "images" / "train" / "4" / "image.png")
    problems = {
        "4": {"question": "Which figure of speech is used in this text?", "choices": ["chiasmus", "apostrophe"],
              "answer": 1, "hint": "", "image": "image.png", "task": "closed choice", "grade": "grade11",
              "subject": "language science", "topic": "figurative-language", "category": "Literary devices",
              "skill": "Classify the figure of speech", "lecture": "Figures of speech ...",
              "solution": "The text uses apostrophe, a direct address to an absent person.", "split": "train"},
        "9": {"question": "Which tense does the sentence use?\nMona will print her name.",
              "choices": ["present tense", "future tense", "past tense"], "answer": 1, "hint": "", "image": None,
              "task": "closed choice", "grade": "grade4", "subject": "language science", "topic": "verbs",
              "category": "Verb tense", "skill": "Identify verb tense", "lecture": "Present tense verbs ...",
              "solution": "The sentence is in future tense.", "split": "test"},
    }
    (root / "problems.json").write_text(json.dumps(problems))
    return root / "problems.json"


def test_real_release_layout_loads_unchanged(tmp_path):
    examples = {e.id: e for e in get_task("scienceqa-explain").load(_write_release(tmp_path))}
    assert examples["4"].image == str(tmp_path / "images" / "train" / "4" / "image.png")
    assert examples["9"].image is None and examples["9"].split == "test"
    assert examples["9"].target == "The answer is B. The sentence is in future tense."
    assert examples["9"].inputs["options"] == "(A) present tense\n(B) future tense\n(C) past tense"
    assert examples["4"].extra["lecture"].startswith("Figures")
    jsonl = tmp_path / "problems.jsonl"
    problems = json.loads((tmp_path / "problems.json").read_text())
    jsonl.write_text("".join(json.dumps({"id": pid, **p, "image": None}) + "\n" for pid, p in problems.items()))
    assert [e.target for e in get_task("scienceqa").load(jsonl)] == ["B", "B"]


@pytest.mark.parametrize("change,message", [
    ({"answer": 2}, "field '4.answer': expected an option index 0..1, got 2"),
    ({"choices": ["only one"]}, "field '4.choices': expected a list of at least 2 non-empty option texts"),
    ({"image": "missing.png"}, "field '4.image': no image file 'missing.png'"),
    ({"question": " "}, "field '4.question': missing or empty text"),
])
def test_malformed_problems_name_the_field(change, message, tmp_path):
    path = _write_release(tmp_path)
    problems = json.loads(path.read_text())
    problems["4"].update(change)
    path.write_text(json.dumps(problems))
    with pytest.raises(PeftlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_task("scienceqa").load(path)


CHOICES = ("red", "blue", "green")


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), (" C) green", "C"), ("The answer is (B).", "B"),
    ("Answer: C because it is green", "C"), ("the answer is A.", "A"), ("It is blue, clearly.", "B"),
    ("green, not red", "C"), ("A cat is red", "A"), ("A colour I like", None), ("D", None), ("", None),
    ("The answer is D.", None), ("Blue!", "B"),
])
def test_parse_answer(text, letter):
    assert parse_answer(text, CHOICES) == letter


def _refs(letters, images, solutions=("",) * 4):
    return [(Reference(x, x, CHOICES, img, sol),) for x, img, sol in zip(letters, images, solutions, strict=True)]


def test_score_splits_by_image_and_parses():
    task = get_task("scienceqa")
    refs = _refs("ABCA", [True, True, False, False])
    m = task.score(["A", "The answer is (C)", "green", "nonsense"], refs)
    assert m["accuracy"] == 0.5 and m["parsed"] == 0.75
    assert m["accuracy_image"] == 0.5 and m["accuracy_no_image"] == 0.5
    assert "explanation_rougeL" not in m
    only_images = task.score(["A"], _refs("A", [True], ("",)))
    assert only_images["accuracy_image"] == 1.0 and "accuracy_no_image" not in only_images


def test_explain_score_has_rouge_of_the_explanation():
    task = get_task("scienceqa-explain")
    refs = _refs("AB", [True, False], ("The circle is red.", "The square is blue."))
    m = task.score(["The answer is A. The circle is red.", "The answer is A. The square is round."], refs)
    assert m["accuracy"] == 0.5
    assert m["explanation_rougeL"] == pytest.approx((1.0 + 0.75) / 2)


def test_text_model_trains_on_scienceqa(tiny_causal, tmp_path):
    """A text-only model reads question, hint and options; the image is dropped, the scores still split by it."""
    run_dir = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, None, SYNTH, "data.task=scienceqa",
                                    "data.limit_eval=40", "data.max_length=256"))
    metrics = read_json(run_dir / "metrics.json")
    assert {"test_accuracy", "test_accuracy_image", "test_accuracy_no_image", "test_parsed"} <= set(metrics)
    assert len(train_losses(run_dir)) == 2
    assert read_json(run_dir / "result.json")["primary_metric"] == "accuracy"


def test_teacher_explanations_as_targets(tiny_causal, tmp_path):
    examples = get_task("scienceqa-explain").load(SYNTH)
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("".join(json.dumps({"id": e.id, "output": f"The answer is A. Teacher says {e.id}."}) + "\n"
                               for e in examples))
    run_dir = run_training(tiny_cfg(tiny_causal, "lora", tmp_path, None, SYNTH, "data.task=scienceqa-explain",
                                    f"data.target={teacher}", "data.max_length=256"))
    assert "test_explanation_rougeL" in read_json(run_dir / "metrics.json")
