"""Re-record the answers of the CVAT contract (``tests/contract/cvat-2.73.json``).

The fixture's requests are data, edited by hand; this script rewrites only each exchange's
``response`` (status, content type, ``Vary: Accept``, body kind, JSON shape and the values named by
``check_values``). Two sources:

From a real CVAT (creates its own organization, user, project and tasks, and deletes them)::

    CVAT_HOOKS_TEST_CVAT_URL=http://127.0.0.1:8080 \\
    CVAT_HOOKS_TEST_CVAT_USERNAME=admin CVAT_HOOKS_TEST_CVAT_PASSWORD=... \\
    .venv/bin/python -m tests.contract.record

From the recorded exchanges of ``/work/shared/cvat-api-2.73`` (only exchanges with a
``recorded_seq``; the others keep their answer)::

    .venv/bin/python -m tests.contract.record --from-jsonl ../shared/cvat-api-2.73/exchanges.jsonl

``--only ID`` (repeatable) re-records some exchanges, ``--start-at ID`` resumes a live recording.
Review the diff before committing it: a changed answer is a change of CVAT's contract, and the test
CVAT server must follow it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .runner import answer_record, expectation
from .worlds import real_world

FIXTURE = Path(__file__).resolve().parent / "cvat-2.73.json"
ENV_URL, ENV_USER, ENV_PASSWORD = ("CVAT_HOOKS_TEST_CVAT_URL", "CVAT_HOOKS_TEST_CVAT_USERNAME",
                                   "CVAT_HOOKS_TEST_CVAT_PASSWORD")


def load(path: Path = FIXTURE) -> dict[str, Any]:
    return json.loads(path.read_text())


def save(doc: dict[str, Any], path: Path = FIXTURE) -> None:
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def from_recording(exchange: dict[str, Any], record: dict[str, Any], world: dict[str, Any]) -> dict[str, Any]:
    """An exchange's answer from one recorded exchange (``exchanges.jsonl``; see its README)."""
    headers = {k.lower(): v for k, v in record["response_headers"]}
    content_type = headers.get("content-type")
    media = content_type.split(";")[0].strip().lower() if content_type else None
    body = record["response_body"]
    if body is None:
        kind = "empty"
    elif isinstance(body, str) and body.startswith("<") and " bytes of " in body:
        kind = "binary"
    elif isinstance(body, dict) and set(body) == {"_text"}:
        kind = "text"
    else:
        kind = "json"
    names = {k: v for k, v in world.items() if k != "base"}
    if isinstance(body, dict) and isinstance(body.get("id"), str) and body["id"].startswith("action="):
        names["rq_id"] = body["id"]
    vary_accept = "accept" in {v.strip().lower() for v in headers.get("vary", "").split(",")}
    answer = expectation(exchange, record["status"], media, vary_accept, kind, body, base=world["base"],
                         names=names)
    for pointer, value in answer.get("values", {}).items():
        if isinstance(value, str) and "rq_id" in names:
            answer["values"][pointer] = value.replace(quote(names["rq_id"], safe=""), "{rq_id|quote}")
    return answer


def record_from_jsonl(doc: dict[str, Any], path: Path, only: set[str]) -> int:
    records = {r["seq"]: r for r in map(json.loads, path.read_text().splitlines()) if r}
    done = 0
    for exchange in doc["exchanges"]:
        seq = exchange.get("recorded_seq")
        if seq is None or (only and exchange["id"] not in only):
            continue
        exchange["response"] = from_recording(exchange, records[seq], doc["recorded_world"])
        done += 1
    return done


def record_live(doc: dict[str, Any], only: set[str], start_at: str | None = None) -> int:
    url, username, password = (os.environ.get(k) for k in (ENV_URL, ENV_USER, ENV_PASSWORD))
    if not (url and username and password):
        raise SystemExit(f"set {ENV_URL}, {ENV_USER} and {ENV_PASSWORD} to record from a real CVAT")
    done = 0
    ids = [e["id"] for e in doc["exchanges"]]
    skip = set(ids[:ids.index(start_at)]) if start_at else set()
    with ExitStack() as stack:
        world = None
        for exchange in doc["exchanges"]:
            if (only and exchange["id"] not in only) or exchange["id"] in skip:
                continue
            if world is None:
                world = stack.enter_context(real_world(url, username, password))
            response, saved = world.run(exchange)
            exchange["response"] = answer_record(response, exchange, world, saved)
            print(f"{exchange['id']}: {response.status} {exchange['response']['content_type']}", file=sys.stderr)
            save(doc)  # after each one: a failure later keeps what was recorded
            done += 1
            if exchange.get("mutates"):
                stack.close()
                world = None
    return done


def main(argv: list[str] | None = None) -> None:
    """Rewrite the recorded answers of the contract fixture."""
    parser = argparse.ArgumentParser(prog="python -m tests.contract.record", description=main.__doc__)
    parser.add_argument("--from-jsonl", type=Path, help="take answers from recorded exchanges.jsonl")
    parser.add_argument("--only", action="append", default=[], help="an exchange id (repeatable)")
    parser.add_argument("--start-at", help="resume a live recording at this exchange id")
    args = parser.parse_args(argv)
    doc = load()
    if args.from_jsonl:
        done = record_from_jsonl(doc, args.from_jsonl, set(args.only))
    else:
        done = record_live(doc, set(args.only), args.start_at)
    save(doc)
    print(f"recorded {done} exchange(s) into {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    main()
