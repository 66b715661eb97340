"""Atomic file writes: a result file is either the old one or the complete new one, never half-written.

Each write goes to a temporary file in the same folder, is flushed to disk, and is renamed over the target.
A full disk, a read-only folder or a missing permission raises a one-line error and leaves the earlier file in place.
`write_files_atomic` does the same for a set of files that belong together (predictions and their metrics): none is
replaced until every one is on disk. `ensure_writable` checks an output folder before the work that fills it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peftlab.core.errors import PeftlabError

_UMASK = os.umask(0)
os.umask(_UMASK)  # read the process umask once (setting it is the only way to read it)

# What a user can do something about, said in their words; other errors keep the system's own wording.
_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def os_reason(err: OSError) -> str:
    """A short lower-case reason for a failed write: 'disk full', 'read-only file system', 'permission denied'..."""
    return _REASONS.get(err.errno, (err.strerror or str(err)).lower())


def save_reason(err: Exception) -> str:
    """`os_reason` for an OSError, or for a safetensors error, which carries the OS error in its text:
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })'."""
    if isinstance(err, OSError):
        return os_reason(err)
    code = re.search(r"\bcode: (\d+)", str(err))
    return _REASONS.get(int(code.group(1)), str(err)) if code else str(err)


def write_error(path: Path, err: OSError, existed: bool) -> PeftlabError:
    """One line for a failed write of `path`, saying what was left: the earlier file, or nothing."""
    kept = "the previous version of this file was kept" if existed else "nothing was written"
    return PeftlabError(f"{path}: {os_reason(err)}; {kept}")


def _stage(path: Path, data: bytes) -> str:
    """Write `data` to a synced temp file beside `path`; returns its name. Raises a one-line error, leaving nothing."""
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should read like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp
    except OSError as err:
        _discard(tmp)
        raise write_error(path, err, existed) from None
    except BaseException:  # a stop signal mid-write: no temp file is left behind either
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        Path(tmp).unlink(missing_ok=True)


def _replace(tmp: str, path: Path, existed: bool) -> None:
    try:
        os.replace(tmp, path)
    except OSError as err:  # e.g. the target is a folder
        _discard(tmp)
        raise write_error(path, err, existed) from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename."""
    path = Path(path)
    existed = path.exists()
    _replace(_stage(path, data), path, existed)


def write_files_atomic(files: dict[Path, bytes]) -> None:
    """Write several files that belong together: all are staged before any is replaced, in the order given.

    Put the file that marks completion last (metrics.json after predictions.jsonl): a reader that finds it finds
    the others complete. A failure while staging leaves every earlier version in place.
    """
    staged: list[tuple[str, Path, bool]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            existed = path.exists()
            staged.append((_stage(path, data), path, existed))
    except BaseException:
        for tmp, _, _ in staged:
            _discard(tmp)
        raise
    for tmp, path, existed in staged:
        _replace(tmp, path, existed)


def ensure_writable(folder: Path, fix: str) -> None:
    """Check, before any work, that files can be created in `folder` (or in the folders it would be created in).

    Nothing is created: a missing folder is checked at its nearest existing parent, so an error later in the
    command leaves no empty output folder behind. `fix` is the advice at the end of the message.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PeftlabError(f"{folder}: cannot write here ({probe} is a file, not a folder); {fix}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".peftlab-write-check.", dir=probe)
    except OSError as err:
        raise PeftlabError(f"{folder}: cannot write here ({os_reason(err)}); {fix}") from None
    os.close(fd)
    os.unlink(tmp)


def ensure_file_writable(path: Path, flag: str, example: str) -> None:
    """`ensure_writable` for the file an option names (`flag`: --out, --gguf), which must not be a folder either.

    `example` is a file name to suggest inside the folder given by mistake.
    """
    path = Path(path)
    if path.is_dir():
        raise PeftlabError(f"{path}: is a folder; {flag} names the file to write, e.g. {path / example}")
    ensure_writable(path.parent, f"choose another {flag}")


def json_bytes(obj: Any) -> bytes:
    """`obj` as indented JSON, one trailing newline (how every peftlab JSON file reads)."""
    return (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode("utf-8")


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    """One JSON object per line."""
    return "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows).encode("utf-8")


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_bytes_atomic(path, jsonl_bytes(rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line with a single write, so a crash leaves whole lines behind (a log, not a result)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
    except OSError as err:
        raise PeftlabError(f"{path}: {os_reason(err)}; the lines before this one were kept") from None


def read_json(path: Path) -> Any:
    """A JSON file peftlab wrote; one cut off or overwritten (not JSON, not UTF-8) is one line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError both are
        raise PeftlabError(f"{path}: not readable JSON ({str(err).splitlines()[0]}); the file may have been cut "
                           "off or overwritten") from None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file that peftlab wrote (blank lines skipped); a user's data file goes through the
    task loaders instead, which name the line of a malformed row."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
