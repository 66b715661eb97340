"""Every YAML file peftlab reads (run configs, studies, task YAMLs, `key=value` overrides, run folders' config.yaml)
is read here, as YAML 1.2, and every config.yaml it writes is written here.

YAML 1.2 reads a value as people write it: `yes`, `no`, `on` and `off` are words, `1e-3` is a number. PyYAML follows
YAML 1.1, where the first four are booleans and `1e-3` is text, which broke `labels: [yes, no]`. Dates stay text
too (`name: 2024-05-01` is a run name, not a datetime): the 1.2 core schema has no timestamps.

Files are written by PyYAML with every string quoted that a 1.2 reader would take for something else (`'1e-3'`), on
top of the quotes PyYAML adds for 1.1 (`'no'`), so a written config reads back the same under either version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import VersionedResolver

from peftlab.core.errors import PeftlabError

_STR = "tag:yaml.org,2002:str"


class YamlSyntaxError(PeftlabError):
    """Text that is not valid YAML; `line` (1-based, or None) and `problem` let a caller word its own message."""

    def __init__(self, where: str, line: int | None, problem: str) -> None:
        self.where, self.line, self.problem = where, line, problem
        super().__init__(f"{where}:{line}: malformed YAML ({problem})" if line else f"{where}: malformed YAML "
                                                                                     f"({problem})")


class _Constructor(SafeConstructor):
    """The safe constructor with timestamps left as the text they were written as, and so is a plain scalar that
    ruamel's number pattern matches but that is no number (`-_`, `._`: ruamel allows `_` between digits)."""

    def construct_yaml_int(self, node: ScalarNode) -> Any:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            return self.construct_yaml_str(node)

    def construct_yaml_float(self, node: ScalarNode) -> Any:
        try:
            return super().construct_yaml_float(node)
        except ValueError:
            return self.construct_yaml_str(node)


_Constructor.add_constructor("tag:yaml.org,2002:timestamp", SafeConstructor.construct_yaml_str)
_Constructor.add_constructor("tag:yaml.org,2002:int", _Constructor.construct_yaml_int)
_Constructor.add_constructor("tag:yaml.org,2002:float", _Constructor.construct_yaml_float)


def parse_yaml(text: str, where: str) -> Any:
    """`text` read as YAML 1.2 into plain dicts, lists, str, int, float, bool and None (never ruamel's own types).

    A syntax error (or a duplicate key) is a `YamlSyntaxError` naming `where`, the line and the problem.
    """
    reader = YAML(typ="safe", pure=True)
    reader.Constructor = _Constructor
    try:
        return reader.load(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(str(err.problem or err.context or "").split())
        if mark is not None:
            problem += f", column {mark.column + 1}"
        raise YamlSyntaxError(where, mark.line + 1 if mark is not None else None, problem) from None
    except (YAMLError, RecursionError) as err:  # a control character (ReaderError), a nesting too deep to build
        raise YamlSyntaxError(where, None, (str(err).splitlines() or [type(err).__name__])[0]) from None


def read_yaml(path: str | Path) -> Any:
    """The YAML file at `path` (UTF-8, with or without a byte-order mark), read with `parse_yaml`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PeftlabError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise PeftlabError(f"{path}: cannot read ({err.strerror or err})") from None
    return parse_yaml(text, str(path))


def _plain_is_not_text(text: str) -> bool:
    return str(VersionedResolver().resolve(ScalarNode, text, (True, False))) != _STR


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting also the strings that YAML 1.2 would read as a number, null or bool."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar(_STR, text, style="'" if _plain_is_not_text(text) else None)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(obj: Any) -> str:
    """`obj` as block-style YAML in its own key order, reading back as `obj` under YAML 1.2 (and 1.1)."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False)


def describe(value: Any) -> str:
    """What a YAML value is, for an error message: 'a list', 'the text 'lora'', 'the number 3', 'nothing'."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}" + ("..." if len(value) > 40 else "")
    return {dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)
