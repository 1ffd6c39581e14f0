"""``cvat-hooks doctor`` and ``cvat-hooks ping``: is every link from CVAT to the workers working?

``doctor`` is one report to paste into an issue: each check OK, WARN or FAIL with a one-line reason.
It never shows a secret or a token (CVAT's errors are already redacted by the client; every reason
passes through the ``Redactor`` too). ``ping`` asks CVAT to ping a webhook and waits until the
receiver has recorded that very ping, so it proves the whole path: CVAT -> network (and CVAT's
egress proxy) -> receiver -> signature -> Redis.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from core import cvat_events
from core.contract import QUEUES
from core.delivery_log import DeliveryLog
from core.errors import ActionError
from core.events import delivery_id_of
from core.redaction import Redactor
from operations import webhook_registry as registry
from operations.cvat_webhooks import (
    ORGANIZATION,
    PROJECT,
    SERVER,
    Scope,
    Webhook,
    WebhookGateway,
    is_success,
    parse_time,
    visible_webhooks,
    webhooks_in,
)
from operations.reconcile import recent_runs
from operations.webhook_registry import Known, Ownership
from receiver.rules import RulesError, load_rules
from receiver.secrets_store import SecretStore
from receiver.settings import LEGACY_TRIAL_SECRET_FILE, Settings

if TYPE_CHECKING:
    from redis import Redis

RECENT_DELIVERIES = 50
"""Deliveries per webhook that ``doctor`` summarises (one page)."""
SMOKESCREEN_HINT = ("if CVAT runs its egress proxy (smokescreen), it blocks private addresses: allow the "
                    "receiver's with SMOKESCREEN_OPTS (e.g. --allow-range=10.0.0.0/8) and restart CVAT")


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    reason: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "reason": self.reason,
                "details": self.details}


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No FAIL (warnings are allowed)."""
        return all(c.status is not Status.FAIL for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}

    def lines(self) -> list[str]:
        """The report as text: one line per check."""
        width = max((len(c.name) for c in self.checks), default=0)
        return [f"{c.status.value:<5} {c.name:<{width}}  {c.reason}" for c in self.checks]


class ServerGateway(WebhookGateway, Protocol):
    """The CVAT calls ``doctor`` makes besides the webhook ones."""

    def server_about(self) -> dict[str, Any]: ...
    def current_user(self) -> dict[str, Any]: ...


def status_hint(status: int | None, response: str | None = None) -> str:
    """What a delivery status CVAT recorded means for a cvat-hooks receiver, and what to do."""
    if status is None:
        return "no answer recorded"
    if is_success(status):
        return "delivered"
    body = _json(response)
    error = str(body.get("error", "")) if isinstance(body, dict) else ""
    if status == 401 and "missing" in error:
        return ("401: CVAT sent no signature: the webhook has no secret in CVAT "
                "(`cvat-hooks register ... --rotate-secret` sets one)")
    if status == 401:
        return ("401: the receiver rejected the signature: CVAT's secret for this webhook differs from the "
                "receiver's (`cvat-hooks register ... --rotate-secret` sets a new one on both)")
    if status == 407:
        return f"407: CVAT's outgoing proxy refused the connection; {SMOKESCREEN_HINT}"
    if status == 502:
        return f"502: CVAT could not connect to the receiver (down, wrong host or port?); {SMOKESCREEN_HINT}"
    if status == 504:
        return "504: the receiver did not answer within CVAT's timeout"
    if status in (404, 405):
        return f"{status}: nothing takes webhooks at this URL (the path must end with /webhooks/cvat)"
    if status == 413:
        return "413: the receiver refused the body as too large (CVAT_HOOKS_MAX_BODY)"
    if status == 400:
        return f"400: the receiver could not read the body ({error or 'not JSON'})"
    if status == 503:
        return "503: the receiver could not store the event (is its Redis up?)"
    return f"{status}: {(response or '').strip()[:120] or 'no body'}"


# -- ping ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PingResult:
    webhook_id: int
    target_url: str
    ok: bool
    message: str
    status_code: int | None = None
    round_trip_ms: float | None = None
    delivery_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def ping_targets(gateway: WebhookGateway, *, webhook_id: int | None = None, scope: Scope | None = None,
                 known: Known | None = None) -> list[Webhook]:
    """The webhook with this id (whoever's it is: it was asked for), or this deployment's webhooks of a
    scope or of the whole CVAT (``known``; without it, every cvat-hooks-looking one)."""
    if webhook_id is not None:
        found = [w for w in visible_webhooks(gateway) if w.id == webhook_id]
        if not found:
            raise ValueError(f"CVAT shows no webhook {webhook_id} to these credentials")
        return found
    hooks = webhooks_in(gateway, scope) if scope is not None else visible_webhooks(gateway)
    ours = known.mine(hooks) if known is not None else [w for w in hooks if w.is_cvat_hooks]
    if not ours:
        raise ValueError(f"no webhook of this deployment {f'in {scope} ' if scope else ''}to ping "
                         "(`cvat-hooks webhooks list` shows what CVAT has)")
    return ours


def ping(gateway: WebhookGateway, deliveries: DeliveryLog, webhook: Webhook, *, timeout: float = 10.0,
         poll: float = 0.05, clock: Callable[[], float] = time.monotonic) -> PingResult:
    """Have CVAT ping ``webhook``, wait until the receiver has recorded it: how long it took, or why not."""
    started_wall, started = time.time(), clock()

    def result(ok: bool, message: str, **extra: Any) -> PingResult:
        return PingResult(webhook.id, webhook.target_url, ok, message, **extra)

    try:
        answer = gateway.ping_webhook(webhook.id)
    except ActionError as exc:
        return result(False, f"CVAT refused the ping: {exc}")
    status = answer.get("status_code")
    if status is None and not answer.get("request"):
        return result(False, "CVAT sent nothing: the webhook is inactive "
                             "(`cvat-hooks register` again activates it)")
    if not is_success(status):
        return result(False, f"CVAT's delivery failed: {status_hint(status, answer.get('response'))}",
                      status_code=status)
    did = _ping_delivery_id(answer)
    deadline = started + timeout
    while True:
        found = _recorded(deliveries, did, webhook.id, started_wall)
        if found is not None:
            elapsed = round((clock() - started) * 1000, 1)
            return result(True, f"round trip {elapsed:g} ms (CVAT -> receiver -> recorded)",
                          status_code=status, round_trip_ms=elapsed, delivery_id=found)
        if clock() >= deadline:
            return result(False, f"CVAT got {status} from {webhook.target_url}, but this receiver's Redis "
                                 f"has no record of the ping after {timeout:g} s: that URL reaches another "
                                 "receiver (or one using another Redis)", status_code=status)
        time.sleep(poll)


def _ping_delivery_id(answer: dict[str, Any]) -> str | None:
    """The receiver's id for the ping CVAT just sent: from the payload CVAT reports, or our answer."""
    payload = answer.get("request")
    if isinstance(payload, dict) and payload:
        return delivery_id_of(payload)
    body = _json(answer.get("response"))
    return body.get("delivery_id") if isinstance(body, dict) else None


def _recorded(deliveries: DeliveryLog, did: str | None, webhook_id: int, since: float) -> str | None:
    """The id of the receiver's record of a ping received (or received again) since ``since``."""
    slack = 1.0  # the receiver's clock may be a little behind ours
    if did is not None:
        found = deliveries.get(did)
        if found is None:
            return None
        record = found.record
        again = parse_time(record.get("last_duplicate_at"))
        received = float(record.get("received_ts") or 0)
        recent = received >= since - slack or (again is not None and again.timestamp() >= since - slack)
        return did if recent else None
    for delivery in deliveries.list(limit=20, event="ping", since=since - slack):
        if delivery.record.get("webhook_id") == webhook_id:
            return delivery.id
    return None


def _json(text: Any) -> Any:
    if not isinstance(text, str):
        return text if isinstance(text, dict) else None
    try:
        return json.loads(text)
    except ValueError:
        return None


# -- doctor -------------------------------------------------------------------------------------


def doctor(settings: Settings, *, gateway: ServerGateway | None, redis: Redis | None,
           redis_problem: str | None = None, cvat_problem: str | None = None) -> Report:
    """Every check, in the order a delivery travels. ``gateway``/``redis`` are ``None`` when they could
    not even be built (``*_problem`` says why)."""
    redactor = Redactor(settings.sensitive_values())
    report = Report()
    needed = _rules(settings, report)
    known: Known | None = None
    if redis is not None:
        from redis.exceptions import RedisError

        try:
            known = registry.load(redis)
        except RedisError:
            known = None  # the redis check below says why
    if gateway is None:
        report.checks.append(Check("cvat", Status.FAIL, cvat_problem or "CVAT is not configured "
                                   "(set CVAT_URL and CVAT_ACCESS_TOKEN)"))
    else:
        _cvat(gateway, report, needed, known)
    _secrets(settings, report)
    report.checks.append(_journal(settings))
    if redis is None:
        report.checks.append(Check("redis", Status.FAIL, redis_problem or "no Redis configured"))
    else:
        _redis(settings, redis, report)
    return Report([Check(c.name, c.status, redactor.text(c.reason), redactor.data(c.details))
                   for c in report.checks])


def _rules(settings: Settings, report: Report) -> set[str] | None:
    try:
        rules = load_rules(settings.rules_path)
    except (RulesError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.checks.append(Check("rules", Status.FAIL, f"{settings.rules_path}: {first}"))
        return None
    needed = rules.events_needed()
    details = {"path": str(settings.rules_path), "rules": len(rules.rules), "events": sorted(needed),
               "warnings": [str(w) for w in rules.warnings]}
    reason = f"{len(rules.rules)} rule(s) from {settings.rules_path}, listening to {len(needed)} event(s)"
    if rules.warnings:
        report.checks.append(Check("rules", Status.WARN, f"{reason}; {len(rules.warnings)} warning(s): "
                                   f"{rules.warnings[0]}", details))
    else:
        report.checks.append(Check("rules", Status.OK, reason, details))
    return needed


def _cvat(gateway: ServerGateway, report: Report, needed: set[str] | None, known: Known | None) -> None:
    try:
        about = gateway.server_about()
    except ActionError as exc:
        report.checks.append(Check("cvat", Status.FAIL, f"unreachable: {exc}"))
        report.checks.append(Check("token", Status.WARN, "not checked: CVAT is unreachable"))
        return
    version = about.get("version", "?")
    report.checks.append(Check("cvat", Status.OK, f"reachable, CVAT {version}", {"version": version}))
    try:
        user = gateway.current_user()
    except ActionError as exc:
        report.checks.append(Check("token", Status.FAIL, f"rejected: {exc}"))
        return
    report.checks.append(Check("token", Status.OK, f"valid, user {user.get('username', '?')}",
                               {"username": user.get("username")}))
    try:
        visible = visible_webhooks(gateway)
    except ActionError as exc:
        report.checks.append(Check("webhooks", Status.FAIL, f"cannot list them: {exc}"))
        return
    if known is None:
        hooks = [w for w in visible if w.is_cvat_hooks]
        report.checks.append(Check("webhooks", Status.WARN, "without this deployment's Redis, its webhooks "
                                   "cannot be told from other deployments': every cvat-hooks webhook is shown"))
    else:
        hooks = known.mine(visible)
        report.checks.extend(_not_mine(known, visible))
        if not hooks:
            report.checks.append(Check("webhooks", Status.WARN, "no webhook of this deployment in CVAT: "
                                       "`cvat-hooks register --project ID | --org SLUG | --server "
                                       "--url PUBLIC_URL`"))
    for hook in hooks:
        report.checks.append(_webhook(gateway, hook, needed))


def _not_mine(known: Known, visible: list[Webhook]) -> list[Check]:
    """cvat-hooks webhooks this deployment leaves alone, and remembered ones CVAT no longer lists."""
    from operations.registration import unadopted_hint

    checks: list[Check] = []
    unadopted = [w for w in visible if known.ownership(w) is Ownership.UNADOPTED]
    if unadopted:
        names = ", ".join(f"{w.id} ({w.where})" for w in unadopted)
        checks.append(Check("unadopted webhooks", Status.WARN, f"webhook(s) {names} look like cvat-hooks' but "
                            "this deployment did not register them, so reconcile and ping leave them alone: "
                            f"run register again to adopt, e.g. `{unadopted_hint(unadopted[0])}`",
                            {"webhooks": [w.to_json() for w in unadopted]}))
    other = [w for w in visible if known.ownership(w) is Ownership.OTHER]
    if other:
        names = ", ".join(f"{w.id} ({w.where}, {w.description})" for w in other)
        checks.append(Check("other deployments", Status.OK, f"webhook(s) {names} belong to other cvat-hooks "
                            "deployments: left alone (if this deployment's Redis was reset, they may be its "
                            "own: run register again to adopt)", {"webhooks": [w.to_json() for w in other]}))
    listed = {w.id for w in visible}
    missing = sorted(i for i in known.webhooks if i not in listed)
    if missing:
        checks.append(Check("remembered webhooks", Status.WARN, f"webhook(s) {', '.join(map(str, missing))} "
                            "remembered by this deployment are not listed by CVAT (deleted? the next "
                            "reconcile forgets them)", {"webhook_ids": missing}))
    return checks


def _webhook(gateway: WebhookGateway, hook: Webhook, needed: set[str] | None) -> Check:
    """Active, subscribed to what the rules need, and what its recent deliveries answered."""
    name = f"webhook {hook.id} ({hook.where})"
    details: dict[str, Any] = {**hook.to_json()}
    if not hook.is_active:
        return Check(name, Status.FAIL, "inactive in CVAT: `cvat-hooks register` again activates it", details)
    possible = set({PROJECT: cvat_events.PROJECT_EVENTS, ORGANIZATION: cvat_events.ORGANIZATION_EVENTS,
                    SERVER: cvat_events.SERVER_EVENTS}.get(hook.type, ()))
    missing = sorted((needed or set()) & possible - set(hook.events))
    details["missing_events"] = missing
    try:
        page = gateway.webhook_deliveries(hook.id, page=1, page_size=RECENT_DELIVERIES)
    except ActionError as exc:
        return Check(name, Status.WARN, f"cannot read its deliveries: {exc}", details)
    recent = [d for d in page.get("results") or [] if isinstance(d, dict)]
    counts = Counter(str(d.get("status_code")) for d in recent)
    details["recent_statuses"] = dict(counts)
    failed = [d for d in recent if not is_success(d.get("status_code"))]
    summary = ", ".join(f"{code}x{n}" for code, n in counts.most_common()) or "none yet"
    reason = f"-> {hook.target_url}; last {len(recent)} deliveries: {summary}"
    if missing:
        reason += f"; not subscribed to {', '.join(missing)} (`cvat-hooks register` again)"
    if recent and not is_success(recent[0].get("status_code")):
        latest = recent[0]
        return Check(name, Status.FAIL, f"{reason}; latest failed: "
                     f"{status_hint(latest.get('status_code'), latest.get('response'))}", details)
    if failed:
        worst = failed[0]
        return Check(name, Status.WARN, f"{reason}; {len(failed)} failed, e.g. "
                     f"{status_hint(worst.get('status_code'), worst.get('response'))}", details)
    return Check(name, Status.WARN if missing else Status.OK, reason, details)


def _secrets(settings: Settings, report: Report) -> None:
    """The secrets every receiver of these settings accepts: ``CVAT_HOOKS_SECRET`` and the secrets
    store, where ``register`` writes and the trial keeps its generated secret."""
    count = len(SecretStore.for_settings(settings).current())
    files = ", ".join(str(p) for p in settings.secret_files)
    legacy = settings.data_dir / LEGACY_TRIAL_SECRET_FILE
    if legacy.exists():
        report.checks.append(Check("secrets", Status.WARN if count else Status.FAIL,
                                   f"{legacy} holds a trial secret of an older cvat-hooks: the next `cvat-hooks "
                                   f"serve` (`./dev run`) moves it into {settings.registered_secrets_file}",
                                   {"count": count}))
        return
    if count:
        report.checks.append(Check("secrets", Status.OK, f"{count} webhook secret(s) accepted "
                                   f"(CVAT_HOOKS_SECRET and {files})", {"count": count}))
    elif settings.insecure_no_signature:
        report.checks.append(Check("secrets", Status.WARN, "no secret: unsigned deliveries are accepted "
                                   "(CVAT_HOOKS_INSECURE_NO_SIGNATURE)"))
    else:
        report.checks.append(Check("secrets", Status.FAIL, "no webhook secret: the receiver will not start "
                                   "(`cvat-hooks register` writes one)"))


def _journal(settings: Settings) -> Check:
    """This machine's receiver journal: deliveries it kept while Redis was unreachable, and damaged
    entries the drain set aside for a human (a crash mid-write, a disk that lied)."""
    from receiver.journal import QUARANTINE, Journal

    journal = Journal(settings.data_dir / "journal", max_bytes=settings.journal_max_bytes)
    details = {"directory": str(journal.directory), "bytes": journal.size(), "damaged": journal.quarantined()}
    if details["damaged"]:
        return Check("journal", Status.WARN, f"{details['damaged']} damaged entr"
                     f"{'y' if details['damaged'] == 1 else 'ies'} set aside in {journal.directory / QUARANTINE}: "
                     "read them (base64 bodies), then remove the file", details)
    if journal.pending():
        return Check("journal", Status.WARN, f"{details['bytes']} bytes of deliveries wait in {journal.directory} "
                     "for Redis: a receiver moves them in when Redis is back", details)
    return Check("journal", Status.OK, "empty: no delivery waits for Redis", details)


def _redis(settings: Settings, redis: Redis, report: Report) -> None:
    from redis.exceptions import RedisError
    from rq import Worker

    from core.queue_stats import queue_stats
    from core.queueing import SERIALIZER

    try:
        redis.ping()
    except RedisError as exc:
        report.checks.append(Check("redis", Status.FAIL, f"unreachable: {type(exc).__name__}: {exc}"))
        return
    report.checks.append(Check("redis", Status.OK, "reachable"))
    report.checks.append(_durability(redis))
    try:
        workers = Worker.all(connection=redis, serializer=SERIALIZER)
        counts = queue_stats(redis, QUEUES)
        depth = {name: c.queued for name, c in counts.items()}
        failed = {name: c.failed for name, c in counts.items()}
        runs = recent_runs(redis, 1)
    except RedisError as exc:
        report.checks.append(Check("workers", Status.FAIL, f"cannot read RQ's state: {exc}"))
        return
    names = sorted(w.name for w in workers)
    if workers:
        report.checks.append(Check("workers", Status.OK, f"{len(workers)} alive", {"names": names}))
    else:
        report.checks.append(Check("workers", Status.FAIL, "no worker alive: start `cvat-hooks worker`"))
    report.checks.append(Check("queues", Status.OK, ", ".join(f"{n}: {d} queued" for n, d in depth.items()),
                               {"depth": depth}))
    total = sum(failed.values())
    report.checks.append(Check("failed jobs", Status.WARN if total else Status.OK,
                               f"{total} failed job(s)" + (": `cvat-hooks deliveries list --status failed`"
                                                           if total else ""), {"failed": failed}))
    report.checks.append(_reconcile(settings, runs[0] if runs else None))


def _durability(redis: Redis) -> Check:
    """Can this Redis lose what the receiver acknowledged (eviction: FAIL; no persistence: WARN)?"""
    from redis.exceptions import RedisError

    from core.redis_conn import check_durability

    name = "redis durability"
    try:
        verdict = check_durability(redis)
    except RedisError as exc:
        return Check(name, Status.WARN, f"could not check: {type(exc).__name__}: {exc}")
    details = {"maxmemory_policy": verdict.policy, "appendonly": verdict.aof, "save": verdict.save}
    if problem := verdict.eviction_problem():
        return Check(name, Status.FAIL, f"{problem}; the receiver reports not ready until then", details)
    if problem := verdict.persistence_problem():
        return Check(name, Status.WARN, problem, details)
    if verdict.unchecked:
        return Check(name, Status.WARN, f"could not check everything: {verdict.unchecked}", details)
    return Check(name, Status.OK, f"maxmemory-policy noeviction, "
                 f"{'AOF' if verdict.aof else 'RDB save ' + repr(verdict.save)}", details)


def _reconcile(settings: Settings, last: dict[str, Any] | None) -> Check:
    period = settings.reconcile_minutes * 60
    if last is None:
        if period <= 0:
            return Check("reconcile", Status.OK,
                         "never ran; periodic run disabled (CVAT_HOOKS_RECONCILE_MINUTES=0)")
        return Check("reconcile", Status.WARN, "never ran: the workers run it every "
                     f"{settings.reconcile_minutes:g} min once CVAT is configured "
                     "(or `cvat-hooks reconcile`)")
    age = time.time() - float(last.get("ts") or 0)
    reason = (f"last run {_ago(age)} ({last.get('trigger')}): checked {last.get('checked', 0)}, "
              f"redelivered {last.get('redelivered_count', 0)}, gave up on {last.get('gave_up_count', 0)}")
    if last.get("errors"):
        return Check("reconcile", Status.WARN, f"{reason}; error: {last['errors'][0]}", last)
    if period > 0 and age > 3 * period + 60:
        return Check("reconcile", Status.WARN, f"{reason}; expected every "
                     f"{settings.reconcile_minutes:g} min: are the workers running?", last)
    return Check("reconcile", Status.OK, reason, last)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
