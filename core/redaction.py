"""Keep secrets out of everything we write: logs, delivery records, error messages, answers."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from core import json_text

MASK = "***"

_CREDENTIALS = re.compile(r"[^/@\s:]*:[^/@\s]*@")
"""``user:password@`` right after a URL's ``://``."""
_SCHEME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-"
_LETTER = re.compile(r"[A-Za-z]")


def mask_url_credentials(value: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://***@host``, wherever a URL sits in ``value``.

    In linear time. The regular expression this replaces, ``[a-z][a-z0-9+.-]*://...`` searched
    unanchored, re-read a run of letters from each of its letters, so a signed payload holding a
    100 KB string kept the GIL for minutes while its record was redacted, and gunicorn killed the
    worker (issue 6). Here each ``://`` is found once and its scheme read backwards from it; the
    matches are the same (leftmost scheme letter, same credential characters).
    """
    at = value.find("://")
    if at < 0:
        return value
    out: list[str] = []
    done = floor = 0  # value[:done] is in out; no scheme reaches back before floor
    while at >= 0:
        segment = value[floor:at]
        start = floor + len(segment.rstrip(_SCHEME_CHARS))
        letter = _LETTER.search(value, start, at)  # a scheme starts with a letter
        credentials = _CREDENTIALS.match(value, at + 3) if letter else None
        if credentials is None:
            floor = at + 3
        else:
            out.append(value[done:at + 3] + MASK + "@")
            done = floor = credentials.end()
        at = value.find("://", floor)
    return "".join(out) + value[done:]


class Redactor:
    """Replaces known secret values (and ``user:password@`` in URLs) with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole. Very short values
        # would mask innocent text and are not secrets worth the name.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self._in_json = [json.dumps(s, ensure_ascii=False)[1:-1] for s in self._secrets]  # as orjson escapes

    def add(self, *secrets: str) -> None:
        """Also mask these values from now on."""
        self.__init__([*self._secrets, *secrets])  # type: ignore[misc]

    def text(self, value: str) -> str:
        """Mask secrets in one string."""
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return mask_url_credentials(value)

    def dumps(self, value: Any) -> str:
        """The JSON text of ``self.data(value)`` (``core.json_text``), without walking ``value`` when
        the JSON holds no secret.

        A delivery record carries the whole payload; walking it string by string was a tenth of
        the receiver's time per request (issue 5). A secret inside a string shows in the JSON text
        as its JSON-escaped form, and credentials in a URL survive escaping, so a text free of both
        is exactly what the walk would have produced.
        """
        raw = json_text.compact(value)
        if raw is not None:
            text = raw.decode("utf-8")
            if not any(secret in text for secret in self._in_json) and mask_url_credentials(text) == text:
                return text
        return json_text.dumps(self.data(value)).decode("utf-8")

    def data(self, value: Any) -> Any:
        """Mask secrets in every string of a JSON-like value."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        return value


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in the final message of every record it sees."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.redactor.text(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.redactor.text(text)
        return True
