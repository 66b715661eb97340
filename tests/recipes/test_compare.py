"""Studies: a grid expands to runs, every run lands in the table, and a rerun skips finished runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from peftlab.recipes.compare import load_study, run_study


def _study(tmp_path: Path, model: Path, data: Path) -> Path:
    study = {
        "name": "s",
        "output_dir": str(tmp_path / "runs"),
        "base": {"model": {"name": str(model)}, "data": {"path": str(data), "limit_train": 8, "limit_eval": 4},
                 "train": {"max_steps": 1, "threads": 1}},
        "runs": [{"name": "zs", "method": {"name": "zero-shot"}}],
        "grids": [{"name": "pt", "config": {"method": {"name": "prompt-tuning"}},
                   "params": {"method.num_virtual_tokens": [2, 4]}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_grid_expands(tmp_path, tiny_causal, small_pubmedqa):
    _, runs = load_study(_study(tmp_path, tiny_causal, small_pubmedqa))
    assert [r.name for r in runs] == ["zs", "pt-num_virtual_tokens2", "pt-num_virtual_tokens4"]


def test_study_resumes_skipping_finished_runs(tmp_path, tiny_causal, small_pubmedqa, capsys):
    path = _study(tmp_path, tiny_causal, small_pubmedqa)
    study_dir = run_study(path)
    assert "3 runs, 0 already done, 3 to run" in capsys.readouterr().out
    table = (study_dir / "results.md").read_text()
    assert all(name in table for name in ("zs", "pt-num_virtual_tokens2", "pt-num_virtual_tokens4"))
    finished = (study_dir / "zs" / "result.json").stat().st_mtime_ns
    (study_dir / "pt-num_virtual_tokens4" / "result.json").unlink()  # as if the study died during this run
    run_study(path)
    assert "3 runs, 2 already done, 1 to run" in capsys.readouterr().out
    assert (study_dir / "zs" / "result.json").stat().st_mtime_ns == finished
    assert (study_dir / "pt-num_virtual_tokens4" / "result.json").exists()
