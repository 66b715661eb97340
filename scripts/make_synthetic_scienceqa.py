"""Write the SYNTHETIC ScienceQA-format set in data/scienceqa-synthetic/ (not ScienceQA: no question comes from it).

    python scripts/make_synthetic_scienceqa.py [--out data/scienceqa-synthetic] [--seed 0]

Every question is generated together with its answer: the picture is drawn from the same colours, shapes, counts
and positions the question asks about, so each label is true by construction. Files follow ScienceQA's own layout,
so the loader that reads them reads the real ScienceQA release unchanged:

    problems.json      {pid: {question, choices, answer, hint, image, task, grade, subject, topic, category,
                              skill, lecture, solution, split}}
    pid_splits.json    {train: [pid...], val: [...], test: [...]}
    images/<split>/<pid>/image.png   64x64 PNG, for the questions that have a picture
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

SIZE, CELL = 64, 21  # a 3x3 grid of cells; one object per cell, so objects never overlap
COLORS = {
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 160, 60),
    "yellow": (230, 200, 20), "purple": (140, 60, 180), "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
SIDES = {"triangle": 3, "square": 4, "rectangle": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
LECTURES = {
    "count": "To count objects of one kind, look for the objects that have both the colour and the shape asked "
             "about, and skip all the others.",
    "color": "Every object in a picture has a colour. To name it, find the object and look at what colour fills it.",
    "shape": "Shapes are named by their outline: a circle is round, a square has four equal straight sides, and a "
             "triangle has three straight sides.",
    "position": "Positions in a picture are relative: an object is to the left of another when it is closer to the "
                "left edge, and above it when it is closer to the top edge.",
    "sides": "A polygon is a flat shape with straight sides. Its name tells how many sides it has: tri- means three, "
             "penta- five, hexa- six and octa- eight.",
    "sum": "Adding two numbers gives their sum, the total you get when you put both amounts together.",
    "compare": "To compare whole numbers, the number with more tens is greater; with equal tens, compare the ones.",
}
Object = tuple[str, str, int]  # colour, shape, cell


def draw(objects: list[Object]) -> Image.Image:
    """A white 64x64 picture with each (colour, shape) centred in its grid cell; no anti-aliasing, exact colours."""
    image = Image.new("RGB", (SIZE, SIZE), "white")
    pen = ImageDraw.Draw(image)
    for color, shape, cell in objects:
        x0, y0 = (cell % 3) * CELL + 3, (cell // 3) * CELL + 3
        box = (x0, y0, x0 + 14, y0 + 14)
        if shape == "circle":
            pen.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            pen.rectangle(box, fill=COLORS[color])
        else:
            pen.polygon([(x0 + 7, y0), (x0, y0 + 14), (x0 + 14, y0 + 14)], fill=COLORS[color])
    return image


def _choices(rng: random.Random, answer: str, pool: list[str], k: int) -> tuple[list[str], int]:
    options = [answer, *rng.sample([p for p in pool if p != answer], k - 1)]
    rng.shuffle(options)
    return options, options.index(answer)


def q_count(rng: random.Random) -> dict:
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    n = rng.randint(1, 4)
    cells = rng.sample(range(9), n + rng.randint(0, 3))
    others = [(c, s) for c in COLORS for s in SHAPES if (c, s) != (color, shape)]
    objects = [(color, shape, cell) for cell in cells[:n]] + [(*rng.choice(others), cell) for cell in cells[n:]]
    choices, answer = _choices(rng, str(n), [str(i) for i in range(1, 7)], 4)
    verb = "is" if n == 1 else "are"
    return {"question": f"How many {color} {shape}s are in the picture?", "choices": choices, "answer": answer,
            "objects": objects, "solution": f"Count only the objects that are both {color} and {shape}-shaped. "
            f"There {verb} {n}."}


def q_color(rng: random.Random) -> dict:
    shape = rng.choice(SHAPES)
    colors = rng.sample(list(COLORS), 3)
    cells = rng.sample(range(9), rng.randint(1, 3))
    rest = [s for s in SHAPES if s != shape]
    objects = [(colors[0], shape, cells[0])] + [(colors[i], rng.choice(rest), c) for i, c in enumerate(cells[1:], 1)]
    choices, answer = _choices(rng, colors[0], list(COLORS), 3)
    return {"question": f"What color is the {shape}?", "choices": choices, "answer": answer, "objects": objects,
            "solution": f"There is one {shape} in the picture, and it is {colors[0]}."}


def q_shape(rng: random.Random) -> dict:
    colors = rng.sample(list(COLORS), 3)
    cells = rng.sample(range(9), rng.randint(1, 3))
    objects = [(colors[i], rng.choice(SHAPES), c) for i, c in enumerate(cells)]
    color, shape = objects[0][0], objects[0][1]
    choices, answer = _choices(rng, shape, list(SHAPES), 3)
    outline = {"circle": "is round", "square": "has four equal straight sides", "triangle": "has three straight sides"}
    return {"question": f"What shape is the {color} object?", "choices": choices, "answer": answer,
            "objects": objects, "solution": f"The {color} object {outline[shape]}, so it is a {shape}."}


def q_position(rng: random.Random) -> dict:
    (c1, c2), (s1, s2) = rng.sample(list(COLORS), 2), (rng.choice(SHAPES), rng.choice(SHAPES))
    line, (a, b) = rng.randrange(3), rng.sample(range(3), 2)
    if rng.random() < 0.5:  # same row: left or right
        cells, words, asked = (line * 3 + a, line * 3 + b), ("left", "right"), "to the left or to the right of"
    else:  # same column: above or below
        cells, words, asked = (a * 3 + line, b * 3 + line), ("above", "below"), "above or below"
    relation = words[0] if a < b else words[1]  # cell a holds the first object; a smaller index is left / higher
    choices = list(words)
    said = f"to the {relation} of" if relation in ("left", "right") else relation
    return {"question": f"Is the {c1} {s1} {asked} the {c2} {s2}?",
            "choices": choices, "answer": choices.index(relation),
            "objects": [(c1, s1, cells[0]), (c2, s2, cells[1])],
            "hint": "Left, right, above and below are as seen in the picture.",
            "solution": f"In the picture, the {c1} {s1} is {said} the {c2} {s2}."}


def q_sides(rng: random.Random) -> dict:
    shape = rng.choice(list(SIDES))
    choices, answer = _choices(rng, str(SIDES[shape]), [str(i) for i in range(3, 9)], 4)
    return {"question": f"How many sides does a {shape} have?", "choices": choices, "answer": answer,
            "solution": f"A {shape} has {SIDES[shape]} straight sides."}


def q_sum(rng: random.Random) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    choices, answer = _choices(rng, str(a + b), [str(i) for i in range(2, 19)], 4)
    return {"question": f"What is {a} + {b}?", "choices": choices, "answer": answer,
            "solution": f"{a} + {b} = {a + b}."}


def q_compare(rng: random.Random) -> dict:
    numbers = [str(n) for n in rng.sample(range(10, 100), 3)]
    best = max(numbers, key=int)
    rest = " and ".join(n for n in numbers if n != best)
    return {"question": "Which number is the greatest?", "choices": numbers, "answer": numbers.index(best),
            "solution": f"{best} is greater than {rest}."}


# kind -> (generator, how many questions, has a picture)
KINDS: dict[str, tuple[Callable[[random.Random], dict], int, bool]] = {
    "count": (q_count, 35, True), "color": (q_color, 35, True), "shape": (q_shape, 35, True),
    "position": (q_position, 35, True), "sides": (q_sides, 20, False), "sum": (q_sum, 20, False),
    "compare": (q_compare, 20, False),
}


def make(out: Path, seed: int = 0) -> dict[str, dict]:
    """Generate the set into `out` (replacing an earlier one); returns the problems."""
    rng = random.Random(seed)
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    problems: dict[str, dict] = {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for kind, (generate, count, picture) in KINDS.items():
        for i in range(count):
            split = "train" if i % 5 < 3 else ("val" if i % 5 == 3 else "test")  # 60/20/20 within every kind
            pid = str(len(problems) + 1)
            q = generate(rng)
            if picture:
                folder = out / "images" / split / pid
                folder.mkdir(parents=True, exist_ok=True)
                draw(q["objects"]).save(folder / "image.png", optimize=True)
            problems[pid] = {
                "question": q["question"], "choices": q["choices"], "answer": q["answer"], "hint": q.get("hint", ""),
                "image": "image.png" if picture else None, "task": "closed choice", "grade": "grade1",
                "subject": "synthetic", "topic": kind, "category": f"synthetic {kind}", "skill": kind,
                "lecture": LECTURES[kind], "solution": q["solution"], "split": split,
            }
            splits[split].append(pid)
    out.mkdir(parents=True, exist_ok=True)
    (out / "problems.json").write_text(json.dumps(problems, indent=1) + "\n")
    (out / "pid_splits.json").write_text(json.dumps(splits, indent=1) + "\n")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/scienceqa-synthetic"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    problems = make(args.out, args.seed)
    with_image = sum(p["image"] is not None for p in problems.values())
    print(f"wrote {len(problems)} synthetic problems ({with_image} with a picture) to {args.out}")


if __name__ == "__main__":
    main()
