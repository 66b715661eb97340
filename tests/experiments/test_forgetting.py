"""Forgetting probe: deltas are trained - base, and the base really is the untrained model."""

from __future__ import annotations

import json
import math

import pytest
from builders import REPO

from peftlab.core.config import load_config
from peftlab.core.errors import PeftlabError
from peftlab.data.mixture import metric_key
from peftlab.experiments.forgetting import general_items
from peftlab.models.loading import load_model
from peftlab.prompts.format import PromptFormat
from peftlab.recipes.train_run import run_training


def _run(tiny_causal, small_pubmedqa, small_dialogsum, tmp_path, method: str, *extra: str) -> dict:
    cfg = load_config(None, [
        f"model.name={tiny_causal}", f"method.name={method}", f"data.path={small_pubmedqa}",
        "data.limit_train=16", "data.limit_eval=4", "train.max_steps=3", "train.lr=0.05",
        f"output_dir={tmp_path}", f"name={method}",
        "experiments.forgetting=[dialogsum]", f"experiments.forgetting_data={{dialogsum: {small_dialogsum}}}",
        "experiments.forgetting_limit=3", *extra,
    ])
    return json.loads((run_training(cfg) / "result.json").read_text())["metrics"]


def test_deltas_against_the_right_base(tiny_causal, small_pubmedqa, small_dialogsum, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped general text is found relative to the repo root, like data files
    zero = _run(tiny_causal, small_pubmedqa, small_dialogsum, tmp_path, "zero-shot")
    assert zero["forget_dialogsum_rouge1_delta"] == 0.0
    assert zero["forget_general_loss_delta"] == 0.0
    assert math.isfinite(zero["forget_general_loss"]) and zero["forget_general_loss"] > 0
    for method in ("lora", "full"):  # adapter switched off / a fresh copy of the base
        m = _run(tiny_causal, small_pubmedqa, small_dialogsum, tmp_path, method)
        assert m["forget_general_loss_base"] == pytest.approx(zero["forget_general_loss"], rel=1e-6)
        assert m["forget_dialogsum_rouge1_base"] == pytest.approx(zero["forget_dialogsum_rouge1"])
        # training moved the model, so the trained value is measured on the trained weights, not the base
        assert m["forget_general_loss_delta"] != 0.0
        expected = m["forget_general_loss"] - m["forget_general_loss_base"]
        assert m["forget_general_loss_delta"] == pytest.approx(expected)


def test_general_text_items(tiny_model, tmp_path):
    text = tmp_path / "g.txt"
    text.write_text("The river bends slowly past the old mill.\n\nBread rises while the kitchen stays warm today.\n")
    loaded = load_model(str(tiny_model), device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    items = general_items(fmt, text)
    assert len(items) == 2
    if loaded.kind == "causal":  # every token after the first is predicted
        assert len(items[0].prompt_ids) == 1
        first = text.read_text().split("\n\n")[0]
        assert items[0].prompt_ids + items[0].target_ids == loaded.tokenizer(first).input_ids
    with pytest.raises(PeftlabError, match="no such general-text file"):
        general_items(fmt, tmp_path / "missing.txt")


def test_metric_key():
    assert metric_key("pubmedqa-binary") == "pubmedqa_binary"
    assert metric_key("tasks/my task.yaml") == "my_task"
