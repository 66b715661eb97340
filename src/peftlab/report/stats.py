"""The statistics behind a study's decision: intervals, paired tests against the best method, Pareto frontier, verdict.

Everything here is a pure function over numbers and rows, so it can be checked on hand-made cases.

A method's result is a list of *replicas*: one per seed or fold, each a `Replica` of its test examples (id,
predicted label, reference label, per-example score). The metric of a replica is computed from those rows, the same
way the run computed it (accuracy, macro-F1 over the task's labels, or the mean per-example score, e.g. ROUGE-1).

- One replica: the 95% interval is a percentile bootstrap over the test examples.
- Several replicas: a two-level bootstrap. Each draw resamples the replicas (seeds or folds) and then the test
  examples, so the interval covers both sources: which examples happened to be in the test split, and the spread
  from training again with another seed or on another fold.
- Paired comparison: both methods are resampled on the *same* example draw (their test examples are the same), so
  the interval is that of the difference, which is much narrower than either interval alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class Replica:
    """The test rows of one run: aligned arrays, one entry per test example, sorted by id."""

    ids: tuple[str, ...]
    pred: np.ndarray  # label index (-1 where not a classification row)
    ref: np.ndarray  # label index (-1 where not a classification row)
    score: np.ndarray  # per-example score as the run wrote it (1/0 correctness, ROUGE-1, ...)


def replica_from_rows(rows: Sequence[dict], labels: Sequence[str] | None) -> Replica:
    """A replica from predictions.jsonl rows (`id`, `prediction`, `references`, `score`)."""
    rows = sorted(rows, key=lambda r: str(r["id"]))
    index = {label: i for i, label in enumerate(labels or [])}
    pred = np.array([index.get(str(r.get("prediction")), -1) for r in rows], dtype=int)
    ref = np.array([index.get(str((r.get("references") or [None])[0]), -1) for r in rows], dtype=int)
    score = np.array([float(r.get("score") or 0.0) for r in rows], dtype=float)
    return Replica(tuple(str(r["id"]) for r in rows), pred, ref, score)


Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def metric_fn(name: str, n_labels: int) -> Metric:
    """The metric over (pred, ref, score) arrays: accuracy, macro-F1 over `n_labels` labels, or the mean score."""
    if name == "accuracy" and n_labels:
        return lambda p, r, s: float(np.mean(p == r))
    if name == "macro_f1" and n_labels:
        return lambda p, r, s: macro_f1(p, r, n_labels)
    return lambda p, r, s: float(np.mean(s))


def macro_f1(pred: np.ndarray, ref: np.ndarray, n_labels: int) -> float:
    """Macro-F1 over all `n_labels` labels; a label neither predicted nor present scores 0 (zero_division=0)."""
    hit = (pred == ref) & (ref >= 0)
    tp = np.bincount(ref[hit], minlength=n_labels)[:n_labels].astype(float)
    pred_n = np.bincount(pred[pred >= 0], minlength=n_labels)[:n_labels]
    ref_n = np.bincount(ref[ref >= 0], minlength=n_labels)[:n_labels]
    denom = pred_n + ref_n
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_labels), where=denom > 0)
    return float(f1.mean())


def _value(rep: Replica, metric: Metric, idx: np.ndarray | None = None) -> float:
    if idx is None:
        return metric(rep.pred, rep.ref, rep.score)
    return metric(rep.pred[idx], rep.ref[idx], rep.score[idx])


def _shared(replicas: Sequence[Replica]) -> bool:
    """Seeds share the test examples; folds do not (each fold has its own)."""
    return all(r.ids == replicas[0].ids for r in replicas)


def _draw(replicas: Sequence[Replica], metric: Metric, rng: np.random.Generator, pick: np.ndarray,
          shared_idx: np.ndarray | None) -> float:
    """One bootstrap value: the mean metric over the picked replicas, each on resampled examples."""
    values = []
    for k in pick:
        rep = replicas[k]
        idx = shared_idx if shared_idx is not None else rng.integers(0, len(rep.ids), len(rep.ids))
        values.append(_value(rep, metric, idx))
    return float(np.mean(values))


def point(replicas: Sequence[Replica], metric: Metric) -> float:
    """The mean metric over replicas (seeds or folds)."""
    return float(np.mean([_value(r, metric) for r in replicas]))


def bootstrap_interval(replicas: Sequence[Replica], metric: Metric, n_boot: int = N_BOOT, seed: int = 0,
                       level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over test examples, and over replicas when there are several."""
    rng = np.random.default_rng(seed)
    n_rep, shared = len(replicas), _shared(replicas)
    n = len(replicas[0].ids)
    draws = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n_rep, n_rep) if n_rep > 1 else np.zeros(1, dtype=int)
        draws[b] = _draw(replicas, metric, rng, pick, rng.integers(0, n, n) if shared else None)
    alpha = (1 - level) / 2
    return point(replicas, metric), float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


@dataclass(frozen=True)
class Paired:
    """A paired comparison of method A against method B on the same test examples: difference A - B."""

    diff: float
    low: float
    high: float
    p: float
    test: str  # "paired bootstrap" or "McNemar (exact)" / "McNemar (chi2)"

    @property
    def distinguishable(self) -> bool:
        """False when the 95% test cannot tell the two apart."""
        return self.p < 1 - LEVEL


def _align(a: Sequence[Replica], b: Sequence[Replica]) -> None:
    if {r.ids for r in a} != {r.ids for r in b}:
        raise ValueError("a paired comparison needs both methods scored on the same test examples")


def paired_bootstrap(a: Sequence[Replica], b: Sequence[Replica], metric: Metric, n_boot: int = N_BOOT,
                     seed: int = 0, level: float = LEVEL) -> Paired:
    """Bootstrap of metric(A) - metric(B), resampling the same examples for both.

    Seeds: the two methods' seeds are independent, so each side resamples its own seeds; examples are shared.
    Folds: fold k of A and fold k of B hold the same examples, so folds are resampled together, as pairs.
    The p-value is the two-sided bootstrap p (twice the smaller tail share beyond 0).
    """
    _align(a, b)
    rng = np.random.default_rng(seed)
    shared = _shared(a) and _shared(b)
    by_ids = {r.ids: i for i, r in enumerate(b)}
    draws = np.empty(n_boot)
    for k in range(n_boot):
        if shared:
            idx = rng.integers(0, len(a[0].ids), len(a[0].ids))
            pa, pb = rng.integers(0, len(a), len(a)), rng.integers(0, len(b), len(b))
            draws[k] = _draw(a, metric, rng, pa, idx) - _draw(b, metric, rng, pb, idx)
        else:
            folds = rng.integers(0, len(a), len(a))
            diffs = []
            for f in folds:
                ra, rb = a[f], b[by_ids[a[f].ids]]
                idx = rng.integers(0, len(ra.ids), len(ra.ids))
                diffs.append(_value(ra, metric, idx) - _value(rb, metric, idx))
            draws[k] = float(np.mean(diffs))
    alpha = (1 - level) / 2
    diff = point(a, metric) - point(b, metric)
    p = min(1.0, 2 * min(np.mean(draws <= 0), np.mean(draws >= 0)))
    return Paired(diff, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha)), float(p),
                  "paired bootstrap")


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool], exact: bool | None = None) -> dict:
    """McNemar's test on paired correctness: b = A right and B wrong, c = A wrong and B right.

    Exact (two-sided binomial on the discordant pairs, p = 0.5) when b + c < 25 unless told otherwise, else the
    chi-squared statistic with continuity correction, (|b - c| - 1)^2 / (b + c), on one degree of freedom.
    """
    a, b_ = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError("McNemar needs the same examples for both methods")
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    n = b + c
    exact = n < 25 if exact is None else exact
    if n == 0:
        return {"b": b, "c": c, "statistic": 0.0, "p": 1.0, "exact": exact}
    if exact:
        p = min(1.0, 2 * scipy_stats.binom.cdf(min(b, c), n, 0.5))
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p": float(p), "exact": True}
    stat = (abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "statistic": float(stat), "p": float(scipy_stats.chi2.sf(stat, 1)), "exact": False}


def compare_to_best(a: Sequence[Replica], best: Sequence[Replica], metric_name: str, metric: Metric,
                    seed: int = 0) -> Paired:
    """A against the best: McNemar for accuracy with one run each (its natural paired test), else paired bootstrap.

    The interval of the difference always comes from the paired bootstrap.
    """
    boot = paired_bootstrap(a, best, metric, seed=seed)
    if metric_name == "accuracy" and len(a) == 1 and len(best) == 1:
        m = mcnemar(a[0].pred == a[0].ref, best[0].pred == best[0].ref)
        kind = "McNemar (exact)" if m["exact"] else "McNemar (chi2)"
        return Paired(boot.diff, boot.low, boot.high, m["p"], kind)
    return boot


def pareto_front(rows: Sequence[dict], quality: str, cost: str) -> list[str]:
    """Names of the rows no other row dominates: at least as good and at most as costly, and strictly one of them.

    Rows missing the quality or the cost are left out.
    """
    ok = [r for r in rows if _num(r.get(quality)) is not None and _num(r.get(cost)) is not None]
    front = []
    for r in ok:
        q, c = float(r[quality]), float(r[cost])
        dominated = any(
            float(o[quality]) >= q and float(o[cost]) <= c and (float(o[quality]) > q or float(o[cost]) < c)
            for o in ok if o is not r
        )
        if not dominated:
            front.append(r["name"])
    return front


def _num(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def needed_test_size(n: int, half_width: float, gap: float) -> int:
    """Test examples for a 95% half-width of `gap`, given half-width `half_width` at `n` (width goes as 1/sqrt(n))."""
    if gap <= 0 or half_width <= 0:
        return n
    return int(math.ceil(n * (half_width / gap) ** 2 - 1e-9))  # 1e-9: 5625.000000001 is 5625


@dataclass(frozen=True)
class MethodSummary:
    """One method's line in the decision: its interval, its comparison with the best, and its costs."""

    name: str
    mean: float
    low: float
    high: float
    vs_best: Paired | None  # None for the best method itself
    trainable_params: float
    train_seconds: float


def rank_key(mean: float, trainable_params: float | None, train_seconds: float | None) -> tuple[float, float, float]:
    """Sort key for "best" (the largest wins): the metric, and on an exact tie the cheaper method, by trainable
    parameters and then training time, so that equal scores never crown the dearer method by table order."""
    return mean, -(trainable_params or 0.0), -(train_seconds or 0.0)


def verdict(summaries: Sequence[MethodSummary], metric: str, n_test: int, point_size: float = 0.01) -> list[str]:
    """3-5 plain lines: the best method, the ones tied with it, the cheapest within one point, a size warning.

    `point_size` is one point of the metric (0.01 on a 0-1 scale).
    """
    best = max(summaries, key=lambda s: rank_key(s.mean, s.trainable_params, s.train_seconds))
    tied = [s for s in summaries if s is not best and s.vs_best is not None and not s.vs_best.distinguishable]
    lines = [f"Best: {best.name}, test {metric} {best.mean:.3f} (95% interval {best.low:.3f}-{best.high:.3f})."]
    lines.append("Tied with it at 95% (a paired test cannot tell them apart): "
                 + (", ".join(s.name for s in tied) if tied else "none") + ".")
    close = [s for s in summaries if s.mean >= best.mean - point_size]
    cheap = min(close, key=lambda s: (s.trainable_params, s.train_seconds))
    lines.append(f"Cheapest within 1 point of the best: {cheap.name} ({cheap.trainable_params:,.0f} trainable "
                 f"parameters, {cheap.train_seconds:.0f} s training, {metric} {cheap.mean:.3f}).")
    others = [s for s in summaries if s is not best and s.vs_best is not None]
    if others and tied:
        lines.append(_size_line(best, max(others, key=lambda s: s.mean), n_test, point_size))
    return lines


def _size_line(best: MethodSummary, runner: MethodSummary, n_test: int, point_size: float) -> str:
    """Whether the test split is big enough to separate the best method from the runner-up it is tied with.

    "About N examples would be needed" is only said when N is more than the split has: the interval can be
    narrow enough already while the paired test still calls a tie, and a 0-wide interval sizes nothing.
    """
    gap = abs(runner.vs_best.diff)
    half = (runner.vs_best.high - runner.vs_best.low) / 2
    if half == 0:
        return (f"Warning: {runner.name} and {best.name} score alike on every resample of the {n_test} test "
                "examples (an interval 0 wide), so this split cannot say how many examples would separate them.")
    # A gap under one point (a tie on the test split) cannot be "separated"; size the split for one point then.
    target = "that gap" if gap >= point_size else "a 1-point gap"
    need = needed_test_size(n_test, half, max(gap, point_size))
    if need > n_test:
        return (f"Warning: the test split is too small to separate the methods: {n_test} examples give the best "
                f"method an interval {best.high - best.low:.3f} wide, and its difference with {runner.name} "
                f"(gap {gap:.3f}) ±{half:.3f}; about {need:,} test examples would be needed to separate {target}.")
    if gap < point_size:
        return (f"The {n_test} test examples are enough to separate a 1-point gap (±{half:.3f}); {runner.name} is "
                f"{gap:.3f} from {best.name}, less than a point: a tie in practice.")
    return (f"Warning: {runner.name} and {best.name} are at the edge of separable: with {n_test} test examples "
            f"their difference (gap {gap:.3f}) ±{half:.3f} is no wider than the gap, but the "
            f"{runner.vs_best.test} test cannot tell them apart (p {runner.vs_best.p:.3f}); a larger test split "
            "would settle it.")


# ---------------------------------------------------------------------------------------------------------------------
# Racing: stop repeating a method once it is significantly worse than the leader
# ---------------------------------------------------------------------------------------------------------------------


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (in their given order): the i-th smallest is multiplied by
    m - i + 1, and the adjusted values are made non-decreasing in that order. Controls the family-wise error."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class RacedOut:
    """A method that stopped repeating: after how many rounds, against which leader, and the evidence."""

    name: str
    rounds: int
    leader: str
    diff: float  # its metric minus the leader's, over the examples scored so far
    p_holm: float
    test: str


def race_round(candidates: dict[str, Sequence[Replica]], costs: dict[str, tuple[float, float]], metric_name: str,
               metric: Metric, rounds: int, alpha: float = 0.05, seed: int = 0) -> list[RacedOut]:
    """The methods to stop after round `rounds`: each remaining method is tested against the current leader with the
    paired test over every example scored so far (`compare_to_best`), the p-values are Holm-corrected together,
    and a method whose corrected p is below `alpha` and which scores below the leader stops. The leader never
    stops. `costs` holds (trainable params, train seconds) per method, to break exact ties as the verdict does."""
    scores = {name: point(reps, metric) for name, reps in candidates.items()}
    leader = max(candidates, key=lambda n: rank_key(scores[n], *costs.get(n, (0.0, 0.0))))
    others = [name for name in candidates if name != leader]
    tests = [compare_to_best(candidates[name], candidates[leader], metric_name, metric, seed=seed) for name in others]
    adjusted = holm([t.p for t in tests])
    return [RacedOut(name, rounds, leader, t.diff, p, t.test)
            for name, t, p in zip(others, tests, adjusted, strict=True) if p < alpha and t.diff < 0]
