"""core.events.parse_json reads a body with orjson, or with json.loads where orjson would change a
value: what it returns, and so the delivery id, must be exactly what json.loads reads."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.events import BadEvent, canonical, delivery_id_of, parse_json

objects = st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
), max_size=6)


def same(a, b) -> bool:
    """Equal, and every number of the same type (1 and 1.0 are equal, but not the same value)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=500, deadline=None)
@given(objects, st.booleans())
def test_a_body_reads_as_json_loads_reads_it(value, ascii_only):
    """Any JSON object, integers of any size included, escaped or in UTF-8."""
    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    assert same(parse_json(body), json.loads(body))


@pytest.mark.parametrize("number", [
    b"12345678901234567890",  # beyond 2**64: orjson would read 1.2345678901234567e19
    b"-9223372036854775809",  # below -2**63
    b"99999999999999999999999",
    b"123456789012345678",  # 18 digits: orjson reads it, exactly
    b"9223372036854775807",
], ids=["beyond-u64", "below-i64", "23-digits", "18-digits", "i64-max"])
def test_integers_stay_exact_and_so_does_the_delivery_id(number):
    """The value CVAT sent, and the delivery id json.loads' value hashes to."""
    body = b'{"event": "update:job", "job": {"id": ' + number + b', "name": "caf\\u00e9"}}'
    data = parse_json(body)
    assert data["job"]["id"] == int(number) and type(data["job"]["id"]) is int
    assert delivery_id_of(data) == hashlib.sha256(canonical(json.loads(body))).hexdigest()


@pytest.mark.parametrize("body", [
    b'{"a": "\\ud800"}', b'{"a": NaN}', b'{"a": 1e400}', b'\xef\xbb\xbf{"a": 1}', b'{"a": "\xff"}',
], ids=["lone-surrogate", "nan", "infinite", "bom", "bad-utf8"])
@pytest.mark.parametrize("long_digits", [b"", b', "n": 12345678901234567890'], ids=["orjson", "json-loads"])
def test_what_cvat_never_sends_is_refused(body, long_digits):
    """Refused with a reason, by either reader."""
    with pytest.raises(BadEvent, match="not valid JSON|not text"):
        parse_json(body[:-1] + long_digits + body[-1:])
