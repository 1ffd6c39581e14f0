"""Real CVAT deliveries kept under ``tests/payloads/``, for the tests and the benchmarks alike."""

from __future__ import annotations

import json
from pathlib import Path

PAYLOADS = Path(__file__).resolve().parent / "payloads"


def capture(name: str) -> tuple[bytes, dict[str, str]]:
    """A real CVAT 2.73 delivery: exact body bytes and headers (signed with ``mykey``)."""
    data = json.loads((PAYLOADS / "cvat-2.73" / name).read_text())
    return data["body_raw"].encode("utf-8"), data["headers"]
