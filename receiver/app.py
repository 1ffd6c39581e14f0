"""The Flask application factory: wiring only, nothing built at import time."""

from __future__ import annotations

import logging

from flask import Flask
from redis import Redis

from core import metrics
from core.delivery_log import DeliveryLog
from core.receipts import Receipts
from core.redaction import Redactor
from core.redis_conn import DurabilityCheck, connect
from core.state import StateStore
from receiver import views
from receiver.admin import init_admin
from receiver.current import EXTENSION
from receiver.dispatch import Intake
from receiver.endpoint import WebhookEndpoint
from receiver.journal import Journal
from receiver.rules import RuleStore
from receiver.rules.store import LastGoodRules
from receiver.settings import Settings, process_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, redis: Redis | None = None) -> Flask:
    """Build the receiver app; refuses to start without a webhook secret or with bad rules."""
    settings = settings or process_settings()
    settings.require_secret()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    intake = init_intake(app, settings, redis)
    app.wsgi_app = WebhookEndpoint(app.wsgi_app, intake)  # type: ignore[method-assign]
    app.register_blueprint(views.bp)
    init_admin(app)
    return app


def init_intake(app: Flask, settings: Settings, redis: Redis | None = None) -> Intake:
    """Hang the delivery pipeline's resources on ``app.extensions``."""
    redis = redis or connect(settings.redis_url)
    redactor = Redactor(settings.sensitive_values())
    intake = Intake(
        settings=settings,
        redis=redis,
        rules=RuleStore(settings.rules_path, last_good=LastGoodRules(settings.data_dir, redis)),
        deliveries=DeliveryLog(redis, retention_seconds=settings.workers.retention_seconds, redactor=redactor),
        receipts=Receipts(redis, StateStore(redis, settings.state_seconds, redactor=redactor)),
        redactor=redactor,
        journal=Journal(settings.data_dir / "journal", max_bytes=settings.journal_max_bytes,
                        on_damaged=lambda reason: metrics.safe_inc(redis, "cvat_hooks_rejected_total",
                                                                   reason="journal_damaged")),
    )
    if intake.journal.pending():
        intake.start_journal_drain()  # left over from a receiver that stopped while Redis was down
    app.extensions[EXTENSION] = intake
    intake.rules.watch()  # per process: each gunicorn worker holds, reloads and reports its own rules
    app.extensions["cvat_hooks_durability"] = warn_if_redis_can_lose_data(DurabilityCheck(redis))
    return intake


def warn_if_redis_can_lose_data(check: DurabilityCheck) -> DurabilityCheck:
    """Say loudly at start when Redis can drop what we acknowledge (``/readyz`` refuses an evicting one)."""
    verdict = check.get()
    if problem := verdict.eviction_problem():
        log.error("redis: NOT READY: %s", problem)
    if problem := verdict.persistence_problem():
        log.warning("redis: %s", problem)
    if verdict.unchecked:
        log.info("redis: durability could not be fully checked: %s", verdict.unchecked)
    return check
