"""Helpers of the bad-input tests (tests/bad_inputs/): run the real CLI and read its one error line, and
simulate a read-only folder."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import sys
from pathlib import Path

import pytest

from peftlab import cli


def cli_error(argv: list[str], monkeypatch, capsys, code: int = 2) -> str:
    """The one stderr line of a CLI command that must fail with exit code `code`."""
    monkeypatch.setattr(sys, "argv", ["peftlab", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    shown = [line.rsplit("\r", 1)[-1].strip() for line in err.split("\n")]  # what a terminal shows of each line
    lines = [line for line in shown if line and not re.search(r"\|.*\[\d+:\d+", line)]  # less the progress bars
    assert len(lines) == 1, err
    return lines[0]


def read_only(monkeypatch, root: Path, code: int = errno.EROFS) -> None:
    """Every file or folder created, or file opened for writing, under `root` fails with `code` (EROFS: a read-only
    mount, EACCES: no permission). Reads work, as they do on a read-only mount."""
    root = Path(os.path.abspath(root))
    root.mkdir(parents=True, exist_ok=True)  # a mount point exists
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def under(path) -> bool:
        return isinstance(path, str | os.PathLike) and Path(os.path.abspath(path)).is_relative_to(root)

    def refuse(path):
        raise OSError(code, os.strerror(code), str(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if under(file) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if under(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def must_not_load(monkeypatch, *targets: str) -> None:
    """The check must come before the model loads: loading it is a test failure."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    for target in targets:
        monkeypatch.setattr(target, loaded)
