"""What the receiver last saw of each project, task and job, for ``changed``/``became``/``was``.

CVAT 2.73 sends ``before_update`` and ``changes`` with ``update:*`` events, but newer CVAT drops
them, so transitions must also work from the receiver's own memory. One Lua script per event
compares the event's ``updated_date`` with what was last seen and swaps the snapshot atomically, so
two receivers racing on the same job cannot both claim the same transition, and an older event
arriving late (CVAT does not guarantee order) never moves the state backwards.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.cvat_events import TRACKED_RESOURCES
from core.keys import STATE_KEY as KEY
from core.redaction import Redactor

if TYPE_CHECKING:
    from redis import Redis

    from core.events import Event

TRACKED = frozenset(TRACKED_RESOURCES)
"""Resources whose last-seen state is kept (those with a lifecycle rules care about)."""

# swap(key, updated_date, delivery_id, snapshot_json, ttl) -> {source, previous-snapshot-json}.
# The delivery that last set the state is remembered with the snapshot it replaced, so the same
# delivery processed again (a retry after a 503, or a second receiver) gets the same answer instead
# of "no change". core.receipts runs it inside the script that also checks for duplicates.
# A snapshot learned from CVAT's API (its delivery id is 'learned') is only the old state of events
# newer than it. With the event's own ``updated_date`` it is the state this very event produced, not
# the one before it; an older event (a late or redelivered one) was never compared with it by a
# delivery, so it is not "stale" either. Both are first sight: CVAT's own ``before_update``, when
# sent, still decides.
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
  if st.d == 'learned' and new_u ~= '' and new_u <= st.u then
    if new_u == st.u then
      redis.call('SET', key, cjson.encode({u=new_u, d=new_d, s=new_s, p=''}), 'EX', ttl)
    end
    return {'unknown', ''}
  end
  if new_u ~= '' and st.u ~= '' and new_u < st.u then
    return {'stale', st.s}
  end
  redis.call('SET', key, cjson.encode({u=new_u, d=new_d, s=new_s, p=st.s}), 'EX', ttl)
  return {'last-seen', st.s}
end
"""

# learn(keys..., ttl, u1, s1, u2, s2...) -> how many keys were new. Only a resource with no state yet
# gets one: what a delivery taught us is never replaced, so an update still in flight (or waiting
# for reconcile) is judged against the state before it, not against its own result.
_LEARN = """
local ttl = tonumber(ARGV[1])
local written = 0
for i, key in ipairs(KEYS) do
  local value = cjson.encode({u=ARGV[2 * i], d='learned', s=ARGV[2 * i + 1], p=''})
  if redis.call('SET', key, value, 'NX', 'EX', ttl) then written = written + 1 end
end
return written
"""


@dataclass(frozen=True)
class Seen:
    """The answer of the state store for one event."""

    source: str
    """``last-seen`` (snapshot is what we saw before), ``unknown`` (first sight), ``stale`` (the
    event is older than what we already saw; snapshot is that newer state), ``untracked``."""
    snapshot: dict[str, Any] | None


class StateStore:
    """Last-seen snapshots of tracked resources, in Redis, expiring after ``ttl_seconds`` idle."""

    def __init__(self, redis: Redis, ttl_seconds: int, *, redactor: Redactor | None = None) -> None:
        self.redis = redis
        self.ttl = ttl_seconds
        self.redact = redactor or Redactor()
        """Masks configured secrets in every snapshot before it is stored (``Settings.sensitive_values``)."""
        self._learn = redis.register_script(_LEARN)

    def swap_for(self, event: Event) -> tuple[str, list[Any]] | None:
        """The key and arguments of ``swap`` for this event; ``None`` when its resource is not tracked."""
        obj = event.obj
        if event.resource not in TRACKED or obj is None or event.resource_id is None:
            return None
        key = KEY.format(resource=event.resource, id=event.resource_id)
        return key, [event.updated_date or "", event.delivery_id, self._pack(obj), self.ttl]

    def learn(self, resource: str, objects: list[dict[str, Any]]) -> int:
        """Keep CVAT's current view of resources we hold no state for; return how many were new.

        ``objects`` are API answers (``GET /api/jobs`` items), the same serializer CVAT's webhook
        payloads use, so a later ``became`` compares like with like.
        """
        keys: list[str] = []
        args: list[str | int] = [self.ttl]
        for obj in objects:
            if resource not in TRACKED or not isinstance(obj.get("id"), int):
                continue
            keys.append(KEY.format(resource=resource, id=obj["id"]))
            args += [str(obj.get("updated_date") or ""), self._pack(obj)]
        return int(self._learn(keys=keys, args=args)) if keys else 0

    def _pack(self, obj: dict[str, Any]) -> str:
        """A snapshot as stored: secrets masked, and compressed when that pays (the scripts never
        look inside it, so it stays opaque text for them)."""
        text = self.redact.dumps(obj)
        if len(text) <= PACK_OVER:
            return text
        packed = PACKED + base64.b64encode(zlib.compress(text.encode("utf-8"), 6)).decode("ascii")
        return packed if len(packed) < len(text) else text

    def last(self, resource: str, resource_id: int) -> dict[str, Any] | None:
        """The last snapshot seen of a resource (for the admin views and tests)."""
        raw = self.redis.get(KEY.format(resource=resource, id=resource_id))
        return unpack(json.loads(raw)["s"]) if raw else None


PACKED = "z:"
"""Prefix of a compressed snapshot (base64 of zlib; plain JSON starts with ``{``)."""
PACK_OVER = 512
"""Characters of JSON above which a snapshot is stored compressed."""


def unpack(stored: str | bytes) -> dict[str, Any]:
    """A stored snapshot back as the object (plain JSON, or compressed by ``StateStore._pack``)."""
    text = stored.decode("utf-8") if isinstance(stored, bytes) else stored
    if text.startswith(PACKED):
        text = zlib.decompress(base64.b64decode(text[len(PACKED):])).decode("utf-8")
    return json.loads(text)


def seen_from(reply: list[Any]) -> Seen:
    """Read ``swap``'s ``{source, previous-snapshot}``."""
    source, previous = reply
    source = source.decode() if isinstance(source, bytes) else source
    return Seen(source, unpack(previous) if previous else None)
