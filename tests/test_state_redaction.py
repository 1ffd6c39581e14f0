"""Last-seen state snapshots (``cvat-hooks:state:*``) never hold a configured secret."""

from __future__ import annotations

import json
from pathlib import Path

from core.events import parse_event
from core.receipts import Batch, Receipts
from core.redaction import Redactor
from core.state import StateStore

PAYLOADS = Path(__file__).resolve().parent / "payloads"
SECRET = "tok-9f8e7d6c5b4a"


def _event_with_secret(delivery: str = "update_job_completed.json") -> object:
    """A captured CVAT delivery whose job carries the secret in text (a name, a URL's password)."""
    payload = json.loads(json.loads((PAYLOADS / "cvat-2.73" / delivery).read_text())["body_raw"])
    payload["job"]["url"] = f"https://bot:{SECRET}@cvat.example/api/jobs/1"
    payload["job"]["note"] = f"token is {SECRET}"
    return parse_event(json.dumps(payload).encode())


def _stored(redis: object) -> bytes:
    """Every byte under the state keys."""
    return b"".join(redis.get(key) or b"" for key in redis.keys("cvat-hooks:state:*"))  # type: ignore[attr-defined]


def test_snapshots_written_through_receipts_are_redacted(redis: object) -> None:
    """A delivery's snapshot, stored by the receipt script, has the secret and URL credentials masked."""
    receipts = Receipts(redis, StateStore(redis, 60, redactor=Redactor([SECRET])))  # type: ignore[arg-type]
    receipts.begin(_event_with_secret(), Batch())  # type: ignore[arg-type]
    stored = _stored(redis)
    assert stored and SECRET.encode() not in stored and b"bot:" not in stored


def test_snapshots_learned_from_cvat_are_redacted(redis: object) -> None:
    """Snapshots learned from CVAT's API are masked too."""
    store = StateStore(redis, 60, redactor=Redactor([SECRET]))  # type: ignore[arg-type]
    store.learn("job", [{"id": 41, "updated_date": "2026-01-01", "name": f"x {SECRET}"}])
    assert store.last("job", 41) == {"id": 41, "updated_date": "2026-01-01", "name": "x ***"}
    assert SECRET.encode() not in _stored(redis)


def test_an_actions_note_is_redacted_and_kept_as_the_other_steps(redis: object) -> None:
    """A note an action writes (``ctx.note``) has the secret and URL credentials masked, keeps its
    data (text beyond ASCII included), and is kept in the timeline for the retention."""
    from core.delivery_log import DeliveryLog, timeline_key

    log = DeliveryLog(redis, retention_seconds=600, redactor=Redactor([SECRET]))  # type: ignore[arg-type]
    log.action_note("d1", "j1", f"sent with {SECRET}", url=f"https://bot:{SECRET}@hooks.example/x", size="é")
    steps = redis.lrange(timeline_key("d1"), 0, -1)  # type: ignore[attr-defined]
    assert len(steps) == 1 and SECRET.encode() not in steps[0] and b"bot:" not in steps[0]
    step = json.loads(steps[0])
    assert {k: step[k] for k in ("job_id", "step", "message", "size")} == \
        {"job_id": "j1", "step": "note", "message": "sent with ***", "size": "é"}
    assert 0 < redis.ttl(timeline_key("d1")) <= 600  # type: ignore[attr-defined]
