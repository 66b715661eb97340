"""peftlab.core.allocator: freed tensor memory stays in the process (glibc on Linux)."""

from __future__ import annotations

import platform
import subprocess
import sys
from types import SimpleNamespace

import pytest

from peftlab.core import allocator
from peftlab.core.allocator import reuse_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Allocates and frees a 24 MB tensor in a fresh process; prints how many MB of resident memory the free gave back.
FREE_24_MB = """
import os, sys, torch
if sys.argv[1] == "on":
    from peftlab.core.allocator import reuse_freed_memory
    assert reuse_freed_memory()
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
t = torch.ones(6 * 2**20)
before = resident_mb()
del t
print(before - resident_mb())
"""


def _returned_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FREE_24_MB, mode], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_tensor_memory_stays_resident_only_with_the_setting():
    # By default glibc maps a 24 MB block on its own and unmaps it on free; with the setting it comes from the
    # heap, which is never trimmed, so the next tensor reuses pages that are already there.
    assert _returned_mb("off") > 20
    assert _returned_mb("on") < 1


class _FakeMallopt:
    """Stands in for glibc's mallopt: records its calls and answers `result` (1: success, 0: refused)."""

    def __init__(self, result: int):
        self.result, self.calls = result, []

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


@pytest.mark.parametrize("answer,expected", [(1, True), (0, False)])
def test_reuse_freed_memory_sets_both_thresholds_and_reports_glibc_answer(answer, expected, monkeypatch):
    mallopt = _FakeMallopt(answer)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    assert allocator.reuse_freed_memory.__wrapped__() is expected
    # a refused mmap threshold stops there: the trim setting alone would keep nothing resident
    wanted = [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD_MAX), (allocator.M_TRIM_THRESHOLD, -1)]
    assert mallopt.calls == (wanted if answer == 1 else wanted[:1])


def test_reuse_freed_memory_does_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert reuse_freed_memory.__wrapped__() is False


def test_the_cli_sets_it_before_running_a_command(monkeypatch):
    import peftlab.cli

    calls = []
    monkeypatch.setattr(peftlab.cli, "reuse_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(sys, "argv", ["peftlab", "--help"])
    try:
        peftlab.cli.main()
    except SystemExit as err:
        assert not err.code
    assert calls == [True]
