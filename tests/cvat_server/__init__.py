"""A test CVAT server that cvat-sdk talks to over real HTTP (see ``server.CvatTestServer``).

Run it alone for benchmarks: ``python -m tests.cvat_server --port 8080 --export-size-mb 500``.
"""

from __future__ import annotations

from .exports import export_chunks, export_digest
from .server import DEFAULT_TOKEN, CloudFile, CvatTestServer, RecordedRequest, wait_until
from .sink import Received, WebhookSink
from .webhooks import Sent, jsonb_order, signature

__all__ = ["DEFAULT_TOKEN", "CloudFile", "CvatTestServer", "Received", "RecordedRequest", "Sent",
           "WebhookSink", "export_chunks", "export_digest", "jsonb_order", "signature", "wait_until"]
