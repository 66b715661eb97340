"""Tests for peftlab.report.study_runs: a study folder's runs read back as one table."""

from __future__ import annotations

from pathlib import Path

import pytest
from studykit import make_study

from peftlab.report.html_report import write_report
from peftlab.report.study_runs import load_results


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    return make_study(tmp_path / "study")


def test_load_results_flattens_and_sorts(study: Path) -> None:
    df = load_results(study)
    assert list(df["name"]) == ["zero-shot", "prefix-gen", "lora-r8"]
    assert df.loc[2, "test_accuracy"] == pytest.approx(0.86)
    assert df.loc[2, "flip_rate"] == pytest.approx(0.04)
    assert "metrics" not in df.columns


def test_a_lone_run_folder_reports_as_a_one_run_study(study: Path) -> None:
    run = study / "lora"
    df = load_results(run)
    assert list(df["name"]) == ["lora-r8"] and list(df["run_dir"]) == ["."]
    page = write_report(run, title="one run").read_text()
    assert "lora-r8" in page and "confusion" in page.lower()  # predictions were found inside the run folder
