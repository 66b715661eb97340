"""Training targets other than the gold labels: a teacher model's outputs (distillation).

`data.target` is `gold` (the default), `teacher` (the study's `<output_dir>/teacher.jsonl`), or a path to a JSONL
or CSV file of outputs keyed by example id, e.g. a hosted model's answers. Every training example must have an
output: a missing id is an error that names it. `generate_teacher_outputs` writes such a file from any model, adapter
or finished run (`peftlab distill`); `prepare_teacher` is a study's teacher step, ranking candidates on val first.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from pydantic import StrictInt, StrictStr
from pydantic.dataclasses import dataclass as section
from rich.console import Console
from rich.table import Table

from peftlab.core.config import DEFAULT_MODEL, check_limit, from_dict
from peftlab.core.errors import PeftlabError
from peftlab.core.files import ensure_file_writable, write_json, write_jsonl
from peftlab.core.result import has_result, run_config
from peftlab.core.schema import FORBID
from peftlab.data.splits import load_splits
from peftlab.data.targets import read_outputs
from peftlab.data.tasks import Example, Task, task_for
from peftlab.evaluate.split_scoring import evaluate
from peftlab.models.adapters import load_for_inference
from peftlab.prompts.encoding import encode_split, format_for


@section(config=FORBID)
class TeacherSpec:
    """One teacher candidate of a study: a base model, optionally with an adapter or a finished run folder."""

    name: StrictStr
    model: StrictStr = DEFAULT_MODEL
    adapter: StrictStr | None = None
    template: StrictInt | None = None


def resolve_teacher(spec: str) -> tuple[str, str | None]:
    """`MODEL[:ADAPTER_OR_RUN]` or a finished run folder -> (base model, adapter or run folder or None).

    A run folder names its own base in config.yaml; its adapter/ (or model/ for full fine-tuning) is the teacher.
    """
    run = Path(spec)
    if (run / "config.yaml").is_file() and has_result(run):
        base = run_config(run).model.name
        trained = (run / "adapter").is_dir() or (run / "model").is_dir()
        return base, str(run) if trained else None
    model, _, adapter = spec.partition(":")
    return model, adapter or None


def _load_teacher(model: str, adapter: str | None, cfg):
    loaded, _ = load_for_inference(model, adapter, cfg.model.device, cfg.model.allow_pickle)
    return loaded, format_for(loaded)


def _predict(model: str, adapter: str | None, cfg, examples: list[Example], progress: bool = True):
    """(metrics, predictions) of one teacher on `examples`, through the same encoding and scoring as any run."""

    loaded, fmt = _load_teacher(model, adapter, cfg)
    task = task_for(cfg.data)
    items = encode_split(cfg.data, task, fmt, examples)
    metrics, rows = evaluate(loaded.model, fmt, task, examples, items, split="teacher", progress=progress)
    return metrics, [row["prediction"] for row in rows]


def generate_teacher_outputs(teacher: str, cfg, out: Path, split: str = "train", limit: int | None = None) -> Path:
    """Write the teacher's outputs for one split of `cfg`'s data as JSONL {"id", "output"}; returns `out`.

    `teacher` is `MODEL[:ADAPTER_OR_RUN]`, a run folder, or a JSONL/CSV of outputs made elsewhere (normalised).
    The split is drawn with `cfg.data` (split fractions, seed, limits), so it is the student's training split.
    """

    out = Path(out)
    check_limit(limit)  # 0 used to distill every example, and -1 all but the last
    ensure_file_writable(out, "--out", "teacher.jsonl")  # before the teacher runs over the split, not after
    if Path(teacher).suffix in (".jsonl", ".csv") and Path(teacher).is_file():
        write_jsonl(out, [{"id": k, "output": v} for k, v in read_outputs(Path(teacher)).items()])
        return out
    task = task_for(cfg.data)
    examples = load_splits(cfg.data, task)[split]
    examples = examples[:limit] if limit else examples
    if not examples:
        raise PeftlabError(f"the {split} split is empty; nothing to distill")
    model, adapter = resolve_teacher(teacher)
    _, outputs = _predict(model, adapter, cfg, examples)
    rows = [{"id": ex.id, "output": o} for ex, o in zip(examples, outputs, strict=True) if o.strip()]
    if len(rows) < len(examples):  # an empty output cannot be a training target; training will name the id
        print(f"warning: {len(examples) - len(rows)} empty teacher output(s) left out of {out}", file=sys.stderr)
    write_jsonl(out, rows)
    return out


def rank_teachers(teachers: list[TeacherSpec], cfg, study_dir: Path) -> list[dict]:
    """Score every candidate on the val split; write `teacher_ranking.json` (best first) and print a table."""
    task = task_for(cfg.data)
    val = _val_split(cfg, task)
    key = f"val_{task.primary_metric}"
    ranking = []
    for t in teachers:
        tcfg = _with_template(cfg, t)
        metrics, _ = _predict(t.model, t.adapter, tcfg, val, progress=False)
        ranking.append({"name": t.name, "model": t.model, "adapter": t.adapter, "template": tcfg.data.template,
                        key: metrics[task.primary_metric], "n": len(val)})
    ranking.sort(key=lambda r: -r[key])
    write_json(study_dir / "teacher_ranking.json", ranking)
    table = Table("rank", "teacher", "model", "adapter", key, title="teacher ranking (val)")
    for i, r in enumerate(ranking, 1):
        table.add_row(str(i), r["name"], r["model"], r["adapter"] or "-", f"{r[key]:.4f}")
    Console().print(table)
    return ranking


def _val_split(cfg, task: Task) -> list[Example]:
    val = load_splits(cfg.data, task)["val"]
    if not val:
        raise PeftlabError("the val split is empty; teachers cannot be ranked (check data.split)")
    return val


def _with_template(cfg, teacher: TeacherSpec):
    if teacher.template is None:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=teacher.template))


def prepare_teacher(header: dict, configs: list, study_dir: Path) -> Path:
    """A study's teacher step: rank the `teachers` on val (with `select_teacher: true`) and distill with the best.

    The outputs go to `<study>/teacher.jsonl`, which runs with `data.target: teacher` train on. An existing file is
    kept, so a resumed study does not regenerate it (delete it to redo the step).
    """
    out = Path(study_dir) / "teacher.jsonl"
    if out.is_file():
        print(f"teacher outputs: {out} (exists; delete it to regenerate)")
        return out
    raw = header.get("teachers") or []
    if not isinstance(raw, list) or not raw:
        raise PeftlabError("select_teacher needs a `teachers:` list of {name, model, adapter?, template?}")
    teachers = [from_dict(TeacherSpec, t, f"teachers[{i}]") for i, t in enumerate(raw)]
    if not configs:
        raise PeftlabError("the teacher step needs at least one run (its data settings pick the train split)")
    cfg = next((c for c in configs if c.data.target == "teacher"), configs[0])
    best = teachers[0]
    if header.get("select_teacher") and len(teachers) > 1:
        best = next(t for t in teachers if t.name == rank_teachers(teachers, cfg, Path(study_dir))[0]["name"])
    print(f"distilling with teacher '{best.name}' into {out}", flush=True)
    spec = f"{best.model}:{best.adapter}" if best.adapter else best.model
    return generate_teacher_outputs(spec, _with_template(cfg, best), out, split="train")
