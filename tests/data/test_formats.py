"""Your own files: the alpaca and chat formats from JSONL, JSON, CSV and Parquet, files per split, label sets."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from peftlab.core.config import load_config
from peftlab.core.errors import PeftlabError
from peftlab.data.splits import data_labels, load_splits
from peftlab.data.tasks import get_task, task_for
from peftlab.data.tasks.formats import infer_labels, match_label, merged_labels

ALPACA = [
    {"id": "a1", "instruction": "Is it good?", "input": "Great lamp.", "output": "yes"},
    {"id": "a2", "instruction": "Is it good?", "input": "", "output": "no"},
    {"id": "a3", "instruction": "Is it good?", "output": "yes"},
]
CHAT = [
    {"id": "c1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hours?"},
                              {"role": "assistant", "content": "9 to 6."}]},
    {"id": "c2", "messages": [{"role": "user", "content": "Returns?"}, {"role": "assistant", "content": "30 days."}]},
]


def write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_alpaca_loads_from_each_file_type(suffix, tmp_path):
    examples = get_task("alpaca").load(write(ALPACA, tmp_path / f"d{suffix}"))
    assert [e.id for e in examples] == ["a1", "a2", "a3"]
    assert examples[0].inputs == {"instruction": "Is it good?", "input": "\n\nGreat lamp."}
    assert examples[1].inputs["input"] == examples[2].inputs["input"] == ""  # empty and missing input are allowed
    assert [e.target for e in examples] == ["yes", "no", "yes"]
    assert get_task("alpaca").template(0).render(examples[0].inputs) == "Is it good?\n\nGreat lamp."


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_chat_loads_from_each_file_type(suffix, tmp_path):
    examples = get_task("chat").load(write(CHAT, tmp_path / f"d{suffix}"))
    assert [e.target for e in examples] == ["9 to 6.", "30 days."]
    assert examples[0].messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hours?"})


def test_chat_prompt_goes_through_the_chat_template(tiny_causal, tmp_path):
    from peftlab.models.loading import load_model
    from peftlab.prompts.encoding import encode, format_for

    fmt = format_for(load_model(str(tiny_causal), device="cpu"))
    example = get_task("chat").load(write(CHAT, tmp_path / "d.jsonl"))[0]
    item = encode(get_task("chat"), example, fmt, 256)
    text = fmt.tokenizer.decode(item.prompt_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert fmt.tokenizer.decode(item.target_ids).startswith("9 to 6.")


def test_labels_are_inferred_only_from_a_few_repeated_short_outputs():
    from peftlab.data.tasks.base import Example

    def ex(target: str) -> Example:
        return Example(target, {"instruction": "x"}, target, (target,))

    assert infer_labels([ex(t) for t in ["pos", "neg", "pos", "neg"]]) == ("neg", "pos")
    assert infer_labels([ex(t) for t in ["pos", "neg", "pos"]]) == ()  # "neg" seen once: free text
    assert infer_labels([ex(f"summary number {i} of a long dialogue") for i in range(10)]) == ()
    # Case and surrounding space do not make another label (issue 39): the most frequent spelling names it.
    mixed = [ex(t) for t in ["Yes", "yes", "yes", "NO", "No", "no"]]
    assert infer_labels(mixed) == ("no", "yes")  # a tie goes to the lower-case spelling
    assert merged_labels(mixed) == "'NO' (1), 'No' (1), 'no' (1) -> 'no'; 'Yes' (1), 'yes' (2) -> 'yes'"
    assert infer_labels([ex(t) for t in ["Pos", "pos", "neg", "Neg"]]) == ("neg", "pos")
    assert merged_labels([ex(t) for t in ["pos", "neg", "pos", "neg"]]) is None
    assert match_label("YES", ("yes", "no")) == "yes" and match_label("maybe", ("yes", "no")) is None


def test_files_per_split_and_a_val_split_carved_from_train(tmp_path):
    rows = [{"id": f"r{i}", "instruction": "Good?", "input": f"item {i}", "output": "yes" if i % 2 else "no"}
            for i in range(40)]
    train, test = write(rows[:30], tmp_path / "train.jsonl"), write(rows[30:], tmp_path / "test.csv")
    cfg = load_config(None, ["data.task=alpaca", f"data.train={train}", f"data.test={test}"])
    task = task_for(cfg.data).relabel(data_labels(cfg.data, task_for(cfg.data)))
    assert task.kind == "classification" and task.labels == ("no", "yes")
    splits = load_splits(cfg.data, task)
    assert [e.id for e in splits["test"]] == [f"r{i}" for i in range(30, 40)]  # the test file, whole and in order
    assert len(splits["val"]) in (3, 4) and len(splits["train"]) + len(splits["val"]) == 30  # ~1/9 of train, by class
    assert {e.target for e in splits["val"]} == {"no", "yes"}
    assert not {e.id for e in splits["val"]} & {e.id for e in splits["train"]}


def test_data_path_and_per_split_files_do_not_mix(tmp_path):
    train = write(ALPACA, tmp_path / "t.jsonl")
    cfg = load_config(None, ["data.task=alpaca", f"data.train={train}", f"data.path={train}"])
    with pytest.raises(PeftlabError, match="set data.path or data.train/data.val/data.test, not both"):
        load_splits(cfg.data, get_task("alpaca"))
