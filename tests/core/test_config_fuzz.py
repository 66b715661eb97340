"""Property test of the config parser: any YAML-shaped input gives a typed RunConfig or one PeftlabError line that
names the key. Never another exception."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from peftlab.core.config import RunConfig, from_dict, load_config, to_dict
from peftlab.core.errors import PeftlabError

SECTIONS = {name: sorted(to_dict(from_dict(RunConfig, {}))[name]) for name in ("model", "data", "method", "train")}
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=12))
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=3), st.dictionaries(st.text(max_size=5), SCALAR, max_size=2))
KEY = st.one_of(st.sampled_from([k for keys in SECTIONS.values() for k in keys]), st.text(min_size=1, max_size=8))


@settings(suppress_health_check=[HealthCheck.too_slow])  # sizes: the profile's (tests/conftest.py)
@given(raw=st.dictionaries(st.sampled_from([*SECTIONS, "name", "bogus"]),
                           st.one_of(st.dictionaries(KEY, VALUE, max_size=4), VALUE), max_size=4))
@example(raw={"model": {"\n": None}})  # the dev profile found it: an unknown key with a line break, a two-line error
def test_config_parses_or_fails_with_one_line_naming_the_key(raw):
    try:
        cfg = load_config(None, base=raw)
    except PeftlabError as err:
        message = str(err)
        assert message and "\n" not in message
        return
    assert isinstance(cfg, RunConfig)
    for section, keys in raw.items():  # what was accepted is what was given, not a coerced stand-in
        if isinstance(keys, dict):
            for key, value in keys.items():
                got = getattr(getattr(cfg, section), key)
                assert got == value or isinstance(value, int) and got == float(value) or value is None, (key, got)


@given(key=st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]), value=st.text(max_size=12))
def test_overrides_parse_or_fail_with_one_line(key, value):
    try:
        load_config(None, [f"{key}={value}"])
    except PeftlabError as err:
        assert "\n" not in str(err)
