"""Pytest fixtures for the test CVAT server and the real CVAT client (imported by ``conftest.py``).

``cvat_server`` is a fresh server per test (it starts in milliseconds), so state changes and
injected faults never leak between tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer
from workers.settings import CvatSettings

CLIENT_TIMEOUT = 2.0
"""Connect/read timeout of the test clients, in seconds (a "timeout" fault sleeps longer)."""


@pytest.fixture
def cvat_server() -> Iterator[CvatTestServer]:
    """A running test CVAT server on a free loopback port, seeded like the 2.73 captures."""
    server = CvatTestServer(timeout_sleep=CLIENT_TIMEOUT + 1.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cvat_settings(cvat_server: CvatTestServer) -> CvatSettings:
    """Settings for a PAT-authenticated client of ``cvat_server`` that polls exports quickly."""
    return CvatSettings(url=cvat_server.url, access_token=DEFAULT_TOKEN, status_check_period=0.1)


@pytest.fixture
def cvat_gateway(cvat_settings: CvatSettings) -> Iterator[object]:
    """The real ``CvatClient`` against ``cvat_server`` (closed after the test)."""
    from workers.cvat_client import CvatClient

    gateway = CvatClient(cvat_settings, connect_timeout=CLIENT_TIMEOUT, read_timeout=CLIENT_TIMEOUT)
    yield gateway
    gateway.close()
