"""Distillation: teacher outputs keyed by id, teacher runs as teachers, and a study's teacher selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import peftlab.experiments.distill as distill
from peftlab.cli import app
from peftlab.core.config import load_config
from peftlab.core.errors import PeftlabError
from peftlab.data.splits import load_splits
from peftlab.data.targets import read_outputs, teacher_file
from peftlab.data.tasks import get_task
from peftlab.experiments.distill import generate_teacher_outputs, resolve_teacher
from peftlab.recipes.compare import run_study
from peftlab.recipes.train_run import run_training


def _cfg(model, data, tmp_path, *extra):
    return load_config(None, [f"model.name={model}", f"data.path={data}", "data.limit_train=12", "data.limit_eval=4",
                              "train.max_steps=1", f"output_dir={tmp_path}", "model.device=cpu", *extra])


def test_teacher_outputs_cover_the_train_split_and_train_a_student(tiny_causal, small_pubmedqa, tmp_path):
    cfg = _cfg(tiny_causal, small_pubmedqa, tmp_path, "name=student")
    out = generate_teacher_outputs(str(tiny_causal), cfg, tmp_path / "teacher.jsonl")
    outputs = read_outputs(out)
    train = load_splits(cfg.data, get_task("pubmedqa"))["train"]
    assert set(outputs) == {ex.id for ex in train}
    assert set(outputs.values()) <= {"yes", "no", "maybe"}
    student = load_config(None, [f"data.target={out}"], base=json.loads(json.dumps(_raw(cfg))))
    assert (run_training(student) / "result.json").is_file()
    # `teacher` means the outputs file next to the run folders
    by_name = load_config(None, ["data.target=teacher"], base=_raw(cfg))
    assert teacher_file(by_name.data, by_name.output_dir) == tmp_path / "teacher.jsonl"


def _raw(cfg) -> dict:
    from peftlab.core.config import to_dict

    return to_dict(cfg)


def test_target_teacher_without_file_names_the_path(tmp_path):
    cfg = load_config(None, ["data.target=teacher", f"output_dir={tmp_path}"])
    with pytest.raises(PeftlabError, match=str(tmp_path / "teacher.jsonl")):
        teacher_file(cfg.data, cfg.output_dir)


def test_resolve_teacher(tiny_causal, small_pubmedqa, tmp_path):
    assert resolve_teacher("smollm2-135m-instruct") == ("smollm2-135m-instruct", None)
    assert resolve_teacher("m:runs/x/adapter") == ("m", "runs/x/adapter")
    run = run_training(_cfg(tiny_causal, small_pubmedqa, tmp_path, "name=lora", "method.name=lora"))
    assert resolve_teacher(str(run)) == (str(tiny_causal), str(run))  # base from the run's config.yaml
    zero = run_training(_cfg(tiny_causal, small_pubmedqa, tmp_path, "name=zs", "method.name=zero-shot"))
    assert resolve_teacher(str(zero)) == (str(tiny_causal), None)  # nothing trained: the base is the teacher


def test_distill_cli_generation_and_external_file(tiny_causal, small_dialogsum, tmp_path):
    out = tmp_path / "t.jsonl"
    args = ["distill", "--teacher", str(tiny_causal), "--task", "dialogsum", "--data", str(small_dialogsum),
            "--out", str(out), "--limit", "3", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) <= 3 and all(set(r) == {"id", "output"} and r["output"] for r in rows)
    csv = tmp_path / "hosted.csv"
    csv.write_text("id,prediction\na,first summary\nb,second summary\n")
    result = CliRunner().invoke(app, ["distill", "--teacher", str(csv), "--task", "dialogsum", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_outputs(out) == {"a": "first summary", "b": "second summary"}


def test_rank_teachers_picks_the_best_on_val(tiny_causal, small_pubmedqa, tmp_path, monkeypatch):
    scores = {"weak": 0.2, "strong": 0.9, "middle": 0.5}
    used = []

    def fake_predict(model, adapter, cfg, examples, progress=True):
        used.append((model, len(examples)))
        return {"accuracy": scores[model]}, ["yes"] * len(examples)

    monkeypatch.setattr(distill, "_predict", fake_predict)
    cfg = _cfg(tiny_causal, small_pubmedqa, tmp_path, "name=s", "data.target=teacher")
    header = {"select_teacher": True, "teachers": [{"name": n, "model": n} for n in scores]}
    out = distill.prepare_teacher(header, [cfg], tmp_path)
    ranking = json.loads((tmp_path / "teacher_ranking.json").read_text())
    assert [r["name"] for r in ranking] == ["strong", "middle", "weak"]
    assert used[-1][0] == "strong"  # the train split was distilled with the best teacher
    assert len(read_outputs(out)) == used[-1][1]
    n_val = len(load_splits(cfg.data, get_task("pubmedqa"))["val"])
    assert [n for _, n in used[:3]] == [n_val] * 3 and n_val <= 4  # ranked on the (limited) val split
    with pytest.raises(PeftlabError, match="unknown config key 'teachers\\[0\\].bogus'"):
        distill.prepare_teacher({"teachers": [{"name": "x", "bogus": 1}]}, [cfg], tmp_path / "other")


def test_study_with_teacher_selection(tiny_causal, small_pubmedqa, tmp_path):
    study = {
        "name": "distill",
        "output_dir": str(tmp_path),
        "select_teacher": True,
        "teachers": [{"name": "t0", "model": str(tiny_causal), "template": 0},
                     {"name": "t1", "model": str(tiny_causal), "template": 1}],
        "base": {"model": {"name": str(tiny_causal), "device": "cpu"}, "method": {"name": "lora"},
                 "data": {"path": str(small_pubmedqa), "limit_train": 8, "limit_eval": 4},
                 "train": {"max_steps": 1}},
        "runs": [{"name": "gold"}, {"name": "distilled", "data": {"target": "teacher"}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    study_dir = run_study(path)
    ranking = json.loads((study_dir / "teacher_ranking.json").read_text())
    assert {r["name"] for r in ranking} == {"t0", "t1"}
    assert ranking[0]["val_accuracy"] >= ranking[1]["val_accuracy"]
    assert (study_dir / "teacher.jsonl").is_file()
    assert all((study_dir / r / "result.json").is_file() for r in ("gold", "distilled"))
    saved = yaml.safe_load((study_dir / "distilled" / "config.yaml").read_text())
    assert saved["data"]["target"] == "teacher" and Path(saved["output_dir"]) == study_dir
