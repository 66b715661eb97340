"""Multi-task mixtures (FLAN style): one run trained on several tasks, each with several instruction phrasings.

    data:
      mixture:
        - {task: pubmedqa, weight: 1, templates: [0, 1, 2]}
        - {task: dialogsum, weight: 2, templates: [0, 2]}

or the shorthand `data.task: mix:pubmedqa,dialogsum` (equal weights, every phrasing). The training set has as many
examples as the tasks' train splits together; task i gets a `weight_i / sum(weights)` share of them, drawn by
cycling through its shuffled train split, so a small task is repeated and a large one subsampled. Each training
example is phrased with a template drawn by a seeded RNG from its entry's list. Val and test are scored per task
with the entry's first template; metric keys carry the task, e.g. `test_pubmedqa_accuracy`, `test_dialogsum_rouge1`.
Per-epoch validation (best checkpoint, early stopping, sweep pruning) uses the first entry: list the task that
matters most first.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from peftlab.config import RunConfig, from_dict, save_config
from peftlab.data import Encoded, PromptFormat, encode
from peftlab.errors import PeftlabError
from peftlab.tasks import Example, Task, get_task


@dataclass
class MixtureEntry:
    """One task of a mixture: its data file (default: the task's own), sampling weight and phrasings."""

    task: str
    path: str | None = None
    weight: float = 1.0
    templates: list[int] = field(default_factory=list)


@dataclass
class Part:
    entry: MixtureEntry
    task: Task
    key: str  # the task as it appears in metric keys
    splits: dict[str, list[Example]]


def parse_mixture(cfg: RunConfig) -> list[MixtureEntry]:
    """The mixture entries of `data.mixture`, or of the `mix:a,b` shorthand, checked."""
    raw = cfg.data.mixture
    if not raw and cfg.data.task.startswith("mix:"):
        raw = [{"task": name.strip()} for name in cfg.data.task[4:].split(",") if name.strip()]
    entries = [from_dict(MixtureEntry, r, f"data.mixture[{i}]") for i, r in enumerate(raw)]
    if len(entries) < 2:
        raise PeftlabError("a mixture needs at least two tasks (data.mixture or data.task: mix:a,b)")
    for i, e in enumerate(entries):
        n = len(get_task(e.task).templates)
        e.templates = e.templates or list(range(n))
        if e.weight <= 0 or any(not 0 <= t < n for t in e.templates):
            raise PeftlabError(f"data.mixture[{i}] ({e.task}): weight must be > 0 and templates within 0..{n - 1}")
    return entries


def load_parts(cfg: RunConfig, entries: list[MixtureEntry]) -> list[Part]:
    """Each task's splits, drawn with the run's split settings and limits."""
    from peftlab.forgetting import metric_key
    from peftlab.train import load_splits

    parts = []
    for e in entries:
        task = get_task(e.task)
        tcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, task=e.task, path=e.path, mixture=[]))
        parts.append(Part(e, task, metric_key(task.name), load_splits(tcfg, task)))
    keys = [p.key for p in parts]
    if len(set(keys)) != len(keys):
        raise PeftlabError(f"data.mixture lists a task twice: {keys}")
    return parts


def sample_train(parts: list[Part], fmt: PromptFormat, max_length: int, seed: int) -> tuple[list[Encoded], dict]:
    """The mixed, encoded training set and how many examples each task contributed."""
    rng = random.Random(seed)
    total = sum(len(p.splits["train"]) for p in parts)
    weights = sum(p.entry.weight for p in parts)
    out: list[Encoded] = []
    counts = {}
    for p in parts:
        n = round(total * p.entry.weight / weights)
        picks: list[Example] = []
        while len(picks) < n and p.splits["train"]:  # whole shuffled passes: every example before any repeats
            picks += rng.sample(p.splits["train"], len(p.splits["train"]))
        for ex in picks[:n]:
            item = encode(p.task, ex, fmt, max_length, rng.choice(p.entry.templates))
            out.append(dataclasses.replace(item, id=f"{p.key}:{ex.id}"))
        counts[p.key] = min(n, len(picks))
    return out, counts


def run_mixture_training(cfg: RunConfig, on_epoch_end=None) -> Path:
    """Train one run on the mixture and write a normal run folder (same files as `train.run_training`)."""
    from peftlab.methods import apply_method, count_params, get_method
    from peftlab.models import load_model
    from peftlab.runtime import accelerator_and_dtype, seed_everything
    from peftlab.train import fit

    started = time.perf_counter()
    method = get_method(cfg.method.name)
    if cfg.data.target != "gold" or cfg.method.name == "few-shot" or cfg.experiments.probe:
        raise PeftlabError("a mixture trains on gold targets, without few-shot demos or the brittleness probe")
    seed_everything(cfg.train.seed)
    parts = load_parts(cfg, parse_mixture(cfg))
    accelerator, device, dtype = accelerator_and_dtype(cfg, method)
    loaded = load_model(cfg.model.name, device=device, dtype=dtype, chat=cfg.model.chat,
                        allow_pickle=cfg.model.allow_pickle)
    fmt = PromptFormat.for_model(loaded)
    train, counts = sample_train(parts, fmt, cfg.data.max_length, cfg.data.seed)
    enc = {(p.key, s): [encode(p.task, ex, fmt, cfg.data.max_length, p.entry.templates[0]) for ex in p.splits[s]]
           for p in parts for s in ("val", "test")}
    if accelerator.is_main_process:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
    model = apply_method(loaded, parts[0].task, cfg.method)
    trainable, total = count_params(model)
    summary: dict = {"train_steps": 0, "train_seconds": 0.0, "tokens_per_s": None, "last_train_loss": None,
                     "best_val_loss": None}
    if method.trains:
        first = parts[0]
        summary = fit(cfg, model, loaded, first.task, fmt, train, enc[(first.key, "val")], first.splits["val"],
                      cfg.run_dir, accelerator, on_epoch_end)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        _finish(cfg, raw, loaded, fmt, parts, enc, summary, {"train_mix": counts, "params": (trainable, total)},
                started)
    accelerator.end_training()
    return cfg.run_dir


def _evaluate_parts(model, fmt: PromptFormat, parts: list[Part], enc: dict) -> tuple[dict, list[dict]]:
    """Per-task val and test metrics (keys `<split>_<task>_<metric>`) and test prediction rows tagged by task."""
    from peftlab.evaluate import evaluate

    metrics: dict = {}
    rows: list[dict] = []
    for p in parts:
        for split in ("val", "test"):
            if not enc[(p.key, split)]:
                continue
            m, r = evaluate(model, fmt, p.task, p.splits[split], enc[(p.key, split)], split=split)
            metrics.update({f"{split}_{p.key}_{k}": v for k, v in m.items() if k not in ("task", "split")})
            if split == "test":
                rows += [{**row, "task": p.task.name} for row in r]
    return metrics, rows


def _finish(cfg: RunConfig, model, loaded, fmt: PromptFormat, parts: list[Part], enc: dict, summary: dict,
            info: dict, started: float) -> None:
    """The run folder: metrics, predictions, adapter and result.json (written last), as `train._finish` does."""
    from peftlab.experiments import run_experiments
    from peftlab.io import write_json, write_jsonl
    from peftlab.methods import get_method
    from peftlab.runtime import peak_rss_mb, versions
    from peftlab.train import save_trained

    metrics, rows = _evaluate_parts(model, fmt, parts, enc)
    metrics.update(run_experiments(cfg, model, fmt, parts[0].task, parts[0].splits, cfg.run_dir))
    trains = get_method(cfg.method.name).trains
    adapter_bytes = save_trained(model, loaded, cfg.method.name, cfg.run_dir) if trains else 0
    name = "mix:" + "+".join(p.task.name for p in parts)
    write_json(cfg.run_dir / "metrics.json", {"task": name, **metrics})
    write_jsonl(cfg.run_dir / "predictions.jsonl", rows)
    trainable, total = info["params"]
    result = {
        "name": cfg.name, "method": cfg.method.name, "task": name, "model": cfg.model.name,
        "task_kind": "mixture",
        "primary_metric": f"{parts[0].key}_{parts[0].task.primary_metric}",  # the first task's, like validation
        "trainable_params": trainable if trains else 0, "total_params": total,
        "trainable_pct": 100 * trainable / total if trains else 0.0, "adapter_bytes": adapter_bytes,
        **{k: v for k, v in summary.items() if k != "best_val_metrics"},
        "peak_rss_mb": peak_rss_mb(), "wall_seconds": time.perf_counter() - started,
        "truncated_examples": sum(e.truncated > 0 for items in enc.values() for e in items),
        "train_mix": info["train_mix"], "metrics": metrics, "versions": versions(),
    }
    write_json(cfg.run_dir / "result.json", result)  # written last: its presence marks the run complete
