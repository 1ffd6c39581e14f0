"""gunicorn's own log lines and its access log in the one format of every cvat-hooks process.

gunicorn formats its lines itself (``[2026-...] [pid] [INFO] ...``, and access lines with a date of
their own), and the receiver's gunicorn workers are not started by the ``cvat-hooks`` command that
configures logging, so without this their lines had no common shape and the receiver's own INFO lines
were lost. ``serve`` names this class with ``--logger-class`` (gunicorn's documented way to change its
logging): gunicorn's handlers give way to ``core.logs``' one handler on the root logger, set up in
gunicorn's master before it forks its workers, which inherit it.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger  # type: ignore[import-untyped]

from core.logs import configure
from core.redaction import Redactor
from receiver.settings import Settings, use_process_settings


class GunicornLogger(Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's logger, writing through ``core.logs`` (text or JSON, secrets masked)."""

    def setup(self, cfg: Any) -> None:
        """gunicorn's set-up (levels, access log on), then its handlers replaced by the root logger's."""
        super().setup(cfg)
        try:
            settings = Settings.from_env()
            use_process_settings(settings)  # create_app, in the workers gunicorn forks, reads them
            configure(settings.log_format, redactor=Redactor(settings.sensitive_values()),
                      level=settings.log_level)
        except ValueError:  # a bad setting is reported by create_app, which refuses to start on it
            configure()
        for logger in (self.error_log, self.access_log):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
