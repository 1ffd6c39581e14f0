"""The admin side of the receiver: a JSON API under ``/api/`` and a web page under ``/ui/``.

Both read the delivery log, rules and queues the intake already hangs on ``app.extensions``, and
both are closed unless ``CVAT_HOOKS_ADMIN_TOKEN`` is set (see :mod:`receiver.admin.auth`).
"""

from __future__ import annotations

from typing import Any

from flask import Flask


def init_admin(app: Flask) -> None:
    """Register the admin API and UI blueprints (after :func:`receiver.app.init_intake`); with the
    admin open, sample the queue depth once a minute for the UI's charts (:mod:`core.history`)."""
    from receiver.admin import api, auth, ui
    from receiver.current import EXTENSION

    app.register_blueprint(api.bp)
    app.register_blueprint(ui.bp)
    intake = app.extensions[EXTENSION]
    if auth.disabled_reason(intake.settings) is None:
        from core.history import start_sampler

        start_sampler(intake, lambda owner: owner.redis, queue_depth)


def queue_depth(redis: Any) -> int:
    """Jobs waiting in every queue (one ``LLEN`` each)."""
    from core.contract import QUEUES
    from core.queueing import queue

    return sum(queue(name, redis).count for name in QUEUES)
