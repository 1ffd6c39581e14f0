"""What the receiver last saw of each project, task and job, for ``changed``/``became``/``was``.

CVAT 2.73 sends ``before_update`` and ``changes`` with ``update:*`` events, but newer CVAT drops
them, so transitions must also work from the receiver's own memory. One Lua script per event
compares the event's ``updated_date`` with what was last seen and swaps the snapshot atomically, so
two receivers racing on the same job cannot both claim the same transition, and an older event
arriving late (CVAT does not guarantee order) never moves the state backwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis import Redis

    from receiver.events import Event

TRACKED = frozenset({"project", "task", "job"})
"""Resources whose last-seen state is kept (those with a lifecycle rules care about)."""

KEY = "cvat-hooks:state:{resource}:{id}"

# swap(key, updated_date, delivery_id, snapshot_json, ttl) -> {source, previous-snapshot-json}.
# The delivery that last set the state is remembered with the snapshot it replaced, so the same
# delivery processed again (a retry after a 503, or a second receiver) gets the same answer instead
# of "no change". receiver.receipts runs it inside the script that also checks for duplicates.
SWAP_FUNCTION = """
local function swap(key, new_u, new_d, new_s, ttl)
  local cur = redis.call('GET', key)
  if not cur then
    redis.call('SET', key, cjson.encode({u=new_u, d=new_d, s=new_s, p=''}), 'EX', ttl)
    return {'unknown', ''}
  end
  local st = cjson.decode(cur)
  if st.d == new_d then
    if st.p == '' then return {'unknown', ''} end
    return {'last-seen', st.p}
  end
  if new_u ~= '' and st.u ~= '' and new_u < st.u then
    return {'stale', st.s}
  end
  redis.call('SET', key, cjson.encode({u=new_u, d=new_d, s=new_s, p=st.s}), 'EX', ttl)
  return {'last-seen', st.s}
end
"""
_SWAP = SWAP_FUNCTION + "return swap(KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))"


@dataclass(frozen=True)
class Seen:
    """The answer of the state store for one event."""

    source: str
    """``last-seen`` (snapshot is what we saw before), ``unknown`` (first sight), ``stale`` (the
    event is older than what we already saw; snapshot is that newer state), ``untracked``."""
    snapshot: dict[str, Any] | None


class StateStore:
    """Last-seen snapshots of tracked resources, in Redis, expiring after ``ttl_seconds`` idle."""

    def __init__(self, redis: Redis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl = ttl_seconds
        self._swap = redis.register_script(_SWAP)

    def observe(self, event: Event) -> Seen:
        """Record this event's view of its resource and say what we had seen before it."""
        swap = self.swap_for(event)
        if swap is None:
            return Seen("untracked", None)
        key, args = swap
        return seen_from(self._swap(keys=[key], args=args))

    def swap_for(self, event: Event) -> tuple[str, list[Any]] | None:
        """The key and arguments of ``swap`` for this event; ``None`` when its resource is not tracked."""
        obj = event.obj
        if event.resource not in TRACKED or obj is None or event.resource_id is None:
            return None
        key = KEY.format(resource=event.resource, id=event.resource_id)
        return key, [event.updated_date or "", event.delivery_id, json.dumps(obj), self.ttl]

    def last(self, resource: str, resource_id: int) -> dict[str, Any] | None:
        """The last snapshot seen of a resource (for the admin views and tests)."""
        raw = self.redis.get(KEY.format(resource=resource, id=resource_id))
        return json.loads(json.loads(raw)["s"]) if raw else None


def seen_from(reply: list[Any]) -> Seen:
    """Read ``swap``'s ``{source, previous-snapshot-json}``."""
    source, previous = reply
    source = source.decode() if isinstance(source, bytes) else source
    return Seen(source, json.loads(previous) if previous else None)
