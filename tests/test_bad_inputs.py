"""The bad-input table: every malformed input the CLI, config, data loader and server accept, with its exact message.

Each CLI case must end with exit code 2 and exactly one line on stderr (no traceback); the README's
troubleshooting section lists the same cases.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from peftlab import cli


def _run(argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["peftlab", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _pubmedqa_file(tmp_path: Path, **changes) -> Path:
    item = {"QUESTION": "Does it work?", "CONTEXTS": ["It was measured."], "final_decision": "yes"}
    item.update(changes)
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"1": {**item, "final_decision": "no"}, "2": item}))
    return path


def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"dialogue": "#Person1#: hi", "summary": "They greet."})

# (case, builder(tmp_path, tiny_causal) -> argv, the exact message with {tmp} for the tmp folder)
EVAL_CASES = [
    ("bad JSON line",
     lambda t, m: ["--task", "dialogsum", "--data", str(_jsonl(t, [GOOD, "{not json"]))],
     "error: {tmp}/d.jsonl:2: malformed JSON (Expecting property name enclosed in double quotes)"),
    ("missing field",
     lambda t, m: ["--task", "dialogsum", "--data", str(_jsonl(t, [GOOD, json.dumps({"summary": "x"})]))],
     "error: {tmp}/d.jsonl:2: field 'dialogue': missing"),
    ("empty text",
     lambda t, m: ["--task", "dialogsum", "--data", str(_jsonl(t, [json.dumps({"dialogue": " ", "summary": "x"})]))],
     "error: {tmp}/d.jsonl:1: field 'dialogue': empty text"),
    ("unknown label",
     lambda t, m: ["--task", "pubmedqa", "--data", str(_pubmedqa_file(t, final_decision="perhaps"))],
     "error: {tmp}/p.json: field '2.final_decision': unknown label 'perhaps'; valid: yes, no, maybe"),
    ("missing file",
     lambda t, m: ["--task", "pubmedqa", "--data", str(t / "nope.json")],
     "error: {tmp}/nope.json: no such data file (set data.path)"),
    ("unknown task",
     lambda t, m: ["--task", "pubmed", "--data", str(t / "x")],
     "error: unknown task 'pubmed'; valid: <path/to/task.yaml>, dialogsum, pubmedqa, pubmedqa-binary, "
     "pubmedqa-explain, scienceqa, scienceqa-explain"),
    ("unknown model",
     lambda t, m: ["--task", "pubmedqa", "--data", str(_pubmedqa_file(t)), "--model", "smollm9"],
     "error: unknown model 'smollm9'; valid: <a local model folder>, gemma-3-270m, smollm2-135m-instruct"),
]


@pytest.mark.parametrize("case,argv,message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_inputs(case, argv, message, tmp_path, tiny_causal, monkeypatch, capsys):
    args = ["eval", *argv(tmp_path, tiny_causal), "--out", str(tmp_path / "out")]
    if "--model" not in args:
        args += ["--model", str(tiny_causal)]
    assert _run(args, monkeypatch, capsys) == message.format(tmp=tmp_path)


def _config(tmp_path: Path, train: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "output_dir": str(tmp_path), "train": train}))
    return path


CONFIG_CASES = [
    ("unknown config key", {"lrr": 0.1},
     "error: unknown config key 'train.lrr'; valid: activation_checkpointing, batch_size, batch_tokens, "
     "checkpoint_every, class_balance, epochs, eval_every_epoch, grad_accum, lr, max_grad_norm, max_steps, "
     "micro_tokens, mixed_precision, patience, report_to, resume, schedule, seed, shared_prefix, threads, "
     "warmup_ratio, weight_decay"),
    ("unknown mixed precision", {"mixed_precision": "fp8"},
     "error: train.mixed_precision must be auto, no or bf16, got 'fp8'"),
    ("negative class balance", {"class_balance": -0.5},
     "error: train.class_balance must be >= 0 (0: unweighted, 1: balanced), got -0.5"),
    ("negative learning rate", {"lr": -0.001}, "error: train.lr must be positive, got -0.001"),
    ("wrong type", {"epochs": "two"}, "error: train.epochs: expected int, got 'two'"),
]


@pytest.mark.parametrize("case,train,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_bad_inputs(case, train, message, tmp_path, monkeypatch, capsys):
    assert _run(["train", str(_config(tmp_path, train))], monkeypatch, capsys) == message


def test_missing_config_file(tmp_path, monkeypatch, capsys):
    line = _run(["train", str(tmp_path / "none.yaml")], monkeypatch, capsys)
    assert line == f"error: {tmp_path}/none.yaml: no such config file"


def test_adapter_from_another_base_is_refused(tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    from builders import build_tiny_causal
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.core.config import load_config
    from peftlab.recipes.train import run_training

    other = build_tiny_causal(tmp_path / "other")  # same tokenizer, wider model: the adapter's shapes differ
    config = LlamaConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(other)
    run = run_training(load_config(None, [f"model.name={other}", "method.name=lora", f"data.path={small_pubmedqa}",
                                          "data.limit_train=4", "data.limit_eval=2", "train.max_steps=1",
                                          f"output_dir={tmp_path}/runs", "name=wide"]))
    capsys.readouterr()  # drop the training run's progress output
    line = _run(["eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model", str(tiny_causal),
                 "--adapter", str(run), "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert re.fullmatch(
        rf"error: adapter {run}/adapter was trained on base '{other}' and does not fit base '{tiny_causal}' "
        rf"\({tiny_causal}\): tensor \S+lora_A\S+ has shape \(8, 48\)",
        line,
    ), line


def test_pickled_weights_are_refused(tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = shutil.copytree(tiny_causal, tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    line = _run(["eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model", str(folder),
                 "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert line == (f"error: {folder}: weights are pickles (pytorch_model.bin), which can run code when loaded; "
                    "convert them to safetensors or pass --allow-pickle")


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    from peftlab.core import files as pio
    from peftlab.core.errors import PeftlabError

    target = tmp_path / "result.json"
    pio.write_json(target, {"ok": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pio.os, "fsync", no_space)
    with pytest.raises(PeftlabError, match=r"result.json: disk full; the previous version of this file was kept"):
        pio.write_json(target, {"ok": 2})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left behind


def test_oversized_request_is_a_413_and_the_server_stays_up(tiny_causal):
    from fastapi.testclient import TestClient

    from peftlab.deploy.serve import create_app
    from peftlab.models.loading import load_model

    client = TestClient(create_app(load_model(str(tiny_causal), device="cpu"), {}, max_body_bytes=1024))
    big = client.post("/v1/completions", json={"model": "base", "prompt": "x" * 5000, "max_tokens": 2})
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "body_too_large"
    assert client.get("/health").status_code == 200
