"""``python -m bench.cvat_stand_in --jobs 600 --delay-ms 100``: the test CVAT server, with room for a load.

The stand-in (``tests.cvat_server``) seeds the three jobs of the 2.73 captures; a bench that sends a
different job in every event needs hundreds, and a bench of actions that wait on CVAT needs CVAT to
take its time. This adds one task of ``--jobs`` jobs to project 1, every job already ``completed`` in
stage ``acceptance`` (what the captured ``update:job`` delivery says), and can hold each read of one
job (``GET /api/jobs/<id>``) for ``--delay-ms``, the time a busy CVAT takes to answer it.

It prints one line ``READY {"url": ..., "first_job": ..., "last_job": ...}`` once it listens.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

READY = "READY "
"""The prefix of the line the stand-in prints once it listens (then JSON)."""


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM."""
    from flask import request

    from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer

    parser = argparse.ArgumentParser(prog="python -m bench.cvat_stand_in", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--jobs", type=int, default=100, help="jobs of the added task")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="hold each GET /api/jobs/<id> this long")
    parser.add_argument("--export-size-mb", type=float, default=1.0, help="size of every export, in MiB")
    parser.add_argument("--export-seconds", type=float, default=0.2, help="time an export takes")
    args = parser.parse_args(argv)
    server = CvatTestServer(port=args.port, token=DEFAULT_TOKEN, export_seconds=args.export_seconds,
                            export_size=int(args.export_size_mb * 1024 * 1024))
    task_id = server.add_task("bench-jobs", project_id=1, jobs=args.jobs, frames_per_job=1)
    job_ids = sorted(j["id"] for j in server.state.task_jobs(task_id))
    for job_id in job_ids:
        server.set_job(job_id, stage="acceptance", state="completed")
    delay = args.delay_ms / 1000

    if delay > 0:
        def hold() -> None:
            """A read of one job takes as long as a loaded CVAT takes to answer it."""
            if request.method == "GET" and request.endpoint == "job_detail":
                time.sleep(delay)

        server.app.before_request(hold)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(READY + json.dumps({"url": server.url, "first_job": job_ids[0], "last_job": job_ids[-1]}),
              flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
