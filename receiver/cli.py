"""The ``cvat-hooks`` command: each command a few lines over a plain function used elsewhere too."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from receiver.settings import ConfigError, Settings


def _settings() -> Settings:
    return Settings.from_env()


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cvat-hooks: turn CVAT webhooks into dependable automation."""
    from workers.logs import configure
    from workers.redaction import Redactor

    settings = _settings()
    configure(settings.log_format, redactor=Redactor(settings.sensitive_values()))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="CVAT_HOOKS_HOST")
@click.option("--port", default=8000, show_default=True, type=int, envvar="CVAT_HOOKS_PORT")
@click.option("--workers", default=2, show_default=True, type=int, envvar="CVAT_HOOKS_HTTP_WORKERS",
              help="gunicorn worker processes")
@click.option("--with-worker/--no-worker", default=None,
              help="also run an RQ worker (default: only with the embedded Redis)")
def serve(host: str, port: int, workers: int, with_worker: bool | None) -> None:
    """Run the receiver (with an embedded Redis and a worker when no Redis is configured)."""
    from receiver.serve import ServeOptions
    from receiver.serve import serve as run_serve

    try:
        sys.exit(run_serve(_settings(), ServeOptions(host=host, port=port, workers=workers,
                                                     with_worker=with_worker)))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--burst", is_flag=True, help="stop when the queues are empty")
@click.option("--queue", "queues", multiple=True, help="serve only these queues (repeatable)")
@click.option("--class", "kind", type=click.Choice(["fork", "simple"]), default="fork", show_default=True,
              envvar="CVAT_HOOKS_WORKER_CLASS", help="fork: each job in a child process (crash isolation)")
def worker(burst: bool, queues: tuple[str, ...], kind: str) -> None:
    """Run an RQ worker for the actions (with RQ's scheduler, for delayed retries)."""
    from workers.contract import QUEUES
    from workers.redis_conn import RedisConfigError
    from workers.worker import run

    try:
        run(_settings().workers, burst=burst, queues=queues or QUEUES, kind=kind)
    except RedisConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--port", default=8000, type=int, envvar="CVAT_HOOKS_PORT")
def healthcheck(port: int) -> None:
    """Container health: the receiver answers /healthz; a worker has a fresh heartbeat in Redis."""
    from workers.health import check

    ok, message = check(port=port, settings=_settings().workers)
    click.echo(message)
    sys.exit(0 if ok else 1)


@main.group()
def rules() -> None:
    """Check and try out rules.yaml."""


@rules.command("check")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def rules_check(path: Path | None) -> None:
    """Validate a rules file; exit 1 listing every problem."""
    from receiver.rules import RulesError, load_rules

    path = path or _settings().rules_path
    try:
        ruleset = load_rules(path)
    except RulesError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for warning in ruleset.warnings:
        click.echo(str(warning), err=True)
    click.echo(f"{path}: {len(ruleset.rules)} rule(s) OK")
    click.echo("CVAT events to subscribe: " + ", ".join(sorted(ruleset.events_needed())))


@rules.command("test")
@click.argument("payload", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), help="rules file (default: configured)")
@click.option("--json", "as_json", is_flag=True)
def rules_test(payload: Path, rules_path: Path | None, as_json: bool) -> None:
    """Which rules a payload matches, why, and the rendered actions (nothing is queued)."""
    from receiver.rules import RulesError, load_rules
    from receiver.try_rules import explain_payload

    try:
        ruleset = load_rules(rules_path or _settings().rules_path)
        report = explain_payload(ruleset, read_body(payload))
    except RulesError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _echo_json(report)
        return
    click.echo(f"event {report['event']} (delivery {report['delivery_id'][:12]}), "
               f"transitions from: {report['transitions']}")
    for rule in report["rules"]:
        click.echo(f"{'MATCH' if rule['matched'] else 'no   '} {rule['rule_id']}")
        for reason in rule["reasons"]:
            click.echo(f"        {reason}")
        for action in rule.get("actions", []):
            click.echo(f"        -> {action['action']} {json.dumps(action['params'])}")
        for error in rule.get("errors", []):
            click.echo(f"        !! {error}")


def read_body(path: Path) -> bytes:
    """A payload file: a raw body, or a capture ``{"body_raw": ...}`` as in shared/cvat-payloads."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(data, dict) and isinstance(data.get("body_raw"), str) and "event" not in data:
        return data["body_raw"].encode("utf-8")
    return raw


@main.command()
@click.argument("payload", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--secret", required=True, envvar="CVAT_HOOKS_SECRET", help="the webhook secret")
def sign(payload: Path, secret: str) -> None:
    """Print the X-Signature-256 header CVAT would send for a payload file's exact bytes."""
    from receiver.signature import HEADER
    from receiver.signature import sign as sign_body

    click.echo(f"{HEADER}: {sign_body(read_body(payload), secret.split(',')[0])}")


@main.group()
def deliveries() -> None:
    """What the receiver recorded, and replays."""


def _log() -> Any:
    from workers.delivery_log import DeliveryLog
    from workers.redaction import Redactor
    from workers.redis_conn import RedisConfigError, connect

    from receiver.serve import redis_url_for

    settings = _settings()
    url, keep_alive = redis_url_for(settings)
    try:
        redis = connect(url)
    except RedisConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    redis._cvat_hooks_embedded = keep_alive  # the embedded server lives as long as the client
    return DeliveryLog(redis, retention_seconds=settings.workers.retention_seconds,
                       redactor=Redactor(settings.sensitive_values()))


def _when(value: str | None) -> float | None:
    """A time filter: ISO date/time, or a duration back from now (``30m``, ``2h``, ``7d``)."""
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1] in units and value[:-1].isdigit():
        return time.time() - int(value[:-1]) * units[value[-1]]
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: use an ISO date/time or 30m, 2h, 7d") from exc


@deliveries.command("list")
@click.option("--event", help="event name or pattern, e.g. 'update:*'")
@click.option("--rule", help="only deliveries that matched this rule id")
@click.option("--status", type=click.Choice(["ping", "no_match", "pending", "succeeded", "failed"]))
@click.option("--since", help="ISO time or a duration back from now (30m, 2h, 7d)")
@click.option("--until", help="ISO time or a duration back from now")
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def deliveries_list(event: str | None, rule: str | None, status: str | None, since: str | None,
                    until: str | None, limit: int, as_json: bool) -> None:
    """Recent deliveries, newest first."""
    found = _log().list(limit=limit, event=event, rule=rule, status=status, since=_when(since),
                        until=_when(until))
    if as_json:
        _echo_json([d.summary() for d in found])
        return
    for d in found:
        s = d.summary()
        dup = f" (+{s['duplicates']} dup)" if s["duplicates"] else ""
        click.echo(f"{s['received_at']}  {s['delivery_id'][:12]}  {s['status']:<9} {s['event']:<40} "
                   f"{','.join(s['rules']) or '-'}{dup}")


@deliveries.command("show")
@click.argument("delivery_id")
@click.option("--json", "as_json", is_flag=True)
def deliveries_show(delivery_id: str, as_json: bool) -> None:
    """One delivery: what matched and why, and each action's timeline."""
    delivery = _log().find(delivery_id)
    if delivery is None:
        raise click.ClickException(f"no delivery {delivery_id!r} (unknown, or older than the retention)")
    if as_json:
        _echo_json(delivery.to_json())
        return
    r = delivery.record
    click.echo(f"delivery {delivery.id}\n  event     {r['event']}\n  received  {r['received_at']}\n"
               f"  status    {delivery.status.value}\n  source    transitions from {r['transitions']['source']}")
    for m in r.get("matched", []):
        click.echo(f"  rule {m['rule_id']}: " + "; ".join(m["reasons"]))
    for a in delivery.actions.values():
        click.echo(f"  action {a['action']} ({a['job_id']}): {a['status']}, {a.get('attempts', 0)} attempt(s)")
    click.echo("  timeline:")
    for step in delivery.timeline:
        click.echo(f"    {step['t']}  {step['message']}")


@deliveries.command("replay")
@click.argument("delivery_id")
@click.option("--force", is_flag=True, help="also re-run actions that already succeeded")
def deliveries_replay(delivery_id: str, force: bool) -> None:
    """Re-run a delivery's actions as a new, recorded run (failed ones only, unless --force)."""
    from workers.replay import NothingToReplay, replay

    log = _log()
    delivery = log.find(delivery_id)
    if delivery is None:
        raise click.ClickException(f"no delivery {delivery_id!r} (unknown, or older than the retention)")
    try:
        jobs = replay(log, delivery, force=force)
    except NothingToReplay as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"delivery {delivery.id}: queued {len(jobs)} job(s): {', '.join(jobs)}")


if __name__ == "__main__":
    main()
