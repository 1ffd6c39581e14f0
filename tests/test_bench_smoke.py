"""The benchmark suite's pieces, end to end in a tiny mode: proof that they measure, not of speed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import dispatch, export, intake, procs, report


def quiet(message: str) -> None:
    """The suite's progress log, silenced."""


def rendered(results: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str]:
    """Targets, terminal tables and Markdown for some phase results."""
    targets = report.evaluate(results)
    doc = {"started": "now", "machine": procs.machine_info(), "results": results, "errors": {},
           "targets": targets}
    return targets, report.text_tables(doc), report.markdown(doc)


def test_dispatch_tiny(tmp_path: Path) -> None:
    """A forking worker drains 50 no-op jobs (twice, one run kept), times paced starts, and survives a
    crashing action."""
    result = dispatch.run(tmp_path, jobs=50, drains=2, latency_seconds=0.5, setups=(("fork", 1),), log=quiet)
    setup = result["setups"]["forkx1"]
    assert setup["drain"]["completed"] == 50
    runs = setup["drain"]["runs_per_second"]
    assert len(runs) == 2 and setup["drain"]["per_second"] == max(runs)  # the upper median of two
    assert setup["latency"]["started"] == setup["latency"]["events"] == 50
    assert result["crash"]["fork"]["worker_survived"] is True
    assert result["crash"]["fork"]["crashed_job_log_error"] == "WorkHorseKilled"
    targets, text, md = rendered({"dispatch": result})
    assert {t["verdict"] for t in targets} <= {"PASS", "MISS"}
    assert "forkx1" in text and "| forkx1 |" in md


def test_export_tiny(tmp_path: Path) -> None:
    """The real export action writes 1 MB and 5 MB exports locally and to S3, memory sampled."""
    result = export.run(tmp_path, size_mb=5, small_mb=1, export_seconds=0.2, reps=1, log=quiet)
    assert len(result["overhead"]["runs"]) == 1
    for name in ("local-5mb", "s3-5mb", "local-1mb", "s3-1mb"):
        run = result["memory"][name]
        assert run["size_mb"] == float(name.split("-")[1].removesuffix("mb"))
        assert run["rss_peak_mb"] >= run["rss_idle_mb"] > 0
    targets, text, _ = rendered({"export": result})
    assert any(t["id"] == "export-rss-s3" for t in targets)
    assert "local-5mb" in text


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("webhook") is None,
                    reason="intake needs wrk and webhook (apt-get install wrk webhook)")
def test_intake_tiny(tmp_path: Path) -> None:
    """wrk drives all three servers; cvat-hooks queues distinct events and dedupes repeated ones."""
    result = intake.run(tmp_path, seconds=1, reps=1, connections=(4,), bodies=3000, log=quiet)
    servers = result["servers"]
    for name in ("ceiling", "webhook", "cvat-hooks", "cvat-hooks-dup"):
        assert servers[name]["cells"]["4"]["rps"] > 0, name
        assert servers[name]["rss_mb"]["peak"] > 0, name
    assert servers["cvat-hooks"]["notes"]["outcomes_all_runs"].get("queued", 0) > 0
    assert set(servers["cvat-hooks-dup"]["notes"]["outcomes_all_runs"]) == {"duplicate"}
    targets, text, _ = rendered({"intake": result})
    assert any(t["id"] == "intake-vs-ceiling" for t in targets)
    assert "adnanh/webhook" in text
