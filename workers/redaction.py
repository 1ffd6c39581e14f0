"""Keep secrets out of everything we write: logs, delivery records, error messages, answers."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@", re.IGNORECASE)


class Redactor:
    """Replaces known secret values (and ``user:password@`` in URLs) with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole. Very short values
        # would mask innocent text and are not secrets worth the name.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def add(self, *secrets: str) -> None:
        """Also mask these values from now on."""
        self.__init__([*self._secrets, *secrets])  # type: ignore[misc]

    def text(self, value: str) -> str:
        """Mask secrets in one string."""
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return _URL_CREDENTIALS.sub(lambda m: m["scheme"] + MASK + "@", value)

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
