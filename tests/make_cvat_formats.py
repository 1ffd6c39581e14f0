"""Regenerate ``core/cvat_formats.json``, the format names ``rules check`` knows offline.

It asks a real CVAT for ``GET /api/server/annotation/formats`` and keeps the names of its exporters
and importers (disabled ones too: a format a server has switched off still exists, and the
server's own list decides when the rule runs). Run it against each CVAT version we support::

    CVAT_HOOKS_TEST_CVAT_URL=http://127.0.0.1:8080 CVAT_HOOKS_TEST_CVAT_USERNAME=admin \\
    CVAT_HOOKS_TEST_CVAT_PASSWORD=... .venv/bin/python -m tests.make_cvat_formats
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import requests

TARGET = Path(__file__).resolve().parent.parent / "core" / "cvat_formats.json"


def fetch(url: str, username: str, password: str) -> dict[str, Any]:
    """The server's version and its format names, as the file stores them."""
    headers = {"Accept": "application/vnd.cvat+json"}
    auth = (username, password)
    about = requests.get(f"{url}/api/server/about", headers=headers, timeout=30)
    about.raise_for_status()
    answer = requests.get(f"{url}/api/server/annotation/formats", headers=headers, auth=auth, timeout=30)
    answer.raise_for_status()
    formats = answer.json()
    return {
        "about": "Annotation format names of CVAT's GET /api/server/annotation/formats; regenerate with "
                 "tests/make_cvat_formats.py.",
        "cvat_version": about.json()["version"],
        "export": sorted(f["name"] for f in formats["exporters"]),
        "import": sorted(f["name"] for f in formats["importers"]),
    }


def main() -> None:
    """Write the file from the CVAT named by the real suite's environment variables."""
    data = fetch(os.environ["CVAT_HOOKS_TEST_CVAT_URL"].rstrip("/"), os.environ["CVAT_HOOKS_TEST_CVAT_USERNAME"],
                 os.environ["CVAT_HOOKS_TEST_CVAT_PASSWORD"])
    TARGET.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"{TARGET}: CVAT {data['cvat_version']}, {len(data['export'])} export and "
          f"{len(data['import'])} import formats")


if __name__ == "__main__":
    main()
