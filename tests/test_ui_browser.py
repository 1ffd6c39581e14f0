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

from core.contract import EXPORT_QUEUE
from core.delivery_log import DeliveryLog
from core.queueing import queue
from receiver.admin import auth
from receiver.app import create_app
from tests.conftest import capture, free_port, post, signed, with_settings
from tests.procs import wait_for

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

    assert page.locator("#replay").count() == 0  # offered only where it can do something
    assert "still queued or running" in page.locator("#no-replay").inner_text()


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


# -- issue 18: rules page, why nothing matched, re-match, queues and dead letters, paging, search, charts,
# -- auto-refresh, bulk replay, a 390 px wide phone --------------------------------------------------------

BROKEN_RULE = "  - id: broken\n    on: update:job\n    do: []\n"
ISSUE_RULE = ("  - id: notify-issues\n    on: create:issue\n    do:\n      - action: notify\n"
              "        url: http://127.0.0.1:9/hook\n        text: an issue was created\n")


def test_rules_page_shows_version_and_a_refused_edit(live, settings, browser_page):
    """The Rules page lists the rules and their version; a refused edit shows as a banner on every page."""
    page = browser_page
    login(page, live)
    page.click("#nav-rules")
    page.wait_for_url("**/ui/rules")
    store = live.app.extensions["cvat_hooks"].rules
    assert page.locator("#rules-version").inner_text() == store.current.digest[:12]
    assert page.locator("#rules tbody tr").count() == len(store.current.rules) == 2
    assert page.locator("#rules-banner").count() == 0
    settings.rules_path.write_text(settings.rules_path.read_text() + BROKEN_RULE)
    assert wait_for(lambda: store.last_error is not None)
    page.reload()
    assert f"{settings.rules_path}:" in page.locator("#rules-error pre").inner_text()
    assert "refused" in page.locator("#rules-reload").inner_text()
    page.goto(f"{live.url}/ui/")
    assert "edit refused" in page.locator("#rules-banner").inner_text()


def test_why_nothing_matched_and_rematch(live, settings, browser_page):
    """A delivery that matched nothing says why per rule, offers no plain replay, and Re-match runs a new rule."""
    page = browser_page
    body, _ = capture("create_issue.json")
    delivery_id = post(live.app.test_client(), body).json["delivery_id"]
    login(page, live)
    page.goto(f"{live.url}/ui/deliveries/{delivery_id}")
    assert page.locator("#replay").count() == 0
    assert "matched no rule" in page.locator("#no-replay").inner_text()
    verdicts = page.locator("#verdicts").inner_text()
    assert "event create:issue not in on (update:job)" in verdicts
    assert "event create:issue not in on (create:task)" in verdicts
    store = live.app.extensions["cvat_hooks"].rules
    settings.rules_path.write_text(settings.rules_path.read_text() + ISSUE_RULE)
    assert wait_for(lambda: len(store.current.rules) == 3)
    page.reload()
    assert page.locator("#verdicts .verdict.matched").inner_text().startswith("notify-issues")
    page.click("#rematch")
    page.wait_for_selector("#flash")
    job_id = f"cvh-{delivery_id[:32]}-notify-issues-0"
    assert page.locator("#flash").inner_text() == f"Re-match queued 1 job(s): {job_id}"
    assert page.locator("#actions tr", has_text=job_id).locator(".badge").inner_text() == "queued"


def test_a_ping_offers_neither_replay_nor_rematch(live, browser_page):
    """A ping's page offers no button that could do nothing, and says why."""
    body, _ = capture("ping.json")
    delivery_id = post(live.app.test_client(), body).json["delivery_id"]
    login(browser_page, live)
    browser_page.goto(f"{live.url}/ui/deliveries/{delivery_id}")
    assert browser_page.locator("#replay").count() == 0 and browser_page.locator("#rematch").count() == 0
    assert "is a ping" in browser_page.locator("#no-replay").inner_text()


def test_queues_page_lists_a_dead_letter_and_requeues_it(live, redis, settings, worker_env, browser_page):
    """A job a real worker gave up on is listed as a dead letter with its error; Requeue (a CSRF-checked POST)
    puts it back on its queue."""
    from core.contract import LIGHT_QUEUE
    from workers.worker import build_worker

    body, _ = capture("create_task.json")
    delivery_id = post(live.app.test_client(), body).json["delivery_id"]
    build_worker(settings.workers, kind="simple").work(burst=True, with_scheduler=False)
    light = queue(LIGHT_QUEUE, redis)
    [job_id] = light.failed_job_registry.get_job_ids()
    page = browser_page
    login(page, live)
    page.click("#fig-failed-jobs")
    page.wait_for_url("**/ui/queues#dead")
    row = page.locator("#failed tr", has_text=job_id)
    assert delivery_id[:12] in row.inner_text()
    assert page.locator("#workers").inner_text().count("No worker alive") == 1
    row.locator("button.requeue").click()
    page.wait_for_selector("#flash")
    assert page.locator("#flash").inner_text() == f"Requeued {job_id} on {LIGHT_QUEUE}"
    assert job_id in light.job_ids and job_id not in light.failed_job_registry.get_job_ids()
    assert page.locator("#failed").inner_text().count("No dead letters") == 1
    steps = DeliveryLog(redis, retention_seconds=3600).get(delivery_id).timeline
    assert any("requeued from the admin UI" in s["message"] for s in steps)


def many_deliveries(live, count: int) -> list[int]:
    """``count`` completed-job deliveries, one per CVAT job id (1001, 1002...); the job ids."""
    client = live.app.test_client()
    body, _ = capture("update_job_completed.json")
    data = json.loads(body)
    ids = []
    for n in range(count):
        data["job"]["id"] = 1001 + n
        raw = json.dumps(data).encode()
        assert post(client, raw, signed(raw)).status_code == 202
        ids.append(1001 + n)
    return ids


def test_paging_search_chart_and_auto_refresh(live, redis, browser_page):
    """55 deliveries: two pages (50 + 5), a search by job id finds one, the hour chart counts them all and
    shows a failure, and the auto-refresh toggle makes the page reload itself."""
    from core import metrics

    many_deliveries(live, 55)
    metrics.inc(redis, "cvat_hooks_action_runs_total", action="export", outcome="failed")
    page = browser_page
    login(page, live)
    rows = page.locator("#deliveries tbody tr")
    assert rows.count() == 50
    assert page.locator("#chart-hour .chart-deliveries").inner_text() == "55"
    assert page.locator("#chart-day .chart-deliveries").inner_text() == "55"
    assert page.locator("#chart-hour .chart-failures").inner_text() == "1"
    assert page.locator("#chart-hour rect.failed").count() == 1
    assert page.locator("#chart-hour polyline.depth").count() == 1  # sampled when the app started
    page.click("#page-next")
    page.wait_for_url("**page=2**")
    assert rows.count() == 5 and page.locator("#page-next").count() == 0
    page.click("#page-prev")
    assert rows.count() == 50
    page.fill("input[name=job]", "1042")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**job=1042**")
    assert rows.count() == 1
    page.click("#deliveries tbody a")
    assert '"id": 1042' in page.locator("#payload").inner_text()
    page.goto(f"{live.url}/ui/")
    page.click("#refresh-10")
    page.wait_for_url("**refresh=10**")
    assert page.locator("meta[http-equiv=refresh]").get_attribute("content") == "10"
    assert page.locator("form.filters input[name=refresh]").get_attribute("value") == "10"


def test_bulk_replay_from_the_filtered_list(live, redis, browser_page):
    """Failed deliveries filtered in the list: the count is shown and confirmed, then a progress bar runs to
    the end and every one has a new run queued."""
    for job in many_deliveries(live, 3):
        del job
    log = DeliveryLog(redis, retention_seconds=3600)
    for delivery in log.list(limit=10):
        [job_id] = delivery.actions
        log.action_failed(delivery.id, job_id, attempt=1, started=time.time(), error_class="CvatUnavailable",
                          message="CVAT answered 502", kind="transient", next_retry_at=None)
    page = browser_page
    login(page, live)
    page.goto(f"{live.url}/ui/?status=failed")
    page.click("#bulk-replay")
    assert "The filters select 3 deliveries" in page.locator("#bulk-count").inner_text()
    page.click("#bulk-confirm")
    page.wait_for_url("**/ui/bulk/**")
    page.wait_for_selector("h1:has-text('Bulk replay finished')", timeout=20_000)
    bar = page.locator("#bulk-progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "3"
    assert "3 replayed, 0 with nothing to run, 3 job(s) queued" in page.locator("#bulk-status").inner_text()
    assert all(d.status.value == "pending" for d in log.list(limit=10))


@pytest.mark.parametrize("path", ["/ui/", "/ui/deliveries/{id}", "/ui/rules", "/ui/queues"],
                         ids=["list", "detail", "rules", "queues"])
def test_pages_fit_a_390_px_phone(live, redis, tmp_path: Path, path: str):
    """At 390x844 no page scrolls sideways (wide tables scroll inside their own box)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    ids = seed(live, redis)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "phone"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        context.set_default_timeout(15_000)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            login(page, live)
            page.goto(live.url + path.format(id=ids["update_job_completed"]))
            assert page.locator("main h1").count() == 1
            width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert width[0] <= width[1] == 390, width
            shoot(page, f"ui-phone-{path.strip('/').split('/')[1] if '/' in path.strip('/') else 'list'}.png")
        finally:
            context.close()
