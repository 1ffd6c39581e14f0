"""Secrets never leak: broad traffic through every part, with known secrets, then every output searched.

The secrets: the webhook secret, the CVAT access token, a CVAT password, the admin token and the AWS
secret key, and a notify URL's query token and ``Authorization`` header, which the rules reference as
``${NAME}`` from the worker's environment. The traffic, over real HTTP to
real processes (redis-server, ``cvat-hooks serve``, ``cvat-hooks worker`` with a token and with a
password, the test CVAT server, moto's S3, a webhook sink):

- deliveries signed right, signed wrong, tampered, unsigned, with the secret itself sent as the
  signature header, malformed; deliveries CVAT itself sends, and a ping;
- actions that succeed (export to a file and to S3, notify, update_job, check_labels) and fail
  (a 401 from CVAT, a notify target refusing connections), a CLI replay and an admin API replay;
- the CLI (``deliveries list/show --json``, ``doctor`` text and JSON with each kind of credential,
  ``reconcile``, ``webhooks list``, ``rules check``), ``/metrics``, ``/readyz``, the admin API and UI
  with the right token, a wrong one, none, and the webhook secret in its place.

Searched afterwards: every process's log (every incarnation), every CLI output, every HTTP answer
(headers and body), every key and value in Redis (RQ's job data and the exception strings of failed
jobs included) and Redis's append-only file. A secret is found if any 10 characters of it appear.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis import Redis
from rq.registry import FailedJobRegistry

from core.contract import QUEUES
from core.delivery_log import DeliveryLog
from core.queueing import queue
from tests.conftest import capture, stored
from tests.cvat_server import CvatTestServer, WebhookSink
from tests.moto_s3 import s3_endpoint
from tests.procs import ReceiverProc, RedisProc, WorkerProc, clean_env, cli_argv, wait_for

WEBHOOK_SECRET = "Wq7dK2pZ9xR4mT8vB3nY6cL1"
CVAT_TOKEN = "Hq4uW9eRt2yU7iO0aS5dF8gJ"
CVAT_PASSWORD = "Zx8cV6bN4mQ2wE9rT1yU3iO5"
ADMIN_TOKEN = "Pl5oK3iJ1uH9yG7tF2rD4eS6wQ8zX0cV2bN4"
AWS_SECRET = "Tg6fR4eD2sA0qW8eR5tY7uI9"
NOTIFY_SECRET = "Mn7bV5cX3zL1kJ9hG2fD4sA8"
NOTIFY_AUTH = "Rk2jH8gF6dS4aP0oI9uY7tR5"
SECRETS = {"webhook secret": WEBHOOK_SECRET, "CVAT access token": CVAT_TOKEN, "CVAT password": CVAT_PASSWORD,
           "admin token": ADMIN_TOKEN, "AWS secret key": AWS_SECRET, "notify URL token": NOTIFY_SECRET,
           "notify Authorization header": NOTIFY_AUTH}

WINDOW = 10
"""Characters of a secret that count as a leak (a truncated token is still a leak)."""

RULES = """
version: 1
rules:
  - id: export-finished-jobs
    on: update:job
    if: {job.state: {became: completed}}
    allow_self_trigger: true  # the captured event's sender is the account the workers use
    do:
      - action: export
        resource: job
        format: CVAT for images 1.1
        to: exports/{task_id}/job-{job_id}.zip
      - action: export
        resource: job
        format: CVAT for images 1.1
        to: s3://leak-check/{task_id}/job-{job_id}.zip
      - action: notify
        url: "%(sink)s/services/T0/B0?token=${HOOK_TOKEN}"
        headers: {Authorization: "Bearer ${HOOK_AUTH}"}
        text: "job {job_id} of task {task_id} is {job.state}"
      - action: update_job
        stage: validation
    retry: {attempts: 1, backoff: [0]}
  - id: new-task
    on: create:task
    do:
      - action: check_labels
        require: [car, person, bicycle]
      - action: notify
        url: "http://127.0.0.1:9/hooks/refused?token=${HOOK_TOKEN}"
        text: "task {task_id}"
    retry: {attempts: 1, backoff: [0]}
"""


@dataclass
class Outputs:
    """Everything any part produced, by where it came from."""

    items: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, where: str, data: bytes | str) -> None:
        self.items.append((where, data.encode("utf-8", "replace") if isinstance(data, str) else data))

    def leaks(self, secret: str) -> list[str]:
        windows = {secret[i:i + WINDOW].encode() for i in range(len(secret) - WINDOW + 1)}
        return sorted({where for where, data in self.items if any(w in data for w in windows)})


@dataclass
class World:
    tmp: Path
    redis: RedisProc
    cvat: CvatTestServer
    sink: WebhookSink
    s3: str
    outputs: Outputs = field(default_factory=Outputs)
    procs: list = field(default_factory=list)  # type: ignore[type-arg]

    def env(self, *, password: bool = False) -> dict[str, str]:
        """A process's environment: a token, or a username and password, for CVAT."""
        env = {"CVAT_HOOKS_REDIS_URL": self.redis.url, "CVAT_HOOKS_SECRET": WEBHOOK_SECRET,
               "CVAT_HOOKS_RULES": str(self.tmp / "rules.yaml"), "CVAT_HOOKS_DATA_DIR": str(self.tmp / "data"),
               "CVAT_HOOKS_ADMIN_TOKEN": ADMIN_TOKEN, "CVAT_URL": self.cvat.url,
               "CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS": "127.0.0.1",  # the sink: loopback must be listed
               "CVAT_HOOKS_CVAT_POLL_SECONDS": "0.1", "CVAT_HOOKS_RECONCILE_MINUTES": "0",
               "CVAT_HOOKS_WORKER_MAINTENANCE_SECONDS": "2",
               "AWS_ENDPOINT_URL": self.s3, "AWS_ACCESS_KEY_ID": "leak-check-key-id",
               "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": str(self.tmp / "no-aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(self.tmp / "no-aws-credentials"),
               "AWS_EC2_METADATA_DISABLED": "true",
               "HOOK_TOKEN": NOTIFY_SECRET, "HOOK_AUTH": NOTIFY_AUTH}
        if password:
            env.update(CVAT_USERNAME="robot", CVAT_PASSWORD=CVAT_PASSWORD)
        else:
            env["CVAT_ACCESS_TOKEN"] = CVAT_TOKEN
        return env

    def cli(self, *args: str, password: bool = False) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(cli_argv(*args), env=clean_env(self.env(password=password)), capture_output=True,
                              text=True, timeout=90)
        self.outputs.add(f"cli:{' '.join(args[:2])}", done.stdout + done.stderr)
        return done

    def http(self, method: str, url: str, *, body: bytes | None = None,
             headers: dict[str, str] | None = None, where: str = "") -> tuple[int, bytes]:
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=20) as answer:
                status, text, head = answer.status, answer.read(), str(answer.headers)
        except urllib.error.HTTPError as exc:
            status, text, head = exc.code, exc.read(), str(exc.headers)
        self.outputs.add(where or f"http:{method} {url.split('/', 3)[-1]}", head.encode() + b"\n" + text)
        return status, text


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    redis = RedisProc(tmp_path / "redis", tmp_path / "logs").start()
    cvat = CvatTestServer(token=CVAT_TOKEN, export_seconds=0.1).start()
    cvat.add_user("robot", password=CVAT_PASSWORD, admin=True)
    with WebhookSink() as sink, s3_endpoint() as s3:
        import boto3  # type: ignore[import-untyped]

        client = boto3.session.Session().client(
            "s3", endpoint_url=s3, aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1")
        client.create_bucket(Bucket="leak-check")
        client.close()
        (tmp_path / "rules.yaml").write_text(RULES % {"sink": sink.url})
        w = World(tmp_path, redis, cvat, sink, s3)
        yield w
        for proc in reversed(w.procs):
            proc.kill()
    cvat.stop()
    redis.kill()


def signed(body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    from receiver.signature import sign

    return {"X-Signature-256": sign(body, secret), "Content-Type": "application/json"}


def readable(value: bytes) -> bytes:
    """A Redis value as text can be searched: RQ zlib-compresses a job's data and exception string."""
    if value[:1] == b"\x78":
        try:
            return value + b"\n" + zlib.decompress(value)
        except zlib.error:
            pass
    return value


def redis_contents(redis: Redis) -> Iterator[tuple[str, bytes]]:
    """Every key with everything it holds, whatever its type, compressed values decompressed."""
    for key in redis.scan_iter(count=1000):
        kind = redis.type(key)
        if kind == b"string":
            parts = [redis.get(key) or b""]
        elif kind == b"hash":
            parts = [k + b"=\n" + readable(v) for k, v in redis.hgetall(key).items()]
        elif kind == b"list":
            parts = redis.lrange(key, 0, -1)
        elif kind == b"set":
            parts = list(redis.smembers(key))
        elif kind == b"zset":
            parts = [member for member, _ in redis.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            parts = [k + b"=\n" + readable(v) for _, fields in redis.xrange(key) for k, v in fields.items()]
        else:
            parts = [kind]
        yield key.decode(), key + b"\n" + b"\n".join(readable(part) for part in parts)


def test_no_secret_appears_in_any_output(world: World) -> None:
    """Good, bad and tampered deliveries, successful and failing actions, the CLI, /metrics, the admin
    API and UI: not ten characters of any secret in any log, answer, CLI output or Redis value."""
    receiver = ReceiverProc(world.env(), world.tmp / "logs")
    worker = WorkerProc(world.env(), world.tmp / "logs", kind="fork", name="worker-token")
    world.procs += [receiver, worker]
    receiver.start()
    worker.start()
    hook = receiver.url + "/webhooks/cvat"
    world.cvat.add_webhook(hook, project_id=1, secret=WEBHOOK_SECRET, events=["update:job", "create:task"])
    world.cvat.add_webhook(receiver.url + "/webhooks/cvat?wrong", project_id=1, secret="not-the-secret",
                           events=["update:job"])

    # Deliveries: good (CVAT itself, and captures), bad, tampered, unsigned, malformed.
    world.cvat.fail_next(1, 401, path="/api/jobs/1")  # one of the actions meets a 401 from CVAT
    world.cvat.set_job(1, stage="acceptance", state="completed")
    world.cvat.emit("update:job", 1, before={"state": "in progress"})
    body, _ = capture("create_task.json")
    world.http("POST", hook, body=body, headers=signed(body), where="webhook:good")
    ping, _ = capture("ping.json")
    world.http("POST", hook, body=ping, headers=signed(ping), where="webhook:ping")
    world.http("POST", hook, body=body, headers=signed(body, "not-the-secret"), where="webhook:wrong-secret")
    world.http("POST", hook, body=body.replace(b"wh-task", b"xx-task"), headers=signed(body), where="webhook:tampered")
    world.http("POST", hook, body=body, headers={"Content-Type": "application/json"}, where="webhook:unsigned")
    world.http("POST", hook, body=body, headers={"X-Signature-256": WEBHOOK_SECRET}, where="webhook:secret-as-header")
    world.http("POST", hook, body=body, headers={"X-Signature-256": "sha256=" + WEBHOOK_SECRET},
               where="webhook:secret-sha")
    garbage = b'{"event": "update:job", "job": [1, 2'
    world.http("POST", hook, body=garbage, headers=signed(garbage), where="webhook:malformed")
    world.http("GET", hook, where="webhook:get")

    log = DeliveryLog(world.redis.client(), retention_seconds=3600)
    assert wait_for(lambda: len(log.list(limit=20)) >= 3 and all(
        d.status.value in ("succeeded", "failed", "ping", "no_match") for d in log.list(limit=20)), timeout=60), \
        [(d.record["event"], d.status.value) for d in log.list(limit=20)]
    statuses = {a["action"] + ":" + a["status"] for d in log.list(limit=20) for a in d.actions.values()}
    assert {"export:succeeded", "notify:succeeded", "notify:failed"} <= statuses, statuses
    assert any(s.startswith("update_job:failed") for s in statuses) or any(
        "401" in json.dumps(d.to_json(shown=stored)) for d in log.list(limit=20)), statuses
    assert len(world.sink.received) == 1
    assert world.sink.received[0].headers.get("Authorization") == f"Bearer {NOTIFY_AUTH}"

    # Replays: the CLI and the admin API.
    failed = [d for d in log.list(limit=20) if d.status.value == "failed"]
    assert failed
    world.cli("deliveries", "replay", failed[0].id)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    world.http("POST", f"{receiver.url}/api/deliveries/{failed[-1].id}/replay", headers=auth, body=b"")
    worker.stop()

    # A worker that logs in with a password, through a 401 and a success.
    world.cvat.set_job(3, stage="acceptance", state="completed")
    world.cvat.emit("update:job", 3, before={"state": "in progress"})
    world.cvat.fail_next(1, 401, path="/api/jobs/3")
    world.cli("worker", "--burst", "--class", "simple", password=True)

    # The CLI, both kinds of credentials (independent commands, run side by side).
    listed = world.cli("deliveries", "list", "--json")
    shown = json.loads(listed.stdout)
    assert len(shown) >= 4
    commands: list[tuple[tuple[str, ...], bool]] = [
        *((("deliveries", "show", d["delivery_id"], "--json"), False) for d in shown if d["actions"]),
        (("deliveries", "show", shown[0]["delivery_id"]), False),
        (("doctor",), False), (("doctor", "--json"), True), (("webhooks", "list", "--json"), True),
        (("reconcile", "--json"), False), (("rules", "check"), False)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda command: world.cli(*command[0], password=command[1]), commands))

    # Metrics, health, the admin API and UI.
    for path in ("/metrics", "/readyz", "/healthz", "/nope"):
        world.http("GET", receiver.url + path)
    for token in (ADMIN_TOKEN, "wrong-token", WEBHOOK_SECRET, None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for path in ("/api/", "/api/deliveries", "/api/rules", "/api/stats", "/api/nope"):
            world.http("GET", receiver.url + path, headers=headers, where=f"admin-api:GET {path}")
        for delivery in log.list(limit=20):
            world.http("GET", f"{receiver.url}/api/deliveries/{delivery.id}", headers=headers,
                       where="admin-api:GET /api/deliveries/")
    for token in ("wrong-token", WEBHOOK_SECRET):
        form = f"token={token}&next=/ui/".encode()
        world.http("POST", receiver.url + "/ui/login", body=form,
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, where="ui:login-refused")
    world.http("GET", receiver.url + "/ui/login")

    # Every output: logs, Redis (RQ's jobs and failed jobs included), the append-only file.
    receiver.stop()
    for proc in world.procs:
        world.outputs.add(f"log:{proc.name}", proc.log_text())
    redis = world.redis.client()
    for key, data in redis_contents(redis):
        world.outputs.add(f"redis:{key}", data)
    redis.bgrewriteaof()
    for path in sorted((world.tmp / "redis").rglob("*")):
        if path.is_file():
            world.outputs.add("aof", path.read_bytes())
    failed_jobs = [job_id for name in QUEUES
                   for job_id in FailedJobRegistry(queue=queue(name, redis)).get_job_ids(cleanup=False)]
    assert failed_jobs, "failed jobs (and their exception strings) were searched"
    assert len(world.outputs.items) > 100

    # The search sees what it must: the notify URL's reference is in the jobs in Redis, delivery ids in the logs.
    assert any(where.startswith("redis:rq:job:") for where in world.outputs.leaks("${HOOK_TOKEN}"))
    assert "log:worker-token" in world.outputs.leaks(failed[0].id)

    found = {name: world.outputs.leaks(secret) for name, secret in SECRETS.items()}
    assert found == {name: [] for name in SECRETS}, found
