"""peftlab.core.resources: one peak-memory figure for runs and benchmarks."""

from __future__ import annotations

import subprocess
import sys

from peftlab.core.resources import peak_rss_mb

# A parent that holds 2 GB, then execs a fresh Python that reports its own peak. `compare` starts every run this
# way; Linux carries ru_maxrss across exec, so the old figure reported the parent's 2 GB for the child.
_PARENT = """
import os, sys
held = b"x" * (2 * 2**30)
child = "from peftlab.core.resources import peak_rss_mb; print(peak_rss_mb())"
os.execv(sys.executable, [sys.executable, "-c", child])
"""


def test_peak_rss_is_the_process_own_after_exec():
    out = subprocess.run([sys.executable, "-c", _PARENT], capture_output=True, text=True, check=True).stdout
    assert float(out) < 1500


def test_peak_rss_counts_what_this_process_touched():
    before = peak_rss_mb()
    held = b"x" * int((before + 200) * 2**20)  # more than the peak so far, so the peak must rise
    assert peak_rss_mb() >= before + 150
    del held


def test_cpu_model_names_the_instruction_set(monkeypatch, tmp_path):
    import peftlab.core.resources as resources

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n")
    real_path = resources.Path
    monkeypatch.setattr(resources, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert resources.cpu_model().endswith("AMD EPYC 7B13 AVX2")
    cpuinfo.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n")
    assert resources.cpu_model().endswith("Intel(R) Xeon(R) Processor AMX")
    cpuinfo.write_text("model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n")
    assert resources.cpu_model().endswith("AMD EPYC 9B14 AVX-512 with AVX512_BF16")
