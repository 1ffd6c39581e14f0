"""``python -m bench.run [--quick] [--only intake,dispatch,...]``: the benchmark suite, one command.

Prints a table per phase, then every performance target of issue 16 with PASS, MISS or "not run",
and saves the results (JSON and Markdown, with machine info) under ``bench/results/``. The real-CVAT
export is not a phase: it needs a real CVAT, so ``python -m bench.real_export`` runs it apart and its
newest saved result is read here. Exits 0 whether targets are met or not: this is a measurement, not
a test (it exits 1 only when a phase could not run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import procs
from bench.report import evaluate, markdown, text_tables

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("intake", "dispatch", "export", "scaling", "latency", "adnanh")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, one repetition, 50 MB exports")
    parser.add_argument("--only", default=",".join(PHASES), help="phases to run, e.g. intake,dispatch")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 10, quick 3)")
    parser.add_argument("--reps", type=int, help="runs per intake cell, median kept (default 3, quick 1)")
    parser.add_argument("--connections", default="1,16,64", help="wrk connection counts")
    parser.add_argument("--baseline", default=None,
                        help="intake: the commit of cvat-hooks to run beside this code (default: "
                             "bench.intake.BASELINE, issue 16's; '' for none)")
    parser.add_argument("--jobs", type=int, help="jobs per dispatch drain (default 2000, quick 300)")
    parser.add_argument("--export-mb", type=float, help="size of the large export (default 500, quick 50)")
    parser.add_argument("--adnanh-events", type=int, help="deliveries per side, adnanh (default 120, quick 6)")
    parser.add_argument("--per-process", type=int, help="actions per light process, scaling (default 40, quick 5)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (server logs)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    q = args.quick
    args.seconds = args.seconds or (3.0 if q else 10.0)
    args.reps = args.reps or (1 if q else 3)
    args.jobs = args.jobs or (300 if q else 2000)
    args.export_mb = args.export_mb or (50.0 if q else 500.0)
    args.adnanh_events = args.adnanh_events or (6 if q else 120)
    args.per_process = args.per_process or (5 if q else 40)
    args.connections = tuple(int(c) for c in args.connections.split(","))
    return args


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


def latest_saved(phase: str) -> dict[str, Any] | None:
    """The newest result a bench run apart saved for ``phase`` (``bench/results/<phase>-*.json``, or
    with ``-`` for ``_``; the result itself, or what a document like :func:`save_phase`'s holds for it),
    with the file it came from; ``None`` when there is none."""
    names = {phase, phase.replace("_", "-")}
    found = sorted((p for name in names for p in RESULTS.glob(f"{name}-*.json")), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    doc = json.loads(found[-1].read_text())
    result = doc.get("result") or (doc.get("results") or {}).get(phase) or doc
    if not isinstance(result, dict):
        return None
    return {**result, "saved_in": f"bench/results/{found[-1].name}"}


def save_phase(phase: str, result: dict[str, Any], *, quick: bool = False) -> Path:
    """Save one bench run apart (``python -m bench.<phase>``) like the suite's results: JSON with
    machine info and its targets, and the Markdown tables; prints them."""
    started = datetime.now()
    stem = f"{phase}-{started:%Y%m%d-%H%M%S}{'-quick' if quick else ''}"
    path = RESULTS / f"{stem}.json"
    # Its tables and targets name the file they are saved in, as the suite's do when it reads it back.
    results = {phase: {**result, "saved_in": f"bench/results/{path.name}"}}
    doc: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "quick": quick,
                           "machine": procs.machine_info(), "results": results, "result": result, "errors": {}}
    doc["targets"] = evaluate(results)
    print()
    print(text_tables(doc))
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(markdown(doc))
    print(f"\nsaved bench/results/{stem}.json and .md")
    return path


def run_phases(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Run each asked phase; a phase that fails is reported, and the others still run."""
    from bench import adnanh, dispatch, export, intake, latency, scaling

    phases: dict[str, Callable[[], dict[str, Any]]] = {
        "intake": lambda: intake.run(work / "intake", seconds=args.seconds, reps=args.reps,
                                     connections=args.connections, bodies=30_000 if args.quick else 80_000,
                                     baseline=intake.BASELINE if args.baseline is None else args.baseline or None,
                                     log=log),
        "dispatch": lambda: dispatch.run(work / "dispatch", jobs=args.jobs, drains=1 if args.quick else 3,
                                         latency_seconds=3.0 if args.quick else 10.0, log=log),
        "export": lambda: export.run(work / "export", size_mb=args.export_mb, small_mb=5.0,
                                     export_seconds=2.0, reps=1 if args.quick else 3, log=log),
        "scaling": lambda: scaling.run(work / "scaling", processes=(1, 2) if args.quick else scaling.PROCESSES,
                                       per_process=args.per_process, log=log),
        "latency": lambda: latency.run(work / "latency", seconds=2.0 if args.quick else 10.0,
                                       warmup=20 if args.quick else 50, log=log),
        "adnanh": lambda: adnanh.run(work / "adnanh", events=args.adnanh_events, log=log),
    }
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in PHASES:
        if name not in args.only:
            continue
        log(f"== {name} ==")
        started = time.monotonic()
        try:
            results[name] = phases[name]()
            results[name]["phase_seconds"] = round(time.monotonic() - started, 1)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} failed: {errors[name]}")
            traceback.print_exc()
        settle(work / name, keep=args.keep)
    return results, errors


def settle(phase_dir: Path, *, keep: bool) -> None:
    """Leave the machine to the next phase as quiet as the phase found it: the files it wrote are
    removed and written back now (``sync``), instead of being flushed by the kernel while the next
    phase measures (the export phase leaves gigabytes of dirty pages; the latency phase after it
    measured a p99 of 28 ms in the suite against 7 ms alone)."""
    if not keep:
        shutil.rmtree(phase_dir, ignore_errors=True)
    os.sync()
    time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cvat-hooks-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now()
    machine = procs.machine_info()
    log(f"cvat-hooks bench: {', '.join(args.only)}{' (quick)' if args.quick else ''}; work dir {work}")
    try:
        results, errors = run_phases(args, work)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_at_end"] = os.getloadavg()
    real = latest_saved("real_export")
    if real is not None:
        results["real_export"] = real
    targets = evaluate(results)
    doc = {"started": started.isoformat(timespec="seconds"), "quick": args.quick,
           "settings": {"seconds": args.seconds, "reps": args.reps, "connections": list(args.connections),
                        "jobs": args.jobs, "export_mb": args.export_mb, "adnanh_events": args.adnanh_events,
                        "per_process": args.per_process},
           "machine": machine, "results": results, "errors": errors, "targets": targets}
    print()
    print(text_tables(doc))
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stem = f"bench-{started:%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}"
        (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (RESULTS / f"{stem}.md").write_text(markdown(doc))
        print(f"\nsaved bench/results/{stem}.json and .md")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
