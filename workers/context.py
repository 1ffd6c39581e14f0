"""What an action gets to do its work: the call, CVAT, storage, Redis, and a way to note steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.contract import ActionCall
from core.settings import WorkerSettings

if TYPE_CHECKING:
    from redis import Redis

    from workers.gateway import CvatGateway


@dataclass
class ActionContext:
    """Built by ``workers.jobs`` for one run of one action."""

    call: ActionCall
    settings: WorkerSettings
    redis: Redis
    gateway_factory: Callable[[], CvatGateway]
    note: Callable[..., None] = field(default=lambda message, **data: None)
    """``note("message", key=value)`` adds a step to the delivery's timeline."""
    _gateway: CvatGateway | None = None

    @property
    def params(self) -> dict[str, Any]:
        return self.call.params

    @property
    def event(self) -> dict[str, Any]:
        return self.call.event

    @property
    def gateway(self) -> CvatGateway:
        """The CVAT client, made on first use (a notify action never needs one)."""
        if self._gateway is None:
            self._gateway = self.gateway_factory()
        return self._gateway

    def close(self) -> None:
        """Release what the run opened (the CVAT client's connections), if it opened anything."""
        close = getattr(self._gateway, "close", None)
        if close is not None:
            close()
