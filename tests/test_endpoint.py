"""receiver.endpoint: POST /webhooks/cvat answered in front of Flask, everything else left to Flask."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask

from receiver.endpoint import WebhookEndpoint, content_length
from tests.conftest import SECRET, capture, post, signed


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"CONTENT_LENGTH": "12"}, 12),
    ({"CONTENT_LENGTH": " 12\t"}, 12),
    ({"CONTENT_LENGTH": "0"}, 0),
    ({"CONTENT_LENGTH": "+5"}, 0),  # int() would take it; HTTP does not
    ({"CONTENT_LENGTH": "1_000"}, 0),
    ({"CONTENT_LENGTH": "-3"}, 0),
    ({"CONTENT_LENGTH": "١٢"}, 0),  # Arabic-Indic digits: int() reads 12
    ({"CONTENT_LENGTH": "12", "HTTP_TRANSFER_ENCODING": "chunked"}, None),
    ({"CONTENT_LENGTH": "12", "HTTP_TRANSFER_ENCODING": "gzip, Chunked"}, None),
], ids=["none", "plain", "blanks", "zero", "plus", "underscore", "negative", "non-ascii-digits", "chunked",
        "chunked-listed"])
def test_content_length_is_read_as_werkzeug_reads_it(environ, expected):
    """The size the body limit and the read go by, as Flask's own requests would have it."""
    assert content_length(environ) == expected


def test_a_delivery_is_answered_as_json_with_its_length(client, redis):
    """202 with a JSON body whose Content-Length is its size, and the delivery recorded."""
    body, headers = capture("update_job_completed.json")
    answer = post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
    assert answer.status_code == 202 and answer.json["status"] == "queued"
    assert answer.headers["Content-Type"] == "application/json"
    assert int(answer.headers["Content-Length"]) == len(answer.data)
    assert redis.zscore("cvat-hooks:deliveries", answer.json["delivery_id"]) is not None


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_another_method_is_405_saying_post(client, method):
    """Not a 404: the URL is right (``cvat-hooks doctor`` tells the two apart), the method is not."""
    answer = client.open("/webhooks/cvat", method=method)
    assert answer.status_code == 405 and answer.headers["Allow"] == "POST" and "POST" in answer.json["error"]


def test_a_head_request_gets_the_headers_alone(client):
    """HEAD: the 405's status and headers, no body."""
    answer = client.head("/webhooks/cvat")
    assert answer.status_code == 405 and answer.headers["Allow"] == "POST" and answer.data == b""


def test_a_body_declared_too_large_is_413_and_the_connection_closed(settings, client, redis):
    """Refused unread; closed, or the server would read the whole declared body before the next request."""
    body = b'{"event": "ping", "pad": "' + b"x" * settings.max_body + b'"}'
    answer = post(client, body)
    assert answer.status_code == 413 and answer.headers["Connection"] == "close"
    assert str(settings.max_body) in answer.json["error"]


@pytest.mark.parametrize("path", ["/webhooks/cvat/", "/webhooks", "/webhooks/cvatx"])
def test_other_paths_go_on_to_flask(client, path):
    """Only the exact path is the endpoint's: the rest get Flask's answers."""
    body = b'{"event": "ping"}'
    assert client.post(path, data=body, headers=signed(body)).status_code == 404


@dataclass
class _Settings:
    max_body: int = 1000
    body_seconds: float = 5.0


@dataclass
class _FailingIntake:
    """An intake whose receive fails in a way it does not handle (a bug): the endpoint's last resort."""

    settings: Any
    redis: Any = None

    def receive(self, body: bytes, signature: str | None, *, peer: str = "-") -> Any:
        raise KeyError("a bug")


def test_an_unexpected_failure_is_a_logged_500_in_json(caplog):
    """A bug answers 500 (CVAT retries it) with a JSON body, and the traceback goes to the log."""
    endpoint = WebhookEndpoint(Flask(__name__).wsgi_app, _FailingIntake(_Settings()))  # type: ignore[arg-type]
    app = Flask(__name__)
    app.wsgi_app = endpoint  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="receiver.endpoint"):
        answer = post(app.test_client(), b'{"event": "ping"}', signed(b'{"event": "ping"}', SECRET))
    assert answer.status_code == 500 and answer.json == {"error": "internal error; see the receiver's log"}
    [record] = [r for r in caplog.records if r.name == "receiver.endpoint"]
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])
