"""A refused rules file never keeps a gunicorn worker from booting (real gunicorn, worker SIGKILLed by PID)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests.conftest import ROOT, SECRET, RedisServer, capture, signed
from tests.procs import ReceiverProc, alive, children, http, kill_pids, wait_for

BAD = "version: 1\nrules:\n  - id: broken\n    on: update:job\n    do: []\n"


def gunicorn_workers(receiver: ReceiverProc) -> list[int]:
    """The gunicorn workers: children of the gunicorn master, the serve process's only child."""
    [master] = children(receiver.pid)
    return children(master)


def test_a_worker_restarted_while_the_rules_file_is_bad_boots_on_the_last_good_rules(tmp_path: Path,
                                                                                       redis_server: RedisServer):
    """Break rules.yaml, SIGKILL every gunicorn worker: replacements boot, stay ready, and deliveries are answered."""
    rules = tmp_path / "rules.yaml"
    shutil.copy(ROOT / "rules.yaml", rules)
    env = {"CVAT_HOOKS_REDIS_URL": redis_server.url, "CVAT_HOOKS_SECRET": SECRET,
           "CVAT_HOOKS_RULES": str(rules), "CVAT_HOOKS_DATA_DIR": str(tmp_path / "data")}
    receiver = ReceiverProc(env, tmp_path / "logs", http_workers=2).start()
    try:
        before = gunicorn_workers(receiver)
        assert len(before) == 2
        assert http(receiver.url + "/readyz")[0] == 200
        rules.write_text(BAD)
        kill_pids(before)
        assert wait_for(lambda: not any(alive(p) for p in before))
        assert wait_for(lambda: len(set(gunicorn_workers(receiver)) - set(before)) == 2, timeout=30), \
            receiver.log_text()[-3000:]
        assert receiver.running, receiver.log_text()[-3000:]
        body, _ = capture("update_job_completed.json")
        for n in range(6):  # several connections: both new workers answer
            b = body + b" " * n
            status, answer = http(receiver.url + "/webhooks/cvat", b, signed(b))
            assert status in (200, 202), answer
        status, ready = http(receiver.url + "/readyz")
        assert status == 200 and "last good" in ready["checks"]["rules"], ready
        assert "Worker failed to boot" not in receiver.log_text()
    finally:
        receiver.stop()


def test_every_worker_notices_an_edit_at_once_and_it_is_logged_once(tmp_path: Path, redis_server: RedisServer):
    """Real gunicorn, 2 workers, no delivery: a refused edit is logged once at ERROR, a fix once at INFO, and
    /readyz (either worker) shows the failing check, then the new version."""
    rules = tmp_path / "rules.yaml"
    shutil.copy(ROOT / "rules.yaml", rules)
    env = {"CVAT_HOOKS_REDIS_URL": redis_server.url, "CVAT_HOOKS_SECRET": SECRET,
           "CVAT_HOOKS_RULES": str(rules), "CVAT_HOOKS_DATA_DIR": str(tmp_path / "data")}
    receiver = ReceiverProc(env, tmp_path / "logs", http_workers=2).start()
    try:
        assert wait_for(lambda: receiver.log_text().count(": loaded ") == 2, timeout=20), receiver.log_text()
        good = rules.read_text()
        rules.write_text(BAD)
        assert wait_for(lambda: "reload failed" in receiver.log_text(), timeout=20), receiver.log_text()[-3000:]
        time.sleep(3)  # both workers have looked at the file by now (once a second)
        refused = [line for line in receiver.log_text().splitlines() if "reload failed" in line]
        assert len(refused) == 1, refused  # the other worker's line is at DEBUG
        assert f"{rules}:5: rule 'broken'" in refused[0]
        for _ in range(6):  # several connections: whichever worker answers knows
            status, ready = http(receiver.url + "/readyz")
            assert status == 200 and ready["failing"] == ["rules"], ready
        rules.write_text(good + "\n# fixed\n")
        assert wait_for(lambda: "reloaded: version" in receiver.log_text(), timeout=20)
        time.sleep(3)
        loaded = [line for line in receiver.log_text().splitlines() if "reloaded: version" in line]
        assert len(loaded) == 1, loaded
        for _ in range(6):
            status, ready = http(receiver.url + "/readyz")
            assert status == 200 and ready["failing"] == [] and not ready["rules"]["reload_failed"], ready
    finally:
        receiver.stop()
