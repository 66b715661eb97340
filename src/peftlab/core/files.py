"""Atomic file writes: a result file is either the old one or the complete new one, never half-written.

Each write goes to a temporary file in the same folder, is flushed to disk, and is renamed over the target.
A full disk raises a clear error and leaves the earlier file in place.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftlab.core.errors import PeftlabError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read the process umask once (setting it is the only way to read it)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should read like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise PeftlabError(f"{path}: disk full; the previous version of this file was kept") from None
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line with a single write, so a crash leaves whole lines behind (a log, not a result)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=_jsonable) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
