"""core.json_text: orjson's text must be the standard library's JSON, string escapes included (the
redaction's check on JSON text relies on them), and what orjson refuses must still be written."""

from __future__ import annotations

import datetime
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import json_text

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
values = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=1000, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_a_string_is_escaped_as_the_standard_library_escapes_it_without_ascii(text):
    """Character for character the text of ``json.dumps(s, ensure_ascii=False)``: a secret found in
    the one is found in the other."""
    assert json_text.compact(text) == json.dumps(text, ensure_ascii=False).encode("utf-8")


@settings(max_examples=500, deadline=None)
@given(values)
def test_what_orjson_writes_reads_back_as_the_same_value(value):
    """Integers, floats, strings, nesting: ``json.loads`` reads back exactly what was written."""
    assert json.loads(json_text.dumps(value)) == value


@pytest.mark.parametrize("value", [
    {"id": 2**70},  # json.loads reads such an integer from a payload
    {"n": -(2**63) - 1},
    {1: "non-string key"},
    {"s": "\ud800"},  # a lone surrogate, e.g. a file name decoded with surrogateescape
], ids=["int-beyond-64-bits", "int-below-int64", "int-key", "lone-surrogate"])
def test_what_orjson_refuses_is_written_by_the_standard_library(value):
    """orjson refuses it; the text is then ``json.dumps``', in UTF-8, and reads back."""
    assert json_text.compact(value) is None
    written = json_text.dumps(value)
    assert written == json.dumps(value).encode("utf-8")
    assert json.loads(written) == json.loads(json.dumps(value))


@pytest.mark.parametrize("value", [datetime.datetime(2026, 12, 6), {1, 2}], ids=["datetime", "set"])
def test_what_the_standard_library_refuses_stays_refused(value):
    """No quiet new format for a value json.dumps would not write."""
    with pytest.raises(TypeError):
        json_text.dumps(value)


def test_floats_keep_their_value():
    """The shortest text that reads back as the same float, as the standard library's."""
    for number in (0.1, 1e-5, 1.0916352759543043e-05, 1e16, 5e-324, -0.0, 1.7976931348623157e308):
        back = json.loads(json_text.dumps(number))
        assert back == number and math.copysign(1, back) == math.copysign(1, number)
