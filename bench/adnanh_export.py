"""``CVAT_JOB_ID=7 python bench/adnanh_export.py``: the way people export a job today, run once per event.

The script adnanh/webhook starts for every delivery in ``bench.adnanh``: log in with cvat-sdk's
``make_client`` and export the job with the SDK's defaults, as the scripts people share do (the
seeds in the project's reference material). Nothing is tuned: the SDK checks the export's status
every ``Config.status_check_period`` (5 s). It writes ``job-<id>.zip`` into ``BENCH_EXPORT_DIR``,
and ``job-<id>.error`` there instead when it fails, so the bench can say why a file never came.

The job id comes from ``CVAT_JOB_ID`` (webhook's ``pass-environment-to-command``), the rest from the
environment webhook inherits: ``BENCH_CVAT_HOST``, ``BENCH_CVAT_PORT``,
``BENCH_CVAT_USER``, ``BENCH_CVAT_PASSWORD``, ``BENCH_EXPORT_DIR``, ``BENCH_EXPORT_FORMAT``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path


def main() -> int:
    """Export one job's annotations to a local file."""
    job_id = int(os.environ["CVAT_JOB_ID"])
    out_dir = Path(os.environ["BENCH_EXPORT_DIR"])
    try:
        from cvat_sdk import make_client  # type: ignore[import-untyped]

        with make_client(os.environ["BENCH_CVAT_HOST"], port=int(os.environ["BENCH_CVAT_PORT"]),
                         credentials=(os.environ["BENCH_CVAT_USER"], os.environ["BENCH_CVAT_PASSWORD"])) as client:
            job = client.jobs.retrieve(job_id)
            job.export_dataset(os.environ["BENCH_EXPORT_FORMAT"], out_dir / f"job-{job_id}.zip",
                               include_images=False)
    except Exception:
        (out_dir / f"job-{job_id}.error").write_text(traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
