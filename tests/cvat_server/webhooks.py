"""Placeholder: replaced in phase 2."""
from __future__ import annotations

from typing import Any

from flask import Flask


class WebhookSender:
    def __init__(self, server: Any) -> None:
        self.server = server

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def emit_update(self, resource: str, before: Any, after: Any, *, sender_id: int | None) -> None: ...

    def emit_request_completed(self, payload: Any, *, project_id: int | None, org_id: int | None) -> None: ...


def register(app: Flask) -> None: ...
