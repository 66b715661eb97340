"""The shared frozen-base pass: the same values as a separate pass, to the bit, and read back instead of recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.core.config import MethodConfig
from peftlab.data.tasks import get_task
from peftlab.evaluate.scoring import label_scores
from peftlab.methods.frozen_pass import fingerprint, label_field, prompt_pass, reset_stats, stored_rows
from peftlab.methods.head import build, extract
from peftlab.models.loading import load_model
from peftlab.prompts.batches import collate, token_batches
from peftlab.prompts.encoding import format_for
from peftlab.prompts.format import Encoded
from peftlab.recipes.compare import run_study


@pytest.fixture
def shared_store(peftlab_home, monkeypatch) -> Path:
    """The SQLite store on, in an empty PEFTLAB_HOME (the suite runs with it off: see conftest)."""
    monkeypatch.setenv("PEFTLAB_FROZEN_CACHE", "on")
    return peftlab_home


def _items(n: int = 9) -> list[Encoded]:
    g = torch.Generator().manual_seed(0)
    return [Encoded(f"q{i}", torch.randint(5, 500, (int(length),), generator=g).tolist(), [0])
            for i, length in enumerate(torch.randint(3, 40, (n,), generator=g))]


def test_label_scores_and_features_equal_a_separate_pass_and_come_back_from_the_store(tiny_causal, shared_store):
    loaded = load_model(str(tiny_causal), device="cpu")
    task = get_task("pubmedqa")
    fmt = format_for(loaded)
    items = _items()
    labels = ["a", "b", "c"]  # one token each in the tiny vocabulary: one pass scores all three
    separate = label_scores(loaded.model, fmt, items, labels, max_tokens=128, progress=False)
    stats = reset_stats()
    shared = label_scores(loaded.model, fmt, items, labels, max_tokens=128, progress=False, frozen=True)
    assert torch.equal(shared, separate) and stats.from_store == 0
    again = label_scores(loaded.model, fmt, items, labels, max_tokens=128, progress=False, frozen=True)
    assert torch.equal(again, separate) and stats.from_store == len(items)
    # The head at layer 2 reads the states the scoring pass stored, equal to its own early-exit forward's.
    head = build(loaded, task, MethodConfig(name="linear-head", head_layer=2))
    reset_stats()
    stored = extract(head, items, fmt.tokenizer.pad_token_id, progress=False)
    assert stats.from_store == len(items)
    for idx in token_batches(items, 128, max_rows=64):
        batch = collate([items[i] for i in idx], "causal", fmt.tokenizer.pad_token_id)
        own = head.features(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        assert torch.equal(stored[idx], own)


def test_other_weights_never_read_another_models_values(tiny_causal, shared_store):
    loaded = load_model(str(tiny_causal), device="cpu")
    items, field = _items(4), label_field([[5], [6]])

    def scores(model):
        return stored_rows(model, items, field, lambda todo: prompt_pass(model, todo, 0, 128, label_ids=[5, 6]))

    before = scores(loaded.model)
    digest = fingerprint(loaded.model)
    changed = load_model(str(tiny_causal), device="cpu")
    with torch.no_grad():
        changed.model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0  # one weight, deep inside
    assert fingerprint(changed.model) != digest
    stats = reset_stats()
    after = scores(changed.model)
    assert stats.from_store == 0 and not torch.equal(before, after)


def _letters(folder: Path, name: str, n: int, seed: int) -> Path:
    """An alpaca-style file whose answers are "a", "b" or "c": one token each in the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    words = ["red", "green", "blue", "cat", "dog", "sun", "rain", "tree"]
    rows = [{"id": f"{name}{i}", "instruction": "Which letter fits?",
             "input": " ".join(words[j] for j in torch.randint(0, len(words), (6,), generator=g)),
             "output": "abc"[i % 3]} for i in range(n)]
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _frozen_study(tmp_path: Path, model: Path, out: str) -> Path:
    """Zero-shot, calibrated few-shot and two linear heads: all read the same frozen base."""
    data = {"task": "alpaca", "train": str(_letters(tmp_path, "train", 24, 0)),
            "test": str(_letters(tmp_path, "test", 9, 1)), "max_length": 160}
    study = {
        "name": "frozen",
        "output_dir": str(tmp_path / out),
        "base": {"model": {"name": str(model)}, "data": data, "train": {"threads": 1}},
        "runs": [
            {"name": "zs", "method": {"name": "zero-shot"}},
            {"name": "fs", "method": {"name": "few-shot"}, "data": {"shots": 1, "calibrate": True}},
            {"name": "head-a", "method": {"name": "linear-head", "head_layer": 2, "head_c": 0.1}},
            {"name": "head-b", "method": {"name": "linear-head", "head_layer": 2, "head_c": 10.0}},
        ],
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _answers(run_dir: Path) -> tuple[list, dict]:
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [(r["id"], r["prediction"], r["label_logprobs"]) for r in rows], metrics


def test_a_study_shares_one_pass_bit_identically_and_a_rerun_recomputes_nothing(
    tmp_path, tiny_causal, shared_store, monkeypatch
):
    monkeypatch.setenv("PEFTLAB_FROZEN_CACHE", "off")  # each run in its own process: separate passes
    separate = run_study(_frozen_study(tmp_path, tiny_causal, "separate"))
    monkeypatch.setenv("PEFTLAB_FROZEN_CACHE", "on")
    shared = run_study(_frozen_study(tmp_path, tiny_causal, "shared"))
    rerun = run_study(_frozen_study(tmp_path, tiny_causal, "rerun"))
    for name in ("zs", "fs", "head-a", "head-b"):
        assert _answers(shared / name) == _answers(separate / name), name
        assert _answers(rerun / name) == _answers(separate / name), name
    passes = {name: json.loads((shared / name / "result.json").read_text())["frozen_pass"] for name in ("head-a",
                                                                                                         "head-b")}
    assert passes["head-a"]["from_store"] >= 9  # the test prompts zero-shot scored
    assert passes["head-b"]["from_store"] == passes["head-b"]["prompts"]  # head-a's train and test features
    for name in ("zs", "fs", "head-a", "head-b"):
        counted = json.loads((rerun / name / "result.json").read_text())["frozen_pass"]
        assert counted["prompts"] > 0 and counted["from_store"] == counted["prompts"], name


def test_a_home_that_cannot_hold_the_store_warns_once_and_keeps_the_passes_in_memory(tiny_causal, tmp_path,
                                                                                     monkeypatch, capsys):
    blocked = tmp_path / "home"
    blocked.write_text("a file where PEFTLAB_HOME's folder should be")
    monkeypatch.setenv("PEFTLAB_HOME", str(blocked))
    monkeypatch.setenv("PEFTLAB_FROZEN_CACHE", "on")
    loaded = load_model(str(tiny_causal), device="cpu")
    items, field = _items(3), label_field([[5], [6]])
    stats = reset_stats()
    for _ in range(2):
        stored_rows(loaded.model, items, field, lambda todo: prompt_pass(loaded.model, todo, 0, 128, label_ids=[5, 6]))
    assert stats.from_store == len(items)  # the second pass read the first from memory
    warnings = [line for line in capsys.readouterr().err.splitlines() if "frozen-base passes" in line]
    assert len(warnings) == 1 and str(blocked / "frozen-passes.sqlite") in warnings[0]
