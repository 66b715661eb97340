"""peftlab.core.allocator: freed tensor memory stays in the process (glibc on Linux)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_reuse_freed_memory_reports_success_and_is_set_once():
    assert reuse_freed_memory() is True
    assert reuse_freed_memory() is True


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
