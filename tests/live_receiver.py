"""``live_receiver``: the receiver app on a real loopback port, for what the test CVAT server delivers.

``app.test_client()`` cannot receive what another server POSTs, so this serves ``create_app(settings)``
with werkzeug's threaded server in a thread. It can be stopped and started again on the same port
(the receiver "down" while CVAT keeps sending), which is what reconcile's tests need.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from operations.cli import main
from receiver.settings import Settings
from tests.conftest import free_port
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer


class _Quiet(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug's name
        if type == "error":
            super().log(type, message, *args)


class LiveReceiver:
    """A WSGI app on ``127.0.0.1:<port>``; ``stop()``/``start()`` keep the port."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self._httpd: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The public base URL, as ``cvat-hooks register --url`` takes it."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return self.url + "/webhooks/cvat"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> LiveReceiver:
        self._httpd = make_server("127.0.0.1", self.port, self.app, threaded=True, request_handler=_Quiet)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"live-receiver:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused (CVAT records 502) until ``start()``."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None


@pytest.fixture
def live_receiver(app: Any) -> Iterator[LiveReceiver]:
    """The test's receiver app (``app`` fixture: its Redis, rules and secrets) on a real port."""
    receiver = LiveReceiver(app).start()
    yield receiver
    receiver.stop()


@pytest.fixture
def cli(settings: Settings, cvat_server: CvatTestServer,
        monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """Run ``cvat-hooks`` in-process with the test's CVAT, Redis, rules and data directory."""
    env = {"CVAT_URL": cvat_server.url, "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN,
           "CVAT_HOOKS_REDIS_URL": settings.redis_url or "", "CVAT_HOOKS_RULES": str(settings.rules_path),
           "CVAT_HOOKS_DATA_DIR": str(settings.data_dir)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("CVAT_HOOKS_SECRET_FILE", "CVAT_HOOKS_SECRET", "CVAT_ORG", "CVAT_HOOKS_PUBLIC_URL",
                "CVAT_HOOKS_RECONCILE_MINUTES"):
        monkeypatch.delenv(key, raising=False)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return invoke
