"""The Redis key schema: every key cvat-hooks writes, in one place, grouped by the module that owns it.

A key's name is part of a deployment's data: renaming one orphans what is stored under the old name
(an upgrade would forget deliveries, dedupe marks, learned state). So the values below never change;
``tests/test_keys.py`` pins each one to its literal string, and fails when a module outside this one
spells a ``cvat-hooks:`` key itself.

Forms: a plain constant is the key itself; one ending in ``:`` is a prefix the owner appends an id
to; one holding ``{}`` or ``{name}`` placeholders is a template for :meth:`str.format`. RQ's own keys
(queues, jobs, registries) are RQ's to name; only the fixed ids we give RQ jobs are here.
"""

from __future__ import annotations

PREFIX = "cvat-hooks"
"""The namespace of every key below; never used to build a key outside this module."""

# core.delivery_log
DELIVERIES_KEY = f"{PREFIX}:deliveries"
"""Sorted set: delivery ids scored by receipt time (for listing); entries older than the retention
(``CVAT_HOOKS_RETENTION_DAYS``) are trimmed on each write, the key itself does not expire."""
DELIVERY_KEY = f"{PREFIX}:delivery:{{}}"
"""Hash per delivery id: ``record`` (or ``record.z``), ``action:<job id>``, ``started:<job id>``;
expires after the retention."""
DELIVERY_TIMELINE_KEY = f"{PREFIX}:delivery:{{}}:timeline"
"""List per delivery id: its steps as JSON, oldest first; expires after the retention."""

# core.receipts
SEEN_KEY = f"{PREFIX}:seen:{{}}"
"""String per delivery id (the receipt time): the event was stored; expires after the dedupe window
(``CVAT_HOOKS_DEDUPE_DAYS``)."""

# core.state
STATE_KEY = f"{PREFIX}:state:{{resource}}:{{id}}"
"""String per project, task or job: JSON of its last-seen snapshot; expires after
``CVAT_HOOKS_STATE_DAYS`` without an event."""
STATE_SYNC_KEY = f"{PREFIX}:state-sync:{{resource}}"
"""Hash per resource type: ``operations.state_sync``'s progress, ``newest`` (the newest
``updated_date`` learned) and ``full_at`` (epoch seconds of the last full walk); no expiry."""

# core.history
HISTORY_KEY = f"{PREFIX}:history:"
"""Prefix of a hash per hour since the epoch: ``f:<minute>`` failures, ``d:<minute>`` queue depth;
expires after ``core.history.KEEP_SECONDS`` (26 hours)."""

# core.metrics
METRIC_COUNTERS_KEY = f"{PREFIX}:metrics:counters"
"""Hash: ``<metric>|<label values>`` -> count, for every process's Prometheus counters; no expiry."""
METRIC_HISTOGRAMS_KEY = f"{PREFIX}:metrics:buckets"
"""Hash: ``<metric>|<label values>|<bound>`` -> observations falling in that bucket (not cumulative:
renamed from ``...:histograms`` so the two forms never mix), plus ``...|sum``; no expiry."""

# core.service_account
SERVICE_ACCOUNT_KEY = f"{PREFIX}:service-account"
"""String: the CVAT username the workers last found themselves to be; no expiry (a worker starting
with another account overwrites it)."""

# receiver.admin.auth
ADMIN_FAILURES_KEY = f"{PREFIX}:admin:failures:"
"""Prefix of a string counter per client address: wrong admin tokens; expires with the failure
window (``receiver.admin.auth.FAILURE_WINDOW``, 300 s) counted from the first failure."""

# receiver.bulk_replay
BULK_REPLAY_KEY = f"{PREFIX}:bulk-replay:"
"""Prefix of a hash per bulk replay started from the UI (its progress counts); expires after
``receiver.bulk_replay.PROGRESS_SECONDS`` (1 day)."""

# receiver.rules.store
RULES_ANNOUNCED_KEY = f"{PREFIX}:rules:announced:"
"""Prefix of a string (a pid) per reload outcome, ``<outcome>:<digest>:<mtime>``, claimed with
``SET NX`` by the one process that logs it loudly; expires after
``receiver.rules.store.ANNOUNCED_SECONDS`` (120 s)."""
RULES_LAST_GOOD_KEY = f"{PREFIX}:rules:last-good"
"""Hash: ``text``, ``digest``, ``saved_at`` of the last rules file that loaded; no expiry."""

# operations.webhook_registry
DEPLOYMENT_KEY = f"{PREFIX}:deployment"
"""String: this deployment's random id (set once, ``SET NX``); no expiry."""
WEBHOOKS_KEY = f"{PREFIX}:webhooks"
"""Hash: CVAT webhook id -> JSON of the webhook this deployment registered or adopted; no expiry."""

# operations.reconcile
RECONCILE_RUNS_KEY = f"{PREFIX}:reconcile:runs"
"""List: JSON reports of the last runs, newest first, trimmed to ``RUNS_KEPT``; expires after the
retention (``CVAT_HOOKS_RETENTION_DAYS``) from the last run."""
RECONCILE_TRIES_KEY = f"{PREFIX}:reconcile:tries:{{}}"
"""String counter per delivery id: redeliveries reconcile asked for; expires after the dedupe window."""
RECONCILE_WATERMARK_KEY = f"{PREFIX}:reconcile:watermark:{{}}"
"""String per CVAT webhook id: epoch seconds of the newest delivery a clean run checked; expires after
the dedupe window."""
RECONCILE_LOCK_KEY = f"{PREFIX}:reconcile:lock"
"""redis-py lock (string token): one reconcile at a time; expires after
``operations.reconcile.LOCK_SECONDS`` (30 min)."""
RECONCILE_SCHEDULE_LOCK_KEY = f"{PREFIX}:reconcile:schedule-lock"
"""redis-py lock (string token): one worker at a time (re)schedules the periodic run; expires after 30 s."""
RECONCILE_JOB_ID = f"{PREFIX}-reconcile"
"""RQ job id of the periodic reconcile (RQ stores it under its own keys): fixed, so every worker
finds the same job instead of adding its own."""

# operations.worker_start
LEARN_STATES_JOB_ID = f"{PREFIX}-learn-states"
"""RQ job id of the one-off state learning a starting worker queues: fixed, so workers starting
together queue one, not one each."""

# workers.actions
ACTION_CALL_KEY = f"{PREFIX}:{{kind}}:{{delivery_id}}:{{rule_id}}:{{index}}:{{run}}"
"""String per run of one action of one rule for one delivery (``workers.actions._params.call_key``),
``kind`` naming its use: ``ran`` (run), ``notified`` (notify): JSON of the result; ``rr-choice``
(update_job): the assignee picked. Expires after 30 days."""
ROUND_ROBIN_KEY = f"{PREFIX}:rr:{{rule_id}}:{{digest}}"
"""String counter per rule and round-robin list (``digest``: of the list): the turns taken; no expiry."""
EXPORT_DONE_KEY = f"{PREFIX}:export-done:"
"""Prefix of a string per exported version: JSON of the committed export; expires after 30 days."""
ANNOTATE_DONE_KEY = f"{PREFIX}:annotate-done:"
"""Prefix of a string per annotated version: JSON of the result; expires after 30 days."""
IMPORT_DONE_KEY = f"{PREFIX}:import-done:"
"""Prefix of a string per imported version: JSON of the result; expires after 30 days."""
