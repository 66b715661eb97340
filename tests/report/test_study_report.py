"""Tests for peftlab.report on a small fake study (no training needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from peftlab.core.errors import PeftlabError
from peftlab.report.study_report import build_study_report, load_results, results_table, write_report, write_tables

LONG_PROMPT = "Review: <script>alert('x')</script> " + "a truly wonderful film " * 30


def _result(name: str, method: str, **overrides) -> dict:
    """A plausible result.json for an SST-2-like classification run on a small model."""
    result = {
        "name": name,
        "method": method,
        "task": "sst2",
        "model": "smollm2-135m",
        "task_kind": "classification",
        "primary_metric": "accuracy",
        "trainable_params": 0,
        "total_params": 134_515_008,
        "trainable_pct": 0.0,
        "adapter_bytes": 0,
        "train_steps": 0,
        "train_seconds": 0.0,
        "tokens_per_s": None,
        "peak_rss_mb": 812.4,
        "best_val_loss": None,
        "last_train_loss": None,
        "metrics": {},
        "versions": {"torch": "2.13.0", "peft": "0.17.0"},
    }
    result.update(overrides)
    return result


def _write_run(study: Path, folder: str, result: dict, log: list[dict] | None, preds: list[dict]) -> None:
    run = study / folder
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps(result))
    if log is not None:
        (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (run / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))


def _preds(task_prefix: str, outputs: list[str], refs: list[str], prompt: str = "Review: fine.") -> list[dict]:
    return [
        {
            "id": f"{task_prefix}-{i}",
            "split": "test",
            "prompt": prompt if i == 0 else f"{prompt} #{i}",
            "prediction": out,
            "references": [ref],
            "score": float(out == ref),
        }
        for i, (out, ref) in enumerate(zip(outputs, refs, strict=True))
    ]


def _lora_log() -> list[dict]:
    log = []
    for step in range(10, 110, 10):
        log.append({"step": step, "epoch": step / 100, "loss": 0.9 - step / 200, "lr": 2e-4, "tokens_per_s": 5100.0})
        if step % 50 == 0:
            log.append({"step": step, "epoch": step / 100, "val_loss": 0.6 - step / 1000, "val_accuracy": 0.8})
    return log


def make_study(study: Path) -> Path:
    """Three runs: zero-shot (collapsed, no log), LoRA (classification) and prefix-tuning on a generation task."""
    labels = ["negative", "positive"]
    refs = ["positive", "negative", "positive", "negative"]
    zero = _result(
        "zero-shot",
        "zero_shot",
        metrics={
            "test_accuracy": 0.5,
            "test_macro_f1": 0.33,
            "test_confusion_matrix": [[0, 50], [0, 50]],
            "test_labels": labels,
        },
    )
    _write_run(study, "zero_shot", zero, None, _preds("sst2", ["positive"] * 4, refs, LONG_PROMPT))
    lora = _result(
        "lora-r8",
        "lora",
        trainable_params=921_600,
        trainable_pct=0.685,
        adapter_bytes=3_690_000,
        train_steps=100,
        train_seconds=142.7,
        tokens_per_s=5100.0,
        peak_rss_mb=2310.0,
        best_val_loss=0.5,
        last_train_loss=0.41,
        metrics={
            "val_accuracy": 0.8,
            "test_accuracy": 0.86,
            "test_macro_f1": 0.859,
            "test_confusion_matrix": [[43, 7], [7, 43]],
            "test_labels": labels,
            "flip_rate": 0.04,
        },
    )
    _write_run(
        study,
        "lora",
        lora,
        _lora_log(),
        _preds("sst2", ["positive", "negative", "negative", "negative"], refs, LONG_PROMPT),
    )
    # A crashed writer can leave a truncated last line; the report must still read the rest.
    with (study / "lora" / "train_log.jsonl").open("a") as f:
        f.write('{"step": 110, "lo')
    gen = _result(
        "prefix-gen",
        "prefix_tuning",
        task="pubmed_summ",
        task_kind="generation",
        primary_metric="rouge1",
        trainable_params=30_720,
        trainable_pct=0.0228,
        adapter_bytes=123_000,
        train_steps=100,
        train_seconds=98.2,
        tokens_per_s=3900.0,
        peak_rss_mb=1900.0,
        best_val_loss=2.1,
        last_train_loss=2.3,
        metrics={
            "val_rouge1": 0.3,
            "test_rouge1": 0.31,
            "test_rouge2": 0.12,
            "test_rougeL": 0.27,
            "forget_delta_pubmedqa": -0.02,
        },
    )
    gen_log = [
        {"step": s, "epoch": s / 100, "loss": 3.0 - s / 100, "lr": 1e-3, "tokens_per_s": 3900.0}
        for s in range(10, 110, 10)
    ]
    _write_run(study, "prefix_gen", gen, gen_log, _preds("summ", ["a summary"] * 3, ["a summary", "b", "c"]))
    (study / "not_a_run").mkdir()  # e.g. a cache folder: no result.json, must be skipped
    return study


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    return make_study(tmp_path / "study")


def test_load_results_flattens_and_sorts(study: Path) -> None:
    df = load_results(study)
    assert list(df["name"]) == ["zero-shot", "prefix-gen", "lora-r8"]
    assert df.loc[2, "test_accuracy"] == pytest.approx(0.86)
    assert df.loc[2, "flip_rate"] == pytest.approx(0.04)
    assert "metrics" not in df.columns


def test_results_table_columns_and_missing(study: Path) -> None:
    table = results_table(load_results(study))
    assert list(table.columns) == [
        "run", "method", "trainable params", "trainable %", "adapter MB", "train steps", "train loss", "val loss",
        "test n", "accuracy", "macro_f1", "rouge1", "rouge2", "rougeL", "time (s)", "tokens/s", "peak mem (MB)",
        "flip_rate", "forget_delta_pubmedqa",
    ]  # fmt: skip
    zero, gen, lora = (table.iloc[i] for i in range(3))
    assert zero["val loss"] == zero["train loss"] == zero["tokens/s"] == zero["rouge1"] == "–"
    assert gen["accuracy"] == gen["flip_rate"] == "–"
    assert lora["trainable params"] == "921,600"
    assert lora["accuracy"] == "0.8600"
    assert lora["adapter MB"] == "3.69"
    assert not table.isna().any().any()


def test_write_tables(study: Path) -> None:
    csv_path, md_path = write_tables(study)
    csv = pd.read_csv(csv_path)
    assert len(csv) == 3
    assert "test_confusion_matrix" not in csv.columns and "versions" not in csv.columns
    assert "test_accuracy" in csv.columns
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| run | method | trainable params |")
    assert set(md[1]) <= set("|- ")
    assert len(md) == 5 and "lora-r8" in md[4]


def test_report_is_self_contained(study: Path) -> None:
    page = write_report(study, title="My <study>").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page)
    imgs = re.findall(r'<img class="plot"[^>]*>', page)
    assert len(imgs) >= 4
    assert all(' alt="' in img and ' id="plot-' in img and "data:image/png;base64," in img for img in imgs)
    # Confusion matrices only for the two classification runs.
    assert len(re.findall(r'id="plot-confusion-', page)) == 2
    assert "<title>My &lt;study&gt;</title>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    # The prompt is cut to 300 chars: 36 chars of prefix, then 11 whole repeats of the 23-char phrase.
    assert "a truly wonderful film " * 11 in page and "a truly wonderful film " * 12 not in page
    assert "sst2-0" in page and "summ-2" in page and "sst2-3" not in page  # first 3 ids per task


def test_single_run_without_log(tmp_path: Path) -> None:
    study = tmp_path / "one"
    gen = _result(
        "zero-gen", "zero_shot", task_kind="generation", primary_metric="rouge1", metrics={"test_rouge1": 0.2}
    )
    _write_run(study, "zero_gen", gen, None, _preds("summ", ["x"], ["y"]))
    page = build_study_report(study).read_text()
    assert "No run has a training log" in page
    assert "plot-confusion-" not in page
    assert (study / "results.csv").is_file() and (study / "results.md").is_file()


def test_empty_study_raises(tmp_path: Path) -> None:
    with pytest.raises(PeftlabError, match="no run folder"):  # one line at the CLI, not a ValueError traceback
        write_report(tmp_path)


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


def test_a_lone_run_folder_reports_as_a_one_run_study(study: Path) -> None:
    run = study / "lora"
    df = load_results(run)
    assert list(df["name"]) == ["lora-r8"] and list(df["run_dir"]) == ["."]
    page = write_report(run, title="one run").read_text()
    assert "lora-r8" in page and "confusion" in page.lower()  # predictions were found inside the run folder
