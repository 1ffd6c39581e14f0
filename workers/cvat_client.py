"""The real ``CvatGateway``: cvat-sdk over HTTP. The only module of cvat-hooks that imports ``cvat_sdk``.

Decisions, and why:

* **The SDK for the connection, JSON for the data.** cvat-sdk's ``Client``/``ApiClient`` give us
  authentication (PAT as ``Authorization: Bearer``, or a login session with its CSRF header), the
  ``X-Organization`` header, TLS verification, urllib3's connection pool and the endpoints' paths
  and parameters. But every call is made with ``_parse_response=False`` and the JSON read here:
  the actions want plain dicts anyway, and the SDK's typed models refuse a whole response when one
  enum value is unknown to them (an SDK 2.80 deserialising ``{"status": "exporting"}`` from another
  server version raises ``ApiValueError``), which would turn a harmless server upgrade into failed
  jobs. Requests go through ``ApiClient.call_api`` with the endpoint's path, method and auth, and
  plain JSON bodies, for the same reason: the server, not the SDK's copy of its enums, validates.
* **No retries here.** urllib3's own retries are switched off; a failure is raised once, as
  ``TransientError`` or ``PermanentError`` decided by ``core.errors.classify`` alone, and RQ
  retries the whole job with its backoff. The one exception is a login session that expired: with
  username/password we log in again and repeat the call once, since a 401 there is not the caller's
  fault and a new session fixes it.
* **Every call has a timeout** (connect and read, in seconds), login included; an export also has a
  deadline for the whole wait.
* **Error messages name the operation and the status** (``CVAT GET /api/tasks/99: 404 Not Found:
  No Task matches the given query.``) and pass through ``Redactor``: never a token, password,
  session cookie or header. They are raised ``from None`` so tracebacks stored by RQ do not carry
  the SDK's exception text (which includes response headers).
* **Credentials go only to the configured host**: an export's ``result_url`` is rebased onto the
  configured URL before the download (CVAT builds it from the Host header it saw, which behind a
  proxy can name another scheme or host).
* **A worker's client outlives its job** (:func:`make_gateway`): one login, format list and
  connection pool per process and thread, not per job; a job's ``close()`` leaves them for the next.
* **Status checks where the end is likely** (:func:`check_offsets`): an export's status is asked
  on a backoff schedule that tightens around when recent exports of its kind were ready.
* **Idempotent label creation**: ``add_labels`` creates only the names the target lacks, so a retry
  after a partial success does not fail on CVAT's "All label names must be unique".
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import http
import json
import logging
import math
import os
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import urllib3
from cvat_sdk.api_client import exceptions as sdk_exceptions  # type: ignore[import-untyped]
from cvat_sdk.api_client import models, rest  # type: ignore[import-untyped]
from cvat_sdk.api_client.api_client import Endpoint  # type: ignore[import-untyped]
from cvat_sdk.core.client import AccessTokenCredentials, Client, Config  # type: ignore[import-untyped]
from cvat_sdk.core.helpers import make_request_headers  # type: ignore[import-untyped]

from core.errors import ActionError, ErrorKind, PermanentError, TransientError, classify, status_of
from core.redaction import Redactor
from core.settings import CvatSettings
from workers.annotation_gateway import AnnotateOutcome, ImportMode, ImportOutcome, Progress
from workers.gateway import ExportKind, ExportOutcome, ExportRequest, LabelSet, Resource

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
"""Seconds to establish a connection to CVAT."""
READ_TIMEOUT = 60.0
"""Seconds to wait for each read from CVAT (between bytes of a download, too)."""
EXPORT_TIMEOUT = 6 * 3600.0
"""Seconds an export may take on the server before we give up (transiently) on it."""
FIRST_POLL_DELAY = 0.05
"""Seconds before the first status check of an export."""
POLL_BACKOFF = 1.5
"""Each pause between status checks is this much longer, up to ``status_check_period``: the wait
overshoots an export's end by at most half its duration, in a handful of requests."""
FINE_STEP = 0.05
"""Seconds between the status checks around the time recent exports of the same kind were ready."""
WINDOW_CHECKS = 5
"""At most this many checks in that window; a wider spread of recent times spaces them out."""
OUTLIER_AFTER = 4
"""With this many recent times or more, the slowest is left out of the window as an outlier."""
RECENT_EXPORTS = 8
"""Exports of each kind whose times the schedule of the next one learns from."""
FORMATS_MAX_AGE = 3600.0
"""Seconds a client keeps the server's format list (it changes only with a CVAT upgrade)."""
DOWNLOAD_CHUNK = 1024 * 1024
"""Bytes read and written at a time while downloading (the memory a download holds)."""
PAGE_SIZE = 100
"""Items asked per page of a list."""
MAX_PAGES = 10_000
"""A guard against a server whose ``next`` never ends."""
JOB_FIELDS = frozenset({"stage", "state", "assignee"})
"""What ``update_job`` may change."""
NEW_ATTRIBUTE = {"mutable": False, "input_type": "text", "default_value": "", "values": []}
"""Defaults for attribute fields CVAT requires but a caller may leave out."""


class CvatClient:
    """``CvatGateway`` over cvat-sdk. Connects on first use; one instance per worker thread.

    ``kept``: the client outlives the job that made it (:func:`make_gateway`); :meth:`close` then
    keeps its session, pooled connections, format list and export times for the next job.
    """

    def __init__(self, settings: CvatSettings, *, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, export_timeout: float = EXPORT_TIMEOUT,
                 kept: bool = False) -> None:
        if not settings.url:
            raise PermanentError("CVAT is not configured: CVAT_URL is not set")
        if not (settings.access_token or (settings.username and settings.password)):
            raise PermanentError("CVAT is not configured: set CVAT_ACCESS_TOKEN, "
                                 "or CVAT_USERNAME and CVAT_PASSWORD")
        self.settings = settings
        self.timeout = (connect_timeout, read_timeout)
        self.export_timeout = export_timeout
        self._redactor = Redactor(settings.secrets())
        self._sdk: Client | None = None
        self._formats: dict[str, list[str]] | None = None
        self._formats_at = 0.0
        self._checks = 0
        self._ready_after: dict[tuple[str, str, str | None], deque[float]] = {}
        """Seconds after the request each recent export of a kind was ready (for ``check_offsets``)."""
        self.kept = kept

    # -- connection ---------------------------------------------------------------------------

    def _client(self) -> Client:
        """The SDK client, built and authenticated on first use (no I/O at construction)."""
        if self._sdk is not None:
            return self._sdk
        s = self.settings
        assert s.url
        config = Config(status_check_period=s.status_check_period, verify_ssl=s.verify_tls)
        client = Client(s.url, config=config, check_server_version=False)
        api = client.api_client
        # One attempt per call: retrying is RQ's job (see the module docstring). Redirects still
        # followed. The SDK builds its pool at construction, so rebuild it with this setting.
        api.configuration.retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0,
                                                  redirect=3)
        api.rest_client = rest.RESTClientObject(api.configuration)
        if s.organization is not None:
            client.organization_slug = s.organization
        self._sdk = client
        if s.access_token:
            client.login(AccessTokenCredentials(s.access_token))
        else:
            try:
                self._login()
            except ActionError:
                self._sdk = None  # log in again on the next call
                client.close()
                api.rest_client.pool_manager.clear()
                raise
        return client

    def _login(self) -> None:
        """Start a session with username and password, as ``Client.login`` does, with a timeout."""
        assert self._sdk is not None and self.settings.username and self.settings.password
        api = self._sdk.api_client
        for name in ("sessionid", "csrftoken"):
            api.cookies.pop(name, None)
        api.configuration.api_key.pop("csrfHeaderAuth", None)
        request = models.LoginSerializerExRequest(username=self.settings.username,
                                                  password=self.settings.password)
        try:
            api.auth_api.create_login(request, _request_timeout=self.timeout)
        except Exception as exc:
            raise self._error("POST /api/auth/login", exc) from None
        if "sessionid" not in api.cookies or "csrftoken" not in api.cookies:
            raise PermanentError("CVAT POST /api/auth/login: the server started no session")
        api.configuration.api_key["csrfHeaderAuth"] = api.cookies["csrftoken"].value
        self._redactor.add(api.cookies["sessionid"].value, api.cookies["csrftoken"].value)

    def close(self) -> None:
        """End the session (if we logged in) and close pooled connections, unless the client is
        ``kept`` for the next job (then nothing: the session ends with the process). Never raises."""
        if not self.kept:
            self.end_session()

    def end_session(self, *, timeout: float | None = None) -> None:
        """Log out (if we logged in) and close pooled connections, kept or not. Never raises.
        ``timeout`` (seconds) bounds the logout instead of the client's own timeouts."""
        sdk, self._sdk = self._sdk, None
        if sdk is None:
            return
        api = sdk.api_client
        if "sessionid" in api.cookies:
            try:
                _, response = api.auth_api.create_logout(_request_timeout=self.timeout if timeout is None else timeout,
                                                         _parse_response=False, _check_status=False)
                response.close()  # closes its file and socket; the pool below no longer owns them
            except Exception as exc:  # noqa: BLE001 - closing must not fail a finished job
                log.debug("cvat: logout failed (%s)", type(exc).__name__)
        sdk.close()
        api.rest_client.pool_manager.clear()

    def __enter__(self) -> CvatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls and errors ---------------------------------------------------------------------

    def _call(self, endpoint: Endpoint, *, body: Any = None, missing_ok: bool = False, **params: Any) -> Any:
        """One API call, answered as JSON; any failure raised as a classified ``ActionError``.

        The SDK's endpoint supplies the path, method and authentication; ``ApiClient.call_api``
        sends our plain JSON without the endpoint's input validation (see the module docstring).
        With ``missing_ok`` a 404 answers ``None`` instead of raising.
        """
        client = self._client()
        params = {k: v for k, v in params.items() if v is not None}
        path_params = {endpoint.attribute_map[k]: v for k, v in params.items()
                       if endpoint.location_map[k] == "path"}
        query = [(endpoint.attribute_map[k], _query_value(v)) for k, v in params.items()
                 if endpoint.location_map[k] == "query"]
        headers = _negotiated_headers(client.api_client, endpoint, with_body=body is not None)
        what = _describe(endpoint, params)
        for attempt in (1, 2):
            try:
                # _check_status=False: the SDK would raise before we could release an error
                # answer's connection (its exception keeps no handle on the response).
                _, response = client.api_client.call_api(
                    endpoint.path, endpoint.settings["http_method"], path_params, query, headers, body=body,
                    auth_settings=endpoint.settings["auth"], _parse_response=False,
                    _request_timeout=self.timeout, _check_status=False)
                try:
                    data = response.data
                finally:
                    response.release_conn()
                if not 200 <= response.status <= 299:
                    error = sdk_exceptions.ApiException(status=response.status, reason=response.reason)
                    error.body = data.decode("utf-8", "replace") if data else ""
                    raise error
            except Exception as exc:
                if attempt == 1 and status_of(exc) == 401 and "sessionid" in client.api_client.cookies:
                    log.info("cvat: session expired, logging in again")
                    self._login()
                    continue
                if missing_ok and status_of(exc) == 404:
                    return None
                raise self._error(what, exc) from None
            try:
                return json.loads(data) if data else None
            except ValueError:
                raise PermanentError(f"CVAT {what}: the answer is not JSON (is CVAT_URL right?)") from None
        raise AssertionError("unreachable")

    def _error(self, what: str, exc: BaseException) -> ActionError:
        """``exc`` as TransientError/PermanentError (``classify`` decides), with a safe message."""
        if isinstance(exc, ActionError):
            return exc
        status = status_of(exc)
        if status is not None:
            message = f"CVAT {what}: {status} {_phrase(status)}{_detail(getattr(exc, 'body', None))}"
        elif isinstance(exc, sdk_exceptions.ApiException):  # no HTTP status: TLS and the like
            reason = " ".join(str(exc.reason or type(exc).__name__).split())
            message = f"CVAT {what}: {reason[:300]}"
        else:
            message = f"CVAT {what}: {_network_problem(exc, self.timeout)}"
        cls = TransientError if classify(exc) is ErrorKind.TRANSIENT else PermanentError
        return cls(self._redactor.text(message), status=status)

    def _pages(self, endpoint: Endpoint, **params: Any) -> list[dict[str, Any]]:
        """Every item of a paginated list, following ``next``."""
        items: list[dict[str, Any]] = []
        for page in range(1, MAX_PAGES + 1):
            answer = self._call(endpoint, page=page, page_size=PAGE_SIZE, **params)
            items.extend(answer.get("results") or [])
            if not answer.get("next"):
                return items
        raise PermanentError(f"CVAT {_describe(endpoint, params)}: more than {MAX_PAGES} pages")

    # -- CvatGateway ----------------------------------------------------------------------------

    def _format_names(self, kind: str) -> list[str]:
        """Enabled ``exporters`` or ``importers``; asked once per client and again after
        ``FORMATS_MAX_AGE`` (they change only with a CVAT upgrade; a worker's client lives across
        jobs). CVAT names some formats differently each way: ``CVAT for images 1.1`` is exported,
        ``CVAT 1.1`` imported."""
        if self._formats is None or time.monotonic() - self._formats_at > FORMATS_MAX_AGE:
            answer = self._call(self._client().api_client.server_api.retrieve_annotation_formats_endpoint)
            self._formats = {side: [f["name"] for f in answer.get(side, []) if f.get("enabled", True)]
                             for side in ("exporters", "importers")}
            self._formats_at = time.monotonic()
        return list(self._formats[kind])

    def annotation_formats(self) -> list[str]:
        """Enabled export formats."""
        return self._format_names("exporters")

    def import_formats(self) -> list[str]:
        """Enabled import formats."""
        return self._format_names("importers")

    def _api(self, resource: Resource) -> Any:
        api = self._client().api_client
        return {Resource.JOB: api.jobs_api, Resource.TASK: api.tasks_api,
                Resource.PROJECT: api.projects_api}[Resource(resource)]

    def get_resource(self, resource: Resource, resource_id: int) -> dict[str, Any]:
        return self._call(self._api(resource).retrieve_endpoint, id=resource_id)

    def newest_first(self, resource: Resource, *, page: int = 1, page_size: int = PAGE_SIZE) -> dict[str, Any]:
        """One page of every job, task or project the account sees, most recently updated first
        (``count``, ``next``, ``results``): how ``operations.state_sync`` catches up in a few pages."""
        return self._call(self._api(resource).list_endpoint, sort="-updated_date", page=page,
                          page_size=page_size)

    def list_jobs(self, task_id: int) -> list[dict[str, Any]]:
        return self._pages(self._client().api_client.jobs_api.list_endpoint, task_id=task_id)

    def task_labels(self, task_id: int) -> LabelSet:
        """The task's labels; for a task in a project, the project's (``project_id`` set)."""
        task = self.get_resource(Resource.TASK, task_id)
        labels = self._pages(self._client().api_client.labels_api.list_endpoint, task_id=task_id)
        return LabelSet(labels=labels, task_id=task_id, project_id=task.get("project_id"))

    def add_labels(self, labels: list[dict[str, Any]], *, task_id: int | None = None,
                   project_id: int | None = None) -> None:
        """Create the labels the task (or project) lacks, by name; existing names are left alone.

        A task in a project has no labels of its own: CVAT silently ignores labels PATCHed onto it,
        so that is refused here rather than reported as done.
        """
        if (task_id is None) == (project_id is None):
            raise PermanentError("add_labels needs exactly one of task_id and project_id")
        if task_id is not None:
            owner = self.get_resource(Resource.TASK, task_id).get("project_id")
            if owner is not None:
                raise PermanentError(f"task {task_id} uses the labels of project {owner}: "
                                     "add labels to the project")
            existing = self._pages(self._client().api_client.labels_api.list_endpoint, task_id=task_id)
        else:
            existing = self._pages(self._client().api_client.labels_api.list_endpoint, project_id=project_id)
        have = {label.get("name") for label in existing}
        new: list[dict[str, Any]] = []
        for label in labels:
            if label.get("name") not in have:
                have.add(label.get("name"))
                new.append(_new_label(label))
        if not new:
            return
        if task_id is not None:
            self._call(self._api(Resource.TASK).partial_update_endpoint, id=task_id,
                       body={"labels": new})
        else:
            self._call(self._api(Resource.PROJECT).partial_update_endpoint, id=project_id,
                       body={"labels": new})

    def update_job(self, job_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(fields) - JOB_FIELDS)
        if unknown:
            raise PermanentError(f"update_job cannot change {', '.join(unknown)} "
                                 f"(only {', '.join(sorted(JOB_FIELDS))})")
        return self._call(self._api(Resource.JOB).partial_update_endpoint, id=job_id,
                          body=dict(fields))

    def find_user_id(self, username: str) -> int:
        """The user's id. In an organization's context CVAT lists its members only."""
        users = self._pages(self._client().api_client.users_api.list_endpoint, username=username)
        for user in users:
            if user.get("username") == username:
                return int(user["id"])
        where = f" in organization {self.settings.organization!r}" if self.settings.organization else ""
        raise PermanentError(f"CVAT has no user named {username!r}{where}")

    # -- exports --------------------------------------------------------------------------------

    def export(self, request: ExportRequest, dest: Path | None) -> ExportOutcome:
        """Start the export, wait for it, then download it to ``dest`` (or leave it in CVAT's cloud
        storage). ``dest`` is written in place: the caller stages it and commits or discards it."""
        cloud = request.cloud_storage_id is not None
        if not cloud and dest is None:
            raise PermanentError("export needs a destination file unless CVAT writes to its cloud storage")
        endpoint, params = self._export_call(request)
        started = time.monotonic()
        answer = self._call(endpoint, **params)
        asked = time.monotonic() - started
        rq_id = (answer or {}).get("rq_id")
        if not rq_id:
            raise PermanentError(f"CVAT {_describe(endpoint, params)}: no rq_id in the answer")
        recent = self._ready_after.setdefault((request.resource.value, request.kind.value, request.format),
                                              deque(maxlen=RECENT_EXPORTS))
        finished = self._wait(rq_id, started, expected=tuple(recent))
        server_seconds = time.monotonic() - started
        cvat_seconds = _cvat_seconds(finished)
        # CVAT created the request before it answered: its result was ready at most this long after
        # ``started`` (what we saw, when CVAT's own dates are missing).
        recent.append(asked + cvat_seconds if cvat_seconds is not None else server_seconds)
        outcome = ExportOutcome(path=None, size=None, server_seconds=server_seconds, cvat_seconds=cvat_seconds,
                                status_checks=self._checks, rq_id=rq_id)
        if cloud:
            return outcome
        if not finished.get("result_url"):
            raise PermanentError(f"CVAT export {rq_id} finished without a result_url to download")
        assert dest is not None
        return dataclasses.replace(outcome, path=dest, size=self._download(finished["result_url"], dest))

    def _export_call(self, request: ExportRequest) -> tuple[Endpoint, dict[str, Any]]:
        """The endpoint and query of the export CVAT should run."""
        resource = Resource(request.resource)
        api = self._api(resource)
        params: dict[str, Any] = {"id": request.resource_id}
        if request.cloud_storage_id is not None:
            params.update(location="cloud_storage", cloud_storage_id=request.cloud_storage_id,
                          filename=request.cloud_filename)
        else:
            # Explicit, so a resource whose default target storage is a cloud still downloads.
            params["location"] = "local"
        if request.kind is ExportKind.BACKUP:
            if resource is Resource.JOB:
                raise PermanentError("CVAT cannot back up a job; back up its task")
            if request.lightweight:
                params["lightweight"] = True
            return api.create_backup_export_endpoint, params
        if not request.format:
            raise PermanentError(f"an export of {request.kind.value} needs a format")
        params.update(format=request.format, save_images=request.kind is ExportKind.DATASET)
        return api.create_dataset_export_endpoint, params

    def _wait(self, rq_id: str, started: float, *, what: str = "export",
              failure: type[ActionError] = TransientError, expected: Sequence[float] = ()) -> dict[str, Any]:
        """Poll ``/api/requests/{rq_id}`` at the times :func:`check_offsets` gives: quickly at first,
        then less often up to the configured period (cvat-sdk's own wait polls every 5 s), and every
        ``FINE_STEP`` around the times recent requests of the same kind were ready (``expected``, in
        seconds after ``started``), where this one most likely ends.

        The checks are scheduled from ``started`` rather than after each answer, so the time each
        check takes does not push the next one later. Checks that fell due while the last one was
        being answered are sent as one, at once (never a burst to catch up, never more checks than
        the schedule has); those due before it was sent are covered by it.

        ``what`` names the request in errors; ``failure`` is what a request CVAT reports ``failed``
        raises (an import that failed on the server will fail again with the same file).
        """
        endpoint = self._client().api_client.requests_api.retrieve_endpoint
        self._checks = 0
        offsets = check_offsets(expected, max(self.settings.status_check_period, FIRST_POLL_DELAY))
        sent = started
        while True:
            offset = next(offsets)
            while started + offset <= sent:
                offset = next(offsets)
            if offset > self.export_timeout:
                raise TransientError(f"CVAT {what} {rq_id} did not finish within {self.export_timeout:g} s")
            time.sleep(max(0.0, started + offset - time.monotonic()))
            sent = time.monotonic()
            answer = self._call(endpoint, id=rq_id)
            self._checks += 1
            status = answer.get("status")
            if status == "finished":
                return answer
            if status == "failed":
                # An export that failed on the server (disk full, worker lost...) is worth a retry.
                message = str(answer.get("message") or "no message").strip().splitlines()
                raise failure(self._redactor.text(
                    f"CVAT {what} {rq_id} failed on the server: {message[-1][:300] if message else ''}"))

    def _download(self, result_url: str, dest: Path) -> int:
        """Stream ``result_url`` into ``dest`` chunk by chunk; return the bytes written."""
        client = self._client()
        url = _same_origin(result_url, self.settings.url or "")
        what = "GET " + urllib.parse.urlsplit(url).path
        try:
            response = client.api_client.rest_client.GET(
                url, headers=make_request_headers(client.api_client), _parse_response=False,
                _request_timeout=self.timeout)
        except Exception as exc:
            raise self._error(what, exc) from None
        size = 0
        try:
            expected = response.headers.get("Content-Length")
            with open(dest, "wb") as out:
                while chunk := response.read(amt=DOWNLOAD_CHUNK, decode_content=True):
                    out.write(chunk)
                    size += len(chunk)
            encoded = response.headers.get("Content-Encoding")
            if expected is not None and not encoded and int(expected) != size:
                raise TransientError(f"CVAT {what}: got {size} of {expected} bytes")
        except ActionError:
            response.close()
            raise
        except Exception as exc:
            response.close()
            raise self._error(what, exc) from None
        finally:
            response.release_conn()
        return size

    # -- annotations (for workers.actions.auto_annotate and import_annotations) -------------------

    def auto_annotate(self, task_id: int, function: Any, *, work_dir: Path, clear_existing: bool,
                      allow_unmatched_labels: bool, conf_threshold: float | None,
                      progress: Progress | None = None) -> AnnotateOutcome:
        """``cvat_sdk.auto_annotation.annotate_task`` over the task, its chunks cached in ``work_dir``.

        The SDK's own function (not our JSON calls): it downloads the task's labels, frame list and
        chunks, maps the function's labels onto the task's and uploads the result in one request
        (``PATCH .../annotations?action=create``, or ``PUT`` with ``clear_existing``). Its calls
        have no timeout of their own; the queue's job timeout bounds the whole run. A function that
        breaks the SDK's interface, a task without image data and an answer CVAT refuses fail
        permanently; 5xx, 408, 429 and network errors transiently (``core.errors.classify``).
        """
        from cvat_sdk.auto_annotation import BadFunctionError, annotate_task  # type: ignore[import-untyped]
        from cvat_sdk.datasets.common import UnsupportedDatasetError  # type: ignore[import-untyped]

        client = self._client()
        counted = _CountingFunction(function)
        previous = client.config.cache_dir
        client.config.cache_dir = work_dir
        try:
            annotate_task(client, task_id, counted, pbar=_ProgressNotes(progress), clear_existing=clear_existing,
                          allow_unmatched_labels=allow_unmatched_labels, conf_threshold=conf_threshold)
        except BadFunctionError as exc:
            raise PermanentError(self._redactor.text(f"the auto-annotation function broke the SDK's "
                                                     f"interface on task {task_id}: {exc}")) from None
        except UnsupportedDatasetError as exc:
            raise PermanentError(f"task {task_id} cannot be auto-annotated: {exc}") from None
        except sdk_exceptions.ApiException as exc:
            raise self._error(f"auto-annotation of task {task_id}", exc) from None
        except Exception as exc:
            if isinstance(exc, ActionError) or classify(exc) is ErrorKind.PERMANENT:
                raise
            raise self._error(f"auto-annotation of task {task_id}", exc) from None
        finally:
            client.config.cache_dir = previous
        return AnnotateOutcome(frames=counted.frames, detections=counted.detections)

    def import_annotations(self, resource: Resource, resource_id: int, format_name: str, path: Path, *,
                           mode: ImportMode) -> ImportOutcome:
        """Upload ``path`` with the SDK's uploader (CVAT's TUS protocol), then wait for the import.

        Below ``Task.import_annotations`` on purpose: its wait parses the request with the SDK's
        typed models and polls without our timeouts (see the module docstring). ``import_mode`` is
        always sent: without it CVAT 2.73 *replaces* the annotations (recorded exchange a.22).
        The file's name is sent too: CVAT picks the reader of a format from its extension.
        """
        from cvat_sdk.core.uploading import AnnotationUploader  # type: ignore[import-untyped]

        client = self._client()
        endpoint = self._api(resource).create_annotations_endpoint
        url = client.api_map.make_endpoint_url(endpoint.path, kwsub={"id": resource_id})
        what = f"POST {endpoint.path.replace('{id}', str(resource_id))}"
        query = {"format": format_name, "filename": path.name, "import_mode": ImportMode(mode).value}
        started = time.monotonic()
        try:
            response = AnnotationUploader(client).upload_file(url, path, meta={"filename": path.name},
                                                              query_params=query)
            answer = json.loads(response.data or b"{}")
        except Exception as exc:
            raise self._error(what, exc) from None
        rq_id = answer.get("rq_id") if isinstance(answer, dict) else None
        if not rq_id:
            raise PermanentError(f"CVAT {what}: no rq_id in the answer")
        self._wait(rq_id, started, what="import", failure=PermanentError)
        return ImportOutcome(rq_id=rq_id, server_seconds=time.monotonic() - started)

    # -- webhooks and server checks (for operations.cvat_webhooks) ----------------------------------

    @contextlib.contextmanager
    def _org(self, slug: str | None) -> Iterator[Any]:
        """Calls in organization ``slug``'s context, or without ``X-Organization`` (``None``), whatever
        ``CVAT_ORG`` says: CVAT then lists the personal workspace, and takes a detail call's context
        from the object itself (a webhook of another organization than ``CVAT_ORG`` stays reachable)."""
        client = self._client()
        previous = client.organization_slug
        client.organization_slug = slug
        try:
            yield client.api_client
        finally:
            client.organization_slug = previous

    def server_about(self) -> dict[str, Any]:
        """``GET /api/server/about`` (name, version): answered without credentials."""
        with self._org(None) as api:
            return self._call(api.server_api.retrieve_about_endpoint)

    def current_user(self) -> dict[str, Any]:
        """``GET /api/users/self``: proves the token (or login) is valid."""
        with self._org(None) as api:
            return self._call(api.users_api.retrieve_self_endpoint)

    def list_organizations(self) -> list[dict[str, Any]]:
        """Organizations the user can enter (every one for an admin); none from a CVAT without them."""
        with self._org(None) as api:
            if self._call(api.organizations_api.list_endpoint, missing_ok=True, page_size=1) is None:
                return []
            return self._pages(api.organizations_api.list_endpoint)

    def list_webhooks(self, *, org: str | None = None, org_id: int | None = None,
                      project_id: int | None = None, webhook_type: str | None = None) -> list[dict[str, Any]]:
        """Webhooks of one context: organization ``org`` (slug) or ``org_id``, else the personal workspace."""
        with self._org(org) as api:
            return self._pages(api.webhooks_api.list_endpoint, org_id=org_id, project_id=project_id,
                               type=webhook_type)

    def create_webhook(self, fields: dict[str, Any], *, org: str | None = None,
                       org_id: int | None = None) -> dict[str, Any]:
        """``POST /api/webhooks`` in organization ``org`` (slug) or ``org_id``'s context."""
        with self._org(org) as api:
            return self._call(api.webhooks_api.create_endpoint, body=fields, org_id=org_id)

    def update_webhook(self, webhook_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        with self._org(None) as api:
            return self._call(api.webhooks_api.partial_update_endpoint, body=fields, id=webhook_id)

    def delete_webhook(self, webhook_id: int) -> None:
        with self._org(None) as api:
            self._call(api.webhooks_api.destroy_endpoint, id=webhook_id)

    def ping_webhook(self, webhook_id: int) -> dict[str, Any]:
        """CVAT sends a ``ping`` now and answers with that delivery (``{}`` if the webhook is inactive)."""
        with self._org(None) as api:
            return self._call(api.webhooks_api.create_ping_endpoint, id=webhook_id) or {}

    def webhook_deliveries(self, webhook_id: int, *, page: int = 1,
                           page_size: int = PAGE_SIZE) -> dict[str, Any]:
        """One page of a webhook's deliveries, newest first (``count``, ``next``, ``results``)."""
        with self._org(None) as api:
            return self._call(api.webhooks_api.list_deliveries_endpoint, id=webhook_id, page=page,
                              page_size=page_size)

    def redeliver(self, webhook_id: int, delivery_id: int) -> None:
        """CVAT queues the delivery's stored payload again (a new delivery record, ``redelivery: true``)."""
        with self._org(None) as api:
            self._call(api.webhooks_api.create_deliveries_redelivery_endpoint, id=webhook_id,
                       delivery_id=delivery_id)

    def webhook_events(self, webhook_type: str) -> list[str] | None:
        """Event names a ``project`` or ``organization`` webhook may subscribe to; ``None`` from a CVAT
        that cannot say. Older CVAT lists names, newer ``{"key", "group"}`` objects."""
        with self._org(None) as api:
            answer = self._call(api.webhooks_api.retrieve_events_endpoint, missing_ok=True, type=webhook_type)
        if not isinstance(answer, dict) or not isinstance(answer.get("events"), list):
            return None
        return [e["key"] if isinstance(e, dict) else str(e) for e in answer["events"]]


_kept = threading.local()
"""This thread's kept clients by settings, and the process they were made in (``pid``)."""


def make_gateway(settings: CvatSettings) -> CvatClient:
    """The gateway the workers use: this thread's client of ``settings``, ``kept`` across jobs.

    Made once per process and thread (nothing connects until its first call), so a job does not
    pay the client's setup again: logging in (a password login costs CVAT a password hash, about
    0.25 s on a quiet server), the format list, a new connection, and the logout at its end. On a
    real CVAT this was about 0.3 s of each small export (bench/real_export.py). The session ends
    with the process (:func:`_end_kept_sessions`); an expired one is renewed by ``_call``. Per
    thread, because a client is not shared between threads (``_org`` switches its organization);
    per process, because a forked child must not use its parent's pooled sockets.
    """
    pid = os.getpid()
    if getattr(_kept, "pid", None) != pid:
        _kept.pid, _kept.clients = pid, {}
    clients: dict[CvatSettings, CvatClient] = _kept.clients
    client = clients.get(settings)
    if client is None:
        client = clients[settings] = CvatClient(settings, kept=True)
        _every_kept.append((pid, client))
    return client


_every_kept: list[tuple[int, CvatClient]] = []
"""Every kept client of every thread, to log out of at exit."""


EXIT_LOGOUT_TIMEOUT = 1.0
"""Seconds a process ending may spend logging out of each kept session (a worker must stop quickly)."""


@atexit.register
def _end_kept_sessions() -> None:
    """Log out of the kept clients' sessions when the process ends normally (best effort: a killed
    process, or one CVAT does not answer in time, leaves its session to expire on the server)."""
    pid = os.getpid()
    for owner, client in _every_kept:
        if owner == pid:
            client.end_session(timeout=EXIT_LOGOUT_TIMEOUT)
    _every_kept.clear()


# -- helpers ----------------------------------------------------------------------------------


def _describe(endpoint: Endpoint, params: dict[str, Any]) -> str:
    """``GET /api/jobs?task_id=2&page=1``: the method, the path with its ids, and the query."""
    path = endpoint.path
    query = []
    for name, value in params.items():
        where = endpoint.location_map.get(name)
        if where == "path":
            path = path.replace("{" + endpoint.attribute_map[name] + "}", str(value))
        elif where == "query":
            query.append((endpoint.attribute_map[name], value))
    suffix = "?" + urllib.parse.urlencode(query) if query else ""
    return f"{endpoint.settings['http_method']} {path}{suffix}"


def _negotiated_headers(api: Any, endpoint: Endpoint, *, with_body: bool) -> dict[str, str]:
    """``Accept`` and ``Content-Type`` as the SDK's endpoint declares them.

    CVAT answers only the media types its renderers offer (``application/vnd.cvat+json``) and
    refuses ``Accept: application/json`` with 406, so the types come from the endpoint's own
    ``headers_map``, chosen by ``ApiClient``'s public selectors, never written here.
    """
    headers: dict[str, str] = {}
    accept = api.select_header_accept(endpoint.headers_map["accept"])
    if accept:
        headers["Accept"] = accept
    if with_body:
        headers["Content-Type"] = api.select_header_content_type(
            endpoint.headers_map["content_type"]) or "application/json"
    return headers


def _query_value(value: Any) -> Any:
    """Booleans as CVAT's docs write them (``save_images=true``)."""
    return str(value).lower() if isinstance(value, bool) else value


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"


def _detail(body: Any) -> str:
    """What CVAT said about an error (``detail``, or the validation messages), shortened."""
    if not body:
        return ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        data = json.loads(body)
    except ValueError:
        return "" if "<html" in body.lower() else f": {body.strip()[:200]}"
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        text = data["detail"]
    else:
        text = json.dumps(data, ensure_ascii=False)
    return f": {text[:300]}"


def _network_problem(exc: BaseException, timeout: tuple[float, float]) -> str:
    """A short account of a failure below HTTP (urllib3 wraps the cause in MaxRetryError)."""
    cause = getattr(exc, "reason", None) if isinstance(exc, urllib3.exceptions.MaxRetryError) else exc
    cause = cause or exc
    # NewConnectionError derives from ConnectTimeoutError in urllib3 2: test it first.
    if isinstance(cause, urllib3.exceptions.NameResolutionError):
        return "could not resolve the host name"
    if isinstance(cause, urllib3.exceptions.NewConnectionError | ConnectionRefusedError):
        return "could not connect"
    if isinstance(cause, urllib3.exceptions.ConnectTimeoutError):
        return f"connection timed out after {timeout[0]:g} s"
    if isinstance(cause, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return f"no answer within {timeout[1]:g} s"
    if isinstance(cause, urllib3.exceptions.SSLError):
        return f"TLS failed ({' '.join(str(cause).split())[:200]})"
    if isinstance(cause, urllib3.exceptions.ProtocolError | ConnectionError):
        return "connection dropped"
    return type(cause).__name__


def check_offsets(expected: Sequence[float], period: float) -> Iterator[float]:
    """Seconds after a request was made at which to ask whether it finished, for ever.

    Without history: 50 ms, then each pause ``POLL_BACKOFF`` times longer up to ``period``, so a
    quick request is found quickly and a long one costs a check per period. With ``expected``, the
    times recent requests of the same kind were ready: the same backoff, from half the quickest of
    them, up to just before it; then every ``FINE_STEP`` (wider when they spread, at most
    ``WINDOW_CHECKS`` checks) until the slowest (but one, of ``OUTLIER_AFTER`` or more: one stall of
    CVAT's would widen the next ones' steps); then backing off again. A request as quick as
    recent ones is found within a step of its end, in about as many checks as without history (a
    small job export on a real CVAT: four or five, found about 0.15 s after its end before, 0.05 s
    now); one quicker than all of them is found by the checks before the window, at most a period
    late.
    """
    def backoff(start: float, pause: float) -> Iterator[float]:
        at = start
        while True:
            at += pause
            yield at
            pause = min(pause * POLL_BACKOFF, period)

    if not expected:
        yield from backoff(0.0, FIRST_POLL_DELAY)
        return
    ordered = sorted(max(t, FIRST_POLL_DELAY) for t in expected)
    low, high = ordered[0], ordered[-2 if len(ordered) >= OUTLIER_AFTER else -1]
    step = min(max(FINE_STEP, (high - low) / (WINDOW_CHECKS - 1)), period)
    for at in backoff(0.0, min(max(FIRST_POLL_DELAY, low / 2), period)):
        if at > low - FINE_STEP:
            break
        yield at
    window = [low + i * step for i in range(math.ceil((high - low) / step - 1e-9) + 1)]
    yield from window
    yield from backoff(window[-1], min(step * POLL_BACKOFF, period))


def _cvat_seconds(request: dict[str, Any]) -> float | None:
    """A finished request's ``created_date`` -> ``finished_date``, as CVAT's clock measured it."""
    try:
        created, finished = (datetime.fromisoformat(str(request[k]).replace("Z", "+00:00"))
                             for k in ("created_date", "finished_date"))
    except (KeyError, TypeError, ValueError):
        return None
    return max(0.0, (finished - created).total_seconds())


def _same_origin(url: str, base: str) -> str:
    """``url``'s path and query on ``base``'s scheme, host and port."""
    target, origin = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit((origin.scheme, origin.netloc, target.path, target.query, ""))


def _new_label(label: dict[str, Any]) -> dict[str, Any]:
    """A label as CVAT's PATCH wants it: attributes get the fields CVAT requires."""
    new = {k: v for k, v in label.items() if k in ("name", "type", "color", "attributes") and v is not None}
    if "attributes" in new:
        new["attributes"] = [{**NEW_ATTRIBUTE, **attr} for attr in new["attributes"]]
    return new


class _CountingFunction:
    """A detection function that counts the frames it saw and the annotations it returned (what
    ``annotate_task`` uploads is not reported back)."""

    def __init__(self, function: Any) -> None:
        self.spec = function.spec
        self._function = function
        self.frames = 0
        self.detections = 0

    def detect(self, context: Any, image: Any) -> list[Any]:
        found = list(self._function.detect(context, image))
        self.frames += 1
        self.detections += len(found)
        return found


class _ProgressNotes:
    """cvat-sdk's ``ProgressReporter`` interface, passing frames done and total to ``progress``.

    Duck-typed rather than subclassed: ``annotate_task`` only calls ``task``, ``iter``, ``advance``,
    ``report_status`` and ``finish`` (cvat_sdk/core/progress.py).
    """

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self.total = 0
        self.done = 0

    @contextlib.contextmanager
    def task(self, *, total: int = 0, **_: Any) -> Iterator[None]:
        self.start2(total)
        try:
            yield None
        finally:
            self.finish()

    def start2(self, total: int, **_: Any) -> None:
        self.total, self.done = int(total or 0), 0
        self._report()

    def report_status(self, progress: int) -> None:
        self.done = int(progress)
        self._report()

    def advance(self, delta: int) -> None:
        self.done += int(delta)
        self._report()

    def iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            yield item
            self.advance(1)

    def finish(self) -> None:
        pass

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self.done, self.total)
