"""Logging for every cvat-hooks process: one line per event, secrets masked, optional JSON.

``CVAT_HOOKS_LOG_FORMAT=json`` gives one JSON object per line for container log collectors, with
the delivery id as its own field when the message names one (messages start with their subject:
``"delivery <id>: ..."``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from workers.redaction import RedactingFilter, Redactor

_DELIVERY = re.compile(r"\bdelivery ([0-9a-f]{12,64})\b")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, delivery_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        found = getattr(record, "delivery_id", None) or (m[1] if (m := _DELIVERY.search(message)) else None)
        if found:
            out["delivery_id"] = found
        if record.exc_text or record.exc_info:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(out, ensure_ascii=False)


def configure(fmt: str = "text", *, redactor: Redactor | None = None, level: int = logging.INFO) -> None:
    """Send every logger to stderr in ``fmt`` (``text`` or ``json``), masking ``redactor``'s secrets."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(redactor or Redactor()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # cvat-sdk logs every status poll at INFO; keep our own lines readable.
    logging.getLogger("cvat_sdk").setLevel(logging.WARNING)
