"""``WebhookSink``: a tiny HTTP endpoint that records what CVAT (the test server) delivers to it.

Tests of the sender point a webhook's ``target_url`` at it and read back the exact bytes and headers;
``answer(503, 200)`` scripts the statuses of the next deliveries (then 200 again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


@dataclass(frozen=True)
class Received:
    """One POST the sink received."""

    path: str
    headers: dict[str, str]
    body: bytes


class _Quiet(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug's name
        if type == "error":
            super().log(type, message, *args)


class WebhookSink:
    """Listens on a free loopback port; ``url`` + any path is a valid ``target_url``."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._statuses: list[int] = []
        self._lock = threading.Lock()
        self._httpd: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the sink is not started"
        return f"http://127.0.0.1:{self._httpd.server_port}"

    def answer(self, *statuses: int) -> None:
        """Answer the next deliveries with these statuses, in order (200 afterwards)."""
        with self._lock:
            self._statuses.extend(statuses)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {key[5:].replace("_", "-").title(): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        with self._lock:
            self.received.append(Received(environ.get("PATH_INFO", ""), headers, body))
            status = self._statuses.pop(0) if self._statuses else 200
        answer = b'{"ok": true}' if status < 400 else b'{"error": "scripted"}'
        start_response(f"{status} X", [("Content-Type", "application/json"),
                                       ("Content-Length", str(len(answer)))])
        return [answer]

    def start(self) -> WebhookSink:
        self._httpd = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=_Quiet)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="webhook-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> WebhookSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
