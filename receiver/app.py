"""The Flask application factory: wiring only, nothing built at import time."""

from __future__ import annotations

from flask import Flask
from redis import Redis

from receiver import views
from receiver.admin import init_admin
from receiver.dispatch import Intake
from receiver.journal import Journal
from receiver.receipts import Receipts
from receiver.rules import RuleStore
from receiver.settings import Settings
from receiver.state import StateStore
from workers.delivery_log import DeliveryLog
from workers.redaction import Redactor
from workers.redis_conn import connect


def create_app(settings: Settings | None = None, *, redis: Redis | None = None) -> Flask:
    """Build the receiver app; refuses to start without a webhook secret or with bad rules."""
    settings = settings or Settings.from_env()
    settings.require_secret()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    init_intake(app, settings, redis)
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
        rules=RuleStore(settings.rules_path),
        deliveries=DeliveryLog(redis, retention_seconds=settings.workers.retention_seconds, redactor=redactor),
        receipts=Receipts(redis, StateStore(redis, settings.state_seconds)),
        redactor=redactor,
        journal=Journal(settings.data_dir / "journal", max_bytes=settings.journal_max_bytes),
    )
    if intake.journal.pending():
        intake.start_journal_drain()  # left over from a receiver that stopped while Redis was down
    app.extensions["cvat_hooks"] = intake
    return intake
