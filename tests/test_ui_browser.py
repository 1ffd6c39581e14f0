"""The admin UI in a real browser: Debian's Chromium driven by Playwright, against a real HTTP server.

Login -> list -> filter -> detail -> Replay, as an operator clicks through it. Chromium comes from
the distribution (``apt-get install chromium``), never from ``playwright install``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from receiver.admin import auth
from receiver.app import create_app
from tests.conftest import capture, free_port, post, signed, with_settings
from workers.contract import EXPORT_QUEUE
from workers.delivery_log import DeliveryLog
from workers.queueing import queue

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN = "browser-admin-token-5d2a91-c0ffee-1234567"
SCREENSHOTS = os.environ.get("CVAT_HOOKS_UI_SCREENSHOTS")
"""A directory to keep ``ui-list.png`` and ``ui-detail.png`` in, for a human to look at (optional)."""


def require_chromium() -> None:
    """Skip on a developer machine without Chromium; in CI (``CI`` set) its absence is a failure."""
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: the CI set-up must `apt-get install chromium`")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); set CI=1 to make this a failure")


class LiveServer:
    """The app under werkzeug's real HTTP server in a thread, on a free loopback port."""

    def __init__(self, app) -> None:
        """Bind the port now (so the URL is known), serve later."""
        self.app = app
        self.server = make_server("127.0.0.1", free_port(), app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, name="ui-live-server", daemon=True)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> LiveServer:
        """Serve in the background."""
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop serving and close the listening socket."""
        self.server.shutdown()
        self.thread.join(10)
        self.server.server_close()


@pytest.fixture
def live(settings) -> Iterator[LiveServer]:
    """A running receiver with the admin UI enabled, on real Redis."""
    with LiveServer(create_app(with_settings(settings, admin_token=ADMIN))) as server:
        yield server


@pytest.fixture
def browser_page(tmp_path: Path):
    """A page of a fresh headless Chromium profile (the sync API; closed after the test)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1360, "height": 900})
        context.set_default_timeout(15_000)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def seed(live: LiveServer, redis) -> dict[str, str]:
    """A failed export (a real delivery whose action a worker gave up on), a ping and a new task."""
    client = live.app.test_client()
    ids = {}
    for name in ("update_job_completed", "ping", "create_task"):
        body, _ = capture(f"{name}.json")
        ids[name] = post(client, body).json["delivery_id"]
    log = DeliveryLog(redis, retention_seconds=3600)
    [job_id] = log.get(ids["update_job_completed"]).actions
    log.action_failed(ids["update_job_completed"], job_id, attempt=3, started=time.time() - 2,
                      error_class="CvatUnavailable", message="CVAT answered 502 Bad Gateway",
                      kind="transient", next_retry_at=None)
    ids["job"] = job_id
    return ids


def login(page, live: LiveServer) -> None:
    """Open the UI, get sent to the login form, and log in."""
    page.goto(f"{live.url}/ui/")
    assert "/ui/login" in page.url
    page.fill("input[name=token]", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live.url}/ui/")


def shoot(page, name: str) -> None:
    """Keep a screenshot when asked to (``CVAT_HOOKS_UI_SCREENSHOTS``)."""
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def test_login_list_filter_detail_replay(live, redis, browser_page):
    """An operator logs in, filters the list, opens the failed delivery, replays it and sees the new run."""
    page = browser_page
    ids = seed(live, redis)
    login(page, live)

    rows = page.locator("#deliveries tbody tr")
    assert rows.count() == 3
    assert page.locator("#fig-hour b").inner_text() == "3"
    assert page.locator("#deliveries td.status .st-failed").count() == 1
    shoot(page, "ui-list.png")

    page.select_option("select[name=status]", "failed")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**status=failed**")
    assert rows.count() == 1
    assert "update:job" in rows.first.inner_text()

    page.click(f"#deliveries a:has-text('{ids['update_job_completed'][:12]}')")
    page.wait_for_url(f"**/ui/deliveries/{ids['update_job_completed']}")
    assert page.locator("#delivery-status").inner_text() == "failed"
    assert "CVAT answered 502 Bad Gateway" in page.locator("#actions").inner_text()
    assert json.loads(page.locator("#payload").inner_text())["job"]["state"] == "completed"

    page.click("#replay")
    page.wait_for_selector("#flash")
    assert page.locator("#flash").inner_text() == f"Replay queued 1 job(s): {ids['job']}-r1"
    new_run = page.locator("#actions tr", has_text=f"{ids['job']}-r1")
    assert new_run.locator(".badge").inner_text() == "queued"
    assert page.locator("#delivery-status").inner_text() == "pending"
    assert f"{ids['job']}-r1" in queue(EXPORT_QUEUE, redis).job_ids
    shoot(page, "ui-detail.png")

    page.click("#replay")
    page.wait_for_selector("#flash")
    assert page.locator("#flash").inner_text().startswith("Nothing replayed")


def test_session_cookie_in_the_browser(live, browser_page):
    """The browser holds an HttpOnly, SameSite=Strict session cookie that is not the token."""
    login(browser_page, live)
    [cookie] = [c for c in browser_page.context.cookies() if c["name"] == auth.SESSION_COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui/"
    assert ADMIN not in cookie["value"]
    assert browser_page.evaluate("document.cookie") == ""


def test_payload_scripts_do_not_run(live, browser_page):
    """Markup in a payload is displayed as text: no script runs, no dialog opens, the title is ours."""
    body, _ = capture("update_job_completed.json")
    data = json.loads(body)
    data["job"]["task_name"] = "<script>document.title='pwned';alert(1)</script>"
    data["sender"]["username"] = "\"><img src=x onerror=\"document.title='pwned'\">"
    raw = json.dumps(data).encode()
    delivery_id = post(live.app.test_client(), raw, signed(raw)).json["delivery_id"]
    dialogs: list[str] = []
    browser_page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    login(browser_page, live)
    browser_page.goto(f"{live.url}/ui/deliveries/{delivery_id}")
    assert "<script>document.title='pwned'" in browser_page.locator("#payload").inner_text()
    assert browser_page.locator("#payload img").count() == 0
    assert "pwned" not in browser_page.title()
    assert dialogs == []
