"""``CvatTestServer``: a small CVAT that cvat-sdk talks to over real HTTP, with faults on demand.

It serves the Flask app of ``api`` (and ``webhooks``) with werkzeug's threaded server on a free
loopback port, records every request it sees (secrets removed) and can misbehave in the ways a real
CVAT does: 5xx, 429 with ``Retry-After``, slow answers past a client's timeout, dropped connections,
truncated downloads, failed background exports, an outage.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from . import api, exports, negotiation, organizations, task_data, webhooks
from .exports import REQUEST_TTL_SECONDS, export_digest, result_path
from .state import CvatState, attribute, iso_in, now_iso, seed

DEFAULT_TOKEN = "cvat-test-pat.6f1c2d3e4f5a6b7c8d9e"
"""The Personal Access Token the server accepts unless told otherwise."""

DEFAULT_EXPORT_SIZE = 256 * 1024 + 7
"""Bytes in an export (odd, so a download ends on a partial chunk)."""

INTERNAL = "cvat_test_server.internal"
"""WSGI environ key of requests the server makes to itself (``user_edit``): not logged, no faults."""

SECRET_HEADERS = frozenset({"authorization", "cookie", "x-csrftoken", "x-signature-256"})

log = logging.getLogger(__name__)


@dataclass
class RecordedRequest:
    """One request the server received, as tests may assert on it: no credentials kept."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Header names lower-cased; Authorization, Cookie and X-CSRFToken left out."""
    auth: str | None = None
    """How the caller authenticated: ``bearer``, ``token``, ``basic``, ``session`` or ``None``."""
    user: str | None = None
    json: Any = None
    fault: str | None = None
    """The injected fault this request met, if any."""
    status: int | None = None


@dataclass
class Fault:
    kind: int | str
    remaining: int
    path: str | None = None


@dataclass(frozen=True)
class CloudFile:
    """A file an export wrote to one of CVAT's cloud storages (nothing was downloadable)."""

    cloud_storage_id: int
    filename: str
    size: int
    rq_id: str


class _QuietHandler(WSGIRequestHandler):
    """HTTP/1.1 with keep-alive, as CVAT behind its proxy; access log only when verbose."""

    protocol_version = "HTTP/1.1"
    verbose = False

    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug's name
        if self.verbose or type == "error":
            super().log(type, message, *args)


@dataclass
class _Runtime:
    httpd: BaseWSGIServer | None = None
    thread: threading.Thread | None = None
    timers: list[threading.Timer] = field(default_factory=list)


class CvatTestServer:
    """A CVAT 2.73 look-alike on ``127.0.0.1``. Use as a context manager or ``start()``/``stop()``.

    State is seeded as in the 2.73 captures (``state.seed``); tests change it through the helpers
    below or ``server.state`` (under ``server.state.lock``).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, token: str | None = DEFAULT_TOKEN,
                 version: str = "2.73.0", export_seconds: float = 0.2, export_size: int = DEFAULT_EXPORT_SIZE,
                 timeout_sleep: float = 2.0, retry_after: int = 1, verbose: bool = False) -> None:
        self.host, self.port = host, port
        self.token = token
        self.version = version
        self.export_seconds = export_seconds
        """Seconds an export takes to finish."""
        self.export_size = export_size
        """Bytes of the next exports."""
        self.timeout_sleep = timeout_sleep
        """Seconds a ``"timeout"`` fault holds a request before answering (past the client's timeout)."""
        self.retry_after = retry_after
        self.result_base: str | None = None
        """If set, ``result_url`` names this origin instead of the one the client used (as a CVAT
        behind a misconfigured proxy does)."""
        self.verbose = verbose
        self.state = CvatState()
        seed(self.state, token=token)
        self.requests: list[RecordedRequest] = []
        self.cloud_files: list[CloudFile] = []
        self._faults: list[Fault] = []
        self._export_failures: list[str] = []
        self._down = False
        self._stopping = threading.Event()
        self._log_lock = threading.Lock()
        self._rt = _Runtime()
        self.webhooks = webhooks.WebhookSender(self)
        self.app = self._create_app()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._rt.httpd is None:
            raise RuntimeError("the test CVAT server is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> CvatTestServer:
        """Listen (on a free port unless one was given) and serve in a background thread."""
        handler = type("Handler", (_QuietHandler,), {"verbose": self.verbose})
        httpd = make_server(self.host, self.port, self.app, threaded=True, request_handler=handler)
        self.port = httpd.server_port
        self._rt.httpd = httpd
        self._rt.thread = threading.Thread(target=httpd.serve_forever, name=f"cvat-test-server:{self.port}",
                                           kwargs={"poll_interval": 0.05}, daemon=True)
        self._rt.thread.start()
        self.webhooks.start()
        return self

    def stop(self) -> None:
        """Stop serving; sleeping ``timeout`` faults and pending exports are released."""
        self._stopping.set()
        for timer in self._rt.timers:
            timer.cancel()
        self.webhooks.stop()
        if self._rt.httpd is not None:
            self._rt.httpd.shutdown()
            self._rt.httpd.server_close()
        if self._rt.thread is not None:
            self._rt.thread.join(timeout=5)
        self._rt = _Runtime()

    def __enter__(self) -> CvatTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection ---------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int | str = 503, path: str | None = None) -> None:
        """The next ``n`` requests (whose path starts with ``path``, if given) meet a fault: an HTTP
        status (429 comes with ``Retry-After``), ``"timeout"`` (held for ``timeout_sleep`` seconds,
        then answered), ``"reset"`` (connection dropped without an answer) or ``"truncate"``
        (a download cut off half-way; other requests are reset)."""
        if not (isinstance(status, int) or status in ("timeout", "reset", "truncate")):
            raise ValueError(f"unknown fault {status!r}")
        with self._log_lock:
            self._faults.append(Fault(status, n, path))

    def down(self) -> None:
        """Answer every request with 503 until :meth:`up`."""
        self._down = True

    def up(self) -> None:
        self._down = False

    def fail_exports(self, n: int = 1, message: str = "OSError: [Errno 28] No space left on device") -> None:
        """The next ``n`` exports end ``failed`` with this message (CVAT shows the exception)."""
        self._export_failures.extend([message] * n)

    def expire_sessions(self) -> None:
        """Forget every login session (as after a CVAT restart or session timeout)."""
        with self.state.lock:
            self.state.sessions.clear()

    # -- the request log ----------------------------------------------------------------------

    def calls(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """Recorded requests, optionally only one method and paths starting with ``path``."""
        with self._log_lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and (path is None or r.path.startswith(path))]

    def clear_requests(self) -> None:
        with self._log_lock:
            self.requests.clear()

    # -- changing the world -------------------------------------------------------------------

    def add_user(self, username: str, *, password: str | None = None, first_name: str = "",
                 last_name: str = "", admin: bool = False, org: str | None = None) -> int:
        st = self.state
        with st.lock:
            uid = st.next_id("users")
            st.users[uid] = {
                "id": uid, "username": username, "first_name": first_name, "last_name": last_name,
                "email": f"{username}@example.com", "password": password or f"{username}-password",
                "is_staff": admin, "is_superuser": admin, "groups": ["admin" if admin else "user"],
            }
            if org:
                org_rec = st.org_by_slug(org)
                assert org_rec is not None, org
                org_rec["members"][uid] = "worker"
            return uid

    def add_token(self, token: str, username: str = "admin") -> None:
        """Accept another Personal Access Token, for this user."""
        with self.state.lock:
            user = self.state.user_by_name(username)
            assert user is not None, username
            self.state.tokens[token] = user["id"]

    def add_project(self, name: str, *, labels: Sequence[str | dict[str, Any]] = (), owner_id: int = 1,
                    org: str | None = None) -> int:
        st = self.state
        with st.lock:
            pid = st.next_id("projects")
            st.projects[pid] = {"id": pid, "name": name, "owner_id": owner_id, "assignee_id": None,
                                "org_id": self._org_id(org), "created_date": now_iso(),
                                "updated_date": now_iso()}
            self._add_labels(labels, project_id=pid)
            return pid

    def add_task(self, name: str, *, project_id: int | None = None,
                 labels: Sequence[str | dict[str, Any]] = (),
                 jobs: int = 2, frames_per_job: int = 5, owner_id: int = 1, org: str | None = None) -> int:
        """A task with ``jobs`` annotation jobs; ``labels`` only for a task outside a project."""
        st = self.state
        with st.lock:
            tid = st.next_id("tasks")
            org_id = self._org_id(org)
            if project_id is not None:
                org_id = st.projects[project_id].get("org_id")
            st.tasks[tid] = {"id": tid, "name": name, "project_id": project_id, "owner_id": owner_id,
                             "assignee_id": None, "org_id": org_id, "created_date": now_iso(),
                             "updated_date": now_iso(), "size": jobs * frames_per_job, "data_id": tid,
                             "segment_size": frames_per_job}
            for i in range(jobs):
                jid = st.next_id("jobs")
                st.jobs[jid] = {"id": jid, "task_id": tid, "start_frame": i * frames_per_job,
                                "stop_frame": (i + 1) * frames_per_job - 1, "stage": "annotation",
                                "state": "new", "assignee_id": None, "created_date": now_iso(),
                                "updated_date": now_iso(), "type": "annotation"}
            if project_id is None:
                self._add_labels(labels, task_id=tid)
            return tid

    def set_job(self, job_id: int, **fields: Any) -> None:
        """Change a job behind the API's back (no webhook): ``stage``, ``state``, ``assignee_id``..."""
        with self.state.lock:
            self.state.jobs[job_id].update(fields)
            self.state.jobs[job_id]["updated_date"] = now_iso()

    def _org_id(self, slug: str | None) -> int | None:
        if slug is None:
            return None
        org = self.state.org_by_slug(slug)
        assert org is not None, slug
        return org["id"]

    def _add_labels(self, labels: Any, **owner: int) -> None:
        """Labels given as names or ``{"name", "type"?, "attributes"?: [{"name", "input_type"?,
        "values"?, "mutable"?}]}``."""
        items: list[dict[str, Any]] = [{"name": lb} if isinstance(lb, str) else dict(lb) for lb in labels]
        for item in items:
            item["attributes"] = [attribute(0, **a) for a in item.get("attributes", [])]
        with self.app.app_context():
            api._apply_labels(items, **owner)

    # -- exports ------------------------------------------------------------------------------

    def schedule_export(self, rq_id: str) -> None:
        """Finish (or fail) an export after ``export_seconds``."""
        timer = threading.Timer(self.export_seconds, self._finish_export, args=(rq_id,))
        timer.daemon = True
        self._rt.timers.append(timer)
        timer.start()

    def schedule(self, seconds: float, function: Any, *args: Any) -> None:
        """Call ``function(*args)`` after ``seconds`` in a timer thread (cancelled by :meth:`stop`):
        how background requests other than exports (annotation imports) end."""
        timer = threading.Timer(seconds, function, args=args)
        timer.daemon = True
        self._rt.timers.append(timer)
        timer.start()

    def advance_request(self, rq: dict[str, Any]) -> None:
        """``queued`` turns ``started`` once a status check sees it (called under the state lock)."""
        if rq["status"] == "queued":
            rq["status"], rq["started_date"] = "started", now_iso()

    def _finish_export(self, rq_id: str) -> None:
        st = self.state
        with st.lock:
            rq = st.requests.get(rq_id)
            if rq is None or rq["status"] in ("finished", "failed"):
                return
            rq["started_date"] = rq["started_date"] or now_iso()
            rq["finished_date"] = now_iso()
            if self._export_failures:
                rq["status"], rq["message"] = "failed", self._export_failures.pop(0)
            else:
                rq["status"], rq["expiry_date"] = "finished", iso_in(REQUEST_TTL_SECONDS)
                if rq["cloud"] is not None:
                    cs_id, filename = rq["cloud"]
                    self.cloud_files.append(CloudFile(cs_id, filename, rq["size"], rq_id))
                else:
                    path = result_path(rq["target"], rq["target_id"], rq["subresource"], rq_id)
                    rq["result_url"] = (self.result_base or rq["base_url"]) + path
            payload = st.request_json(rq)
            org_id, project_id = rq["operation"]["org_id"], rq["operation"]["project_id"]
        self.webhooks.emit_request_completed(payload, project_id=project_id, org_id=org_id)

    def export_digest(self, rq_id: str) -> str:
        """SHA-256 of the file this export serves."""
        with self.state.lock:
            size = self.state.requests[rq_id]["size"]
        return export_digest(rq_id, size)

    def truncated(self, chunks: Iterator[bytes], size: int, environ: dict[str, Any]) -> Iterator[bytes]:
        """Send about half of a download, then drop the connection."""
        sent = 0
        for chunk in chunks:
            if sent + len(chunk) > size // 2:
                yield chunk[: size // 2 - sent]
                break
            sent += len(chunk)
            yield chunk
        _drop(environ)

    # -- webhooks -------------------------------------------------------------------------------

    def add_webhook(self, target_url: str, *, project_id: int | None = 1, org: str | None = None,
                    events: list[str] | tuple[str, ...] | None = None, secret: str = "",
                    is_active: bool = True, owner: str = "admin") -> int:
        """A webhook, as if created in CVAT's UI: a project webhook (project 1 by default), or an
        organization webhook when ``org`` is given; all of the type's events unless listed."""
        kind = "organization" if org is not None else "project"
        st = self.state
        with st.lock:
            user = st.user_by_name(owner)
            assert user is not None, owner
            webhook_id = st.next_id("webhooks")
            st.webhooks[webhook_id] = {
                "id": webhook_id, "target_url": target_url, "description": f"{kind} hook", "type": kind,
                "content_type": "application/json", "secret": secret, "is_active": is_active,
                "enable_ssl": False, "owner_id": user["id"], "project_id": None if org else project_id,
                "org_id": self._org_id(org), "events": sorted(events or webhooks.EVENTS_BY_TYPE[kind]),
                "created_date": now_iso(), "updated_date": now_iso(),
            }
            return webhook_id

    def emit(self, event: str, resource_id: int | str, *, before: dict[str, Any] | None = None,
             sender: str | None = "admin", include_before_update: bool | None = None,
             wait: bool = True, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Deliver ``event`` about a job/task/project/issue (or an rq_id for ``completed:request[..]``)
        as it is now, to every matching active webhook, shaped like CVAT 2.73's payloads.

        ``update:*`` gets ``before_update``/``changes`` from ``before`` (the old values of the changed
        fields; only ``updated_date`` if not given) unless ``include_before_update=False`` (newer
        CVAT). With ``wait`` the deliveries made are returned (each a CVAT delivery record).
        """
        with self.state.lock:
            first = max(self.state.deliveries, default=0)
        self.webhooks.emit(event, resource_id, before=before, sender=sender,
                           include_before_update=include_before_update)
        if not wait:
            return []
        self.webhooks.join(timeout)
        with self.state.lock:
            return [d for i, d in sorted(self.state.deliveries.items()) if i > first and d["event"] == event]

    def user_edit(self, path: str, fields: dict[str, Any], *, user: str = "admin") -> dict[str, Any]:
        """PATCH ``path`` as ``user`` would in CVAT's UI: the change and its ``update:*`` webhooks
        happen as through the API, but out of the request log and of injected faults."""
        with self.state.lock:
            account = self.state.user_by_name(user)
            assert account is not None, user
            token = next((t for t, uid in self.state.tokens.items() if uid == account["id"]), None)
            if token is None:
                token = f"ui-session-{account['id']}"
                self.state.tokens[token] = account["id"]
        response = self.app.test_client().patch(path, json=fields, base_url=self.url,
                                                headers={"Authorization": f"Bearer {token}"},
                                                environ_overrides={INTERNAL: True})
        if response.status_code != 200:
            raise AssertionError(f"PATCH {path} as {user}: {response.status_code} {response.get_json()}")
        return response.get_json()

    def add_issue(self, job_id: int, *, frame: int = 0, owner: str = "admin",
                  position: tuple[float, ...] = (10.0, 10.0, 60.0, 60.0)) -> int:
        """An issue on a job, and its ``create:issue`` webhooks (as in ``create_issue.json``)."""
        st = self.state
        with st.lock:
            user = st.user_by_name(owner)
            assert user is not None and job_id in st.jobs
            issue_id = st.next_id("issues")
            st.issues[issue_id] = {
                "id": issue_id, "frame": frame, "position": list(position), "job_id": job_id,
                "owner_id": user["id"], "assignee_id": None, "created_date": now_iso(),
                "updated_date": now_iso(), "resolved": False,
            }
        self.emit("create:issue", issue_id, sender=owner, wait=False)
        return issue_id

    # -- webhooks hook -------------------------------------------------------------------------

    def resource_changed(self, resource: str, resource_id: int, before: dict[str, Any], after: dict[str, Any],
                         user_id: int | None) -> None:
        """Called by the API after a PATCH: CVAT sends ``update:<resource>`` to matching webhooks."""
        self.webhooks.emit_update(resource, before, after, sender_id=user_id)

    # -- the app ------------------------------------------------------------------------------

    def _create_app(self) -> Flask:
        app = Flask("cvat_test_server")
        app.json.sort_keys = False  # type: ignore[attr-defined]  # keep CVAT's field order
        app.extensions["cvat_test_server"] = self
        api.register(app)
        exports.register(app)
        task_data.register(app)
        organizations.register(app)
        webhooks.register(app)
        app.before_request(self._before)
        app.after_request(self._after)

        @app.errorhandler(api.ApiError)
        def _api_error(exc: api.ApiError) -> Response:
            response = jsonify(exc.body)
            response.status_code = exc.status
            response.headers.update(exc.headers)
            return response

        @app.errorhandler(404)
        def _unknown(exc: Exception) -> Response:
            # An unknown URL never reaches DRF: Django answers its own HTML page.
            return Response(negotiation.NOT_FOUND_HTML, status=404, mimetype="text/html")

        @app.errorhandler(405)
        def _method(exc: Exception) -> Response:
            response = jsonify({"detail": f'Method "{request.method}" not allowed.'})
            response.status_code = 405
            return response

        return app

    def _before(self) -> Response | None:
        body = request.get_data()  # always consume the body: the connection is kept alive
        if request.environ.get(INTERNAL):
            api.authenticate()
            api.organization_context()
            return None
        record = RecordedRequest(
            method=request.method, path=request.path, query=request.args.to_dict(),
            headers={k.lower(): v for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS},
            json=request.get_json(silent=True) if body else None,
        )
        g.record = record
        with self._log_lock:
            self.requests.append(record)
            fault = next((f for f in self._faults if f.remaining > 0
                          and (f.path is None or request.path.startswith(f.path))), None)
            if fault is not None:
                fault.remaining -= 1
                record.fault = str(fault.kind)
                self._faults = [f for f in self._faults if f.remaining > 0]
        if self._down:
            record.fault = "down"
            raise api.ApiError(503, {"detail": "Service Unavailable"})
        if fault is not None:
            g.fault = fault.kind
            if isinstance(fault.kind, int):
                headers = {"Retry-After": str(self.retry_after)} if fault.kind == 429 else {}
                raise api.ApiError(fault.kind, {"detail": f"Injected fault {fault.kind}"}, headers)
            if fault.kind == "timeout":
                self._stopping.wait(self.timeout_sleep)
            elif fault.kind == "reset" or (
                    fault.kind == "truncate" and not request.path.endswith("/download")):
                _drop(request.environ)
                return Response(b"", status=500)
        if request.url_rule is None:
            return None  # Django's resolver answers 404 before DRF negotiates or authenticates
        negotiation.negotiate()
        api.authenticate()
        api.organization_context()
        with self.state.lock:
            user = self.state.users.get(g.user_id) if g.user_id is not None else None
        record.auth, record.user = g.auth, user["username"] if user else None
        api.check_object_permission()
        api.parse_json_body()
        return None

    def _after(self, response: Response) -> Response:
        response = negotiation.render(response)
        record = g.get("record")
        if record is not None:
            record.status = response.status_code
        return response


def _drop(environ: dict[str, Any]) -> None:
    """Close the client's connection at once, without an answer."""
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (for asynchronous deliveries)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
