"""Racing over repeats, on constructed per-example scores: a clearly worse method stops after the first round, a
near-tie never stops, Holm corrects for the number of comparisons, and the verdict never crowns a raced-out method
and names the same best with racing on and off."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from studykit import fake_run

from peftlab.report.decision import MANIFEST, decide, decision_markdown, race, unpaired_note
from peftlab.report.stats import Replica, holm, metric_fn, race_round

ACC = metric_fn("accuracy", 3)


def _fold(k: int, right: int, n: int = 100, seed: int = 0) -> Replica:
    """Fold k's `n` questions (their own ids), `right` of them answered right, at seeded random places."""
    correct = np.random.default_rng(seed).permutation(np.arange(n) < right)
    ref = np.arange(n) % 3
    pred = np.where(correct, ref, (ref + 1) % 3)
    return Replica(tuple(f"f{k}q{i:03d}" for i in range(n)), pred, ref, correct.astype(float))


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])  # never above 1, and never below an earlier one


def test_a_clearly_worse_method_stops_after_the_first_round_and_a_near_tie_never_does():
    costs = {"lora": (5e3, 10.0), "near": (5e3, 10.0), "full": (1e5, 40.0)}
    rounds = {"lora": [], "near": [], "full": []}
    for k in range(5):  # 100 questions a fold: lora 80, near 78-79, full 45
        rounds["lora"].append(_fold(k, 80, seed=k))
        rounds["near"].append(_fold(k, 79 - k % 2, seed=100 + k))
        rounds["full"].append(_fold(k, 45, seed=200 + k))
        out = race_round({name: reps[: k + 1] for name, reps in rounds.items()
                          if k == 0 or name != "full"}, costs, "accuracy", ACC, k + 1)
        if k == 0:
            assert [(o.name, o.leader, o.rounds) for o in out] == [("full", "lora", 1)]
            assert out[0].diff == pytest.approx(-0.35) and out[0].p_holm < 0.05
        else:
            assert out == []  # 1-2 points apart on 100-500 paired questions: never significant, never stopped


def _answers(correct: np.ndarray) -> Replica:
    ref = np.arange(len(correct)) % 3
    return Replica(tuple(f"q{i:03d}" for i in range(len(correct))), np.where(correct, ref, (ref + 1) % 3), ref,
                   correct.astype(float))


def test_holm_keeps_a_borderline_method_that_one_test_alone_would_stop():
    # 100 questions. The leader gets the first 70 right. Each other method loses 15 of those and wins 5 others:
    # McNemar's exact p is 2 * P(X <= 5 | 20, 1/2) = 0.041 alone, and 4 x 0.041 = 0.16 after Holm over four.
    leader = np.arange(100) < 70
    reps = {"best": [_answers(leader)]}
    for i, name in enumerate(("a", "b", "c", "d")):
        other = leader.copy()
        other[i * 15:(i + 1) * 15] = False
        other[70 + i * 5:75 + i * 5] = True
        reps[name] = [_answers(other)]
    costs = {name: (1.0, 1.0) for name in reps}
    (alone,) = race_round({"best": reps["best"], "a": reps["a"]}, costs, "accuracy", ACC, 1)
    assert alone.name == "a" and alone.p_holm == pytest.approx(0.0414, abs=1e-3) and alone.test == "McNemar (exact)"
    assert race_round(reps, costs, "accuracy", ACC, 1) == []  # four comparisons at once: none below 0.05 after Holm


RUNS = (("lora", "lora", 48, 5_000), ("near", "prompt-tuning", 47, 2_000), ("full", "full", 20, 100_000))


def _write(study: Path, groups: dict, k: int, names: set[str]) -> None:
    """Fold k (60 questions of its own) of each method in `names`, each getting its known share right at places
    seeded by method and fold (so a study that skips runs gives the others the same answers)."""
    for i, (name, method, right, params) in enumerate(RUNS):
        if name in names:
            correct = np.random.default_rng([i, k]).permutation(np.arange(60) < right)
            fake_run(study, f"{name}-fold{k}", method, correct, params, 10.0,
                     ids=[f"f{k}q{i:03d}" for i in range(60)])
            groups.setdefault(name, {"method": method, "runs": []})["runs"].append(f"{name}-fold{k}")
    (study / MANIFEST).write_text(json.dumps({"metric": "accuracy", "repeats": {"folds": 3}, "groups": groups}))


def _study(tmp_path: Path, race_on: bool) -> Path:
    """lora, near and full over 3 folds; full is clearly worse. Racing stops full after fold 0, as compare does."""
    study, groups = tmp_path / ("raced" if race_on else "plain"), {}
    _write(study, groups, 0, {"lora", "near", "full"})
    if race_on:
        stopped = race(study, 1, 0.05)
        assert [o.name for o in stopped] == ["full"]
        groups["full"]["raced_out"] = asdict(stopped[0])
    for k in (1, 2):
        _write(study, groups, k, {"lora", "near"} if race_on else {"lora", "near", "full"})
    if race_on:
        manifest = json.loads((study / MANIFEST).read_text())
        manifest["race"] = {"alpha": 0.05, "rounds": 3, "saved_runs": 2, "total_runs": 9, "saved_share": 0.4}
        (study / MANIFEST).write_text(json.dumps(manifest))
    return study


def test_the_verdict_never_crowns_a_raced_out_method_and_matches_the_unraced_one(tmp_path):
    plain, raced = decide(_study(tmp_path, race_on=False)), decide(_study(tmp_path, race_on=True))
    assert plain["verdict"][0] == raced["verdict"][0]  # the same best, the same interval
    assert plain["verdict"][0].startswith("Best: lora")
    full = next(r for r in raced["rows"] if r["name"] == "full")
    assert full["raced_out"]["rounds"] == 1 and not full["best"] and full["replicas"] == 1
    assert all("full" not in names for names in raced["frontier"].values())
    assert raced["verdict"][-1].startswith("Raced out (paired test against the leader after each round")
    assert "full after 1 of 3 rounds" in raced["verdict"][-1] and "skipped 2 of 9 final runs" in raced["verdict"][-1]
    assert "| full | 1 |" in decision_markdown(raced) and "raced out after 1 round |" in decision_markdown(raced)
    assert unpaired_note(tmp_path / "raced") is None  # a raced-out method's fewer folds are no unpaired split
