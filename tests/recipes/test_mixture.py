"""Multi-task mixtures: weighted sampling, seeded template choice, per-task evaluation."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from trainkit import RESULT_KEYS

from peftlab.core.config import load_config
from peftlab.core.errors import PeftlabError
from peftlab.data.mixture import load_parts, parse_mixture
from peftlab.models.loading import load_model
from peftlab.prompts.encoding import encode, sample_train
from peftlab.prompts.format import PromptFormat
from peftlab.recipes.train_run import run_training


def _mix(pubmedqa, dialogsum, pw=1, dw=3, ptpl="[0, 2]", *extra):
    return load_config(None, [
        "data.limit_train=10", "data.limit_eval=3",
        f"data.mixture=[{{task: pubmedqa, path: {pubmedqa}, weight: {pw}, templates: {ptpl}}},"
        f" {{task: dialogsum, path: {dialogsum}, weight: {dw}}}]", *extra,
    ])


def test_parse_mixture():
    entries = parse_mixture(load_config(None, ["data.task=mix:pubmedqa,dialogsum"]).data)
    assert [(e.task, e.weight, e.templates) for e in entries] == [("pubmedqa", 1.0, [0, 1, 2]), ("dialogsum", 1.0,
                                                                                                   [0, 1, 2])]
    with pytest.raises(PeftlabError, match="templates within 0..2"):
        parse_mixture(load_config(None, ["data.mixture=[{task: pubmedqa, templates: [5]}, {task: dialogsum}]"]).data)
    with pytest.raises(PeftlabError, match="at least two tasks"):
        parse_mixture(load_config(None, ["data.mixture=[{task: pubmedqa}]"]).data)
    with pytest.raises(PeftlabError, match="unknown config key 'data.mixture\\[1\\].wieght'"):
        parse_mixture(load_config(None, ["data.mixture=[{task: pubmedqa}, {task: dialogsum, wieght: 2}]"]).data)


def test_weights_and_templates(tiny_causal, small_pubmedqa, small_dialogsum):
    cfg = _mix(small_pubmedqa, small_dialogsum)
    loaded = load_model(str(tiny_causal), device="cpu")
    fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
    parts = load_parts(cfg.data, parse_mixture(cfg.data))
    train, counts = sample_train(parts, fmt, 512, seed=0)
    assert counts == {"pubmedqa": 5, "dialogsum": 15}  # 20 examples in all, shared 1:3 (dialogsum repeats)
    assert Counter(e.id.split(":")[0] for e in train) == counts
    # every pubmedqa item is phrased with one of the listed templates, and both are used
    by_id = {ex.id: ex for ex in parts[0].splits["train"]}
    used = set()
    for item in (e for e in train if e.id.startswith("pubmedqa:")):
        ex = by_id[item.id.split(":", 1)[1]]
        matches = [t for t in range(3) if encode(parts[0].task, ex, fmt, 512, t).prompt_ids == item.prompt_ids]
        assert len(matches) == 1 and matches[0] in (0, 2)
        used.add(matches[0])
    assert used == {0, 2}
    again, _ = sample_train(parts, fmt, 512, seed=0)
    assert [e.prompt_ids for e in again] == [e.prompt_ids for e in train]  # seeded
    other, _ = sample_train(parts, fmt, 512, seed=1)
    assert [e.prompt_ids for e in other] != [e.prompt_ids for e in train]


def test_mixture_run_is_scored_per_task(tiny_causal, small_pubmedqa, small_dialogsum, tmp_path):
    cfg = _mix(small_pubmedqa, small_dialogsum, 1, 1, "[0]", f"model.name={tiny_causal}", "method.name=lora",
               "train.max_steps=2", f"output_dir={tmp_path}", "name=mix")
    run_dir = run_training(cfg)
    result = json.loads((run_dir / "result.json").read_text())
    metrics = result["metrics"]
    for key in ("test_pubmedqa_accuracy", "test_dialogsum_rouge1", "val_pubmedqa_accuracy", "val_dialogsum_rouge1"):
        assert isinstance(metrics[key], float)
    assert result["primary_metric"] == "pubmedqa_accuracy" and result["task"] == "mix:pubmedqa+dialogsum"
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"pubmedqa", "dialogsum"}
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert result["train_mix"] == {"pubmedqa": 10, "dialogsum": 10}


def test_mixture_and_single_task_runs_write_the_same_result_fields(tiny_causal, small_pubmedqa, small_dialogsum,
                                                                    tmp_path):
    """One training recipe: a mixture's result.json has every field a single-task run's has, and no other."""
    common = [f"model.name={tiny_causal}", "method.name=lora", "train.max_steps=1", "train.threads=1",
              "train.activation_checkpointing=full", f"output_dir={tmp_path}", "data.limit_train=8",
              "data.limit_eval=2"]
    torch.set_num_threads(2)  # train.threads must bring it back to 1
    mixed = run_training(_mix(small_pubmedqa, small_dialogsum, 1, 1, "[0]", *common, "name=mix"))
    single = run_training(load_config(None, [*common, f"data.path={small_pubmedqa}", "name=single"]))
    mixed_result, single_result = (json.loads((d / "result.json").read_text()) for d in (mixed, single))
    assert set(mixed_result) == set(single_result) >= RESULT_KEYS | {"peak_gpu_mb", "weights_mb"}
    # The settings the old copy of the recipe dropped now reach a mixture too.
    assert mixed_result["versions"]["threads"] == 1
