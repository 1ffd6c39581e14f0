"""Property-based tests of the webhook endpoint: 10,000 generated and mutated deliveries in all.

Real parts: the receiver app, called through WSGI exactly as gunicorn calls it (cheaper than the
test client, so the 10,000 fit in half a minute), over a real redis-server, with the real
signature check, parser, last-seen state, rules and dispatch. Bodies are raw bytes, invalid UTF-8,
deep nesting, huge numbers, duplicate keys, lone surrogates, truncations and byte-level or
structural mutations of the real CVAT 2.73 captures; headers are missing, doubled, garbage or
wrongly signed signatures and any content type. The properties:

- never a 5xx, whatever arrives;
- an unsigned or wrongly signed body changes nothing in Redis (no record, no job) and gets 401;
- a correctly signed body gets 400 (unreadable) or 2xx, and every job a 202 names exists in RQ.

Deterministic for CI: ``derandomize=True`` and no example database.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis
from rq.job import Job

from core.cvat_events import EVENT_NAMES
from core.queueing import SERIALIZER
from core.settings import WorkerSettings
from receiver.app import create_app
from receiver.settings import Settings
from receiver.signature import sign
from tests.conftest import PAYLOADS, ROOT, SECRET, RedisServer

EXAMPLES = {
    "unsigned": 3500,
    "tampered": 2000,
    "signed_garbage": 2500,
    "signed_mutations": 1500,
    "headers": 500,
}
"""Examples per property (10,000 in all): more where an example is cheap (rejected before parsing)."""

WRONG_SECRET = "not-the-webhook-secret"


def fuzz_settings(name: str) -> settings:
    """Hypothesis settings of one property: its example count, deterministic, no time limit."""
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# Rules: the shipped file plus catch-alls whose templates reach into the payload, so signed garbage
# exercises matching, conditions and rendering, not just parsing.
EXTRA_RULES = """
  - id: everything-updated
    on: ["update:*", "create:*", "delete:*"]
    if:
      any:
        - job.state: {became: completed}
        - task.name: {regex: "^[a-z]"}
        - job.id: {gt: 0}
        - not: {project.id: {exists: true}}
    do:
      - action: notify
        url: http://127.0.0.1:9/hook
        text: "{event} {job.state} {task.name} {project_id} {job.assignee.username}"
      - action: update_job
        state: completed
  - id: requests
    on: completed:request[*]
    do:
      - action: export
        resource: task
        format: CVAT for images 1.1
        to: exports/{task_id}/{request.operation.format}.zip
"""


def load_captures() -> list[tuple[bytes, str]]:
    """Every real body (the 2.73 captures with their own signatures, and CVAT's documented examples)."""
    found = []
    for path in sorted((PAYLOADS / "cvat-2.73").glob("*.json")):
        data = json.loads(path.read_text())
        found.append((data["body_raw"].encode("utf-8"), data["headers"]["X-Signature-256"]))
    for path in sorted(PAYLOADS.glob("docs_*.json")):
        body = path.read_bytes()
        found.append((body, sign(body, SECRET)))
    return found


CAPTURES = load_captures()


class Answer:
    """What the app answered: status and body."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.body = status, body

    def get_json(self):  # type: ignore[no-untyped-def]
        return json.loads(self.body)

    def get_data(self) -> bytes:
        return self.body


class Target:
    """The app under test and its Redis."""

    def __init__(self, app, redis: Redis, data_dir: Path) -> None:  # type: ignore[no-untyped-def]
        self.app = app
        self.redis = redis
        self.data_dir = data_dir
        self.baseline = (0, 0)

    def post(self, body: bytes, headers: list[tuple[str, str]]) -> Answer:
        """POST exactly these bytes and headers through the WSGI interface, as gunicorn calls the app
        (repeated headers joined with a comma, as gunicorn joins them)."""
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/webhooks/cvat", "QUERY_STRING": "",
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
                   "REMOTE_ADDR": "127.0.0.1", "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
                   "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(), "wsgi.version": (1, 0),
                   "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False}
        for name, value in headers:
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            environ[key] = environ[key] + "," + value if key in environ and key != "CONTENT_LENGTH" else value
        started: list[int] = []
        chunks = self.app(environ, lambda status, _headers, _exc=None: started.append(int(status.split()[0])))
        try:
            data = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        return Answer(started[0], data)

    def fingerprint(self) -> tuple[int, int]:
        """Keys in Redis, and counters other than rejections: what any accepted delivery changes."""
        with self.redis.pipeline(transaction=False) as pipe:
            size, counters = pipe.dbsize().hgetall("cvat-hooks:metrics:counters").execute()
        accepted = sum(int(v) for k, v in counters.items() if not k.startswith(b"cvat_hooks_rejected_total"))
        return int(size), accepted


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The receiver app over a redis-server of this module's own (flushed before each property)."""
    base = tmp_path_factory.mktemp("fuzz-http")
    server = RedisServer(base / "redis").start()
    rules = base / "rules.yaml"
    rules.write_text((ROOT / "rules.yaml").read_text() + EXTRA_RULES)
    settings_ = Settings(secrets=(SECRET,), rules_path=rules,
                         workers=WorkerSettings(redis_url=server.url, data_dir=base / "data"))
    redis = Redis.from_url(server.url)
    # Thousands of rejections would each log a warning into pytest's capture: not what is tested here.
    quiet = [logging.getLogger(name) for name in ("core", "receiver", "workers", "operations")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    yield Target(create_app(settings_), redis, settings_.data_dir)
    for logger, level in zip(quiet, levels, strict=True):
        logger.setLevel(level)
    redis.close()
    server.stop()


@pytest.fixture
def fresh(target: Target) -> Target:
    """The target with an empty Redis but for the rejection counter (once per property, not per
    example), and its fingerprint: what an unsigned delivery must leave unchanged."""
    target.redis.flushall()
    assert target.post(b"{}", []).status_code == 401
    target.baseline = target.fingerprint()
    return target


# -- strategies ----------------------------------------------------------------------------------

# Hypothesis draws the choices (which generator, which mutation, where, a seed); the bulk of each
# body is built from that seed by ``random.Random``, so an example costs well under a millisecond to
# generate and is still reproduced exactly from its draws.

INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80", b"\xe2\x82"]
HUGE_NUMBERS = [b"9" * 4400, b"9" * 4200, b"1e999", b"-1e999", b"1.5e-400", b"-0", b"123456789012345678901234567890",
                b"NaN", b"Infinity", b"-Infinity", b"0x10", b"01", b"1_000", b"2e308"]
SURROGATES = [b'"\\ud800"', b'"\\udfff x"', b'"\\ud83d\\ude00"', b'"\\u0000"', b'"\\\\ud800"', b'"\\ud800\\ud800"']
STRINGS = ["completed", "acceptance", "annotation", "validation", "new", "in progress", "", "\u0000", "../../etc",
           "{job_id}", "{{", "\u00e9t\u00e9", "\U0001f600", "2026-11-22T17:40:43.000000Z", "x" * 500,
           "CVAT for images 1.1", "<script>", "' OR 1=1", "\\", "/"]
EVENT_NAMES_FUZZ = sorted(EVENT_NAMES) + ["ping", "update:", ":job", "UPDATE:JOB", "update:job[x]", "x" * 300, "",
                                          "completed:request[", "update:job ", "update:job\n"]
RESOURCE_KEYS = ["job", "task", "project", "request", "webhook", "before_update", "changes", "sender",
                 "webhook_id", "issue", "comment", "organization"]
OBJECT_KEYS = ["id", "state", "stage", "updated_date", "task_id", "project_id", "name", "operation", "organization",
               "assignee", "labels", "type", "status", "format", "target"]


def random_value(rng: random.Random, depth: int = 0):  # type: ignore[no-untyped-def]
    """A random JSON value: scalars of every kind, lists and objects up to a few levels deep."""
    kind = rng.randrange(10 if depth < 4 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 2 ** 31, 2 ** 63, 2 ** 64 + 1, -(2 ** 70), 10 ** 300, rng.randrange(-99, 10 ** 6)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 5e-324, rng.uniform(-1e9, 1e9)])
    if kind in (4, 5, 6):
        if rng.random() < 0.6:
            return rng.choice(STRINGS)
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD800),
                                       rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(12)))
    if kind == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(OBJECT_KEYS + STRINGS): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_event(rng: random.Random) -> bytes:
    """A JSON object shaped roughly like a CVAT event, random contents, keys in any order."""
    payload: dict = {"event": rng.choice(EVENT_NAMES_FUZZ) if rng.random() < 0.9 else random_value(rng)}
    for key in rng.sample(RESOURCE_KEYS, rng.randrange(5)):
        if rng.random() < 0.7:
            payload[key] = {k: (rng.choice([rng.randrange(-3, 60), 2 ** 70]) if k.endswith("id") and rng.random() < 0.7
                                else random_value(rng, 1))
                            for k in rng.sample(OBJECT_KEYS, rng.randrange(len(OBJECT_KEYS)))}
        else:
            payload[key] = random_value(rng, 1)
    items = list(payload.items())
    rng.shuffle(items)
    separators = rng.choice([(",", ":"), (", ", ": ")])
    return json.dumps(dict(items), separators=separators, ensure_ascii=rng.random() < 0.5).encode()


def random_nesting(rng: random.Random) -> bytes:
    """Deep nesting: arrays or objects, balanced or not, inside an event or alone."""
    depth = rng.choice([10, 63, 64, 65, 66, 200, 999, 1000, 5000, 100_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    inner = opener * depth + b"1" + closer * rng.choice([depth, depth - 1, 0])
    return b'{"event": "update:job", "job": ' + inner + b"}" if rng.random() < 0.5 else inner


def random_garbage(kind: int, seed: int) -> bytes:
    """Body generator ``kind`` (0-5) with its random content from ``seed``."""
    rng = random.Random(seed)
    if kind == 0:
        return rng.randbytes(rng.randrange(600))
    if kind == 1:
        return random_event(rng)
    if kind == 2:
        return random_nesting(rng)
    if kind == 3:
        return json.dumps(random_value(rng)).encode()
    if kind == 4:
        return rng.choice(HUGE_NUMBERS + INVALID_UTF8 + [b"", b"{}", b"[]", b"null", b'"event"', b'{"event": "ping"}',
                                                         b"{" * 20, b'{"event": "ping", "event": "update:job"}'])
    return mutate(random_event(rng), [(rng.randrange(12), rng.randrange(1 << 30)) for _ in range(rng.randrange(1, 4))])


GARBAGE_KINDS = 6
"""Body generators of :func:`random_garbage`."""

MUTATIONS = 12


def mutate(body: bytes, ops: list[tuple[int, int]]) -> bytes:
    """Apply byte-level or structural mutations to ``body``: each ``(operation, seed)``."""
    for op, seed in ops:
        rng = random.Random(seed)
        n = len(body)
        at = rng.randrange(n) if n else 0
        if op == 0:  # truncate
            body = body[:at]
        elif op == 1 and n:  # flip bits of one byte
            body = body[:at] + bytes([body[at] ^ rng.randrange(1, 256)]) + body[at + 1:]
        elif op == 2:  # insert random bytes
            body = body[:at] + rng.randbytes(rng.randrange(1, 9)) + body[at:]
        elif op == 3:  # delete a range
            body = body[:at] + body[at + rng.randrange(1, 65):]
        elif op == 4:  # a duplicate key, first or last
            key = rng.choice([b'"event": "ping", ', b'"event": "update:job", ', b'"job": null, ',
                              b'"job": {"id": 1}, ', b'"event": 1, '])
            body = body.replace(b"{", b"{" + key, 1) if rng.random() < 0.5 else \
                body.rstrip().rstrip(b"}") + b", " + key.rstrip(b", ") + b"}"
        elif op == 5:  # huge, special or invalid numbers
            numbers = [rng.choice(HUGE_NUMBERS) for _ in range(3)]
            body = re.sub(rb"(?<=[:\[, ])-?\d+(\.\d+)?", lambda m, pool=numbers: pool.pop(), body, count=3)
        elif op == 6:  # invalid UTF-8
            body = body[:at] + rng.choice(INVALID_UTF8) + body[at:]
        elif op == 7:  # lone (and paired) surrogate escapes in place of a string
            strings = [rng.choice(SURROGATES) for _ in range(2)]
            body = re.sub(rb'"[^"\\]{0,40}"', lambda m, pool=strings: pool.pop(), body, count=rng.randrange(1, 3))
        elif op == 8:  # wrapped in nesting
            k = rng.choice([1, 70, 3000])
            body = b'{"event": "update:job", "job": ' + b"[" * k + body + b"]" * k + b"}"
        elif op == 9:
            body = mutate_structure(body, rng)
        elif op == 10:  # single quotes
            body = body.replace(b'"', b"'", rng.randrange(1, 6))
        else:  # leading whitespace or a BOM
            body = rng.choice([b" ", b"\n", b"\t", b"\r\n", b"\xef\xbb\xbf"]) + body
    return body


def mutate_structure(body: bytes, rng: random.Random) -> bytes:
    """Parse, change or drop one value at a random path, serialise with a random key order."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body
    node, path = payload, []
    while isinstance(node, dict | list) and node and rng.random() < 0.7:
        key = rng.choice(list(node.keys()) if isinstance(node, dict) else list(range(len(node))))
        path.append(key)
        node = node[key]
    if not path:
        return json.dumps(random_value(rng)).encode()
    parent = payload
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = random_value(rng, 1)
    if isinstance(payload, dict) and rng.random() < 0.5:
        payload = dict(reversed(list(payload.items())))
    return json.dumps(payload).encode()


CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "", "garbage/\u00e9"]


SIGNATURE_KINDS = ["missing", "empty", "garbage", "wrong-hex", "wrong-secret", "other-body", "no-prefix", "sha1",
                   "doubled", "doubled-valid-first", "truncated", "padded", "uppercase-prefix", "spaces-inside"]


def bad_signature(body: bytes, kind: str, seed: int, content_type: str) -> list[tuple[str, str]]:
    """Headers whose signature must never be accepted for ``body``: none, garbage, wrong, doubled."""
    rng = random.Random(seed)
    valid = sign(body, SECRET)
    values = {
        "missing": [],
        "empty": [""],
        "garbage": ["".join(chr(rng.randrange(32, 256)) for _ in range(rng.randrange(90)))],
        "wrong-hex": ["sha256=" + rng.randbytes(32).hex()],
        "wrong-secret": [sign(body, WRONG_SECRET)],
        "other-body": [sign(body + rng.randbytes(rng.randrange(1, 5)), SECRET)],
        "no-prefix": [valid.removeprefix("sha256=")],
        "sha1": ["sha1=" + valid.removeprefix("sha256=")[:40]],
        "doubled": [sign(body, WRONG_SECRET), sign(body, WRONG_SECRET)],
        "doubled-valid-first": [valid, sign(body, WRONG_SECRET)],
        "truncated": [valid[:-1]],
        "padded": [valid + "0"],
        "uppercase-prefix": ["SHA256=" + valid.removeprefix("sha256=")],
        "spaces-inside": [valid[:20] + " " + valid[21:]],
    }[kind]
    headers = [("X-Signature-256", v) for v in values]
    return headers + ([("Content-Type", content_type)] if content_type else [])


def signed_headers(body: bytes, content_type: str = "application/json") -> list[tuple[str, str]]:
    headers = [("X-Signature-256", sign(body, SECRET))]
    if content_type:
        headers.append(("Content-Type", content_type))
    return headers


def assert_signed_answer(target: Target, answer) -> None:  # type: ignore[no-untyped-def]
    """400 or 2xx with a JSON body; every job a 202 names is in RQ."""
    assert answer.status_code in (200, 202, 400), (answer.status_code, answer.get_data()[:300])
    body = answer.get_json()
    assert isinstance(body, dict)
    if answer.status_code == 202:
        for job_id in body["jobs"]:
            assert Job.exists(job_id, connection=target.redis), job_id
        assert Job.fetch(body["jobs"][0], connection=target.redis, serializer=SERIALIZER).args[0]["delivery_id"] \
            == body["delivery_id"]


# -- properties -----------------------------------------------------------------------------------

def case(*bounds: int) -> st.SearchStrategy[tuple[int, ...]]:
    """A tuple of small integers, each in ``[0, bound)``, and a seed: one draw per example keeps
    Hypothesis' own cost per example near a millisecond."""
    return st.tuples(*(st.integers(0, b - 1) for b in bounds), st.integers(0, 1 << 30))


def mutations(seed: int) -> list[tuple[int, int]]:
    """One to three ``(operation, seed)`` mutations, drawn from ``seed``."""
    rng = random.Random(seed)
    return [(rng.randrange(MUTATIONS), rng.randrange(1 << 30)) for _ in range(rng.randrange(1, 4))]


@fuzz_settings("unsigned")
@given(case(GARBAGE_KINDS + 1, len(SIGNATURE_KINDS), len(CONTENT_TYPES)))
def test_unsigned_or_wrongly_signed_bodies_change_nothing(fresh: Target, case: tuple[int, int, int, int]) -> None:
    """Any body (random, JSON of any shape, deep, huge numbers, a real capture), with no, garbage,
    wrong or doubled signature headers: 401 and nothing stored."""
    source, kind, content_type, seed = case
    body = CAPTURES[seed % len(CAPTURES)][0] if source == GARBAGE_KINDS else random_garbage(source, seed)
    answer = fresh.post(body, bad_signature(body, SIGNATURE_KINDS[kind], seed, CONTENT_TYPES[content_type]))
    assert answer.status_code == 401, (answer.status_code, SIGNATURE_KINDS[kind])
    assert fresh.fingerprint() == fresh.baseline


@fuzz_settings("tampered")
@given(case(len(CAPTURES)))
def test_mutated_captures_under_their_original_signature_are_refused(fresh: Target, case: tuple[int, int]) -> None:
    """A real delivery changed in any way but sent with its original signature: 401, nothing stored."""
    original, signature = CAPTURES[case[0]]
    body = mutate(original, mutations(case[1]))
    if body == original:
        return
    answer = fresh.post(body, [("X-Signature-256", signature), ("Content-Type", "application/json")])
    assert answer.status_code == 401, answer.get_data()[:200]
    assert fresh.fingerprint() == fresh.baseline
    assert not (fresh.data_dir / "journal").exists()


@fuzz_settings("signed_garbage")
@given(case(GARBAGE_KINDS, len(CONTENT_TYPES)))
def test_correctly_signed_garbage_is_400_or_2xx(fresh: Target, case: tuple[int, int, int]) -> None:
    """Random bytes, JSON of any shape, deep nesting, huge numbers, correctly signed: 400 or 2xx."""
    body = random_garbage(case[0], case[2])
    assert_signed_answer(fresh, fresh.post(body, signed_headers(body, CONTENT_TYPES[case[1]])))


@fuzz_settings("signed_mutations")
@given(case(len(CAPTURES)))
def test_correctly_signed_mutations_of_captures_are_400_or_2xx(fresh: Target, case: tuple[int, int]) -> None:
    """Byte and structure mutations of the real captures, re-signed: 400 or 2xx, never a crash."""
    body = mutate(CAPTURES[case[0]][0], mutations(case[1]))
    assert_signed_answer(fresh, fresh.post(body, signed_headers(body)))


HEADER_NAMES = ["X-Signature-256", "x-signature-256", "Content-Type", "Content-Encoding", "X-Forwarded-For",
                "Accept", "Cookie", "Authorization", "X-Request-Id", "X-Organization", "Host", "User-Agent",
                "X-Signature", "X-Hub-Signature-256"]
"""Headers an app sees (framing headers, Content-Length and Transfer-Encoding, are the server's)."""


def extra_headers(seed: int) -> list[tuple[str, str]]:
    """Up to five headers, each with up to 60 printable Latin-1 characters (what a header can carry)."""
    rng = random.Random(seed)
    return [(rng.choice(HEADER_NAMES), "".join(chr(rng.randrange(32, 256)) for _ in range(rng.randrange(61))))
            for _ in range(rng.randrange(6))]


@fuzz_settings("headers")
@given(case(len(CAPTURES)))
def test_extra_headers_never_unlock_or_break_the_endpoint(fresh: Target, case: tuple[int, int]) -> None:
    """A real capture with any extra headers: with its signature alone it is read; with another
    signature header beside it, refused; never a 5xx."""
    body, signature = CAPTURES[case[0]]
    extra = extra_headers(case[1])
    doubled = any(k.lower() == "x-signature-256" for k, _ in extra)
    before = fresh.fingerprint()
    answer = fresh.post(body, [("X-Signature-256", signature), *extra])
    if doubled:
        # Two signature headers reach the app as one comma-joined value: never a valid signature.
        assert answer.status_code == 401, answer.get_data()[:200]
        assert fresh.fingerprint()[1] == before[1]
    else:
        assert answer.status_code in (200, 202, 400), answer.get_data()[:200]
