"""Property tests of the YAML 1.2 reader and writer (core.yamlio): any text reads as plain values or fails with one
line naming the file; any text written into a config reads back as the same text, under YAML 1.2 and 1.1 alike."""

from __future__ import annotations

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from peftlab.core.yamlio import YamlSyntaxError, dump_yaml, parse_yaml

PLAIN = (dict, list, str, int, float, bool, type(None))


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return type(value) in PLAIN


@given(text=st.text(max_size=30))
@example("-_")  # matched ruamel's int pattern (which allows '_') and raised ValueError
@example("._")
@example("a: 2024-05-01")
def test_any_text_reads_as_plain_values_or_one_line(text):
    try:
        value = parse_yaml(text, "f.yaml")
    except YamlSyntaxError as err:
        assert str(err).startswith("f.yaml") and "\n" not in str(err)
        return
    assert _plain(value)


@given(word=st.text(max_size=20))
@example("no")
@example("1e-3")
@example("2024-05-01")
@example("\x85")  # a NEL written raw inside quotes reads back as a line break
def test_text_round_trips_through_a_written_file(word):
    written = dump_yaml({"name": word, "labels": [word]})
    assert parse_yaml(written, "config.yaml") == {"name": word, "labels": [word]}
    assert yaml.safe_load(written) == {"name": word, "labels": [word]}
