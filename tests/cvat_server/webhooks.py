"""Webhooks on the test CVAT server: the REST API, and real signed deliveries sent as CVAT 2.73 sends them.

Sending follows ``cvat/apps/webhooks/utils.py`` (``perform_webhook_request``): the body is
``json.dumps(payload)`` (ASCII, ``", "``/``": "`` separators), ``X-Signature-256: sha256=<hex HMAC of
exactly those bytes>`` when the webhook has a secret, timeouts (3, 10) s, a connection error recorded
as 502 and a timeout as 504, the response kept up to 1 MB. Each attempt is a delivery record.

Deliveries go through one background thread, in order, as through CVAT's webhooks RQ queue; a ping
is sent synchronously, as CVAT does. A redelivery re-sends the stored payload, which CVAT reloads
from a PostgreSQL ``jsonb`` column: its keys come back ordered by length, then bytewise, so the bytes
(and the signature) differ from the first delivery's although the JSON is equal.

Server webhooks (type ``server``, CVAT 2.76+, PR #11106: user and organization life-cycle events,
created by an admin, in no organization) exist only when the server's ``version`` is 2.76 or newer
(``CvatTestServer(version="2.76.0")``); at the default 2.73 the type is refused as 2.73 refuses it:
``GET /api/webhooks/events?type=server`` is 400 and creating one is a 400 on ``type``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import urllib3
from flask import Flask, g, has_request_context, jsonify, request

from . import api
from .state import now_iso

if TYPE_CHECKING:
    from .server import CvatTestServer

PROJECT_EVENTS = (
    "completed:request[calculate:quality]", "completed:request[create:task]",
    "completed:request[export:annotations]", "completed:request[export:backup]",
    "completed:request[export:dataset]", "completed:request[merge:job]", "completed:request[merge:task]",
    "create:comment", "create:issue", "create:job", "create:task", "delete:comment", "delete:issue",
    "delete:job", "delete:project", "delete:task", "update:comment", "update:issue", "update:job",
    "update:project", "update:task",
)
"""Events a project webhook may subscribe to in CVAT 2.73 (the list in ``ping.json``)."""

ORGANIZATION_EVENTS = tuple(sorted(PROJECT_EVENTS + (
    "create:invitation", "create:membership", "create:project", "delete:invitation", "delete:membership",
    "update:membership", "update:organization",
)))
SERVER_EVENTS = ("create:organization", "create:user", "delete:organization", "delete:user", "update:user")
"""Events a server webhook may subscribe to (CVAT 2.76+)."""
EVENTS_BY_TYPE = {"project": PROJECT_EVENTS, "organization": ORGANIZATION_EVENTS,
                  "all": ORGANIZATION_EVENTS}
"""Events by webhook type in CVAT 2.73 (see :func:`events_by_type` for a newer server)."""
SERVER_WEBHOOKS_SINCE = (2, 76)


def has_server_webhooks(server: CvatTestServer) -> bool:
    """Whether this server's CVAT version has the ``server`` webhook type (2.76+)."""
    parts = tuple(int(p) for p in server.version.split("-", 1)[0].split(".")[:2] if p.isdigit())
    return parts >= SERVER_WEBHOOKS_SINCE


def events_by_type(server: CvatTestServer) -> dict[str, tuple[str, ...]]:
    """The event choices of each webhook type this server's version offers."""
    if not has_server_webhooks(server):
        return EVENTS_BY_TYPE
    return {**EVENTS_BY_TYPE, "server": SERVER_EVENTS,
            "all": tuple(sorted({*ORGANIZATION_EVENTS, *SERVER_EVENTS}))}

TIMEOUT = (3.0, 10.0)
"""Connect and read timeouts of a delivery, in seconds (CVAT's ``_WEBHOOK_TIMEOUT``)."""
RESPONSE_SIZE_LIMIT = 1024 * 1024
USER_AGENT = "CVAT/{version} python-requests/2.33.1"


def jsonb_order(value: Any) -> Any:
    """``value`` with every object's keys in PostgreSQL ``jsonb`` order (shorter first, then bytes)."""
    if isinstance(value, dict):
        return {k: jsonb_order(value[k]) for k in sorted(value, key=lambda k: (len(k.encode()), k.encode()))}
    if isinstance(value, list):
        return [jsonb_order(v) for v in value]
    return value


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Sent:
    """What went over the wire for one delivery attempt (for tests to check bytes and signature)."""

    delivery_id: int
    webhook_id: int
    target_url: str
    body: bytes
    headers: dict[str, str]
    status_code: int


class WebhookSender:
    """Selects the webhooks an event concerns and delivers to them, recording each attempt."""

    def __init__(self, server: CvatTestServer) -> None:
        self.server = server
        self.include_before_update = True
        """False to send ``update:*`` without ``before_update``/``changes`` (as newer CVAT will)."""
        self.retry_intervals: tuple[float, ...] = ()
        """Seconds before each retry of a 5xx/408/429 attempt (CVAT retries for days; none by default)."""
        self.timeout = TIMEOUT
        self.sent: list[Sent] = []
        self._queue: queue.Queue[tuple[int, dict[str, Any], bool] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._idle = threading.Condition()
        self._http = urllib3.PoolManager(retries=False, cert_reqs="CERT_REQUIRED")
        self._http_insecure = urllib3.PoolManager(retries=False, cert_reqs="CERT_NONE")

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cvat-test-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=15)
            self._thread = None
        self._http.clear()
        self._http_insecure.clear()

    def join(self, timeout: float = 10.0) -> bool:
        """Wait until every queued delivery (and retry) is done; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _enqueue(self, webhook_id: int, payload: dict[str, Any], redelivery: bool = False) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put((webhook_id, payload, redelivery))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            webhook_id, payload, redelivery = item
            try:
                for attempt, pause in enumerate((0.0, *self.retry_intervals)):
                    if attempt and self.server._stopping.wait(pause):
                        break
                    record = self.deliver(webhook_id, payload, redelivery=redelivery, attempt=attempt + 1)
                    if record is None or not _retryable(record["status_code"]):
                        break
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    # -- sending ------------------------------------------------------------------------------

    def deliver(self, webhook_id: int, payload: dict[str, Any], *, redelivery: bool = False, attempt: int = 1
                ) -> dict[str, Any] | None:
        """One attempt: POST the payload to the webhook's target and record it (None if the webhook
        is gone or inactive, as ``send_webhook`` skips those)."""
        st = self.server.state
        with st.lock:
            webhook = st.webhooks.get(webhook_id)
            if webhook is None or not webhook["is_active"]:
                return None
            webhook = dict(webhook)
        body = json.dumps(payload).encode("utf-8")
        headers = {"User-Agent": USER_AGENT.format(version=self.server.version),
                   "Accept-Encoding": "gzip, deflate", "Accept": "*/*", "Connection": "keep-alive",
                   "Content-Type": "application/json"}
        if webhook["secret"]:
            headers["X-Signature-256"] = signature(webhook["secret"], body)
        started = time.monotonic()
        http = self._http if webhook["enable_ssl"] else self._http_insecure
        try:
            response = http.request("POST", webhook["target_url"], body=body, headers=headers,
                                    timeout=urllib3.Timeout(connect=self.timeout[0], read=self.timeout[1]),
                                    preload_content=False, redirect=False)
            try:
                status_code = response.status
                raw = response.read(RESPONSE_SIZE_LIMIT + 1, decode_content=True)
            finally:
                response.release_conn()
            answer = raw.decode("utf-8", "replace") if len(raw) <= RESPONSE_SIZE_LIMIT else ""
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as exc:
            status_code, answer = 504, str(exc)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # requests (which CVAT uses) reports connect timeouts as ConnectionError too: 502.
            status_code, answer = 502, str(exc)
        with st.lock:
            delivery_id = st.next_id("deliveries")
            record = {
                "id": delivery_id, "webhook_id": webhook_id, "event": payload["event"],
                "status_code": status_code, "redelivery": redelivery, "attempt": attempt,
                "created_date": now_iso(), "updated_date": now_iso(),
                "changed_fields": ",".join((payload.get("before_update") or {}).keys()),
                "request": payload, "response": answer,
                "request_duration": int((time.monotonic() - started) * 1000),
            }
            st.deliveries[delivery_id] = record
            self.sent.append(Sent(delivery_id, webhook_id, webhook["target_url"], body, headers, status_code))
        return record

    # -- events ---------------------------------------------------------------------------------

    def matching(self, event: str, *, project_id: int | None, org_id: int | None) -> list[int]:
        """Active webhooks subscribed to ``event`` for this project or organization (a server webhook
        hears its events from everywhere)."""
        st = self.server.state
        with st.lock:
            return [w["id"] for w in sorted(st.webhooks.values(), key=lambda w: w["id"])
                    if w["is_active"] and event in w["events"] and (
                        (w["type"] == "project" and project_id is not None and w["project_id"] == project_id)
                        or (w["type"] == "organization" and org_id is not None and w["org_id"] == org_id)
                        or w["type"] == "server")]

    def publish(self, event: str, body: dict[str, Any], *, project_id: int | None, org_id: int | None,
                webhook_id_at: int = 1) -> list[int]:
        """Queue ``{"event", **body}`` for every matching webhook, with ``webhook_id`` inserted at
        position ``webhook_id_at`` (CVAT puts it second for create/update, last otherwise)."""
        targets = self.matching(event, project_id=project_id, org_id=org_id)
        for webhook_id in targets:
            items = [("event", event), *body.items()]
            items.insert(webhook_id_at if webhook_id_at >= 0 else len(items), ("webhook_id", webhook_id))
            self._enqueue(webhook_id, dict(items))
        return targets

    def emit_update(self, resource: str, before: dict[str, Any], after: dict[str, Any], *,
                    sender_id: int | None, include_before_update: bool | None = None) -> list[int]:
        """``update:<resource>`` for a change from ``before`` to ``after`` (the resource's JSON):
        ``before_update`` holds the old values of what changed, ``updated_date`` first."""
        body: dict[str, Any] = {resource: after, "sender": self._sender(sender_id)}
        if self.include_before_update if include_before_update is None else include_before_update:
            changed = [k for k in after if k not in _NOT_FIELDS and before.get(k) != after.get(k)]
            if "updated_date" in before and before.get("updated_date") != after.get("updated_date"):
                changed.insert(0, "updated_date")
            body["before_update"] = {k: before.get(k) for k in changed}
            body["changes"] = {k: {"from": before.get(k), "to": after.get(k)} for k in changed}
        project_id, org_id = _scope(self.server, resource, after)
        return self.publish(f"update:{resource}", body, project_id=project_id, org_id=org_id)

    def emit_request_completed(self, request_json: dict[str, Any], *, project_id: int | None,
                               org_id: int | None) -> list[int]:
        """``completed:request[<type>]`` when a background request (an export) ends."""
        event = f"completed:request[{request_json['operation']['type']}]"
        return self.publish(event, {"request": request_json}, project_id=project_id, org_id=org_id,
                            webhook_id_at=-1)

    def emit(self, event: str, resource_id: int | str, *, before: dict[str, Any] | None = None,
             sender: str | None = "admin", include_before_update: bool | None = None) -> list[int]:
        """Send ``event`` about a resource as it is now in the server's state, to every matching
        webhook; returns their ids. An ``update:*`` touches the resource's ``updated_date`` and
        reports ``before`` (old values of other changed fields); ``resource_id`` is an rq_id for
        ``completed:request[...]``."""
        st = self.server.state
        with st.lock:
            sender_id = None
            if sender is not None:
                user = st.user_by_name(sender)
                assert user is not None, sender
                sender_id = user["id"]
            if event.startswith("completed:request["):
                request_json = st.request_json(st.requests[str(resource_id)])
                op = request_json["operation"]
                return self.emit_request_completed(request_json, project_id=op["project_id"],
                                                   org_id=op["org_id"])
            action, _, resource = event.partition(":")
            data = _resource_json(self.server, resource, int(resource_id), self._base())
            if action == "update":
                # An update is a save: CVAT's before_update always starts with updated_date.
                records = {"job": st.jobs, "task": st.tasks, "project": st.projects, "issue": st.issues}
                if resource in records:  # users and organizations show no updated_date
                    records[resource][int(resource_id)]["updated_date"] = now_iso()
                previous = {**data, **(before or {})}
                data = _resource_json(self.server, resource, int(resource_id), self._base())
                return self.emit_update(resource, previous, data, sender_id=sender_id,
                                        include_before_update=include_before_update)
            project_id, org_id = _scope(self.server, resource, data)
            body = {resource: data, "sender": self._sender(sender_id)}
            # create:* carries webhook_id second (captures); delete:* appends it (signals.py).
            return self.publish(event, body, project_id=project_id, org_id=org_id,
                                webhook_id_at=1 if action == "create" else -1)

    def _sender(self, user_id: int | None) -> dict[str, Any] | None:
        st = self.server.state
        with st.lock:
            return st.basic_user(user_id, self._base()) if user_id is not None else None

    def _base(self) -> str:
        return api.base_url() if has_request_context() else self.server.url


_NOT_FIELDS = frozenset({"url", "updated_date", "jobs", "labels", "issues", "tasks", "comments"})
"""Keys of a resource's JSON that are summaries, not fields (``updated_date`` is put first)."""


def _scope(server: CvatTestServer, resource: str, data: dict[str, Any]) -> tuple[int | None, int | None]:
    """(project_id, org_id) of a resource's JSON, for webhook selection."""
    if resource == "user":
        return None, None  # only server webhooks hear about users
    if resource == "organization":
        return None, data.get("id")
    if resource == "project":
        return data.get("id"), data.get("organization")
    if resource == "issue":
        with server.state.lock:
            task = server.state.tasks[server.state.jobs[data["job"]]["task_id"]]
        return task["project_id"], task.get("org_id")
    return data.get("project_id"), data.get("organization")


def _resource_json(server: CvatTestServer, resource: str, resource_id: int, base: str) -> dict[str, Any]:
    st = server.state
    if resource == "job":
        return st.job_json(resource_id, base)
    if resource == "task":
        return st.task_json(resource_id, base)
    if resource == "project":
        return st.project_json(resource_id, base)
    if resource == "issue":
        return st.issue_json(resource_id, base)
    if resource == "user":
        return st.user_json(resource_id, base)
    if resource == "organization":
        org = st.organizations[resource_id]
        return {"id": org["id"], "slug": org["slug"], "name": org["name"],
                "owner": st.basic_user(org["owner_id"], base)}
    raise ValueError(f"the test server cannot emit events about {resource!r}")


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


# -- the REST API -----------------------------------------------------------------------------


def webhook_json(server: CvatTestServer, webhook: dict[str, Any], base: str) -> dict[str, Any]:
    st = server.state
    data: dict[str, Any] = {
        "id": webhook["id"],
        "url": f"{base}/api/webhooks/{webhook['id']}",
        "target_url": webhook["target_url"],
        "description": webhook["description"],
        "type": webhook["type"],
        "content_type": webhook["content_type"],
        "is_active": webhook["is_active"],
        "enable_ssl": webhook["enable_ssl"],
        "created_date": webhook["created_date"],
        "updated_date": webhook["updated_date"],
        "owner": st.basic_user(webhook["owner_id"], base),
        "project_id": webhook["project_id"],
        "organization": webhook["org_id"],
        "events": sorted(webhook["events"]),
    }
    last = max((d for d in st.deliveries.values() if d["webhook_id"] == webhook["id"]),
               key=lambda d: d["id"], default=None)
    if last is not None:
        data["last_status"] = last["status_code"]
        data["last_delivery_date"] = last["updated_date"]
    return data


def delivery_json(delivery: dict[str, Any]) -> dict[str, Any]:
    return {k: delivery[k] for k in ("id", "webhook_id", "event", "status_code", "redelivery", "attempt",
                                     "request_duration", "created_date", "updated_date", "changed_fields",
                                     "request", "response")}


def _validate(body: dict[str, Any], *, partial: bool, webhook_type: str | None = None) -> dict[str, Any]:
    """DRF-like validation of a webhook write; returns the fields to store."""
    srv = api.server()
    st = srv.state
    by_type = events_by_type(srv)
    out: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    required = () if partial else ("target_url", "type", "events")
    for name in required:
        if name not in body:
            errors[name] = ["This field is required."]
    if "target_url" in body:
        url = body["target_url"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            errors["target_url"] = ["Enter a valid URL."]
        out["target_url"] = url
    if "type" in body and not partial:
        if body["type"] not in by_type or body["type"] == "all":
            errors["type"] = [f'"{body["type"]}" is not a valid choice.']
        out["type"] = body["type"]
    kind = out.get("type", webhook_type)
    if "events" in body:
        events = body["events"]
        allowed = by_type.get(kind or "", ())
        bad = [e for e in events if e not in allowed] if isinstance(events, list) else ["?"]
        if bad:
            errors["events"] = [f'"{e}" is not a valid choice.' for e in bad]
        elif not events:
            errors["non_field_errors"] = [f"Invalid events list for {kind} webhook"]
        out["events"] = sorted(set(events)) if isinstance(events, list) else []
    for name, default in (("description", ""), ("content_type", "application/json"), ("secret", ""),
                          ("is_active", True), ("enable_ssl", True)):
        if name in body:
            out[name] = body[name]
        elif not partial:
            out[name] = default
    if out.get("content_type", "application/json") != "application/json":
        errors["content_type"] = [f'"{out["content_type"]}" is not a valid choice.']
    if not partial and out.get("type") == "project":
        project_id = body.get("project_id")
        if project_id is None:
            errors["project_id"] = ["Project id is required for a project webhook."]
        elif project_id not in st.projects:
            errors["project_id"] = [f'Invalid pk "{project_id}" - object does not exist.']
        out["project_id"], out["org_id"] = project_id, g.get("org_id")
    elif not partial and out.get("type") == "organization":
        if g.get("org_id") is None:
            errors["organization_id"] = ["An organization webhook needs an organization context."]
        out["project_id"], out["org_id"] = None, g.get("org_id")
    elif not partial and out.get("type") == "server":
        with st.lock:
            admin = g.user_id is not None and st.users[g.user_id]["is_superuser"]
        if not admin and not errors:
            raise api.ApiError(403, {"detail": "You do not have permission to perform this action."})
        out["project_id"], out["org_id"] = None, None  # a server webhook belongs to no organization
    if errors:
        raise api.ApiError(400, errors)
    return out


def _get(webhook_id: int) -> dict[str, Any]:
    webhook = api.server().state.webhooks.get(webhook_id)
    if webhook is None:
        api.not_found("Webhook")
    return webhook


def webhooks_collection() -> Any:
    srv = api.server()
    st = srv.state
    with st.lock:
        if request.method == "POST":
            fields = _validate(request.get_json(silent=True) or {}, partial=False)
            webhook_id = st.next_id("webhooks")
            st.webhooks[webhook_id] = {"id": webhook_id, "owner_id": g.user_id, "created_date": now_iso(),
                                       "updated_date": now_iso(), **fields}
            return jsonify(webhook_json(srv, st.webhooks[webhook_id], api.base_url())), 201
        project_id = api.int_arg("project_id")
        kind = request.args.get("type")
        items = [webhook_json(srv, w, api.base_url())
                 for w in sorted(st.webhooks.values(), key=lambda w: -w["id"])
                 if (project_id is None or w["project_id"] == project_id)
                 and (kind is None or w["type"] == kind) and (g.org_id is None or w["org_id"] == g.org_id)]
        return jsonify(api.paginate(items))


def webhook_detail(webhook_id: int) -> Any:
    srv = api.server()
    st = srv.state
    with st.lock:
        webhook = _get(webhook_id)
        if request.method == "DELETE":
            del st.webhooks[webhook_id]
            for delivery_id in [d["id"] for d in st.deliveries.values() if d["webhook_id"] == webhook_id]:
                del st.deliveries[delivery_id]
            return "", 204
        if request.method in ("PATCH", "PUT"):
            body = request.get_json(silent=True) or {}
            body.pop("type", None)
            webhook.update(_validate(body, partial=True, webhook_type=webhook["type"]))
            webhook["updated_date"] = now_iso()
        return jsonify(webhook_json(srv, webhook, api.base_url()))


def webhook_ping(webhook_id: int) -> Any:
    """Sent synchronously; the answer is the delivery."""
    srv = api.server()
    st = srv.state
    with st.lock:
        webhook = _get(webhook_id)
        described = webhook_json(srv, webhook, api.base_url())
        described.pop("last_status", None)
        described.pop("last_delivery_date", None)
        payload = {"event": "ping", "webhook": described, "sender": st.basic_user(g.user_id, api.base_url())}
    record = srv.webhooks.deliver(webhook_id, payload)
    if record is None:  # an inactive webhook: CVAT still answers, with nothing delivered
        return jsonify({}), 200
    return jsonify(delivery_json(record))


def webhook_deliveries(webhook_id: int) -> Any:
    st = api.server().state
    with st.lock:
        _get(webhook_id)
        items = [delivery_json(d) for d in sorted(st.deliveries.values(), key=lambda d: -d["id"])
                 if d["webhook_id"] == webhook_id]
        return jsonify(api.paginate(items))


def _delivery(webhook_id: int, delivery_id: int) -> dict[str, Any]:
    st = api.server().state
    _get(webhook_id)
    delivery = st.deliveries.get(delivery_id)
    if delivery is None or delivery["webhook_id"] != webhook_id:
        api.not_found("WebhookDelivery")
    return delivery


def webhook_delivery(webhook_id: int, delivery_id: int) -> Any:
    with api.server().state.lock:
        return jsonify(delivery_json(_delivery(webhook_id, delivery_id)))


def webhook_redelivery(webhook_id: int, delivery_id: int) -> Any:
    """Queued; the payload comes back from ``jsonb`` with its keys reordered."""
    srv = api.server()
    with srv.state.lock:
        payload = jsonb_order(_delivery(webhook_id, delivery_id)["request"])
    srv.webhooks._enqueue(webhook_id, payload, redelivery=True)
    return jsonify({})


_REQUEST_GROUPS = {"export:annotations": "Dataset export", "export:dataset": "Dataset export",
                   "export:backup": "Backup export", "create:task": "Task data creation",
                   "merge:job": "Consensus merge", "merge:task": "Consensus merge",
                   "calculate:quality": "Quality report creation"}


def _event_group(event: str) -> str:
    """The group CVAT's UI files an event under (``EventGroup.display_name``)."""
    if event.startswith("completed:request["):
        return _REQUEST_GROUPS.get(event[len("completed:request["):-1], "Request")
    return event.partition(":")[2].title()


def webhook_events() -> Any:
    """Events by webhook type, as ``{"key", "group": {"display_name"}}`` objects (the shape
    cvat-sdk 2.80's ``Events`` model reads)."""
    kind = request.args.get("type", "all")
    by_type = events_by_type(api.server())
    if kind not in by_type:
        raise api.ApiError(400, "Incorrect value of type parameter")
    events = [{"key": e, "group": {"display_name": _event_group(e)}} for e in by_type[kind]]
    return jsonify({"webhook_type": kind, "events": events})


def register(app: Flask) -> None:
    """Routes of ``/api/webhooks``."""
    rules: list[tuple[str, Any, list[str]]] = [
        ("/api/webhooks", webhooks_collection, ["GET", "POST"]),
        ("/api/webhooks/events", webhook_events, ["GET"]),
        ("/api/webhooks/<int:webhook_id>", webhook_detail, ["GET", "PATCH", "PUT", "DELETE"]),
        ("/api/webhooks/<int:webhook_id>/ping", webhook_ping, ["POST"]),
        ("/api/webhooks/<int:webhook_id>/deliveries", webhook_deliveries, ["GET"]),
        ("/api/webhooks/<int:webhook_id>/deliveries/<int:delivery_id>", webhook_delivery, ["GET"]),
        ("/api/webhooks/<int:webhook_id>/deliveries/<int:delivery_id>/redelivery", webhook_redelivery,
         ["POST"]),
    ]
    for rule, view, methods in rules:
        app.add_url_rule(rule, view.__name__, view, methods=methods)
