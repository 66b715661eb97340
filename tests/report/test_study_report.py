"""Tests for peftlab.report.study_report: the whole report of a study, down to how a browser renders it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from studykit import fake_preds, make_study, result_json, write_run

from peftlab.report.study_report import build_study_report


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    return make_study(tmp_path / "study")


def test_single_run_without_log(tmp_path: Path) -> None:
    study = tmp_path / "one"
    gen = result_json(
        "zero-gen", "zero_shot", task_kind="generation", primary_metric="rouge1", metrics={"test_rouge1": 0.2}
    )
    write_run(study, "zero_gen", gen, None, fake_preds("summ", ["x"], ["y"]))
    page = build_study_report(study).read_text()
    assert "No run has a training log" in page
    assert "plot-confusion-" not in page
    assert (study / "results.csv").is_file() and (study / "results.md").is_file()


def _chromium(report: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1280,2000", *args,
        report.resolve().as_uri(),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


# In CI (CI set) the browser is installed by `make test`; a missing one fails there instead of skipping.
@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                    reason="chromium not installed (scripts/install_chromium.sh)")
def test_report_renders_in_chromium(study: Path, tmp_path: Path) -> None:
    from PIL import Image

    report = build_study_report(study)
    dom = _chromium(report, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r'<img class="plot"', dom.stdout)) >= 4

    shot = tmp_path / "shot.png"
    run = _chromium(report, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    console_errors = [
        line for line in (dom.stderr + run.stderr).splitlines()
        if "Uncaught" in line or ("CONSOLE" in line and "ERROR" in line)
    ]  # fmt: skip
    assert not console_errors, console_errors
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 24)
    assert len(colours) > 20
    assert image.getextrema() != ((255, 255), (255, 255), (255, 255))
