"""The JSON text we write to Redis (delivery records, last-seen snapshots, RQ's job data).

orjson writes it about ten times quicker than ``json.dumps``: in the receiver that is about 0.1 ms of
a delivery's 1.5 ms (five records and snapshots, two jobs; ``bench/README.md``, intake), and the
workers write a record per attempt. It escapes a string exactly as ``json.dumps(s,
ensure_ascii=False)`` does (``tests/test_json_text.py`` holds it to that), which the redaction's check
on the JSON text relies on.

Reading stays on ``json.loads``: orjson reads an integer beyond 64 bits as a float, and a payload's
values must stay what CVAT sent. Writing falls back to ``json.dumps`` for what orjson refuses and
the standard library takes (such integers, non-string keys, a lone surrogate, which it escapes to
ASCII so the text is always UTF-8).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_LIKE_JSON = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
"""Refuse datetimes and dataclasses as ``json.dumps`` does, rather than write them in a form of orjson's."""


def compact(value: Any) -> bytes | None:
    """``value`` as orjson writes it (compact, UTF-8), or ``None`` when orjson refuses it."""
    try:
        return orjson.dumps(value, option=_LIKE_JSON)
    except orjson.JSONEncodeError:
        return None


def dumps(value: Any) -> bytes:
    """``value`` as JSON text in UTF-8: orjson's, else the standard library's."""
    text = compact(value)
    return text if text is not None else json.dumps(value).encode("utf-8")
