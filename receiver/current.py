"""Where ``receiver.app`` hangs the delivery pipeline's resources, and how a view gets them back."""

from __future__ import annotations

from flask import current_app

from receiver.dispatch import Intake

EXTENSION = "cvat_hooks"
"""The ``app.extensions`` key of the app's :class:`~receiver.dispatch.Intake`."""


def intake() -> Intake:
    """The app's resources, for the request being served (the intake, admin API and UI views)."""
    intake: Intake = current_app.extensions[EXTENSION]
    return intake
