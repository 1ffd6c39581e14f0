"""Pytest fixtures for the test CVAT server and the real CVAT client (imported by ``conftest.py``).

``cvat_server`` is a fresh server per test (it starts in milliseconds), so state changes and
injected faults never leak between tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from core.settings import CvatSettings
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer, WebhookSink

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
def webhook_sink() -> Iterator[WebhookSink]:
    """An HTTP endpoint recording the deliveries the test CVAT server sends to it."""
    with WebhookSink() as sink:
        yield sink


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


@pytest.fixture
def make_cvat_client(cvat_settings: CvatSettings) -> Iterator[Callable[..., Any]]:
    """``make_cvat_client(organization="acme", read_timeout=0.2, ...)``: more clients of
    ``cvat_server``; settings fields and ``CvatClient`` options as keywords. Closed after the test."""
    from workers.cvat_client import CvatClient

    made: list[CvatClient] = []

    def make(**changes: Any) -> CvatClient:
        names = ("connect_timeout", "read_timeout", "export_timeout")
        options = {k: changes.pop(k) for k in names if k in changes}
        options.setdefault("connect_timeout", CLIENT_TIMEOUT)
        options.setdefault("read_timeout", CLIENT_TIMEOUT)
        client = CvatClient(replace(cvat_settings, **changes), **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
