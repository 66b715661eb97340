"""The decision's statistics on cases worked out by hand: McNemar tables, bootstraps with a known difference,
intervals over seeds and folds, the Pareto frontier, the test size needed and the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from peftlab.report import stats
from peftlab.report.stats import MethodSummary, Paired, Replica

ACC = stats.metric_fn("accuracy", 2)


def _replica(correct: list[bool] | np.ndarray, ids: list[str] | None = None) -> Replica:
    """Binary task, reference always label 0: a correct row predicts 0, a wrong one 1."""
    correct = np.asarray(correct, dtype=bool)
    ids = ids or [f"{i:05d}" for i in range(len(correct))]
    return Replica(tuple(ids), np.where(correct, 0, 1), np.zeros(len(correct), dtype=int), correct.astype(float))


def test_mcnemar_exact_by_hand():
    # 10 pairs where A alone is right, 2 where B alone is right, 88 concordant pairs.
    a = [True] * 10 + [False] * 2 + [True] * 50 + [False] * 38
    b = [False] * 10 + [True] * 2 + [True] * 50 + [False] * 38
    m = stats.mcnemar(a, b)
    assert (m["b"], m["c"], m["exact"]) == (10, 2, True)
    # Two-sided binomial: 2 * P(X <= 2 | n=12, p=1/2) = 2 * (1 + 12 + 66) / 4096.
    assert m["p"] == pytest.approx(2 * 79 / 4096)


def test_mcnemar_chi2_by_hand():
    a = [True] * 30 + [False] * 12 + [True] * 10
    b = [False] * 30 + [True] * 12 + [True] * 10
    m = stats.mcnemar(a, b)
    assert (m["b"], m["c"], m["exact"]) == (30, 12, False)
    assert m["statistic"] == pytest.approx(17**2 / 42)  # (|30 - 12| - 1)^2 / (30 + 12)
    assert m["p"] == pytest.approx(math.erfc(math.sqrt(m["statistic"] / 2)))  # chi-squared, 1 dof, upper tail


def test_mcnemar_same_answers_is_no_evidence():
    assert stats.mcnemar([True, False], [True, False])["p"] == 1.0
    with pytest.raises(ValueError):
        stats.mcnemar([True], [True, False])


def test_paired_bootstrap_recovers_a_known_difference():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.6
    b = a.copy()
    flips = np.flatnonzero(a)[:40]  # B is A with 40 right answers made wrong: exactly 0.10 worse
    b[flips] = False
    paired = stats.paired_bootstrap([_replica(a)], [_replica(b)], ACC, seed=0)
    assert paired.diff == pytest.approx(0.10)
    # Resampled differences are Binomial(400, 0.1) / 400: sd 0.015, so the 95% interval is about 0.10 +- 0.03.
    assert 0.06 < paired.low < 0.08 and 0.12 < paired.high < 0.14
    assert paired.distinguishable
    alone = stats.bootstrap_interval([_replica(a)], ACC)
    # Pairing removes what the two share (which examples are easy): sd 0.015 against 0.0245 for A alone.
    assert alone[2] - alone[1] > 1.4 * (paired.high - paired.low)


def test_paired_bootstrap_of_equal_methods_is_a_tie():
    a = np.arange(100) % 2 == 0
    paired = stats.paired_bootstrap([_replica(a)], [_replica(a)], ACC)
    assert paired.diff == 0 and paired.low == 0 and paired.high == 0 and not paired.distinguishable


def test_single_run_interval_matches_the_binomial():
    a = np.arange(200) % 2 == 0  # accuracy 0.5 on 200 examples: the normal interval is 0.5 +- 1.96 * 0.0354
    mean, low, high = stats.bootstrap_interval([_replica(a)], ACC, n_boot=4000)
    assert mean == 0.5
    assert low == pytest.approx(0.5 - 0.0693, abs=0.012) and high == pytest.approx(0.5 + 0.0693, abs=0.012)


def test_interval_over_seeds_covers_the_seed_spread():
    rng = np.random.default_rng(0)
    seeds = [_replica(rng.random(300) < p) for p in (0.45, 0.6, 0.75)]
    mean, low, high = stats.bootstrap_interval(seeds, ACC)
    assert mean == pytest.approx(np.mean([r.score.mean() for r in seeds]))
    one = stats.bootstrap_interval([seeds[1]], ACC)
    assert (high - low) > 1.5 * (one[2] - one[1])  # the seeds' own spread widens it


def test_folds_have_their_own_examples():
    folds = [_replica(np.arange(60) % k == 0, [f"f{f}-{i}" for i in range(60)]) for f, k in enumerate((2, 2, 3, 4, 5))]
    mean, low, high = stats.bootstrap_interval(folds, ACC)
    assert mean == pytest.approx((1 / 2 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5)
    assert low < mean < high
    other = [_replica(np.ones(60, bool), list(r.ids)) for r in folds]
    paired = stats.paired_bootstrap(other, folds, ACC)
    assert paired.diff == pytest.approx(1 - mean) and paired.distinguishable
    with pytest.raises(ValueError, match="same test examples"):
        stats.paired_bootstrap(folds[:1], other[1:2], ACC)


def test_macro_f1_matches_scikit_learn():
    rng = np.random.default_rng(3)
    pred, ref = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    pred[pred == 2] = 0  # label 2 never predicted: its F1 is 0
    expected = f1_score(ref, pred, labels=[0, 1, 2], average="macro", zero_division=0)
    assert stats.macro_f1(pred, ref, 3) == pytest.approx(expected)


def test_compare_to_best_uses_mcnemar_for_single_accuracy_runs():
    a, b = [True] * 10 + [False] * 2 + [True] * 88, [False] * 10 + [True] * 2 + [True] * 88
    paired = stats.compare_to_best([_replica(b)], [_replica(a)], "accuracy", ACC)
    assert paired.test == "McNemar (exact)" and paired.p == pytest.approx(2 * 79 / 4096)
    assert paired.diff == pytest.approx(-0.08)
    assert stats.compare_to_best([_replica(b)] * 2, [_replica(a)], "accuracy", ACC).test == "paired bootstrap"


def test_pareto_front_on_constructed_rows():
    rows = [
        {"name": "a", "q": 0.80, "cost": 100},
        {"name": "b", "q": 0.70, "cost": 10},
        {"name": "c", "q": 0.60, "cost": 50},  # b is better and cheaper
        {"name": "d", "q": 0.80, "cost": 200},  # a is as good and cheaper
        {"name": "e", "q": 0.50, "cost": 0},
        {"name": "f", "q": 0.90, "cost": None},  # no cost measured: not placed
    ]
    assert stats.pareto_front(rows, "q", "cost") == ["a", "b", "e"]


def test_needed_test_size():
    assert stats.needed_test_size(100, 0.10, 0.05) == 400  # half the width needs four times the examples
    assert stats.needed_test_size(100, 0.02, 0.05) == 16


def test_verdict_names_best_tied_cheapest_and_warns():
    tie = Paired(-0.005, -0.08, 0.07, 0.9, "paired bootstrap")
    far = Paired(-0.2, -0.3, -0.1, 0.001, "paired bootstrap")
    rows = [
        MethodSummary("full", 0.62, 0.5, 0.74, None, 1e8, 300),
        MethodSummary("lora", 0.615, 0.5, 0.73, tie, 1e5, 100),
        MethodSummary("zero-shot", 0.42, 0.3, 0.55, far, 0, 0),
    ]
    lines = stats.verdict(rows, "accuracy", 100)
    assert lines[0].startswith("Best: full")
    assert "lora" in lines[1] and "zero-shot" not in lines[1]
    assert lines[2].startswith("Cheapest within 1 point of the best: lora")
    # Gap 0.005 is under a point, so the split is sized for one point: half-width 0.075 at 100 examples, 100 * 7.5^2.
    assert "Warning" in lines[3] and "(gap 0.005)" in lines[3] and "5,625" in lines[3]
    assert lines[3].endswith("separate a 1-point gap.")
    wide = Paired(-0.05, -0.15, 0.05, 0.3, "paired bootstrap")  # a 5-point gap at half-width 0.1: 100 * 2^2 = 400
    spread = stats.verdict([rows[0], MethodSummary("lora", 0.57, 0.45, 0.69, wide, 1e5, 100)], "accuracy", 100)
    assert "(gap 0.050)" in spread[3] and "400 test examples" in spread[3] and spread[3].endswith("that gap.")
    clear = stats.verdict([rows[0], rows[2]], "accuracy", 100)
    assert "none" in clear[1] and len(clear) == 3


def test_verdict_breaks_an_exact_tie_toward_the_cheaper_method():
    even = Paired(0.0, -0.29, 0.29, 1.0, "McNemar (exact)")
    rows = [MethodSummary("prefix-tuning", 0.583, 0.375, 0.792, even, 230_400, 53.5),
            MethodSummary("prompt-tuning", 0.583, 0.375, 0.792, even, 11_520, 53.6)]
    assert stats.verdict(rows, "accuracy", 24)[0].startswith("Best: prompt-tuning")
    assert stats.rank_key(0.5, 10, 1) > stats.rank_key(0.5, 100, 1) > stats.rank_key(0.49, 0, 0)
