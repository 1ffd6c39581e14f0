"""Regenerate ``receiver/rules/payload_shapes.json``: which paths each CVAT event's payload has.

``rules check`` holds every condition path and template placeholder to these shapes. They are the
union of

- the deliveries in ``tests/payloads/`` (real CVAT 2.73 ones, and the examples of CVAT's webhook
  documentation), read as they are;
- the envelope CVAT's sender builds around the object (``cvat/apps/webhooks/signals.py``:
  ``event``, ``webhook_id``, the object under its resource name, ``sender``, and for ``update:*``
  ``before_update`` and ``changes``; ``event_handlers.py``: ``event``, ``request``, ``webhook_id``
  for ``completed:request[...]``; ``ping``: ``event``, ``webhook``, ``sender``);
- the fields of the read serializers CVAT serializes the object with (``SERIALIZER_FIELDS``, from
  CVAT 2.73's ``engine/serializers.py`` and ``organizations/serializers.py``, through
  ``cvat/apps/events/handlers.py:get_serializer``), for objects no delivery here shows.

A shape is ``"value"`` (text, number or boolean: no fields below), ``"*"`` (anything: not known, or
different between CVAT versions), a mapping of field names to shapes, or a one-item list holding
the shape of the list's items. Run ``.venv/bin/python -m tests.make_payload_shapes`` after adding a
delivery; ``tests/test_payload_shapes.py`` fails while the shipped file is out of date.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.cvat_events import EVENT_NAMES, PING, resource_of

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "payloads"
TARGET = ROOT / "receiver" / "rules" / "payload_shapes.json"

ANY = "*"
VALUE = "value"
_NULL = "null"  # seen only as null so far: the field's shape is still unknown

USER = {"url": VALUE, "id": VALUE, "username": VALUE, "first_name": VALUE, "last_name": VALUE}
"""``BasicUserSerializer``: ``sender``, ``owner``, ``assignee``, a membership's ``user``."""
STORAGE = {"id": VALUE, "location": VALUE, "cloud_storage_id": VALUE}
"""``StorageSerializer``: ``source_storage``, ``target_storage``."""
NESTED: dict[str, Any] = {"owner": USER, "assignee": USER, "user": USER, "source_storage": STORAGE,
                          "target_storage": STORAGE, "organization_info": {"id": VALUE, "slug": VALUE}}
"""Fields that hold one of CVAT's nested objects, whatever resource they are part of."""

SERIALIZER_FIELDS: dict[str, tuple[str, ...]] = {
    "project": ("url", "id", "name", "owner", "assignee", "guide_id", "bug_tracker", "task_subsets",
                "created_date", "updated_date", "status", "dimension", "organization", "organization_id",
                "target_storage", "source_storage", "tasks", "labels", "assignee_updated_date"),
    "task": ("url", "id", "name", "project_id", "project_name", "owner", "assignee", "bug_tracker",
             "created_date", "updated_date", "overlap", "segment_size", "status", "data_chunk_size",
             "data_original_chunk_type", "data_compressed_chunk_type", "data_cloud_storage_id", "guide_id",
             "size", "image_quality", "data", "dimension", "mode", "media_type", "subset", "organization_id",
             "organization", "target_storage", "source_storage", "jobs", "labels", "assignee_updated_date",
             "validation_mode", "consensus_enabled"),
    "job": ("url", "id", "task_id", "task_name", "project_id", "project_name", "assignee", "guide_id",
            "dimension", "mode", "media_type", "bug_tracker", "status", "stage", "state", "frame_count",
            "start_frame", "stop_frame", "data_chunk_size", "data_compressed_chunk_type",
            "data_original_chunk_type", "created_date", "updated_date", "issues", "labels", "type",
            "organization", "target_storage", "source_storage", "assignee_updated_date", "parent_job_id",
            "consensus_replicas", "replicas_count"),
    "issue": ("id", "frame", "position", "job", "owner", "assignee", "created_date", "updated_date",
              "resolved", "comments"),
    "comment": ("id", "issue", "owner", "message", "created_date", "updated_date"),
    "organization": ("id", "slug", "name", "description", "created_date", "updated_date", "contact", "owner"),
    "invitation": ("key", "created_date", "owner", "role", "user", "organization", "expired", "accepted",
                   "organization_info"),
    "membership": ("id", "user", "organization", "is_active", "joined_date", "role", "invitation"),
    "webhook": ("id", "url", "target_url", "description", "type", "content_type", "is_active", "enable_ssl",
                "created_date", "updated_date", "owner", "project_id", "project", "organization", "events",
                "last_status", "last_delivery_date"),
}
"""CVAT 2.73's read serializer fields per resource (``Meta.fields``). Server-wide events of newer CVAT
(``create:user``...) have none here: their object is ``"*"`` until a delivery shows it."""


def infer(value: Any) -> Any:
    """The shape of one JSON value."""
    if isinstance(value, dict):
        return {key: infer(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [infer(item) for item in value]
        merged: Any = _NULL
        for item in items:
            merged = merge(merged, item)
        return [merged]
    return _NULL if value is None else VALUE


def merge(a: Any, b: Any) -> Any:
    """One shape that allows every path either allows."""
    if a == _NULL:
        return b
    if b == _NULL or a == b:
        return a
    if isinstance(a, dict) and isinstance(b, dict):
        return {key: merge(a.get(key, _NULL), b.get(key, _NULL)) if key in a and key in b else a.get(key, b.get(key))
                for key in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list):
        return [merge(a[0], b[0])]
    return ANY  # a value here, an object or a list there (task.labels: a list in older CVAT, a link now)


def finish(shape: Any) -> Any:
    """Sorted keys, and fields only ever seen as null left open."""
    if shape == _NULL:
        return ANY
    if isinstance(shape, dict):
        return {key: finish(shape[key]) for key in sorted(shape)}
    if isinstance(shape, list):
        return [finish(shape[0])]
    return shape


def serializer_shape(resource: str) -> Any:
    """What the read serializer says of a resource's object (nested objects known, other fields open)."""
    fields = SERIALIZER_FIELDS.get(resource)
    if fields is None:
        return ANY
    return {field: NESTED.get(field, _NULL) for field in fields}


def envelope(name: str, request: Any) -> dict[str, Any]:
    """The payload CVAT's sender builds for an event, without samples."""
    if name == PING:
        return {"event": VALUE, "webhook": serializer_shape("webhook"), "sender": USER}
    resource = resource_of(name)
    assert resource is not None
    if resource == "request":
        return {"event": VALUE, "webhook_id": VALUE, "request": request}
    shape: dict[str, Any] = {"event": VALUE, "webhook_id": VALUE, resource: serializer_shape(resource),
                             "sender": USER}
    if name.startswith("update:"):
        # Keyed by model attribute (assignee_id, not assignee: signals.py), whatever changed: open.
        shape.update(before_update=ANY, changes=ANY)
    return shape


def samples() -> list[dict[str, Any]]:
    """Every delivery body in tests/payloads."""
    bodies = []
    for path in sorted(SAMPLES.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if "body_raw" in data and "event" not in data:
            data = json.loads(data["body_raw"])
        bodies.append(data)
    return bodies


def build() -> dict[str, Any]:
    """The file's content."""
    seen: dict[str, Any] = {}
    for body in samples():
        seen[body["event"]] = merge(seen.get(body["event"], _NULL), infer(body))
    request: Any = _NULL  # every completed:request[...] carries RequestSerializer's object
    for name, shape in seen.items():
        if resource_of(name) == "request":
            request = merge(request, shape["request"])
    events = {}
    for name in EVENT_NAMES:
        shape = envelope(name, request)
        for sample_name, sample in seen.items():
            resource = resource_of(name)
            if sample_name == name:
                shape = merge(shape, sample)
            elif resource not in (None, "request", "webhook") and resource_of(sample_name) == resource:
                shape[resource] = merge(shape[resource], sample[resource])  # one object, whatever the action
        events[name] = finish(shape)
    return {"about": "Paths of CVAT's webhook payloads, per event; generated by tests/make_payload_shapes.py "
                     "from tests/payloads and CVAT 2.73's serializers. '*': anything; 'value': no fields below.",
            "cvat_version": "2.73.0", "events": events}


def render() -> str:
    """The file's text."""
    return json.dumps(build(), indent=1, sort_keys=False) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render(), encoding="utf-8")
    print(f"{TARGET}: {len(build()['events'])} events")
