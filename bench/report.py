"""The suite's results as tables (terminal and Markdown), and issue 5's targets, each PASS or MISS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Section = tuple[str, list[str], list[list[str]]]
"""A table: title, column headers, rows of cells."""


def _f(value: Any, fmt: str = "{:.0f}") -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _get(data: dict[str, Any], *path: Any) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


# -- targets ----------------------------------------------------------------------------------


def _target(ident: str, target: str, measured: str, ok: bool | None, note: str = "") -> dict[str, Any]:
    verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
    return {"id": ident, "target": target, "measured": measured, "verdict": verdict, "note": note}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 5 that the phases run could measure."""
    out: list[dict[str, Any]] = []
    intake = results.get("intake")
    if intake:
        servers = intake["servers"]
        c = "16" if "16" in servers["cvat-hooks"]["cells"] else str(intake["connections"][0])
        ours = servers["cvat-hooks"]["cells"][c]
        ceiling = servers["ceiling"]["cells"][c]
        peer = servers["webhook"]["cells"][c]
        r1 = ours["rps"] / ceiling["rps"] if ceiling["rps"] else 0.0
        r2 = ours["rps"] / peer["rps"] if peer["rps"] else 0.0
        out.append(_target("intake-vs-ceiling", f">= 0.70x bare Flask at {c} connections", f"{r1:.2f}x "
                           f"({ours['rps']:.0f} vs {ceiling['rps']:.0f} req/s)", r1 >= 0.70,
                           "distinct events: the full path"))
        if "cpu_ms_per_req" in ours and "cpu_ms_per_req" in ceiling:
            spent = ours["cpu_ms_per_req"] + ours.get("redis_cpu_ms_per_req", 0.0)
            r3 = ceiling["cpu_ms_per_req"] / spent if spent else 0.0
            out.append(_target("intake-vs-ceiling-cpu", f">= 0.70x bare Flask at {c} connections, per CPU",
                               f"{r3:.2f}x ({ceiling['cpu_ms_per_req']:.2f} vs {spent:.2f} ms CPU/request)",
                               r3 >= 0.70, "the same ratio from CPU per request (receiver + its Redis)"))
        out.append(_target("intake-vs-webhook", f">= 1.0x adnanh/webhook at {c} connections", f"{r2:.2f}x "
                           f"({ours['rps']:.0f} vs {peer['rps']:.0f} req/s)", r2 >= 1.0))
        out.append(_target("intake-p99", f"p99 < half of webhook's at {c} connections",
                           f"{ours['p99_ms']:.1f} ms vs {peer['p99_ms']:.1f} ms / 2 "
                           f"= {peer['p99_ms'] / 2:.1f} ms",
                           ours["p99_ms"] < peer["p99_ms"] / 2))
        mem = servers["cvat-hooks"]["rss_mb"]
        out.append(_target("intake-rss-flat", "receiver RSS flat under sustained load",
                           f"{mem['warm']} -> {mem['end']} MB after warm-up (peak {mem['peak']})",
                           servers["cvat-hooks"]["rss_flat"], "flat: grows <= max(5 MB, 5%)"))
    dispatch = results.get("dispatch")
    if dispatch:
        setups = dispatch["setups"]
        shipped = dispatch.get("shipped")  # targets are about what ``cvat-hooks worker`` runs by default
        for kind in ([shipped] if shipped and f"{shipped}x2" in setups else ["fork", "simple"]):
            two, one = setups.get(f"{kind}x2"), setups.get(f"{kind}x1")
            if two:
                rate = two["drain"]["per_second"]
                out.append(_target(f"dispatch-{kind}x2", f">= 400 no-op actions/s, 2 {kind} workers",
                                   f"{rate:.0f}/s", rate >= 400))
                lat = two["latency"]
                out.append(_target(f"latency-p50-{kind}x2", "event-to-action-start p50 <= 5 ms at 100 ev/s",
                                   f"{lat['p50_ms']} ms ({kind} x2)", lat["p50_ms"] <= 5))
                out.append(_target(f"latency-p99-{kind}x2", "event-to-action-start p99 <= 20 ms at 100 ev/s",
                                   f"{lat['p99_ms']} ms ({kind} x2)", lat["p99_ms"] <= 20))
            if one and two and one["drain"]["per_second"]:
                ratio = two["drain"]["per_second"] / one["drain"]["per_second"]
                out.append(_target(f"scale-out-{kind}", f"2 {kind} workers drain >= 1.8x one",
                                   f"{ratio:.2f}x", ratio >= 1.8))
        # The same two targets for two light processes under one parent (CVAT_HOOKS_LIGHT_PROCESSES=2).
        pair, one = setups.get("split2x1"), setups.get(f"{shipped}x1")
        if pair:
            rate = pair["drain"]["per_second"]
            out.append(_target("dispatch-split2", ">= 400 no-op actions/s, 2 light processes in one worker",
                               f"{rate:.0f}/s", rate >= 400, "split2: CVAT_HOOKS_LIGHT_PROCESSES=2"))
            if one and one["drain"]["per_second"]:
                ratio = rate / one["drain"]["per_second"]
                out.append(_target("scale-out-split2", "2 light processes in one worker drain >= 1.8x one",
                                   f"{ratio:.2f}x", ratio >= 1.8, "split2x1 / splitx1"))
        for kind, probe in (dispatch.get("crash") or {}).items():
            if probe["worker_survived"]:
                said = (f"{probe.get('took_down', 'work-horse')} only; worker survived, next job ran: "
                        f"{probe['next_job_ran']}; retried after {probe.get('retried_after_s')} s; "
                        f"log: {probe['crashed_job_log_status']} ({probe['crashed_job_log_error']})")
                ok = probe["next_job_ran"] and probe["crashed_job_log_status"] in ("retrying", "failed")
            else:
                said = (f"the whole worker (exit {probe['worker_exit_code']}); next job ran: "
                        f"{probe['next_job_ran']}; log says {probe['crashed_job_log_status']!r}; "
                        f"RQ retries it in ~{probe['abandoned_job_recovered_in_s']} s")
                ok = probe["crashed_job_log_status"] in ("retrying", "failed")
            out.append(_target(f"crash-{kind}", "a crashing action is not silent", said, ok,
                               "what one os._exit() in an action takes down"))
    export = results.get("export")
    if export:
        ov = export["overhead"]["median_overhead_s"]
        out.append(_target("export-overhead", "export <= 0.5 s over the server's own time",
                           f"+{ov:.2f} s over a {export['overhead']['export_seconds']:g} s export", ov <= 0.5,
                           "1 MB file: polling, login and format check, not transfer"))
        size = f"{export['size_mb']:g}mb"
        for where in ("local", "s3"):
            r = _get(export, "memory", f"{where}-{size}")
            if r:
                out.append(_target(f"export-rss-{where}",
                                   f"worker RSS growth <= 50 MB, {export['size_mb']:g} MB to {where}",
                                   f"+{r['rss_growth_mb']} MB RSS (+{r['pss_growth_mb']} MB PSS)",
                                   r["rss_growth_mb"] <= 50))
    return out


# -- tables -----------------------------------------------------------------------------------


def sections(doc: dict[str, Any]) -> list[Section]:
    """Every table of a result document."""
    results = doc["results"]
    out: list[Section] = []
    intake = results.get("intake")
    if intake:
        conns = [str(c) for c in intake["connections"]]
        headers = ["server"] + [f"c={c} {what}" for c in conns for what in ("req/s", "p50 ms", "p99 ms")]
        rows = []
        for server in intake["servers"].values():
            row = [server["label"]]
            for c in conns:
                cell = server["cells"][c]
                row += [_f(cell["rps"]), _f(cell["p50_ms"], "{:.2f}"), _f(cell["p99_ms"], "{:.1f}")]
            rows.append(row)
        out.append((f"Intake: median of {intake['reps']} x {intake['seconds']:g} s wrk runs "
                    "(wrk on core 0, servers on core 1)", headers, rows))
        ceiling = intake["servers"]["ceiling"]["cells"]
        peer = intake["servers"]["webhook"]["cells"]
        ratio_rows = []
        for name in ("cvat-hooks", "cvat-hooks-dup"):
            cells = intake["servers"][name]["cells"]
            ratio_rows.append([intake["servers"][name]["label"]]
                              + [f"{cells[c]['rps'] / ceiling[c]['rps']:.2f}x / "
                                 f"{cells[c]['rps'] / peer[c]['rps']:.2f}x" for c in conns])
        out.append(("Intake ratios: cvat-hooks / ceiling, cvat-hooks / webhook",
                    ["mode"] + [f"c={c}" for c in conns], ratio_rows))
        if "cpu_ms_per_req" in ceiling[conns[0]]:
            ref = "16" if "16" in conns else conns[-1]
            cpu_rows = []
            for server in intake["servers"].values():
                row = [server["label"]]
                for c in conns:
                    cell = server["cells"][c]
                    own = cell.get("cpu_ms_per_req")
                    redis = cell.get("redis_cpu_ms_per_req")
                    row.append(_f(own, "{:.2f}") + ("" if redis is None else f" + {redis:.2f}"))
                last = server["cells"][ref]
                spent = (last.get("cpu_ms_per_req") or 0) + (last.get("redis_cpu_ms_per_req") or 0)
                row.append(f"{ceiling[ref]['cpu_ms_per_req'] / spent:.2f}x" if spent else "-")
                cpu_rows.append(row)
            out.append(("Intake CPU per request, ms (server process tree + its Redis): steadier than req/s "
                        "on a busy host", ["server"] + [f"c={c}" for c in conns]
                        + [f"ceiling CPU / this CPU at c={ref}"], cpu_rows))
        mem_rows = []
        for name, server in intake["servers"].items():
            if name == "cvat-hooks-dup":
                continue
            m = server["rss_mb"]
            extra = ""
            if "redis_peak_rss_mb" in server["notes"]:
                extra = f"redis-server apart: peak {server['notes']['redis_peak_rss_mb']} MB"
            mem_rows.append([server["label"].replace(" (distinct events)", ""), _f(m["idle"], "{}"),
                             _f(m["warm"], "{}"), _f(m["end"], "{}"), _f(m["peak"], "{}"),
                             "yes" if server["rss_flat"] else "NO", extra])
        out.append(("Intake memory: RSS summed over each server's process tree, MB",
                    ["server", "idle", "after warm-up", "end", "peak", "flat", "note"], mem_rows))
        outcome_rows = [[name, str(intake["servers"][name]["notes"].get("outcomes_all_runs"))]
                        for name in ("cvat-hooks", "cvat-hooks-dup")]
        out.append(("Intake: what cvat-hooks did with the requests (its own counters)", ["mode", "outcomes"],
                    outcome_rows))
    dispatch = results.get("dispatch")
    if dispatch:
        rows = []
        for name, s in dispatch["setups"].items():
            d, lat = s["drain"], s["latency"]
            rows.append([name, f"{d['completed']}/{d['jobs']}", _f(d["seconds"], "{:.2f}"),
                         _f(d["per_second"]), " / ".join(f"{r:.0f}" for r in d.get("runs_per_second", [])),
                         _f(lat["p50_ms"], "{:.1f}"), _f(lat["p99_ms"], "{:.1f}"),
                         _f(lat["max_ms"], "{:.0f}"),
                         f"{lat['started']}/{lat['events']}",
                         _f(d.get("worker_cpu_ms_per_job"), "{:.2f}"),
                         _f(d.get("redis_cpu_ms_per_job"), "{:.2f}"),
                         _f(s["rss_mb_after"], "{}")])
        out.append((f"Dispatch: no-op actions ({dispatch['jobs']} queued at once, "
                    f"median of {dispatch.get('drains', 1)} drains; "
                    f"then {dispatch['rate']:g} events/s for {dispatch['latency_seconds']:g} s)",
                    ["workers", "drained", "seconds", "jobs/s", "each drain", "start p50 ms", "p99 ms", "max ms",
                     "started", "worker CPU ms/job", "redis CPU ms/job", "RSS MB"], rows))
        crash = dispatch.get("crash") or {}
        if crash:
            out.append(("Dispatch: one action calling os._exit(), then a no-op",
                        ["class", "took down", "worker survived", "next job ran", "crashed job in the log",
                         "RQ status", "retried after", "abandoned-job retry in"],
                        [[k, str(p.get("took_down", "-")), str(p["worker_survived"]), str(p["next_job_ran"]),
                          f"{p['crashed_job_log_status']} ({p['crashed_job_log_error']})",
                          str(p["crashed_job_rq_status"]),
                          "-" if p.get("retried_after_s") is None else f"{p['retried_after_s']} s",
                          "-" if p["abandoned_job_recovered_in_s"] is None
                          else f"{p['abandoned_job_recovered_in_s']} s"]
                         for k, p in crash.items()]))
    export = results.get("export")
    if export:
        ov = export["overhead"]
        rows = [[str(i + 1), _f(r["total_s"], "{:.2f}"), _f(r["queue_to_start_s"], "{:.3f}"),
                 _f(r["server_seconds"], "{:.2f}"), _f(r["poll_overshoot_s"], "{:.2f}"),
                 _f(r["overhead_s"], "{:.2f}")]
                for i, r in enumerate(ov["runs"])]
        out.append((f"Export overhead: 1 MB export the server takes {ov['export_seconds']:g} s to prepare",
                    ["run", "queued->done s", "queued->start s", "seen finished after s", "poll overshoot s",
                     "overhead s"], rows))
        rows = [[name, _f(r["size_mb"], "{}"), _f(r["total_s"], "{:.1f}"), _f(r["mb_per_s"], "{}"),
                 _f(r["rss_idle_mb"], "{}"), _f(r["rss_peak_mb"], "{}"), _f(r["rss_growth_mb"], "{}"),
                 _f(r["pss_growth_mb"], "{}")] for name, r in export["memory"].items()]
        out.append(("Export memory: the shipped worker's process tree (split) while exporting",
                    ["export", "MB", "seconds", "MB/s", "RSS idle", "RSS peak", "RSS growth", "PSS growth"],
                    rows))
    targets = doc.get("targets") or []
    if targets:
        out.append(("Targets (issue 5)", ["verdict", "target", "measured", "note"],
                    [[t["verdict"], t["target"], t["measured"], t["note"]] for t in targets]))
    return out


def _text_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    body = [fmt.format(*headers), line] + [fmt.format(*(str(c) for c in row)) for row in rows]
    return f"{title}\n" + "\n".join(body)


def text_tables(doc: dict[str, Any]) -> str:
    """Every table, for the terminal."""
    parts = [_text_table(*s) for s in sections(doc)]
    for phase, error in (doc.get("errors") or {}).items():
        parts.append(f"{phase}: FAILED to run: {error}")
    return "\n\n".join(parts)


def _md_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(x: Any) -> str:
        return str(x).replace("|", "\\|")

    out = [f"### {title}", "", "| " + " | ".join(map(esc, headers)) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(out)


def _load(values: Sequence[float] | None) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "-"


def markdown(doc: dict[str, Any]) -> str:
    """The whole result document as Markdown, machine info first."""
    m = doc["machine"]
    head = [f"# cvat-hooks benchmark, {doc['started']}{' (quick)' if doc.get('quick') else ''}", "",
            f"- machine: {m.get('cpu_model')}, {m.get('cpus')} CPUs, {m.get('memory_mb')} MB, "
            f"kernel {m.get('kernel')}, Python {m.get('python')}",
            f"- load average (1, 5, 15 min) at start: {_load(m.get('loadavg_at_start'))}; "
            f"at end: {_load(m.get('loadavg_at_end'))} (other work on the machine: see bench/README.md)",
            f"- tools: {m.get('wrk')}; {m.get('webhook')}; {m.get('redis_server')}",
            f"- packages: {', '.join(f'{k} {v}' for k, v in (m.get('packages') or {}).items())}",
            f"- commit: {m.get('git_commit')}{' (with uncommitted changes)' if m.get('git_dirty') else ''}",
            f"- settings: {doc.get('settings')}", ""]
    body = [_md_table(*s) for s in sections(doc)]
    for phase, error in (doc.get("errors") or {}).items():
        body.append(f"**{phase} failed to run:** `{error}`")
    return "\n".join(head) + "\n" + "\n\n".join(body) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.report RESULT.json``: print a saved result's tables and rewrite its Markdown."""
    import json
    import sys
    from pathlib import Path

    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        doc = json.loads(path.read_text())
        doc["targets"] = evaluate(doc["results"])
        print(text_tables(doc))
        path.with_suffix(".md").write_text(markdown(doc))


if __name__ == "__main__":
    main()
