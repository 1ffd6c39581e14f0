"""A delivery's two round trips to Redis, each one Lua script, so the receiver answers fast.

``begin``: was this event stored before? Then note the duplicate (delivery log, metric) and stop.
Otherwise swap the resource's last-seen state (``receiver.state``) and say what was there, which the
rules need. ``commit``: claim the event (``SET NX`` on its seen key) and, only if this call claimed
it, apply the delivery record, its RQ jobs and the metrics; if another receiver claimed it first,
note a duplicate instead. Both are atomic like MULTI, but one round trip each and with the check
inside, where WATCH/EXISTS/MULTI/EXEC took four and a separate call per duplicate (issue 5).

The writes are collected in a :class:`Batch` by the code that owns them: the delivery log, the
metrics, and RQ's own ``Queue.enqueue_many``, which is given the batch as its pipeline, so queued
jobs are exactly what RQ writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from receiver.state import SWAP_FUNCTION, Seen, StateStore, seen_from

if TYPE_CHECKING:
    from redis import Redis

    from receiver.events import Event

SEEN_KEY = "cvat-hooks:seen:{}"

# ops: a flat ARGV slice of commands, each as <argc> <command> <args...>; the pseudo command
# IFEXISTS <key> <n> skips the next n commands when key does not exist.
_APPLY = """
local function apply(from, to)
  local i = from
  while i <= to do
    local n = tonumber(ARGV[i])
    if ARGV[i + 1] == 'IFEXISTS' then
      if redis.call('EXISTS', ARGV[i + 2]) == 0 then
        local skip = tonumber(ARGV[i + 3])
        i = i + n + 1
        for _ = 1, skip do i = i + tonumber(ARGV[i]) + 1 end
      else
        i = i + n + 1
      end
    else
      redis.call(unpack(ARGV, i + 1, i + n))
      i = i + n + 1
    end
  end
end
"""

# KEYS: seen key, state key ('' when untracked). ARGV: 4 swap args, then the duplicate's ops.
_BEGIN = _APPLY + SWAP_FUNCTION + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  apply(5, #ARGV)
  return {'duplicate', ''}
end
if KEYS[2] == '' then return {'untracked', ''} end
return swap(KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))
"""

# KEYS: seen key. ARGV: seen value, seconds, n = length of the new event's ops, its ops, then the
# duplicate's ops. Returns 1 when this call stored the event, 0 when it was a duplicate.
_COMMIT = _APPLY + """
local split = 3 + tonumber(ARGV[3])
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  apply(4, split)
  return 1
end
apply(split + 1, #ARGV)
return 0
"""


class Batch:
    """Redis writes to apply later inside a script: the part of a pipeline's interface that our
    delivery log and metrics use, and that RQ's ``enqueue_many`` uses with a pipeline."""

    def __init__(self) -> None:
        self.args: list[Any] = []

    def __len__(self) -> int:
        return len(self.args)

    def _op(self, *args: Any) -> None:
        self.args.append(len(args))
        self.args.extend(args)

    @contextmanager
    def if_exists(self, key: str) -> Iterator[None]:
        """The writes made inside apply only if ``key`` exists when the script runs."""
        self._op("IFEXISTS", key, 0)
        at = len(self.args) - 1
        before = self._count()
        yield
        self.args[at] = self._count() - before

    def _count(self) -> int:
        i = count = 0
        while i < len(self.args):
            i += self.args[i] + 1
            count += 1
        return count

    def hset(self, name: str, key: Any = None, value: Any = None, mapping: Mapping[Any, Any] | None = None,
             items: list[Any] | None = None) -> None:
        pairs: list[Any] = [key, value] if key is not None else []
        for k, v in (mapping or {}).items():
            pairs += [k, v]
        pairs += items or []
        self._op("HSET", name, *pairs)

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self._op("HINCRBY", name, key, amount)

    def hincrbyfloat(self, name: str, key: str, amount: float = 1.0) -> None:
        self._op("HINCRBYFLOAT", name, key, amount)

    def set(self, name: str, value: Any, ex: int | None = None) -> None:
        self._op("SET", name, value, *(("EX", int(ex)) if ex else ()))

    def expire(self, name: str, time: int) -> None:
        self._op("EXPIRE", name, int(time))

    def rpush(self, name: str, *values: Any) -> None:
        self._op("RPUSH", name, *values)

    def lpush(self, name: str, *values: Any) -> None:
        self._op("LPUSH", name, *values)

    def sadd(self, name: str, *values: Any) -> None:
        self._op("SADD", name, *values)

    def zadd(self, name: str, mapping: Mapping[Any, float]) -> None:
        args: list[Any] = []
        for member, score in mapping.items():
            args += [score, member]
        self._op("ZADD", name, *args)

    def zremrangebyscore(self, name: str, min: Any, max: Any) -> None:  # noqa: A002 (redis-py's names)
        self._op("ZREMRANGEBYSCORE", name, min, max)


@dataclass(frozen=True)
class Begun:
    """What ``begin`` found: a duplicate, or the state the rules compare against."""

    duplicate: bool
    seen: Seen


class Receipts:
    """Runs the two scripts of a delivery (see the module docstring)."""

    def __init__(self, redis: Redis, state: StateStore) -> None:
        self.redis = redis
        self.state = state
        self._begin = redis.register_script(_BEGIN)
        self._commit = redis.register_script(_COMMIT)

    def begin(self, event: Event, if_duplicate: Batch) -> Begun:
        """Check for a duplicate (applying ``if_duplicate`` then) and swap the last-seen state."""
        swap = self.state.swap_for(event)
        key, args = swap if swap is not None else ("", ["", "", "", 0])
        reply = self._begin(keys=[SEEN_KEY.format(event.delivery_id), key], args=[*args, *if_duplicate.args])
        seen = seen_from(reply)
        if seen.source == "duplicate":
            return Begun(True, Seen("untracked", None))
        return Begun(False, seen)

    def commit(self, event: Event, seen_value: int, seconds: int, writes: Batch, if_duplicate: Batch) -> bool:
        """Claim the event and apply ``writes``; ``False`` (and ``if_duplicate`` applied) if it was taken."""
        stored = self._commit(keys=[SEEN_KEY.format(event.delivery_id)],
                              args=[seen_value, seconds, len(writes), *writes.args, *if_duplicate.args])
        return bool(stored)
