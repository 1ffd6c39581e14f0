"""A test CVAT server that cvat-sdk talks to over real HTTP (see ``server.CvatTestServer``).

Run it alone for benchmarks: ``python -m tests.cvat_server --port 8080 --export-size-mb 500``.
"""

from __future__ import annotations

from .exports import export_chunks, export_digest
from .server import DEFAULT_TOKEN, CloudFile, CvatTestServer, RecordedRequest, wait_until

__all__ = ["DEFAULT_TOKEN", "CloudFile", "CvatTestServer", "RecordedRequest", "export_chunks",
           "export_digest", "wait_until"]
