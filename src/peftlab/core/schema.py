"""YAML sections checked by pydantic, and its errors as peftlab's one-line messages.

A section is a pydantic dataclass: attribute access, mutation, `dataclasses.replace` and `asdict` work as on a
plain dataclass, and pydantic checks every value when one is built: its type, its choices (`Literal`), its bounds
(`ge=1`) and an unknown key (`FORBID`). Values are taken as YAML wrote them (`StrictInt`, `StrictStr`, ...): the
text '3' is no number and `true` no integer; an integer is a number. `checked` builds a section from a mapping and
turns pydantic's `ValidationError` into a `PeftlabError` that names the dotted key, what it got and what is allowed:

    unknown config key 'train.lrr'; valid: activation_checkpointing, batch_size, ...
    train.epochs: expected a whole number >= 1, got the text 'two'
    train.mixed_precision must be auto, no or bf16, got 'fp8'
    data.limit_eval must be >= 1 (leave it unset to use every example), got 0
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import ConfigDict, Field, Tag, TypeAdapter, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from peftlab.core.errors import PeftlabError, on_one_line
from peftlab.core.yamlio import describe

T = TypeVar("T")

FORBID = ConfigDict(extra="forbid")  # every section's config: a key it does not have is an error that names it


def setting(default: Any = PydanticUndefined, help: str = "", note: str | None = None, **constraints: Any) -> Any:
    """A section's field: its default (none: required), its help text, and pydantic constraints (`ge=1`, `gt=0`).

    `note` is added to the message of a value that breaks them: `must be >= 1 (leave it unset to ...), got 0`.
    A list or dict default is copied for each instance.
    """
    extra = {"note": note} if note else None
    if isinstance(default, list | dict):
        return Field(default_factory=lambda d=default: type(d)(d), description=help, json_schema_extra=extra,
                     **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def _left_empty(cls: type, value: Any, info: Any) -> Any:
    if value is None:  # `train:` with its keys commented out, or `runs:` with nothing under it
        return cls.__pydantic_fields__[info.field_name].get_default(call_default_factory=True)
    return value


def empty_is_default(*names: str) -> Any:
    """A field validator for a class body: a key given as nothing (`train:` with every key commented out) takes
    its default, where pydantic would refuse the None."""
    return field_validator(*names, mode="before")(_left_empty)


def fields_of(cls: type) -> dict[str, FieldInfo]:
    """A section's fields: name -> pydantic FieldInfo (annotation, default, `description` = help text)."""
    return cls.__pydantic_fields__


@functools.cache
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(tp)


def checked(tp: type[T] | Any, raw: Any, where: str = "", kind: str = "config", note: str | None = None) -> T:
    """`raw` (a mapping read from YAML) validated as `tp`; any problem is one `PeftlabError` line naming the key.

    `where` prefixes every key (`data.mixture[0]`), `kind` names the file's keys in an unknown-key message
    (`unknown study key 'tune.trails'`), and `note` says what the mapping is when `raw` is no mapping.
    """
    if not isinstance(raw, dict):
        noted = f" ({note})" if note else ""
        raise PeftlabError(f"{where or kind}: expected a mapping{noted}, got {describe(raw)}")
    try:
        return _adapter(tp).validate_python(raw)
    except ValidationError as err:
        raise PeftlabError(on_one_line(one_line(err, tp, where, kind))) from None


# ---------------------------------------------------------------------------------------------------------------------
# ValidationError -> one line
# ---------------------------------------------------------------------------------------------------------------------

_UNKNOWN = {"unexpected_keyword_argument", "extra_forbidden", "invalid_key"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
# What an error type expected, where the annotation cannot say (past a union pydantic could not match).
_EXPECTED = {"int_type": "a whole number", "float_type": "a number", "string_type": "text",
             "bool_type": "true or false", "dict_type": "a mapping", "list_type": "a list", "tuple_type": "a list",
             "dataclass_type": "a mapping", "dataclass_exact_type": "a mapping"}
# (one, many) words per type, for "expected a list of whole numbers".
_WORDS = {int: ("a whole number", "whole numbers"), float: ("a number", "numbers"), str: ("text", "text"),
          bool: ("true or false", "true or false values"), dict: ("a mapping", "mappings")}


@dataclasses.dataclass
class _Spot:
    """Where an error's location points: the dotted key, the annotation there (None where unknown), the field
    (for its note), the last section looked into (for the valid keys) and where the tag of the innermost union
    whose members were each tried begins."""

    key: str
    ann: Any
    info: FieldInfo | None = None
    section: type | None = None
    union_at: int | None = None


def one_line(err: ValidationError, tp: Any, where: str = "", kind: str = "config") -> str:
    """The first problem of `err` as one line. Where a union's members all failed (`list[str] | str` given 5),
    the member that got furthest says what is wrong; when none did, the message lists what the union takes."""
    errors = err.errors()
    first = errors[0]
    spot = _spot(tp, first["loc"], where)
    if spot.union_at is not None and first["type"] not in _UNKNOWN:
        cut = spot.union_at
        members = [e for e in errors if e["loc"][:cut] == first["loc"][:cut]]
        deepest = max(len(e["loc"]) for e in members)
        furthest = [e for e in members if len(e["loc"]) == deepest]
        if len(furthest) > 1:  # no member matched further than another: say what the union takes
            return _message({**first, "type": "union"}, _spot(tp, first["loc"][:cut], where), kind)
        first = furthest[0]
        spot = _spot(tp, first["loc"], where)
    return _message(first, spot, kind)


def _message(error: dict, spot: _Spot, kind: str) -> str:
    kind_of, value, key = error["type"], error.get("input"), spot.key or kind
    note = (spot.info.json_schema_extra or {}).get("note") if spot.info else None
    noted = f" ({note})" if note else ""
    if kind_of in _UNKNOWN:
        valid = ", ".join(sorted(fields_of(spot.section))) if spot.section else ""
        return f"unknown {kind} key {spot.key!r}; valid: {valid}"
    if kind_of in _BOUNDS:
        name, op = _BOUNDS[kind_of]
        return f"{key} must be {op} {_number(error['ctx'][name])}{noted}, got {_yaml(value)}"
    if kind_of == "too_short":
        n = error["ctx"]["min_length"]
        return f"{key} must hold at least {n} {'item' if n == 1 else 'items'}{noted}, got {_yaml(value)}"
    if kind_of in ("value_error", "assertion_error"):
        reason = str(error["ctx"]["error"])
        if _is_section(spot.ann):  # a rule between a section's keys: its message names them
            return f"{key}: {reason}"
        return f"{key} {reason}, got {_yaml(value)}"
    choices = _choices(spot.ann)
    if choices is not None and kind_of in ("literal_error", "union", *_EXPECTED):
        return f"{key} must be {choices}{noted}, got {_yaml(value)}"
    if kind_of == "missing":
        value = None  # a required key left out reads as one given as nothing
    expected = _words(spot.ann) or _EXPECTED.get(kind_of)
    if expected is None or kind_of not in ("missing", "union", *_EXPECTED):
        return f"{key}: {error['msg']}{noted}"  # a custom error (a space entry of no known shape)
    return f"{key}: expected {expected}{_bounds(spot)}{noted}, got {describe(value)}"


def _bounds(spot: _Spot) -> str:
    """' >= 1' for a field with bounds, where the value itself (not an item of it) is the problem."""
    if spot.info is None or spot.ann is not spot.info.annotation:
        return ""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    said = [f"{op} {_number(getattr(m, name))}" for m in spot.info.metadata for name, op in ops.items()
            if isinstance(getattr(m, name, None), int | float)]
    return " " + " and ".join(said) if said else ""


def _number(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)  # 0.0 as 0, as the user would write it


def _yaml(value: Any) -> str:
    """A value as the user wrote it: false, null, 'fp8', [0.5, 0.2]."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def _spot(tp: Any, loc: tuple, where: str) -> _Spot:
    """Follow an error location through sections, lists, mappings and unions, naming the key on the way."""
    spot = _Spot(where, tp)
    for i, part in enumerate(loc):
        ann = _bare(spot.ann)
        if _is_section(ann):
            spot.section, spot.key = ann, _join(spot.key, part)
            info = fields_of(ann).get(part) if isinstance(part, str) else None
            spot.info, spot.ann = info, info.annotation if info else None
        elif _is_union(ann):  # a discriminated union tried one member; any other, each member in turn
            spot.ann = _tagged(ann, part)
            spot.union_at = spot.union_at if spot.ann is not None else i
        elif isinstance(part, int):
            spot.key = f"{spot.key}[{part}]"
            spot.ann = typing.get_args(ann)[0] if typing.get_origin(ann) in (list, tuple) else None
        else:  # a mapping's key: the field's note says what the mapping is, not what its values are
            spot.key, spot.info = _join(spot.key, part), None
            spot.ann = typing.get_args(ann)[1] if typing.get_origin(ann) is dict and typing.get_args(ann) else None
    return spot


def _join(key: str, part: Any) -> str:
    return f"{key}.{part}" if key else str(part)


def _bare(ann: Any) -> Any:
    """`ann` without `Annotated` metadata and without `None` (a value left unset is never the problem)."""
    if typing.get_origin(ann) is Annotated:
        return _bare(typing.get_args(ann)[0])
    if _is_union(ann, optional_too=True):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return _bare(args[0]) if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 (built from a tuple)
    return ann


def _is_union(ann: Any, optional_too: bool = False) -> bool:
    if typing.get_origin(ann) not in (Union, types.UnionType):
        return False
    return optional_too or len([a for a in typing.get_args(ann) if a is not type(None)]) > 1


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and hasattr(ann, "__pydantic_fields__")


def _tagged(union: Any, tag: Any) -> Any:
    """The member of `union` that pydantic's location names by `tag` (a discriminator's `Tag`), else None."""
    for member in typing.get_args(union):
        if typing.get_origin(member) is Annotated:
            if any(isinstance(m, Tag) and m.tag == tag for m in typing.get_args(member)[1:]):
                return typing.get_args(member)[0]
    return None


def _members(ann: Any) -> list:
    ann = _bare(ann)
    return [_bare(a) for a in typing.get_args(ann)] if _is_union(ann) else [ann]


def _choices(ann: Any) -> str | None:
    """'auto, no or bf16' when `ann` takes only fixed values (Literal, bool), else None."""
    values: list = []
    for member in _members(ann):
        if typing.get_origin(member) is Literal:
            values += typing.get_args(member)
        elif member is bool:
            values += [False, True]
        else:
            return None
    shown = [str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    return ", ".join(shown[:-1]) + f" or {shown[-1]}" if len(shown) > 1 else (shown[0] if shown else None)


def _words(ann: Any, many: bool = False) -> str | None:
    """What `ann` takes, in words: 'a whole number', 'a list of text', 'a mapping or text'."""
    if ann is None:
        return None
    said = []
    for member in _members(ann):
        origin = typing.get_origin(member)
        if origin in (list, tuple):
            args = [a for a in typing.get_args(member) if a is not Ellipsis]
            items = _words(args[0], many=True) if args else None
            said.append("lists" if many else f"a list of {items}" if items else "a list")
        elif origin is dict or member is dict or _is_section(member):
            said.append(_WORDS[dict][many])
        elif member in _WORDS:
            said.append(_WORDS[member][many])
        else:
            return None
    if "a number" in said and "a whole number" in said:  # int | float: any number
        said.remove("a whole number")
    return " or ".join(dict.fromkeys(said))
