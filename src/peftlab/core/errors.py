"""User-facing errors.

Anything a user can cause (a bad file, an unknown name, a wrong adapter) raises `PeftlabError`. The CLI prints its
message on one line and exits with code 2, with no traceback: the message must say what to fix.
"""

from __future__ import annotations

from pathlib import Path


class PeftlabError(Exception):
    """An error caused by input the user controls; its message is shown as is."""

    exit_code = 2


class NotSupported(PeftlabError):
    """A run that cannot happen here: an optional package or backend is missing, or peft cannot run the method on
    this model. The message names what is missing. A study lists such a run as not run instead of failing."""

    exit_code = 3


# Every character `str.splitlines` breaks a line at, written as its escape (a backslash, n), so a message stays one
# line.
_ESCAPE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def on_one_line(text: str) -> str:
    """`text` with every line break escaped: a key or value from a file may carry one."""
    return text.translate(_ESCAPE_BREAKS)


def data_error(path: str | Path, line: int | None, field: str | None, problem: str) -> PeftlabError:
    """An error that points at `path:line` and names the field, the way compilers report errors."""
    where = f"{path}:{line}" if line is not None else str(path)
    what = f"field '{field}': " if field else ""
    # One line, whatever the row holds: a field name or a value from the file may carry a line break.
    return PeftlabError(on_one_line(f"{where}: {what}{problem}"))


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> PeftlabError:
    """An error for an unknown registry name that lists the valid ones."""
    return PeftlabError(f"unknown {kind} '{name}'; valid: {', '.join(sorted(valid))}")
