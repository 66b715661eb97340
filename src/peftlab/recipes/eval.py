"""Evaluation recipe: load a model (and adapter), read and split a task's data, score it, write the results."""

from __future__ import annotations

from pathlib import Path

from peftlab.core.config import RunConfig, from_dict, validate
from peftlab.core.errors import PeftlabError
from peftlab.core.files import write_json, write_jsonl
from peftlab.data.splits import in_file_order, load_splits, read_examples
from peftlab.data.tasks import get_task
from peftlab.evaluate.evaluate import evaluate
from peftlab.models.adapters import load_for_inference
from peftlab.models.local import check_max_length
from peftlab.prompts.encoding import content_free_items, encode_split, few_shot_demos, format_for


def run_eval(
    task: str,
    out: Path,
    data: str | None = None,
    split: str = "all",
    model: str = "smollm2-135m-instruct",
    adapter: str | None = None,
    shots: int = 0,
    limit: int | None = None,
    template: int = 0,
    max_length: int = 512,
    device: str = "auto",
    allow_pickle: bool = False,
    calibrate: bool = False,
) -> dict:
    """Score a model on a task's data; writes `out/metrics.json` and `out/predictions.jsonl`; returns the metrics."""
    if split not in ("all", "train", "val", "test"):
        raise PeftlabError(f"--split must be all, train, val or test, got '{split}'")
    if limit is not None and limit < 1:
        raise PeftlabError(f"--limit must be >= 1 (leave it out to score every example), got {limit}")
    t = get_task(task)
    cfg = validate(from_dict(RunConfig, {"data": {"task": task, "path": data, "template": template,
                                                  "max_length": max_length, "calibrate": calibrate}}))
    in_file = read_examples(cfg, t)
    splits = load_splits(cfg, t)
    examples = in_file if split == "all" else splits[split]
    # Few-shot demos come from the train split; scoring them too would leak, so 'all' with shots scores val + test.
    if shots and split in ("all", "train"):
        examples = splits["val"] + splits["test"] if split == "all" else examples
    # The first N in the file, as --limit promises, and predictions.jsonl in file order.
    examples = in_file_order(examples, in_file)[:limit]
    if not examples:
        raise PeftlabError(f"no examples to score in split '{split}'")
    loaded, _ = load_for_inference(model, adapter, device, allow_pickle)
    check_max_length(loaded, max_length, "--max-length")
    fmt = format_for(loaded)
    demos = few_shot_demos(t, splits["train"], shots, seed=0, template=template)
    items = encode_split(cfg, t, fmt, examples, demos)
    content_free = content_free_items(cfg, t, fmt, examples, demos)
    metrics, rows = evaluate(loaded.model, fmt, t, examples, items, split=split, content_free=content_free)
    metrics.update(model=model, adapter=adapter, shots=shots, calibrated=bool(content_free))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    write_jsonl(out / "predictions.jsonl", rows)
    return metrics
