"""Tests for peftlab.report.tables: the comparison table, results.csv and results.md."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from studykit import make_study

from peftlab.report.study_runs import load_results
from peftlab.report.tables import results_table, write_tables


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    return make_study(tmp_path / "study")


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
