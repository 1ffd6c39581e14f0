"""The intake ceiling: a bare Flask app that reads the body and answers 200, run by the very
gunicorn command cvat-hooks uses (``operations.serve.gunicorn_command``)."""

from __future__ import annotations

from flask import Flask, request


def create_app() -> Flask:
    """One POST route that does nothing but read the request and say ok."""
    app = Flask(__name__)

    @app.post("/webhooks/cvat")
    def webhook():  # type: ignore[no-untyped-def]
        request.get_data(cache=False)
        return "ok\n", 200

    return app
