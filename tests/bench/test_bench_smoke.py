"""The benchmark commands end to end on the tiny random model: they run, print their tables, and their math holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from peftlab.bench.train import append_results, markdown_table

REPO = Path(__file__).resolve().parents[2]


def _peftlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftlab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_bench_train_smoke_matches_reference_losses(tmp_path):
    out = tmp_path / "train.json"
    proc = _peftlab("bench", "train", "--smoke", "--methods", "lora", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\| lora \| \d+ \| \d+ \| \d+\.\d\dx \(>= 2\.0x\)", proc.stdout, re.MULTILINE), proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["same_init"], "the reference and peftlab did not start from the same adapter weights"
    assert row["ref_rows_read"] == 8 and row["peftlab_steps"] == 4  # n=8, batch 2: every row, one epoch
    assert len(row["losses_ref"]) == len(row["losses_peftlab"]) == 4
    assert len(row["ref_rounds_s"]) == len(row["peftlab_rounds_s"]) == 2  # each side run twice, AB then BA
    # peftlab's batch layout (left-padded prompts, LM head on targets only) must give the reference's losses
    assert row["max_rel_diff"] <= 1e-3, (row["losses_ref"], row["losses_peftlab"])
    assert not (tmp_path / "bench" / "RESULTS.md").exists()  # --smoke writes no results file unless asked


def test_bench_eval_smoke_batched_generation_is_identical(tmp_path):
    out = tmp_path / "eval.json"
    proc = _peftlab("bench", "eval", "--smoke", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup (target >= 5x)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["mismatches"] == [], result["mismatches"]
    assert result["baseline_s"] > 0 and result["peftlab_s"] > 0 and result["scored"] == 10
    assert len(result["peftlab_rounds_s"]) == 4  # peftlab timed after each of the loop's four blocks


def test_results_file_gets_a_header_once_and_dated_sections(tmp_path):
    row = {"method": "lora", "ref_tok_s": 100.0, "peftlab_tok_s": 250.0, "ratio": 2.5, "peftlab_gflops": 30.0,
           "ref_peak_mb": 900.0, "peftlab_peak_mb": 700.0, "losses_ref": [2.0, 1.9], "losses_peftlab": [2.0, 1.9001],
           "max_rel_diff": 5e-5, "same_init": True}
    table = markdown_table([row], sgemm=60.0, infer_mb=500.0)
    assert "| lora | 100 | 250 | 2.50x (>= 2.0x) | 30.0 | 50% (>= 60%) | 900 | 700 | 500 |" in table
    path = tmp_path / "RESULTS.md"
    append_results(path, "first", table)
    append_results(path, "second", table)
    text = path.read_text()
    assert text.count("# peftlab benchmark results") == 1
    assert text.index("## first") < text.index("## second")


def test_cpu_model_names_the_instruction_set(monkeypatch, tmp_path):
    import peftlab.bench.train as bench

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n")
    real_path = bench.Path
    monkeypatch.setattr(bench, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert bench.cpu_model().endswith("AMD EPYC 7B13 AVX2")
    cpuinfo.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n")
    assert bench.cpu_model().endswith("Intel(R) Xeon(R) Processor AMX")
