"""Evaluation and prediction recipes.

- `run_eval`: a model (and adapter) on a task's data, with settings given on the command line.
- `eval_run`: a finished run folder on its own test split or on a new labelled file, with the run's own settings
  (task and labels, template, max_length, demos, calibration). A setting given that contradicts the run is an
  error unless forced: a silently different prompt would score a different model.
- `predict_run`: a finished run on rows without targets: one answer per row, class probabilities for
  classification.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftlab.core.config import DEFAULT_MODEL, RunConfig, check_limit, from_dict, to_dict
from peftlab.core.errors import PeftlabError
from peftlab.core.files import ensure_writable, json_bytes, jsonl_bytes, write_files_atomic, write_jsonl
from peftlab.core.result import run_config
from peftlab.data.splits import data_labels, in_file_order, load_splits, read_examples, read_file
from peftlab.data.tasks import Example, get_task, task_for
from peftlab.evaluate.split_scoring import evaluate, predict
from peftlab.models.adapters import load_for_inference
from peftlab.models.hf_folder import check_max_length
from peftlab.prompts.encoding import content_free_items, encode_split, few_shot_demos, format_for
from peftlab.recipes.saved_run import SavedRun, load_run

FIX_OUT = "choose another --out"


@dataclass(kw_only=True)
class EvalOptions:
    """What `peftlab eval` was given; None means not given (a run's own setting, or the default, applies).
    Keyword-only: twelve options in a row are too easy to pass in the wrong order."""

    task: str | None = None
    data: str | None = None
    split: str | None = None
    model: str | None = None
    adapter: str | None = None
    shots: int | None = None
    limit: int | None = None
    template: int | None = None
    max_length: int | None = None
    device: str = "auto"
    allow_pickle: bool = False
    calibrate: bool | None = None


def run_eval(opts: EvalOptions, out: Path) -> dict:
    """Score a model on a task's data; writes `out/metrics.json` and `out/predictions.jsonl`; returns the metrics."""
    split, shots, template = opts.split or "all", opts.shots or 0, opts.template or 0
    max_length, model = opts.max_length or 512, opts.model or DEFAULT_MODEL
    if split not in ("all", "train", "val", "test"):
        raise PeftlabError(f"--split must be all, train, val or test, got '{split}'")
    if opts.task is None:
        raise PeftlabError("give a run folder (peftlab eval RUN) or --task")
    check_limit(opts.limit)
    ensure_writable(out, FIX_OUT)  # before the model loads and scores, not after
    t = get_task(opts.task)
    cfg = from_dict(RunConfig, {"data": {"task": opts.task, "path": opts.data, "template": template,
                                         "max_length": max_length, "calibrate": bool(opts.calibrate)}})
    labels = data_labels(cfg.data, t)  # alpaca, chat: a file of a few short labels is classification, as in training
    if labels and t.relabel is not None:
        t = t.relabel(labels)
    in_file = read_examples(cfg.data, t)
    splits = load_splits(cfg.data, t)
    examples = in_file if split == "all" else splits[split]
    # Few-shot demos come from the train split; scoring them too would leak, so 'all' with shots scores val + test.
    if shots and split in ("all", "train"):
        examples = splits["val"] + splits["test"] if split == "all" else examples
    # The first N in the file, as --limit promises, and predictions.jsonl in file order.
    examples = in_file_order(examples, in_file)[: opts.limit]
    if not examples:
        raise PeftlabError(f"no examples to score in split '{split}'")
    loaded, _ = load_for_inference(model, opts.adapter, opts.device, opts.allow_pickle)
    check_max_length(loaded, max_length, "--max-length")
    fmt = format_for(loaded)
    demos = few_shot_demos(t, splits["train"], shots, seed=0, template=template)
    items = encode_split(cfg.data, t, fmt, examples, demos)
    content_free = content_free_items(cfg.data, t, fmt, examples, demos)
    metrics, rows = evaluate(loaded.model, fmt, t, examples, items, split=split, content_free=content_free)
    metrics.update(model=model, adapter=opts.adapter, shots=shots, calibrated=bool(content_free))
    _write(out, metrics, rows)
    return metrics


# A flag and the run setting it would replace.
RUN_SETTINGS = {
    "task": ("data", "task"), "model": ("model", "name"), "template": ("data", "template"),
    "max_length": ("data", "max_length"), "shots": ("data", "shots"), "calibrate": ("data", "calibrate"),
}


def _with_flags(cfg: RunConfig, opts: EvalOptions, force: bool) -> RunConfig:
    """The run's config with the flags applied; a flag that changes it is an error unless `force`."""
    raw = to_dict(cfg)
    if opts.adapter is not None:
        raise PeftlabError("--adapter: a run folder brings its own adapter; give one or the other")
    for flag, (section, key) in RUN_SETTINGS.items():
        given, own = getattr(opts, flag), getattr(getattr(cfg, section), key)
        if given is None or given == own:
            continue
        if not force:
            raise PeftlabError(f"--{flag.replace('_', '-')} {given} contradicts the run's {section}.{key} ({own}); "
                               "leave it out to use the run's, or pass --force")
        raw[section][key] = given
    return from_dict(RunConfig, raw)  # a flag's value is checked as the config key it replaces


def eval_run(run_dir: Path, opts: EvalOptions, out: Path | None = None, force: bool = False) -> dict:
    """Score a finished run on its own test split (default) or on `opts.data`, with the run's settings."""
    check_limit(opts.limit)
    out = out or Path(run_dir) / "eval" / (Path(opts.data).stem if opts.data else opts.split or "test")
    ensure_writable(out, FIX_OUT)  # a read-only run folder is refused before scoring, not after
    run = load_run(run_dir, opts.device, _with_flags(run_config(run_dir), opts, force))
    if opts.data:
        if opts.split not in (None, "all"):
            raise PeftlabError("--split applies to the run's own data; with --data every row of the file is scored")
        examples, split = read_file(run.task, Path(opts.data)), "all"
    else:
        split = opts.split or "test"
        if split not in ("train", "val", "test"):
            raise PeftlabError(f"--split must be train, val or test for a run's own data, got '{split}'")
        examples = load_splits(run.cfg.data, run.task, val_in_train=not run.method.trains)[split]
    examples = examples[: opts.limit]
    if not examples:
        raise PeftlabError(f"no examples to score in split '{split}'")
    metrics, rows = evaluate(run.model, run.fmt, run.task, examples, _encode(run, examples), split=split,
                             content_free=run.content_free)
    metrics.update(run=str(run_dir), data=opts.data, calibrated=bool(run.content_free))
    _write(out, metrics, rows)
    return metrics


def predict_run(run_dir: Path, input_file: Path, out: Path, limit: int | None = None, device: str | None = None
                ) -> list[dict]:
    """Answer every row of `input_file` (targets not needed) with a finished run; writes JSONL to `out`."""
    check_limit(limit)
    if Path(out).is_dir():
        raise PeftlabError(f"{out}: is a folder; --out names the JSONL file to write, e.g. {out}/predictions.jsonl")
    ensure_writable(Path(out).parent, FIX_OUT)
    cfg = run_config(run_dir)
    # The rows are read before the model loads: a missing or malformed input file fails in a second.
    examples = read_file(task_for(cfg.data), Path(input_file), labelled=False)[:limit]
    run = load_run(run_dir, device, cfg)
    answers = predict(run.model, run.fmt, run.task, examples, _encode(run, examples), content_free=run.content_free)
    rows = [{"id": ex.id, "prediction": text} for ex, text in zip(examples, answers.texts, strict=True)]
    if answers.scores is not None:
        for row, probabilities in zip(rows, answers.probabilities(run.task.labels), strict=True):
            row["probabilities"] = probabilities
    write_jsonl(out, rows)
    return rows


def _encode(run: SavedRun, examples: list[Example]):
    check_max_length(run.loaded, run.cfg.data.max_length)
    return encode_split(run.cfg.data, run.task, run.fmt, examples, run.shots)


def _write(out: Path, metrics: dict, rows: list[dict]) -> None:
    """Both files or neither: metrics.json goes in last, so finding it means predictions.jsonl is complete."""
    write_files_atomic({out / "predictions.jsonl": jsonl_bytes(rows), out / "metrics.json": json_bytes(metrics)})
