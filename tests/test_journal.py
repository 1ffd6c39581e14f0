"""Redis down while deliveries arrive: they are journaled on disk, answered 202, and moved into
Redis exactly once when it is back (real redis-server stopped and started by PID)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from core.contract import EXPORT_QUEUE, LIGHT_QUEUE
from core.queueing import queue
from receiver.app import create_app
from receiver.journal import Journal, JournalFull
from tests.conftest import RedisServer, capture, post
from tests.procs import wait_for


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server of this test's own, so it can be stopped and started again on the same port."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def test_deliveries_survive_redis_downtime_once_each(settings, own_redis, tmp_path):
    """Accepted while Redis is down (202 journaled), each processed exactly once after it returns."""
    from redis import Redis

    settings = replace(settings, workers=replace(settings.workers, redis_url=own_redis.url,
                                                 data_dir=tmp_path / "data"))
    client = create_app(settings).test_client()
    job_body, _ = capture("update_job_completed.json")
    task_body, _ = capture("create_task.json")
    own_redis.stop()
    answers = [post(client, job_body), post(client, task_body), post(client, job_body)]  # incl. a CVAT retry
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert {a.json["status"] for a in answers} == {"journaled"}
    assert (settings.data_dir / "journal" / "journal.log").exists()
    own_redis.start()
    redis = Redis.from_url(own_redis.url)
    assert wait_for(lambda: queue(EXPORT_QUEUE, redis).count == 1 and queue(LIGHT_QUEUE, redis).count == 1)
    time.sleep(1.5)  # any second drain would have happened by now
    assert queue(EXPORT_QUEUE, redis).count == 1 and queue(LIGHT_QUEUE, redis).count == 1
    assert redis.zcard("cvat-hooks:deliveries") == 2
    assert not list((settings.data_dir / "journal").glob("journal*"))
    # A delivery after the outage takes the normal path again.
    assert post(client, capture("ping.json")[0]).json["status"] == "ping"
    redis.close()


def test_journal_is_bounded(tmp_path):
    """The journal refuses deliveries beyond its size limit instead of filling the disk."""
    journal = Journal(tmp_path, max_bytes=500)
    journal.append(b'{"event": "ping"}', 1.0)
    with pytest.raises(JournalFull):
        journal.append(b"x" * 600, 2.0)


def test_drain_stops_at_first_failure_and_resumes_in_order(tmp_path):
    """A drain that fails midway keeps what is left, and the next drain resumes in order."""
    journal = Journal(tmp_path)
    for n in range(5):
        journal.append(json.dumps({"n": n}).encode(), float(n))
    seen: list[int] = []

    def flaky(body: bytes, t: float) -> None:
        n = json.loads(body)["n"]
        if n == 2 and 2 not in seen and len(seen) == 2:
            seen.append(-1)
            raise ConnectionError("Redis went away again")
        seen.append(n)

    with pytest.raises(ConnectionError):
        journal.drain(flaky)
    assert journal.drain(flaky) == 3
    assert [n for n in seen if n >= 0] == [0, 1, 2, 3, 4]
    assert not journal.pending() or not list(tmp_path.glob("journal*"))


def test_concurrent_appends_lose_nothing(tmp_path):
    """Appends from many threads while a drain runs are all drained exactly once."""
    journal = Journal(tmp_path)
    got: list[int] = []
    stop = threading.Event()

    def writer(base: int) -> None:
        for i in range(50):
            journal.append(json.dumps({"n": base + i}).encode(), 0.0)

    def drainer() -> None:
        while not stop.is_set():
            journal.drain(lambda body, t: got.append(json.loads(body)["n"]))

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(4)]
    d = threading.Thread(target=drainer)
    d.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    d.join()
    journal.drain(lambda body, t: got.append(json.loads(body)["n"]))
    assert sorted(got) == sorted(k * 1000 + i for k in range(4) for i in range(50))


# -- a disk that cuts writes short, and damaged entries ------------------------------------------

FSIZE_SCRIPT = r"""
import json, resource, sys
from pathlib import Path
from receiver.journal import Journal
journal = Journal(Path(sys.argv[1]))
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # SIGXFSZ is ignored by Python: EFBIG / short writes
acked = []
for n in range(int(sys.argv[3])):
    try:
        journal.append(json.dumps({"n": n, "pad": "x" * (n % 7) * 10}).encode(), float(n))
    except OSError:
        continue
    acked.append(n)
print(json.dumps(acked))
"""


@pytest.mark.parametrize("limit", [700, 1000, 1999], ids=["tiny", "mid-entry", "later"])
def test_short_writes_are_never_acknowledged_and_never_block_the_rest(tmp_path, limit):
    """Under a file-size limit, appends that do not fit raise; every acknowledged entry drains, none blocks."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(tmp_path), str(limit), "38"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    acked = json.loads(run.stdout)
    assert 0 < len(acked) < 38, "the limit should cut the run short"
    journal = Journal(tmp_path)
    journal.append(b'{"n": 100}', 100.0)  # after the disk has room again: must not be swallowed
    got: list[int] = []
    journal.drain(lambda body, t: got.append(json.loads(body)["n"]))
    assert got == [*acked, 100]
    assert journal.quarantined() == 0, "a failed append leaves nothing behind to quarantine"


def test_receiver_answers_503_not_202_when_the_disk_cuts_the_journal_short(tmp_path, rules_file):
    """With Redis down and a full disk, a delivery is 202 only if its entry is whole: each 202 drains."""
    import subprocess
    import sys

    script = r"""
import json, resource, sys
from pathlib import Path
from receiver.app import create_app
from receiver.settings import Settings
from tests.conftest import capture, signed
app = create_app(Settings.from_env())
client = app.test_client()
body, _ = capture("update_job_completed.json")
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
out = []
for n in range(38):
    b = body + b" " * n  # a different delivery each time (the delivery id hashes the body)
    out.append(client.post("/webhooks/cvat", data=b, headers=signed(b)).status_code)
print(json.dumps(out))
"""
    from tests.conftest import SECRET, free_port

    env = {"CVAT_HOOKS_SECRET": SECRET, "CVAT_HOOKS_RULES": str(rules_file),
           "CVAT_HOOKS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "CVAT_HOOKS_DATA_DIR": str(tmp_path / "d"),
           "CVAT_HOOKS_LOG_FORMAT": "text"}
    import os

    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[1])
    statuses = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(statuses) == {202, 503} and statuses.index(503) > 0
    got: list[bytes] = []
    Journal(tmp_path / "d" / "journal").drain(lambda body, t: got.append(body))
    assert len(got) == statuses.count(202)


@pytest.mark.parametrize("damage", [
    lambda line: line[: len(line) // 2],                       # torn: cut mid-entry, no end of line
    lambda line: line[: len(line) // 2] + b"\n",               # torn, then a line end: unreadable JSON
    lambda line: line.replace(b'"b": "', b'"b": "QUFB'),       # body changed: checksum mismatch
    lambda line: b"\x00" * len(line),                          # zeroes, as after a crash on some filesystems
], ids=["torn", "torn-line", "bad-checksum", "zeroes"])
def test_a_damaged_middle_entry_is_quarantined_and_the_rest_drain(tmp_path, damage):
    """A damaged entry between good ones is set aside, logged and counted; the later entries still drain."""
    journal = Journal(tmp_path)
    journal.append(b'{"n": 0}', 0.0)
    good = journal.current.read_bytes()
    from receiver.journal import encode_entry

    with journal.current.open("ab") as fh:
        fh.write(damage(encode_entry(b'{"n": 1}', 1.0)))
    for n in (2, 3):
        journal.append(json.dumps({"n": n}).encode(), float(n))
    assert journal.current.read_bytes().startswith(good)
    counted: list[str] = []
    journal.on_damaged = counted.append
    got: list[int] = []
    assert journal.drain(lambda body, t: got.append(json.loads(body)["n"])) == 3
    assert got == [0, 2, 3]
    assert journal.quarantined() == 1 and len(counted) == 1
    assert not journal.pending() or not list(tmp_path.glob("journal*"))
