"""A study's decision: per method a mean with its 95% interval, a paired test against the best, the Pareto frontier
over cost, and a verdict of a few plain lines. Built only from the run folders' files.

Which run folders belong to which method comes from `<study>/study.json` (written by `peftlab compare` for a study
with `repeats`: one method, several seed or fold folders). Without it every run folder is its own method with one
replica. The test rows come from each folder's `predictions.jsonl`.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_json
from peftlab.core.result import has_result, read_result
from peftlab.core.yamlio import read_yaml
from peftlab.report import stats
from peftlab.report.stats import MethodSummary, Replica

MANIFEST = "study.json"
# The data settings that decide which examples a run's test split holds. data.fold is left out: fold k of one method
# pairs with fold k of another by their ids. With a test file of its own, only that file and the cut say which.
SPLIT_KEYS = ("task", "path", "train", "val", "test", "split", "seed", "folds", "limit_eval", "mixture")
TEST_FILE_KEYS = ("task", "test", "limit_eval", "mixture")
# (result.json column, axis label) of the costs the frontier is drawn over.
COSTS = [("trainable_params", "trainable parameters"), ("train_seconds", "train time (s)"),
         ("peak_rss_mb", "peak memory (MB)"), ("adapter_bytes", "adapter size (bytes)")]


@dataclass
class Group:
    """One method of the study with the run folders (seeds or folds) that repeat it."""

    name: str
    method: str
    results: list[dict]
    replicas: list[Replica]
    folders: list[Path] = field(default_factory=list)
    # Per replica, its test rows as (id, references): two methods pair only when these are the same.
    tests: list[tuple] = field(default_factory=list)
    raced_out: dict | None = None  # racing stopped its repeats (`stats.RacedOut` as a dict); it cannot be best


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("split", "test") == "test" and "id" in r]


def load_groups(study_dir: Path) -> list[Group]:
    """The study's methods with their finished replicas (a folder without result.json or predictions is left out)."""
    study_dir = Path(study_dir)
    manifest = study_dir / MANIFEST
    if manifest.is_file():
        spec = json.loads(manifest.read_text(encoding="utf-8"))["groups"]
    else:
        spec = {p.name: {"runs": [p.name]} for p in sorted(study_dir.iterdir()) if has_result(p)}
    groups = []
    for name, g in spec.items():
        results, replicas, folders, tests = [], [], [], []
        for run in g["runs"]:
            rows = _rows(study_dir / run / "predictions.jsonl")
            if not has_result(study_dir / run) or not rows:
                continue
            result = read_result(study_dir / run).to_dict()
            labels = (result.get("metrics") or {}).get("test_labels")
            results.append(result)
            replicas.append(stats.replica_from_rows(rows, labels if isinstance(labels, list) else None))
            folders.append(study_dir / run)
            tests.append(tuple(sorted((str(r["id"]), json.dumps(r.get("references"))) for r in rows)))
        if results:
            groups.append(Group(name, g.get("method") or results[0].get("method", name), results, replicas, folders,
                                tests, g.get("raced_out")))
    return groups


def _mean(results: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in results if isinstance(r.get(key), int | float)]
    return sum(values) / len(values) if values else None


def _metric(study_dir: Path, groups: list[Group], metric: str | None) -> tuple[str, stats.Metric] | None:
    """The metric judged and its function on per-example rows; None where the rows cannot give it."""
    first = groups[0].results[0]
    metric = metric or _manifest_metric(study_dir) or first.get("primary_metric")
    labels = (first.get("metrics") or {}).get("test_labels")
    n_labels = len(labels) if isinstance(labels, list) else 0
    if not ((n_labels and metric in ("accuracy", "macro_f1")) or metric == "rouge1"):
        return None  # the per-example rows carry only these metrics (a mixture's are prefixed by task)
    return metric, stats.metric_fn(metric, n_labels)


def _costs(g: Group) -> tuple[float, float]:
    return _mean(g.results, "trainable_params") or 0.0, _mean(g.results, "train_seconds") or 0.0


def race(study_dir: Path, rounds: int, alpha: float, metric: str | None = None, seed: int = 0) -> list[stats.RacedOut]:
    """After round `rounds` of a racing study: the methods still repeating that are now significantly worse than
    the leader (`stats.race_round`), judged on the run folders finished so far. [] when they cannot be compared."""
    groups = [g for g in load_groups(study_dir) if g.raced_out is None]
    judged = _metric(study_dir, groups, metric) if len(groups) > 1 else None
    if judged is None or _unpaired(groups) is not None:
        return []
    name, fn = judged
    return stats.race_round({g.name: g.replicas for g in groups}, {g.name: _costs(g) for g in groups}, name, fn,
                            rounds, alpha, seed)


def _row(g: Group, interval: tuple[float, float, float], paired: stats.Paired | None, best: bool) -> dict:
    mean, low, high = interval
    costs = {key: _mean(g.results, key) for key, _ in COSTS}
    return {"name": g.name, "method": g.method, "replicas": len(g.replicas), "mean": mean, "low": low, "high": high,
            **costs, "best": best, "diff": paired.diff if paired else 0.0, "diff_low": paired.low if paired else 0.0,
            "diff_high": paired.high if paired else 0.0, "p": paired.p if paired else None,
            "test": paired.test if paired else None, "tied": paired is not None and not paired.distinguishable,
            "raced_out": g.raced_out}


def decide(study_dir: Path, metric: str | None = None, seed: int = 0) -> dict | None:
    """The decision as a dict (what decision.json holds), or None when there are fewer than two comparable methods.

    A method that racing stopped is listed with the repeats it had, and is never best: the paired tests and the
    verdict are over the methods that ran every repeat.
    """
    groups = load_groups(study_dir)
    contenders = [g for g in groups if g.raced_out is None]
    if len(groups) < 2 or not contenders:
        return None
    judged = _metric(study_dir, groups, metric)
    if judged is None or _unpaired(contenders) is not None:
        return None  # methods scored on different test examples cannot be paired
    metric, fn = judged
    if not _rows_reproduce_metric(groups, metric, fn):
        return None
    intervals = {g.name: stats.bootstrap_interval(g.replicas, fn, seed=seed) for g in groups}
    best = max(contenders, key=lambda g: stats.rank_key(intervals[g.name][0], *_costs(g)))
    rows, summaries = [], []
    for g in groups:
        paired = None
        if g is not best and g.raced_out is None:
            paired = stats.compare_to_best(g.replicas, best.replicas, metric, fn, seed=seed)
        rows.append(_row(g, intervals[g.name], paired, g is best))
        if g.raced_out is None:
            summaries.append(MethodSummary(g.name, *intervals[g.name], paired, *_costs(g)))
    ids = {r.ids for g in contenders for r in g.replicas}
    # Seeds share one test split; folds each have their own, and together they test every example once.
    n_test = len(contenders[0].replicas[0].ids) if _shared(contenders) else sum(len(i) for i in ids)
    fronts = {key: stats.pareto_front([r for r in rows if not r["raced_out"]], "mean", key) for key, _ in COSTS}
    for row in rows:
        row["frontier"] = [label for key, label in COSTS if row["name"] in fronts[key]]
    verdict = stats.verdict(summaries, metric, n_test) if len(summaries) > 1 else [
        f"Best: {best.name}, test {metric} {intervals[best.name][0]:.3f} (95% interval "
        f"{intervals[best.name][1]:.3f}-{intervals[best.name][2]:.3f}); every other method was raced out."]
    return {"metric": metric, "n_test": n_test, "level": stats.LEVEL, "rows": rows, "frontier": fronts,
            "verdict": verdict + _race_lines(study_dir, groups), "data": data_source(contenders[0].folders[0])}


def _race_lines(study_dir: Path, groups: list[Group]) -> list[str]:
    """What racing did: each method it stopped, when and why, and the compute it saved."""
    out = [g for g in groups if g.raced_out]
    manifest = Path(study_dir) / MANIFEST
    info = json.loads(manifest.read_text(encoding="utf-8")).get("race") if manifest.is_file() else None
    if not info:
        return []
    stopped = "; ".join(f"{g.name} after {r['rounds']} of {info['rounds']} rounds ({r['diff']:+.3f} vs {r['leader']}, "
                        f"Holm p {r['p_holm']:.3f})" for g in out for r in [g.raced_out]) or "none"
    return [f"Raced out (paired test against the leader after each round, Holm-corrected, alpha {info['alpha']}): "
            f"{stopped}. Racing skipped {info['saved_runs']} of {info['total_runs']} final runs, about "
            f"{100 * info['saved_share']:.0f}% of their estimated compute."]


def test_split(run_dir: Path) -> dict:
    """The data settings of a run (config.yaml) that decide its test examples; {} when the folder does not say."""
    try:
        config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    except PeftlabError:
        return {}
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        return {}
    return {key: data.get(key) for key in (TEST_FILE_KEYS if data.get("test") else SPLIT_KEYS)}


def _unpaired(groups: list[Group]) -> str | None:
    """Why the methods were not scored on the same test examples, or None when they were.

    The same ids are not enough: two files both number their rows row2, row3, ..., and a data file edited between
    runs keeps its ids. So the settings that pick the test split must agree, and so must every row's references.
    """
    splits = {g.name: test_split(g.folders[0]) for g in groups}
    differ = [k for k in dict.fromkeys(k for s in splits.values() for k in s)
              if len({json.dumps(s.get(k)) for s in splits.values()}) > 1]
    if differ:
        return "; ".join(f"{name}: " + ", ".join(f"data.{k}={s.get(k)}" for k in differ) for name, s in splits.items())
    if any(set(g.tests) != set(groups[0].tests) for g in groups):
        odd = next(g.name for g in groups if set(g.tests) != set(groups[0].tests))
        return f"{groups[0].name} and {odd} have different test ids or references (a data file changed between runs?)"
    return None


def unpaired_note(study_dir: Path) -> str | None:
    """A sentence for the results page when methods of one task were scored on different test examples: their test
    metrics are then no comparison, and no verdict is drawn. None when they share them. Runs of different tasks are
    side by side on purpose, and are not compared."""
    by_task: dict[str, list[Group]] = {}
    for g in load_groups(study_dir):
        if g.raced_out:  # racing stopped its repeats on purpose: it holds some of the folds, not other examples
            continue
        by_task.setdefault(str(g.results[0].get("task")), []).append(g)
    why = next((w for gs in by_task.values() if len(gs) > 1 and (w := _unpaired(gs)) is not None), None)
    if why is None:
        return None
    return (f"The runs were not scored on the same test examples ({why}): their test metrics are not a comparison, "
            "and no paired verdict is drawn. Rerun them on one test split.")


def data_source(run_dir: Path) -> str | None:
    """Where a run's test split came from, as the end of "this test split, ...", from its config.yaml's data section.

    The user's own files are named; only a packaged task's default file lives under data/. None when the run folder
    does not say (no or unreadable config.yaml, a mixture of tasks).
    """
    try:
        config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    except PeftlabError:
        return None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or data.get("mixture"):
        return None
    if data.get("test"):
        return f"read from {data['test']}"
    if data.get("train") or data.get("path"):
        return f"drawn from {data.get('train') or data.get('path')}"
    task = str(data.get("task") or "pubmedqa")
    if task.endswith((".yaml", ".yml")):
        return f"drawn from the data file that {task} names"
    return f"drawn from the {task} data in data/"


def _rows_reproduce_metric(groups: list[Group], metric: str, fn) -> bool:
    """The metric recomputed from each run's test rows must equal the one it wrote, or the rows are not the whole
    test split (a cut predictions file) and an interval from them would describe something else."""
    for g in groups:
        for result, rep in zip(g.results, g.replicas, strict=True):
            written = (result.get("metrics") or {}).get(f"test_{metric}")
            if isinstance(written, int | float) and abs(stats.point([rep], fn) - written) > 1e-6:
                return False
    return True


def _shared(groups: list[Group]) -> bool:
    return all(r.ids == groups[0].replicas[0].ids for g in groups for r in g.replicas)


def _manifest_metric(study_dir: Path) -> str | None:
    manifest = Path(study_dir) / MANIFEST
    return json.loads(manifest.read_text(encoding="utf-8")).get("metric") if manifest.is_file() else None


def decision_markdown(d: dict) -> str:
    """The verdict lines, then one row per method: mean [95% interval], difference with the best, test, frontier."""
    m = d["metric"]
    lines = ["## Verdict", ""] + [f"- {line}" for line in d["verdict"]] + [
        "", f"| method | runs | test {m} (95% interval) | vs best (95% interval) | p | tied with best | "
            "trainable params | train s | peak MB | Pareto frontier |", "|---" * 10 + "|"]
    for r in d["rows"]:
        vs = "best" if r["best"] else f"{r['diff']:+.3f} ({r['diff_low']:+.3f}, {r['diff_high']:+.3f})"
        p = "" if r["p"] is None else f"{r['p']:.3f} ({r['test']})"
        if r.get("raced_out"):
            rounds = r["raced_out"]["rounds"]
            vs = f"raced out after {rounds} round{'s' if rounds > 1 else ''}"
            p = f"{r['raced_out']['p_holm']:.3f} (Holm)"
        lines.append(
            f"| {r['name']} | {r['replicas']} | {r['mean']:.3f} ({r['low']:.3f}-{r['high']:.3f}) | {vs} | {p} | "
            f"{'yes' if r['tied'] else ('-' if r['best'] else 'no')} | {_n(r['trainable_params'], ',.0f')} | "
            f"{_n(r['train_seconds'], ',.1f')} | {_n(r['peak_rss_mb'], ',.0f')} | {', '.join(r['frontier'])} |")
    lines += ["", _meaning(d), ""]
    return "\n".join(lines) + "\n"


def _meaning(d: dict) -> str:
    return (f"Intervals are 95% percentile bootstraps over the {d['n_test']} test examples, and over the repeats "
            "(seeds or folds) where a method has several; 'vs best' is a paired bootstrap of the difference on the "
            "same examples, and 'tied' means the paired test (McNemar for accuracy with single runs) has "
            f"p >= 0.05. They describe this test split{', ' + d['data'] if d.get('data') else ''}, not the population "
            "of all questions.")


def _n(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def decision_html(d: dict, plot: str) -> str:
    """The verdict as a list, the decision table and the Pareto plot."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in d["verdict"])
    md_rows = decision_markdown(d).split("\n")
    table_lines = [line for line in md_rows if line.startswith("|") and not line.startswith("|---")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in table_lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return (f'<ul class="verdict">{items}</ul><table class="results decision"><tr>{head}</tr>{body}</table>'
            f"<p>{html.escape(_meaning(d))}</p>{plot}")


def pareto_figure(d: dict) -> Figure:
    """Quality against each cost, with the 95% intervals as error bars; frontier methods in red, joined by a line."""
    fig = Figure(figsize=(12.0, 8.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    labels = []
    for ax, (key, label) in zip(axes, COSTS, strict=True):
        pts = [r for r in d["rows"] if r.get(key) is not None]
        labels.append([])
        for r in pts:
            on = r["name"] in d["frontier"][key]
            x = max(float(r[key]), 1.0)  # log axis: 0 (zero-shot) sits at 1
            ax.errorbar(x, r["mean"], yerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]], fmt="o",
                        color="tab:red" if on else "tab:blue", capsize=3)
            labels[-1].append(ax.annotate(r["name"], (x, r["mean"]), textcoords="offset points", xytext=(4, 4),
                                          fontsize=8))
        front = sorted((max(float(r[key]), 1.0), r["mean"]) for r in pts if r["name"] in d["frontier"][key])
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), color="tab:red", lw=1, alpha=0.6)
        ax.set_xscale("log")
        ax.margins(0.15)
        ax.set(xlabel=f"{label} (log)", ylabel=f"test {d['metric']}", title=f"{d['metric']} vs {label}")
        ax.grid(alpha=0.3)
    spread_labels(fig, labels)
    return fig


def spread_labels(fig: Figure, groups: list[list]) -> None:
    """Move point labels up, each past the labels below it that it would overlap, so that the names of close
    methods (prompt and prefix tuning at nearly the same memory) stay readable. Within each group (one axes)."""
    fig.canvas.draw()  # lays the axes out (constrained layout) before the labels are measured
    renderer = fig.canvas.get_renderer()
    for labels in groups:
        placed = []
        for label in sorted(labels, key=lambda a: (a.xy[1], a.xy[0])):
            for _ in range(len(labels)):
                box = label.get_window_extent(renderer)
                hit = next((p for p in placed if box.overlaps(p)), None)
                if hit is None:
                    break
                dx, dy = label.xyann
                label.xyann = (dx, dy + (hit.y1 - box.y0) * 72 / fig.dpi + 1)  # display pixels to points
            placed.append(label.get_window_extent(renderer))


def write_decision(study_dir: Path, metric: str | None = None) -> dict | None:
    """Write decision.json and pareto.png into the study folder; return the decision (None when there is none)."""
    d = decide(study_dir, metric)
    if d is None:
        return None
    write_json(Path(study_dir) / "decision.json", d)
    fig = pareto_figure(d)
    FigureCanvasAgg(fig)
    fig.savefig(Path(study_dir) / "pareto.png", dpi=90, bbox_inches="tight")
    return d
