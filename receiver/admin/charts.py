"""The UI's small charts, as numbers an inline SVG template draws (no JavaScript, no library).

Each chart is bars of deliveries with the failures of the same bucket over them, and a line of the
queue depth sampled in it, scaled to its own largest value (shown beside it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.delivery_log import INDEX_KEY
from core.history import Bucket, buckets

if TYPE_CHECKING:
    from redis import Redis

WIDTH = 600
"""Units across the SVG's view box (it scales to the page's width)."""
HEIGHT = 120
"""Units of height of the plotting area."""
SPANS = (("hour", "Last hour (per minute)", 3600, 60), ("day", "Last 24 hours (per 30 minutes)", 86400, 1800))
"""(id, title, seconds shown, seconds per bar) of each chart."""


@dataclass(frozen=True)
class Bar:
    """One bucket drawn: position, heights, and its figures for the tooltip."""

    x: float
    width: float
    delivered_h: float
    failed_h: float
    label: str


@dataclass(frozen=True)
class Chart:
    """One chart ready to draw."""

    id: str
    title: str
    bars: list[Bar]
    depth_points: str
    """SVG polyline points of the queue depth (empty without samples)."""
    total_deliveries: int
    total_failures: int
    top: int
    """The value the top of the plotting area stands for."""
    max_depth: int | None


def _chart(id_: str, title: str, data: list[Bucket], step: int) -> Chart:
    top = max([1, *(b.deliveries for b in data), *(b.failures for b in data), *(b.depth or 0 for b in data)])
    slot = WIDTH / max(len(data), 1)
    bars, points = [], []
    for i, b in enumerate(data):
        when = time.strftime("%H:%M", time.gmtime(b.start))
        label = f"{when} UTC: {b.deliveries} deliveries, {b.failures} failed" + (
            f", queue depth {b.depth}" if b.depth is not None else "")
        bars.append(Bar(round(i * slot + slot * 0.1, 2), round(slot * 0.8, 2),
                        round(HEIGHT * b.deliveries / top, 2), round(HEIGHT * b.failures / top, 2), label))
        if b.depth is not None:
            points.append(f"{round(i * slot + slot / 2, 2)},{round(HEIGHT - HEIGHT * b.depth / top, 2)}")
    depths = [b.depth for b in data if b.depth is not None]
    return Chart(id_, title, bars, " ".join(points), sum(b.deliveries for b in data),
                 sum(b.failures for b in data), top, max(depths) if depths else None)


def charts(redis: Redis, *, now: float | None = None) -> list[Chart]:
    """The hour and day charts, from :mod:`core.history` and the delivery index."""
    return [_chart(id_, title, buckets(redis, INDEX_KEY, span=span, step=step, now=now), step)
            for id_, title, span, step in SPANS]
