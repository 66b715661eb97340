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
from badkit import cli_error

from peftlab import cli


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
     "error: unknown task 'pubmed'; valid: <path/to/task.yaml>, alpaca, chat, dialogsum, pubmedqa, "
     "pubmedqa-binary, pubmedqa-explain, scienceqa, scienceqa-explain"),
    ("unknown model",
     lambda t, m: ["--task", "pubmedqa", "--data", str(_pubmedqa_file(t)), "--model", "smollm9"],
     "error: unknown model 'smollm9'; valid: <a local model folder>, gemma-3-270m, smollm2-135m-instruct"),
]


@pytest.mark.parametrize("case,argv,message", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_bad_inputs(case, argv, message, tmp_path, tiny_causal, monkeypatch, capsys):
    args = ["eval", *argv(tmp_path, tiny_causal), "--out", str(tmp_path / "out")]
    if "--model" not in args:
        args += ["--model", str(tiny_causal)]
    assert cli_error(args, monkeypatch, capsys) == message.format(tmp=tmp_path)


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
    ("negative learning rate", {"lr": -0.001}, "error: train.lr must be > 0, got -0.001"),
    ("wrong type", {"epochs": "two"}, "error: train.epochs: expected a whole number >= 1, got the text 'two'"),
    ("a list of the wrong items", {"report_to": ["mlflow", 3]},
     "error: train.report_to[1]: expected text, got the number 3"),
]


@pytest.mark.parametrize("case,train,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_bad_inputs(case, train, message, tmp_path, monkeypatch, capsys):
    assert cli_error(["train", str(_config(tmp_path, train))], monkeypatch, capsys) == message


def test_missing_config_file(tmp_path, monkeypatch, capsys):
    line = cli_error(["train", str(tmp_path / "none.yaml")], monkeypatch, capsys)
    assert line == f"error: {tmp_path}/none.yaml: no such config file"


def test_adapter_from_another_base_is_refused(tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    from builders import build_tiny_causal
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.core.config import load_config
    from peftlab.recipes.train_run import run_training

    other = build_tiny_causal(tmp_path / "other")  # same tokenizer, wider model: the adapter's shapes differ
    config = LlamaConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(other)
    run = run_training(load_config(None, [f"model.name={other}", "method.name=lora", f"data.path={small_pubmedqa}",
                                          "data.limit_train=4", "data.limit_eval=2", "train.max_steps=1",
                                          f"output_dir={tmp_path}/runs", "name=wide"]))
    capsys.readouterr()  # drop the training run's progress output
    line = cli_error(["eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model", str(tiny_causal),
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
    line = cli_error(["eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model", str(folder),
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


# ---------------------------------------------------------------------------------------------------------------------
# Inputs that used to give a wrong answer with exit 0, or a traceback (issue 30's table). Each fails on the code
# before the fix: the comment says what happened then.
# ---------------------------------------------------------------------------------------------------------------------

def _custom_task(tmp_path: Path, rows: list[dict], inputs: str = "[text]") -> tuple[Path, Path]:
    spec = tmp_path / "task.yaml"
    spec.write_text(f"name: own\ninputs: {inputs}\ntarget: label\ntemplate: '{{text}}'\nmetric: accuracy\n"
                    "labels: [a, b]\n")
    return spec, _jsonl(tmp_path, [json.dumps(r) for r in rows])


def _rows(n: int, **extra) -> list[dict]:
    return [{"text": f"item number {i}", "label": "ab"[i % 2], **extra} for i in range(n)]


ISSUE30_EVAL_CASES = [
    # 2: "Test" was ignored, so the row was re-split and could land in training.
    ("row split not train/val/test",
     lambda t: ["--task", str(_custom_task(t, _rows(6, split="Test"))[0]), "--data", str(t / "d.jsonl")],
     "error: {tmp}/d.jsonl:1: field 'split': unknown split 'Test'; valid: train, val, test"),
    # 3: --limit 0 scored everything and --limit -3 all but 3.
    ("eval --limit 0",
     lambda t: ["--task", "dialogsum", "--data", str(_jsonl(t, [GOOD] * 4)), "--limit", "0"],
     "error: --limit must be >= 1 (leave it out to score every example), got 0"),
    ("eval --limit -3",
     lambda t: ["--task", "dialogsum", "--data", str(_jsonl(t, [GOOD] * 4)), "--limit", "-3"],
     "error: --limit must be >= 1 (leave it out to score every example), got -3"),
    # 6: a number was "empty text"; lists and objects were pasted into the prompt as their Python repr.
    ("number as text",
     lambda t: ["--task", "dialogsum", "--data", str(_jsonl(t, [json.dumps({"dialogue": 42, "summary": "x"})]))],
     "error: {tmp}/d.jsonl:1: field 'dialogue': expected text, got a number (42)"),
    ("object as text",
     lambda t: ["--task", "dialogsum", "--data",
                str(_jsonl(t, [json.dumps({"dialogue": {"a": "b"}, "summary": "x"})]))],
     "error: {tmp}/d.jsonl:1: field 'dialogue': expected text, got an object"),
    ("list of numbers as text",
     lambda t: ["--task", "dialogsum", "--data", str(_jsonl(t, [json.dumps({"dialogue": [1, 2], "summary": "x"})]))],
     "error: {tmp}/d.jsonl:1: field 'dialogue': expected text, got a list of non-text values"),
    ("object as id",
     lambda t: ["--task", "dialogsum", "--data",
                str(_jsonl(t, [json.dumps({"dialogue": "hi", "summary": "x", "fname": {"a": 1}})]))],
     "error: {tmp}/d.jsonl:1: field 'fname': expected text or an integer id, got an object"),
    # 7: a prompt past the model's 1024 positions was scored.
    ("max length past the model's positions",
     lambda t: ["--task", "dialogsum", "--data", str(_jsonl(t, [GOOD] * 4)), "--max-length", "100000"],
     "error: --max-length 100000 is over {model}'s 1024 positions; lower it"),
]


@pytest.mark.parametrize("case,argv,message", ISSUE30_EVAL_CASES, ids=[c[0] for c in ISSUE30_EVAL_CASES])
def test_issue30_eval_bad_inputs(case, argv, message, tmp_path, tiny_causal, monkeypatch, capsys):
    args = ["eval", *argv(tmp_path), "--out", str(tmp_path / "out"), "--model", str(tiny_causal)]
    assert cli_error(args, monkeypatch, capsys) == message.format(tmp=tmp_path, model=tiny_causal)


def _train_args(tmp_path: Path, model: Path, data: Path, *overrides: str) -> list[str]:
    config = tmp_path / "run.yaml"
    config.write_text("name: r\nmethod: {name: lora}\n")
    return ["train", str(config), f"model.name={model}", f"data.path={data}", "train.max_steps=1",
            f"output_dir={tmp_path}/runs", *overrides]


def test_override_that_is_not_yaml(tmp_path, monkeypatch, capsys):
    # Found by the config property test: a control character in an override was a yaml traceback.
    line = cli_error(_train_args(tmp_path, Path("m"), Path("d"), "train.lr=\x1f"), monkeypatch, capsys)
    assert line.startswith("error: override 'train.lr': the value '\\x1f' is not valid YAML (")


@pytest.mark.parametrize("override,message", [
    # 3: data.limit_eval=0 scored everything.
    ("data.limit_eval=0", "error: data.limit_eval must be >= 1 (leave it unset to use every example), got 0"),
    ("data.limit_train=-2", "error: data.limit_train must be >= 1 (leave it unset to use every example), got -2"),
    # 4: a prompt-tuning run with 0 virtual tokens trained 0 parameters and reported a result.
    ("method.num_virtual_tokens=0", "error: method.num_virtual_tokens must be >= 1, got 0"),
    ("method.r=0", "error: method.r must be >= 1, got 0"),
])
def test_issue30_config_values(override, message, tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    assert cli_error(_train_args(tmp_path, tiny_causal, small_pubmedqa, override), monkeypatch, capsys) == message
    assert not (tmp_path / "runs" / "r" / "config.yaml").exists()


def test_too_little_data_for_a_test_split(tmp_path, tiny_causal, monkeypatch, capsys):
    # 5: exit 0 with a metrics.json that held only the task's name, and no warning.
    data = _jsonl(tmp_path, [GOOD] * 2)
    line = cli_error(_train_args(tmp_path, tiny_causal, data, "data.task=dialogsum"), monkeypatch, capsys)
    assert line == (f"error: {data}: the test split is empty (2 train, 0 val); add examples or raise the test share "
                    "of data.split (now [0.8, 0.1, 0.1])")
    assert not (tmp_path / "runs" / "r").exists()


def test_empty_data_file_leaves_no_run_folder(tmp_path, tiny_causal, monkeypatch, capsys):
    # 14: an empty data file left a config.yaml behind.
    data = _jsonl(tmp_path, [""])
    line = cli_error(_train_args(tmp_path, tiny_causal, data, "data.task=dialogsum"), monkeypatch, capsys)
    assert line == f"error: {data}: no examples in the file"
    assert not (tmp_path / "runs" / "r").exists()


def test_a_busy_run_folder_is_refused_with_the_holder_pid(tmp_path, tiny_causal, small_pubmedqa, monkeypatch,
                                                          capsys):
    # 1: two trainings on one folder both exited 0, leaving one run's config beside the other's adapter.
    import os
    import subprocess

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from peftlab.core.lock import run_folder_lock\n"
        f"with run_folder_lock(Path({str(run_dir)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = cli_error(_train_args(tmp_path, tiny_causal, small_pubmedqa), monkeypatch, capsys)
        assert line == (f"error: {run_dir}: run folder in use by another peftlab process (PID {holder.pid}); "
                        "wait for it to finish or give this run another name")
    finally:
        holder.kill()
        holder.wait()
    # A holder killed with SIGKILL leaves a stale lock file; the next run takes it over.
    assert (run_dir / ".lock").exists() and os.path.getsize(run_dir / ".lock") > 0
    monkeypatch.setattr(sys, "argv", ["peftlab", *_train_args(tmp_path, tiny_causal, small_pubmedqa)])
    cli.main()
    assert (run_dir / "result.json").is_file()


def test_truncated_adapter_is_one_line(tmp_path, tiny_causal, small_pubmedqa, monkeypatch, capsys):
    # 10: a cut-off adapter_model.safetensors raised SafetensorError with a traceback in eval and serve.
    from peftlab.core.config import load_config
    from peftlab.recipes.train_run import run_training

    run = run_training(load_config(None, [f"model.name={tiny_causal}", "method.name=lora",
                                          f"data.path={small_pubmedqa}", "data.limit_train=4", "data.limit_eval=2",
                                          "train.max_steps=1", f"output_dir={tmp_path}/runs", "name=cut"]))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    line = cli_error(["eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model", str(tiny_causal),
                 "--adapter", str(run), "--out", str(tmp_path / "o")], monkeypatch, capsys)
    assert line.startswith(f"error: {weights}: not a readable safetensors file (") and line.endswith(
        "the save may have been cut off: train the run again"), line


def test_busy_port_fails_before_the_model_loads(monkeypatch, capsys):
    # 11: serve loaded the model, printed "serving ... on", then died with exit 3.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # An unknown model name would fail too, but only once the port is taken: the port is checked first.
        line = cli_error(["serve", "--model", "smollm9", "--port", str(port)], monkeypatch, capsys)
    assert line == f"error: 127.0.0.1:{port}: cannot serve there (Address already in use); choose another --port"


def test_template_keyword_as_an_input_field(tmp_path, tiny_causal, monkeypatch, capsys):
    # 9: an input field named `instruction` raised "str.format() got multiple values" with a traceback.
    spec = tmp_path / "task.yaml"
    spec.write_text("name: own\ninputs: [instruction]\ntarget: label\ntemplate: 'Q: {instruction}'\n"
                    "metric: accuracy\nlabels: [a, b]\n")
    data = _jsonl(tmp_path, [json.dumps({"instruction": f"say {'ab'[i % 2]}", "label": "ab"[i % 2]})
                             for i in range(6)])
    monkeypatch.setattr(sys, "argv", ["peftlab", "eval", "--task", str(spec), "--data", str(data), "--model",
                                      str(tiny_causal), "--out", str(tmp_path / "o")])
    cli.main()
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert "Q: say a" in rows[0]["prompt"]


def test_utf8_bom_and_crlf_are_read(tmp_path, tiny_causal, monkeypatch, capsys):
    # 13: a file with a byte-order mark was refused as malformed JSON.
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([GOOD] * 3).encode() + b"\r\n")
    monkeypatch.setattr(sys, "argv", ["peftlab", "eval", "--task", "dialogsum", "--data", str(data), "--model",
                                      str(tiny_causal), "--out", str(tmp_path / "o"), "--max-length", "256"])
    cli.main()
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["n"] == 3


def test_eval_limit_takes_the_first_rows_in_file_order(tmp_path, tiny_causal, monkeypatch, capsys):
    # 8: --limit took N examples from a shuffled order, and predictions.jsonl came back out of file order.
    rows = [json.dumps({"dialogue": f"#Person1#: number {i}", "summary": "x", "fname": f"d{i}"}) for i in range(12)]
    data = _jsonl(tmp_path, rows)
    monkeypatch.setattr(sys, "argv", ["peftlab", "eval", "--task", "dialogsum", "--data", str(data), "--model",
                                      str(tiny_causal), "--out", str(tmp_path / "o"), "--limit", "5"])
    cli.main()
    ids = [json.loads(line)["id"] for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["d0", "d1", "d2", "d3", "d4"]


# ---------------------------------------------------------------------------------------------------------------------
# The user's own files (alpaca, chat; JSONL, JSON, CSV, Parquet): a bad row is one line naming file, row and field.
# ---------------------------------------------------------------------------------------------------------------------

def _file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _records(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


USER = {"role": "user", "content": "Hi?"}
FORMAT_CASES = [
    ("alpaca without instruction", "alpaca", "d.jsonl", _records([{"output": "x"}]),
     "{tmp}/d.jsonl:1: field 'instruction': missing"),
    ("alpaca output a number", "alpaca", "d.jsonl", _records([{"instruction": "Say", "output": 3}]),
     "{tmp}/d.jsonl:1: field 'output': expected text, got a number (3)"),
    ("alpaca input an object", "alpaca", "d.jsonl", _records([{"instruction": "Say", "input": {}, "output": "x"}]),
     "{tmp}/d.jsonl:1: field 'input': expected text, got an object"),
    ("csv row without output", "alpaca", "d.csv", "instruction,output\nSay,x\nSay,\n",
     "{tmp}/d.csv:3: field 'output': expected text, got null"),
    ("json that is not a list", "alpaca", "d.json", json.dumps({"instruction": "Say", "output": "x"}),
     "{tmp}/d.json: expected a JSON list of objects (one per example)"),
    ("unknown file type", "alpaca", "d.txt", "Say\n",
     "{tmp}/d.txt: unknown file type '.txt'; use one of .jsonl, .json, .csv, .parquet"),
    ("chat without messages", "chat", "d.jsonl", _records([{"text": "Hi"}]),
     "{tmp}/d.jsonl:1: field 'messages': expected a non-empty list of {{role, content}} turns"),
    ("chat ending on the user", "chat", "d.jsonl", _records([{"messages": [USER]}]),
     "{tmp}/d.jsonl:1: field 'messages': the last turn must be the assistant's answer (the target)"),
    ("chat with an unknown role", "chat", "d.jsonl", _records([{"messages": [{"role": "bot", "content": "x"}]}]),
     "{tmp}/d.jsonl:1: field 'messages[0]': expected {{role, content}} with role one of system, user, assistant"),
    ("chat turn without content", "chat", "d.jsonl",
     _records([{"messages": [USER, {"role": "assistant", "content": None}]}]),
     "{tmp}/d.jsonl:1: field 'messages[1].content': expected text, got null"),
]


@pytest.mark.parametrize("case,task,name,text,message", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_own_file_bad_rows(case, task, name, text, message, tmp_path, tiny_causal, monkeypatch, capsys):
    data = _file(tmp_path, name, text)
    args = ["eval", "--task", task, "--data", str(data), "--model", str(tiny_causal), "--out", str(tmp_path / "o")]
    assert cli_error(args, monkeypatch, capsys) == "error: " + message.format(tmp=tmp_path)
    assert not (tmp_path / "o").exists()  # nothing half-written
