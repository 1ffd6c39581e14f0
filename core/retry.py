"""The retry policy of an action: how many more runs a transient failure earns, and when."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_BACKOFF: tuple[float, ...] = (10, 60, 300, 1800, 7200)
"""Seconds before each retry: 10 s, 1 min, 5 min, 30 min, 2 h (CVAT itself retries for about 4 days)."""

DEFAULT_JITTER = 0.2
"""Each interval is stretched or shrunk by up to this fraction, so a burst of failures does not
retry in lock-step against a CVAT server that is just coming back."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries after the first run; ``attempts`` counts retries, ``backoff`` their delays in seconds.

    When there are more attempts than delays, the last delay repeats (RQ repeats the first one,
    which would retry a long outage every 10 s).
    """

    attempts: int = len(DEFAULT_BACKOFF)
    backoff: tuple[float, ...] = field(default=DEFAULT_BACKOFF)
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or self.attempts < 0:
            raise ValueError(f"retry attempts must be a whole number >= 0, not {self.attempts!r}")
        if self.attempts and not self.backoff:
            raise ValueError("retry backoff must list at least one delay when attempts > 0")
        for delay in self.backoff:
            if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
                raise ValueError(f"retry backoff delays must be numbers of seconds >= 0, not {delay!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"retry jitter must be in [0, 1), not {self.jitter!r}")
        object.__setattr__(self, "backoff", tuple(self.backoff))

    def delays(self, rng: random.Random | None = None) -> list[int]:
        """The delay before each retry, in whole seconds (RQ's unit), jitter applied.

        Without ``rng``, the jitter comes from the ``random`` module's own generator, which Python
        reseeds in every forked process; a new ``random.Random()`` per call seeded itself from
        ``os.urandom`` each time, which showed in the receiver's time per delivery."""
        uniform = rng.uniform if rng is not None else random.uniform
        base: Sequence[float] = list(self.backoff[: self.attempts])
        if self.attempts > len(self.backoff):
            base = list(base) + [self.backoff[-1]] * (self.attempts - len(self.backoff))
        return [max(0, round(d * (1 + uniform(-self.jitter, self.jitter)))) for d in base]

    def to_json(self) -> dict[str, object]:
        """The JSON form carried in a job's arguments."""
        return {"attempts": self.attempts, "backoff": list(self.backoff), "jitter": self.jitter}

    @classmethod
    def from_json(cls, data: dict[str, object] | None) -> RetryPolicy:
        """Rebuild a policy from :meth:`to_json` (or the defaults for ``None``)."""
        if not data:
            return cls()
        return cls(
            attempts=data.get("attempts", len(DEFAULT_BACKOFF)),  # type: ignore[arg-type]
            backoff=tuple(data.get("backoff", DEFAULT_BACKOFF)),  # type: ignore[arg-type]
            jitter=data.get("jitter", DEFAULT_JITTER),  # type: ignore[arg-type]
        )
