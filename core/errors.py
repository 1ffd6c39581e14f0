"""What can go wrong in an action, and the one place that decides whether it is worth retrying.

Retry only what may succeed later (connection errors, timeouts, 5xx, 408, 429), as CVAT's own
webhook sender does; 400/401/403/404 will fail the same way next time, so they fail at once.
"""

from __future__ import annotations

import socket
from enum import StrEnum
from typing import Any

TRANSIENT_STATUSES = frozenset({408, 429})
"""HTTP statuses below 500 that still mean "try again later"."""


class ErrorKind(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class ActionError(Exception):
    """Base of the errors an action raises on purpose; the message is shown to users as it is."""

    kind: ErrorKind = ErrorKind.PERMANENT

    def __init__(self, message: str = "", *, result: dict[str, Any] | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.result = result
        """What the action found before failing (e.g. ``check_labels``' report with ``on_mismatch:
        fail``), so the delivery record shows it; ``None`` when there is nothing to show."""
        self.status = status
        """The HTTP status CVAT answered, when the failure is an answer (404 for a resource gone)."""


class PermanentError(ActionError):
    """The action cannot succeed without someone changing something (rules, CVAT, credentials)."""

    kind = ErrorKind.PERMANENT


class TransientError(ActionError):
    """The action may succeed if run again later."""

    kind = ErrorKind.TRANSIENT


class UnknownAction(PermanentError):
    """A job names an action this worker does not have (an older worker, or a typo that slipped by)."""


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, if any (cvat-sdk's ApiException uses ``status``)."""
    for attr in ("status", "status_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None) or getattr(response, "status", None)
    return value if isinstance(value, int) else None


def classify(exc: BaseException) -> ErrorKind:
    """Transient or permanent: the single decision every retry in cvat-hooks follows."""
    if isinstance(exc, ActionError):
        return exc.kind
    status = status_of(exc)
    if status is not None:
        return ErrorKind.TRANSIENT if status >= 500 or status in TRANSIENT_STATUSES else ErrorKind.PERMANENT
    # urllib3's errors (MaxRetryError, ProtocolError, timeouts) and requests' ConnectionError all
    # derive from or wrap these; importing urllib3 here would be fine too, but the names suffice.
    if isinstance(exc, ConnectionError | TimeoutError | socket.timeout | socket.gaierror):
        return ErrorKind.TRANSIENT
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith(("urllib3", "requests", "botocore")) and any(
        word in name for word in ("Timeout", "Connect", "Protocol", "MaxRetry", "Endpoint", "ReadTimeout")
    ):
        return ErrorKind.TRANSIENT
    return ErrorKind.PERMANENT
