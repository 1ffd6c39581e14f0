"""Verify CVAT's ``X-Signature-256`` header: ``sha256=`` + hex HMAC-SHA256 of the raw body.

Verification runs on the exact bytes received, before anything parses them: re-serialising a body
changes its bytes and breaks the signature (CVAT signs ``json.dumps(payload)`` as it sent it).
Several secrets may be active at once so a secret can be rotated without rejecting deliveries.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from enum import StrEnum

HEADER = "X-Signature-256"
PREFIX = "sha256="


class Verdict(StrEnum):
    VALID = "valid"
    MISSING = "missing"
    MALFORMED = "malformed"
    MISMATCH = "mismatch"


def sign(body: bytes, secret: str) -> str:
    """The header value CVAT would send for ``body`` signed with ``secret``."""
    return PREFIX + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(body: bytes, header: str | None, secrets: Iterable[str]) -> Verdict:
    """Check a header against every active secret, in constant time for each."""
    if header is None or header == "":
        return Verdict.MISSING
    header = header.strip()
    if not header.startswith(PREFIX) or len(header) != len(PREFIX) + 64:
        return Verdict.MALFORMED
    given = header.encode("ascii", "replace")
    matched = False
    for secret in secrets:
        # Check every secret (no early exit) so timing does not reveal which one is in use.
        matched |= hmac.compare_digest(sign(body, secret).encode("ascii"), given)
    return Verdict.VALID if matched else Verdict.MISMATCH
