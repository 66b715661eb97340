"""The benchmark commands end to end on the tiny random model: they run, print their tables, and their math holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.bench.common import append_results
from peftlab.bench.train_bench import markdown_table

REPO = Path(__file__).resolve().parents[2]


def _peftlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900)  # generous: the 2 cores are shared, and a loaded machine is slow


def test_bench_train_smoke_matches_both_references(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "train.json"
    proc = _peftlab("bench", "train", "--smoke", "--methods", "lora", "--rounds", "1", "--json", str(out),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\| lora \| no \| \d+ \| \d+ \| \d+ \| \d+\.\d\dx \(>= 2\.0x\) \| \d+\.\d\dx \(>= 1\.5x\)",
                     proc.stdout, re.MULTILINE), proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["trainer_same_init"] and row["trl_same_init"], "a reference started from other adapter weights"
    assert row["trainer_rows_read"] == row["trl_rows_read"] == 8 and row["peftlab_steps"] == 4  # n=8, batch 2
    assert row["trl_padding_free"]
    assert len(row["losses_trainer"]) == len(row["losses_trl"]) == len(row["losses_peftlab_trl"]) == 4
    # same ids, same tokens: TRL's padding-free loss is the Trainer's, and peftlab's layout gives both
    assert row["trainer_max_rel_diff"] <= 1e-3 and row["trl_max_rel_diff"] <= 1e-3, row
    assert not (tmp_path / "bench" / "RESULTS.md").exists()  # --smoke writes no results file unless asked


# The bf16 sides in one process (a worker process each would cost a minute of the suite): the Trainer's and TRL's
# `bf16=True`, and peftlab's five steps under its own autocast, on the Trainer's batches; for each method given.
BF16_WORKERS = """
import json, sys
from pathlib import Path
from peftlab.bench.common import encode_dialogsum, tiny_model
from peftlab.bench.workers import run_check, run_ref, run_trl
model = str(tiny_model(Path(sys.argv[1])))
_, items, _ = encode_dialogsum(model, 6, 512)
out = {}
for method in sys.argv[2:]:
    spec = {"model": model, "batch": 2, "max_length": 512, "seed": 0, "method": method, "lr": 2e-4,
            "autocast": "bf16", "items": [[e.prompt_ids, e.target_ids] for e in items], "train": {}}
    ref, trl = run_ref(spec), run_trl(spec)
    out[method] = {"ref": ref, "trl": trl, "check": run_check({**spec, "batches": ref["batches"]})}
print(json.dumps(out))
"""


def test_bf16_autocast_sides_agree(tmp_path):
    pytest.importorskip("trl")
    methods = ["lora", "prompt-tuning"]  # padding-free and padded TRL
    proc = subprocess.run([sys.executable, "-c", BF16_WORKERS, str(tmp_path / "tiny"), *methods],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for method in methods:
        ref, trl, check = result[method]["ref"], result[method]["trl"], result[method]["check"]
        assert trl["padding_free"] == (method != "prompt-tuning")  # peft drops prompt tuning's position_ids
        assert ref["init_checksum"] == trl["init_checksum"] == pytest.approx(check["init_checksum"], rel=1e-9)
        assert len(ref["losses"]) == len(check["losses"]) == 3
        for a, b in zip(ref["losses"], check["losses"], strict=True):
            assert abs(a - b) <= 3e-2 * abs(a), (method, ref["losses"], check["losses"])  # the bench's bf16 bar
        if trl["batches"] == ref["batches"]:
            assert trl["losses"] == pytest.approx(ref["losses"], rel=3e-2)


def _fake_worker(calls: list, batches: dict):
    """Stand-in for `run_worker`: records the order of the sides and answers like the workers do."""

    def run(role: str, spec: dict, tmp) -> dict:
        calls.append((role, spec.get("autocast")))
        halved = 2 if spec.get("autocast") == "bf16" else 1
        seconds = {"ref": 4.0, "trl": 3.0, "peftlab": 2.0}.get(role, 0.0) / halved
        if role == "check":
            return {"losses": [2.0, 1.0], "init_checksum": 5.0}
        if role == "infer":
            return {"peak_mb": 3.0}
        if role == "peftlab":
            return {"seconds": seconds, "step_seconds": seconds, "steps": 2, "base_params": 10, "peak_mb": 1.0}
        return {"seconds": seconds, "losses": [2.0, 1.0002], "batches": batches[role], "init_checksum": 5.0,
                "rows_read": 4, "padding_free": True, "peak_mb": 1.0}

    return run


def test_bench_method_rounds_are_a_palindrome_and_each_reference_is_checked_on_its_batches(monkeypatch, tmp_path,
                                                                                            capsys):
    import peftlab.bench.train_bench as bench

    calls: list = []
    monkeypatch.setattr(bench, "run_worker", _fake_worker(calls, {"ref": [[0, 1], [2, 3]], "trl": [[1, 0], [3, 2]]}))
    spec = {"real_tokens": 100}
    rows = bench.bench_method("lora", spec, tmp_path, 2, references=("trainer", "trl"), autocasts=("no", "bf16"))
    sides = [("ref", "no"), ("trl", "no"), ("peftlab", "no"), ("ref", "bf16"), ("trl", "bf16"), ("peftlab", "bf16")]
    timed = [c for c in calls if c[0] != "check"]
    assert timed == sides + sides[::-1]  # A B C, C B A: a steady drift cancels out of every ratio
    assert [c for c in calls if c[0] == "check"] == [("check", "no")] * 2 + [("check", "bf16")] * 2  # other batches
    fp32, bf16 = rows
    assert fp32["ratio"] == 2.0 and fp32["trl_ratio"] == 1.5 and fp32["peftlab_tok_s"] == 50.0
    assert bf16["speedup_vs_fp32"] == 2.0 and bf16["loss_diff_vs_fp32"] == 0.0
    assert fp32["max_rel_diff"] == pytest.approx(0.0002 / 1.0002)  # relative to the reference's loss
    opts = bench.TrainBenchOptions(model="m", methods=("lora",), n=4, max_length=16, batch=2, results=None)
    bench.report_train(rows, {"no": 50.0, "bf16": 100.0}, 1.0, opts)
    printed = capsys.readouterr().out
    assert "| lora | bf16 | 50 | 67 | 100 | 2.00x (>= 2.0x) | 1.50x (>= 1.5x) |" in printed
    assert "bf16 autocast 2.00x peftlab's fp32 (target >= 1.5x); first-5 losses max rel diff to fp32 0.0e+00" \
        in printed


def test_the_trl_reference_shares_the_trainers_check_when_it_draws_the_same_batches(monkeypatch, tmp_path):
    import peftlab.bench.train_bench as bench

    calls: list = []
    monkeypatch.setattr(bench, "run_worker", _fake_worker(calls, {"ref": [[0, 1]], "trl": [[0, 1]]}))
    bench.bench_method("full", {"real_tokens": 10}, tmp_path, rounds=1, references=("trainer", "trl"))
    assert calls.count(("check", "no")) == 1


def test_run_train_bench_takes_everything_from_its_options(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    import peftlab.bench.train_bench as bench

    calls: list = []
    monkeypatch.setattr(bench, "run_worker", _fake_worker(calls, {"ref": [[0, 1]]}))
    monkeypatch.setattr(bench, "sgemm_gflops", lambda device, dtype: 40.0)
    items = [SimpleNamespace(prompt_ids=[1, 2], target_ids=[3], length=3)] * 2
    monkeypatch.setattr(bench, "encode_dialogsum", lambda model, n, max_length: (None, items[:n], None))
    results, json_out = tmp_path / "RESULTS.md", tmp_path / "out.json"
    opts = bench.TrainBenchOptions(model="models/tiny", methods=("lora", "full"), n=2, max_length=16, batch=2,
                                   results=results, json_out=json_out, micro_tokens=64, rounds=1,
                                   references=("trainer",))
    rows = bench.run_train_bench(opts)
    assert [r["method"] for r in rows] == ["lora", "full"] and calls[0] == ("infer", None)
    assert "## Training throughput: tiny, n=2, max_length=16, batch=2, rounds=1, micro_tokens=64 (" \
        in results.read_text()
    assert json.loads(json_out.read_text())["inference_peak_mb"] == 3.0
    assert f"appended to {results}" in capsys.readouterr().out


def test_run_eval_bench_takes_everything_from_its_options(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    import peftlab.bench.eval_bench as bench
    import peftlab.models.loading as loading

    seen: dict = {}
    monkeypatch.setattr(bench, "tiny_model", lambda out: "tiny-llama")
    monkeypatch.setattr(bench, "encode_dialogsum", lambda model, n, max_length: ("fmt", [model] * n, None))
    monkeypatch.setattr(loading, "load_model", lambda name, device, dtype: SimpleNamespace(model=SimpleNamespace(
        eval=lambda: None)))

    def compare(loaded, fmt, items, max_new_tokens, rounds, batch):
        seen.update(items=items, max_new_tokens=max_new_tokens, rounds=rounds, batch=batch)
        return {"baseline_s": 2.0, "peftlab_s": 0.5, "peftlab_rounds_s": [0.5] * rounds, "speedup": 4.0,
                "mismatches": [], "batched_s": None, "batched_mismatches": []}

    monkeypatch.setattr(bench, "compare_generation", compare)
    monkeypatch.setattr(bench, "scoring", lambda loaded, fmt, n, bf16: {"scored": n, "scoring_items_s": 9.0})
    results, json_out = tmp_path / "RESULTS.md", tmp_path / "out.json"
    opts = bench.EvalBenchOptions(model="models/tiny", n=3, max_new_tokens=7, results=results, smoke=True,
                                  json_out=json_out, score_n=5, rounds=2, generate_batch=0)
    r = bench.run_eval_bench(opts)
    assert seen == {"items": ["tiny-llama"] * 3, "max_new_tokens": 7, "rounds": 2, "batch": 0}
    assert r["scored"] == 5 and r["llama_cpp_s"] is None  # --smoke times no llama.cpp
    assert "## Evaluation speed: tiny random model, n=3, max_new_tokens=7 (" in results.read_text()
    assert json.loads(json_out.read_text()) == r
    assert "| speedup (target >= 5x) | 4.00x |" in capsys.readouterr().out


def test_bench_train_options_are_checked(monkeypatch):
    import importlib.util

    import peftlab.bench.train_bench as bench
    from peftlab.core.errors import PeftlabError

    with pytest.raises(PeftlabError, match="--autocast"):
        bench.check_autocasts(["fp16"], "cpu")
    with pytest.raises(PeftlabError, match="--references"):
        bench.usable_references(["trl"])  # the Trainer is the table's base: always there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "trl" else real(name))
    assert bench.usable_references(["trainer", "trl"]) == ["trainer"]


def test_bench_eval_smoke_batched_generation_is_identical(tmp_path):
    from peftlab.bench.common import native_bf16_cpu

    out = tmp_path / "eval.json"
    proc = _peftlab("bench", "eval", "--smoke", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup (target >= 5x)" in proc.stdout
    assert "peftlab against batched generate (target >= 2x)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mismatches"] == [], result["mismatches"]
    assert result["batched_mismatches"] == [], result["batched_mismatches"]  # left padding + static cache, fp32
    assert result["baseline_s"] > 0 and result["peftlab_s"] > 0 and result["batched_s"] > 0 and result["scored"] == 10
    assert len(result["peftlab_rounds_s"]) == 4  # peftlab timed after each of the loop's four blocks
    if native_bf16_cpu():
        assert result["bf16_items_s"] > 0 and 0 <= result["bf16_changed"] <= 10
        assert 0.0 <= result["bf16_accuracy"] <= 1.0
    else:
        assert "bf16_items_s" not in result  # emulated bf16 is not what the issue measures


def test_results_file_gets_a_header_once_and_dated_sections(tmp_path):
    row = {"method": "lora", "ref_tok_s": 100.0, "peftlab_tok_s": 250.0, "ratio": 2.5, "peftlab_gflops": 30.0,
           "ref_peak_mb": 900.0, "peftlab_peak_mb": 700.0, "losses_ref": [2.0, 1.9], "losses_peftlab": [2.0, 1.9001],
           "max_rel_diff": 5e-5, "same_init": True}
    table = markdown_table([row], sgemm=60.0, infer_mb=500.0)
    assert "| lora | no | 100 | 250 | 2.50x (>= 2.0x) | 30.0 | 50% (>= 60%) | 900 | 700 | 500 |" in table
    assert "TRL" not in table  # the TRL columns appear only where a row has TRL's numbers
    path = tmp_path / "RESULTS.md"
    append_results(path, "first", table)
    append_results(path, "second", table)
    text = path.read_text()
    assert text.count("# peftlab benchmark results") == 1
    assert text.index("## first") < text.index("## second")


def test_the_headline_is_against_each_peers_best_precision():
    from peftlab.bench.train_bench import best_precision_lines

    rows = [{"method": "lora", "autocast": "no", "peftlab_tok_s": 252.0, "trainer_tok_s": 150.0, "trl_tok_s": 110.0},
            {"method": "lora", "autocast": "bf16", "peftlab_tok_s": 324.0, "trainer_tok_s": 203.0, "trl_tok_s": 141.0},
            {"method": "full", "autocast": "no", "peftlab_tok_s": 100.0, "trainer_tok_s": 60.0}]
    (line,) = best_precision_lines(rows).splitlines()  # full has one precision: its table ratio is its headline
    assert line == ("- lora: peftlab at its best (bf16, 324 tok/s) is 1.60x the Trainer's best (bf16, 203 tok/s) "
                    "and 2.30x the TRL's best (bf16, 141 tok/s) (target >= 2.0x)")
