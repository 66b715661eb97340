"""The command line: one-line errors with exit code 2, help for every command, and `peftlab eval` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer

from peftlab.cli import app, main
from peftlab.core.files import read_json


def _cli(monkeypatch, *args: str) -> int:
    """Run the real entry point in-process (a subprocess costs ~5 s of imports); returns the exit code."""
    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    try:
        main()
    except SystemExit as err:
        return err.code or 0
    return 0


def test_user_error_is_one_line_exit_2_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "eval", "--task", "nosuch", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown task 'nosuch'"), proc.stderr
    assert "pubmedqa" in lines[0] and "Traceback" not in proc.stderr


def test_bad_data_line_names_file_and_line(monkeypatch, capsys, tmp_path, tiny_causal):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"dialogue": "a", "summary": "b"}\n{"dialogue": "a" "summary": "b"}\n')
    code = _cli(monkeypatch, "eval", "--task", "dialogsum", "--data", str(data), "--model", str(tiny_causal),
                "--out", str(tmp_path / "d"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == err.strip().splitlines()[0] and f"{data}:2: malformed JSON" in err
    assert "Traceback" not in err


def test_missing_option_is_a_usage_error(monkeypatch, capsys):
    assert _cli(monkeypatch, "eval") == 2
    err = capsys.readouterr().err
    assert err == "error: --out is needed without a run folder\n"
    assert _cli(monkeypatch, "predict") == 2
    err = capsys.readouterr().err
    assert "Missing argument 'run'" in err and "Traceback" not in err


def _commands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def test_commands_registered():
    assert {"models", "methods", "eval", "predict", "train", "compare", "report"} <= set(_commands())


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help(command, monkeypatch, capsys):
    args = [command, "--help"] if command else ["--help"]
    assert _cli(monkeypatch, *args) == 0
    out = capsys.readouterr().out
    assert "Usage" in out and (command is None or command in out)


def test_eval_pubmedqa(monkeypatch, tmp_path, tiny_causal, small_pubmedqa):
    out = tmp_path / "d"
    code = _cli(monkeypatch, "eval", "--task", "pubmedqa", "--data", str(small_pubmedqa), "--model", str(tiny_causal),
                "--limit", "8", "--out", str(out), "--device", "cpu")
    assert code == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["n"] == 8 and 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["prediction"] in ("yes", "no", "maybe") for r in rows)


def test_eval_dialogsum_multi_reference(monkeypatch, tmp_path, tiny_causal, small_dialogsum):
    rows = [json.loads(line) for line in small_dialogsum.read_text().splitlines()[:6]]
    data = tmp_path / "test.jsonl"
    with data.open("w") as f:
        for i, r in enumerate(rows):
            refs = {"summary1": r["summary"], "summary2": f"#Person1# asks about {i}.", "summary3": r["summary"][:40]}
            f.write(json.dumps({"fname": r["fname"], "dialogue": r["dialogue"], **refs}) + "\n")
    out = tmp_path / "d"
    code = _cli(monkeypatch, "eval", "--task", "dialogsum", "--data", str(data), "--model", str(tiny_causal),
                "--limit", "4", "--out", str(out), "--device", "cpu", "--max-length", "1024")
    assert code == 0
    metrics = read_json(out / "metrics.json")
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert 0 <= metrics[key] <= metrics[f"{key}_max"] <= 1
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(len(p["references"]) == 3 for p in preds)


def test_methods_lists_every_registered_method_with_its_default_lr(monkeypatch, capsys):
    from peftlab.methods.registry import METHODS

    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    assert _cli(monkeypatch, "methods") == 0
    out = capsys.readouterr().out
    for m in METHODS.values():
        row = next(line for line in out.splitlines() if f" {m.name} " in line)
        assert m.trained_part in row and m.description[:30] in row
        if m.default_lr:
            assert f"{m.default_lr:g}" in row


def test_bench_options_are_parsed_once_into_their_dataclasses(monkeypatch):
    import peftlab.bench.eval_bench as eval_bench
    import peftlab.bench.train_bench as train_bench
    from peftlab.bench.common import DEFAULT_RESULTS
    from peftlab.core.config import DEFAULT_MODEL

    seen: list = []
    monkeypatch.setattr(train_bench, "run_train_bench", seen.append)
    monkeypatch.setattr(eval_bench, "run_eval_bench", seen.append)
    assert _cli(monkeypatch, "bench", "train", "--smoke", "--methods", "lora, full,", "--n", "20", "--batch", "4",
                "--autocast", "no,bf16", "--references", "trainer", "--micro-tokens", "64") == 0
    assert _cli(monkeypatch, "bench", "train", "--methods", "lora", "--device", "cuda", "--dtype", "bfloat16") == 0
    assert _cli(monkeypatch, "bench", "eval", "--smoke", "--n", "64", "--generate-batch", "0") == 0
    smoke, cuda, evaluation = seen
    # --smoke caps n and batch and writes no results file unless asked; the lists come comma-separated
    assert smoke == train_bench.TrainBenchOptions(
        model=DEFAULT_MODEL, methods=("lora", "full"), n=8, max_length=512, batch=2, results=None, smoke=True,
        micro_tokens=64, references=("trainer",), autocasts=("no", "bf16"))
    assert cuda.results == DEFAULT_RESULTS and (cuda.device, cuda.dtype, cuda.n) == ("cuda", "bfloat16", 64)
    assert cuda.references == ("trainer", "trl") and cuda.autocasts == ("no",)
    assert evaluation == eval_bench.EvalBenchOptions(model=DEFAULT_MODEL, n=6, max_new_tokens=8, results=None,
                                                     smoke=True, score_n=10, generate_batch=0)
