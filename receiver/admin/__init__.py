"""The admin side of the receiver: a JSON API under ``/api/`` and a web page under ``/ui/``.

Both read the delivery log, rules and queues the intake already hangs on ``app.extensions``, and
both are closed unless ``CVAT_HOOKS_ADMIN_TOKEN`` is set (see :mod:`receiver.admin.auth`).
"""

from __future__ import annotations

from flask import Flask


def init_admin(app: Flask) -> None:
    """Register the admin API and UI blueprints (after :func:`receiver.app.init_intake`)."""
    from receiver.admin import api, ui

    app.register_blueprint(api.bp)
    app.register_blueprint(ui.bp)
