"""An S3 endpoint for tests: moto's server mode on a loopback port, reached over real HTTP by boto3.

Used through :func:`s3_endpoint`, a context manager the storage and export tests wrap in a fixture.
``use_endpoint`` points boto3 at it the way a deployment would: through the AWS environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from moto.server import ThreadedMotoServer


@contextmanager
def s3_endpoint() -> Iterator[str]:
    """Run moto's S3 on ``127.0.0.1`` (a free port) and yield its URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str, tmp_path: Any) -> None:
    """Configure boto3 through the environment only, isolated from the machine's ``~/.aws``."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@contextmanager
def bucket(name: str) -> Iterator[Any]:
    """Create a bucket on the configured endpoint; yield a client for checking results, then close it."""
    import boto3  # type: ignore[import-untyped]

    client = boto3.session.Session().client("s3")
    try:
        client.create_bucket(Bucket=name)
        yield client
    finally:
        client.close()
