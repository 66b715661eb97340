"""One process per run folder: a lock file that a second process finds held, and a killed process leaves free.

The lock is `flock` on `<run>/.lock`, which the kernel drops when its process exits, however it exits: a lock left
by a `kill -9` is stale, and the next process takes it over without asking anyone to delete a file. The file holds
the holder's PID, so the refusal can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from peftlab.core.errors import PeftlabError
from peftlab.core.files import os_reason

LOCK = ".lock"


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block; a folder another live process holds is an error naming its PID."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise PeftlabError(f"{run_dir}: cannot write the run folder ({os_reason(err)}); "
                           "set output_dir to a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise PeftlabError(
                f"{run_dir}: run folder in use by another peftlab process (PID {holder}); "
                "wait for it to finish or give this run another name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: no PID to blame
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
