"""A delivery's three round trips to Redis, so the receiver answers fast and stores an event once.

:meth:`Receipts.claim` watches the event's seen key (``WATCH``) for the whole delivery. ``begin``
(one Lua script): was this event stored before? Then note the duplicate (delivery log, metric) and
stop. Otherwise swap the resource's last-seen state (``core.state``) and say what was there,
which the rules need. :meth:`Claim.commit`: one ``MULTI``/``EXEC`` on a real redis-py pipeline that
marks the event seen and holds the delivery record and the metrics (one script call, from a
:class:`Batch`) and its RQ jobs, written there by RQ's own ``Queue.enqueue_many``; if another
receiver stored the event since the ``WATCH``, Redis applies none of it and a duplicate is noted
instead (issue 5: one script per step and no separate call per duplicate).
``tests/test_dispatch_round_trips.py`` pins what one delivery sends.

A duplicate's writes (delivery log, metric) are collected in a :class:`Batch` and applied inside the
``begin`` script, only when the event turns out to be one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, WatchError

from core.keys import SEEN_KEY
from core.state import SWAP_FUNCTION, Seen, StateStore, seen_from

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline
    from redis.commands.core import Script

    from core.events import Event

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

# ARGV: the ops of a commit's own writes (seen key, delivery record, metrics). Sent with EVAL, never
# EVALSHA, inside the commit's MULTI: a script missing from Redis' cache (a restart, SCRIPT FLUSH)
# would fail there alone while RQ's jobs beside it were applied.
_STORE = _APPLY + """
apply(1, #ARGV)
return 1
"""

class Batch:
    """Redis writes to apply later inside one of this module's scripts (a duplicate's in ``begin``, a
    new delivery's own in the commit): the part of a pipeline's interface that the delivery log and
    the metrics use."""

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
    """Runs a delivery's round trips (see the module docstring)."""

    def __init__(self, redis: Redis, state: StateStore) -> None:
        self.redis = redis
        self.state = state
        self._begin = redis.register_script(_BEGIN)

    @contextmanager
    def claim(self, event: Event) -> Iterator[Claim]:
        """Watch ``event``'s seen key while inside: :meth:`Claim.commit` stores the event only if no
        one stored it since."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.watch(SEEN_KEY.format(event.delivery_id))
            yield Claim(self, event, pipe)

    def begin(self, event: Event, if_duplicate: Batch, claim: Claim | None = None) -> Begun:
        """Check for a duplicate (applying ``if_duplicate`` then) and swap the last-seen state.

        With the event's ``claim``, the script runs on the claim's watching connection instead of
        one more from the pool (measured: about 30 us less per delivery, redis-py's checkout and its
        readiness check)."""
        swap = self.state.swap_for(event)
        key, args = swap if swap is not None else ("", ["", "", "", 0])
        keys = [SEEN_KEY.format(event.delivery_id), key]
        if claim is None:
            reply = self._begin(keys=keys, args=[*args, *if_duplicate.args])
        else:
            reply = claim.run(self._begin, keys, [*args, *if_duplicate.args])
        seen = seen_from(reply)
        if seen.source == "duplicate":
            return Begun(True, Seen("untracked", None))
        return Begun(False, seen)

    def note_duplicate(self, event: Event, if_duplicate: Batch) -> None:
        """Apply ``if_duplicate``, the event being stored already (the ``begin`` script, untracked)."""
        self._begin(keys=[SEEN_KEY.format(event.delivery_id), ""], args=["", "", "", 0, *if_duplicate.args])


@dataclass
class Claim:
    """One delivery's watched transaction (:meth:`Receipts.claim`)."""

    receipts: Receipts
    event: Event
    pipe: Pipeline

    def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` at once on the watching connection (loading it first if Redis lost it).

        Not ``script(client=pipe)``: redis-py then re-checks every script the pipeline used with a
        ``SCRIPT EXISTS`` round trip when the transaction executes."""
        try:
            return self.pipe.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.pipe.script_load(script.script)
            return self.pipe.evalsha(script.sha, len(keys), *keys, *args)

    def stored_before(self) -> bool:
        """Whether the event was stored already (for an event ``begin`` does not look at: a ping)."""
        return bool(self.pipe.exists(SEEN_KEY.format(self.event.delivery_id)))

    def commit(self, seen_value: int, seconds: int, writes: Callable[[Pipeline], object],
               if_duplicate: Batch, ours: Batch | None = None) -> bool:
        """Mark the event seen for ``seconds`` and apply ``ours`` and ``writes`` in one transaction,
        unless the event was stored since the claim began; then ``if_duplicate`` is applied instead
        and this returns False.

        ``writes`` queues on the real MULTI pipeline (RQ's jobs, by RQ's ``enqueue_many``); ``ours``
        (the delivery record, the metrics) and the seen mark go in the same MULTI as one script call,
        because redis-py's client cost is per command (about 5 us each on the bench host, besides
        about 80 us per round trip): 8 commands of ours became 1 (bench/intake.py's delivery, 20
        commands in the transaction -> 13)."""
        own = Batch()
        own.set(SEEN_KEY.format(self.event.delivery_id), seen_value, ex=seconds)
        self.pipe.multi()
        self.pipe.eval(_STORE, 0, *own.args, *(ours.args if ours is not None else ()))
        writes(self.pipe)
        try:
            self.pipe.execute()
        except WatchError:
            self.receipts.note_duplicate(self.event, if_duplicate)
            return False
        return True
