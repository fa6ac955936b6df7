"""Store maintenance: what a store holds, its schema migrations, and retention.

Each backend offers the maintenance port, :class:`MaintainedBackend`: ``info()`` (counts,
size, schema version, oldest and newest event; read only), ``prune_events(before)`` and
``prune_control(before)``. ``closedloop store info|migrate|prune`` and the automatic
:class:`Retention` go through it, and through the span store's ``prune(before)`` when the
backend offers one (:func:`span_port`).

How each backend prunes:

- **SQLite** deletes events older than the cutoff in bounded batches, one short transaction
  each (:data:`BATCH` rows), so that writers in other processes get the lock between them.
  The pages freed are reused by new writes; the file does not shrink (``VACUUM`` does that,
  offline).
- **PostgreSQL** drops whole day partitions (``events_YYYYMMDD``) that end before the cutoff:
  no row is deleted from them, no table bloats. Retention is therefore by UTC day: events of
  the cutoff's own day stay until that day is entirely older than the cutoff. Late events of
  a day already dropped land in ``events_default``; they are deleted there on the next run.
- **memory** drops events from its list.

Control state is pruned too: history records and published per-key snapshots older than the
cutoff, and pauses that expired before it. An active pause or halt is never removed, nor the
history record of its start, however old.

So are the other records that grow (``prune_records``, one rule per table in
:data:`RECORD_PRUNE`, the same SQL on SQLite and PostgreSQL): approval requests settled
(:data:`APPROVALS_SETTLED`) before the cutoff, with their history; never one pending,
approved and waiting to run, executing, or crashed (a person must first say whether it took
effect). The autonomy audit trail and feedback older than the cutoff, except the record that
set a level still in force (levels themselves are never pruned). Run records of runs started
before it. Detector states (one per detector, drift firings among them: the last few) are
replaced in place and do not grow; they are counted, not pruned.

Automatic retention (:class:`Retention`, set through ``closedloop.configure(retention=...)``
or ``CLOSEDLOOP_RETENTION``, default :data:`DEFAULT_RETENTION`) runs in the store's writer
thread, off the agent's path: when the writer starts, then at most once per ``every``
seconds; each run removes at most ``limit`` events and continues on a later wake-up while
more are due, so the writer is never held for long. Only events older than the cutoff are
ever removed: what was written after it, acknowledged or not, stays.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from closedloop._errors import ConfigError, StoreError

if TYPE_CHECKING:
    from closedloop.store import Store

log = logging.getLogger("closedloop.store")

RETENTION_ENV = "CLOSEDLOOP_RETENTION"
DEFAULT_RETENTION = "90d"
"""Kept when nothing is configured: a quarter of learning signals (weekly trends, baselines),
and a bound on every table. ``off`` keeps everything."""
BATCH = 5_000
"""Events deleted per SQLite transaction: a few tens of milliseconds of write lock."""
_UNITS = {"h": 3_600.0, "d": 86_400.0, "w": 604_800.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_OFF = ("off", "none", "never", "forever")


def parse_duration(text: str) -> float:
    """Seconds in ``12h``, ``30d``, ``2w`` (hours, days, weeks); a one-line
    :class:`~closedloop.ConfigError` for anything else.

    Minutes and months are refused rather than guessed (``6m`` could be either).
    """
    match = _DURATION.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        hint = " (m could mean minutes or months; use h, d or w)" if unit in ("m", "mo") else ""
        raise ConfigError(f"{str(text).strip()!r} is not a duration like 12h, 30d or 2w{hint}")
    seconds = float(match.group(1)) * _UNITS[unit]
    if not 0 < seconds < 1e11:  # past year 5000: ``until`` would not be a date
        raise ConfigError(f"{str(text).strip()!r}: a duration must be more than 0 and less "
                          "than 3000 years")
    return seconds


def parse_retention(value: str | float | None) -> float | None:
    """Seconds to keep, or ``None`` (keep everything) for ``None``, ``off``, ``none``.

    A number is seconds; text is a duration (:func:`parse_duration`).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"retention must be a duration like '30d', seconds, or 'off'; got "
                          f"{value!r}")
    if isinstance(value, str):
        if value.strip().lower() in _OFF:
            return None
        return parse_duration(value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"retention must be more than 0 seconds; got {value!r}")
    return float(value)


def retention_from_env() -> float | None:
    """``$CLOSEDLOOP_RETENTION`` (else :data:`DEFAULT_RETENTION`) in seconds; ``None``: keep
    everything. A value that cannot be read keeps everything too (never delete on a misread
    setting), and the error is logged."""
    text = os.environ.get(RETENTION_ENV, "").strip() or DEFAULT_RETENTION
    try:
        return parse_retention(text)
    except ConfigError as exc:
        log.error("closedloop: %s=%r ignored, nothing is pruned: %s", RETENTION_ENV, text, exc)
        return None


def describe_duration(seconds: float) -> str:
    """``30d``, ``2w``, ``12h``: the largest whole unit, for messages."""
    for unit in ("w", "d", "h"):
        count = seconds / _UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds / 3600:g}h"


# ----- what the port returns ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreInfo:
    """What ``closedloop store info`` shows. Counts are exact; ``None``: not kept there."""

    backend: str
    url: str
    schema_version: int
    latest_version: int
    events: int
    oldest_event: float | None
    newest_event: float | None
    spans: int | None
    scores: int | None
    control_stops: int
    control_halts: int
    control_history: int
    size_bytes: int | None
    records: dict[str, int] = field(default_factory=dict)
    """Rows of the other tables that grow, by table (:data:`RECORD_TABLES`); a table the
    store does not have yet is left out."""
    free_bytes: int | None = None
    """SQLite: space freed by deletes, reused by new writes before the file grows."""
    partitions: tuple[str, ...] = ()
    """PostgreSQL: the day partitions of ``events``, oldest first."""

    @property
    def pending_migrations(self) -> int:
        """Migrations this closedloop would apply (``closedloop store migrate``)."""
        return max(0, self.latest_version - self.schema_version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, times as Unix seconds and ISO strings."""
        out = asdict(self)
        out["partitions"] = list(self.partitions)
        out["records"] = dict(self.records)
        out["pending_migrations"] = self.pending_migrations
        out["oldest_event_time"] = _iso(self.oldest_event)
        out["newest_event_time"] = _iso(self.newest_event)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsPruned:
    """Events removed (or, in a dry run, that would be) by one ``prune_events`` call."""

    events: int
    partitions: tuple[str, ...] = ()
    """PostgreSQL: the day partitions dropped, oldest first."""
    kept_from: float | None = None
    """PostgreSQL: events from here (the cutoff's UTC day) up to the cutoff are kept."""
    more: bool = False
    """The call stopped at its ``limit``: older events remain."""
    approximate: bool = False
    """PostgreSQL: ``events`` counts some large partitions by the planner's statistics."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PruneReport:
    """What :func:`prune` removed from a store, or would remove (``dry_run``)."""

    url: str
    before: float
    dry_run: bool
    events: EventsPruned
    control: int
    spans: dict[str, int] | None = None
    """Spans, traces and scores removed, by kind; ``None`` when the backend has no span port
    (or in a dry run: the span port only prunes)."""
    records: dict[str, int] = field(default_factory=dict)
    """Approval requests and their history, autonomy audit and feedback, runs: rows removed
    (or that would be), by table (:data:`RECORD_PRUNE`)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"url": self.url, "before": self.before, "before_time": _iso(self.before),
                "dry_run": self.dry_run, "events": self.events.events,
                "partitions": list(self.events.partitions),
                "kept_from": self.events.kept_from, "more": self.events.more,
                "approximate": self.events.approximate,
                "control_records": self.control, "spans": self.spans,
                "records": dict(self.records)}


@runtime_checkable
class MaintainedBackend(Protocol):
    """The maintenance port: what a backend holds, and removing what is older than a cutoff."""

    def info(self) -> StoreInfo:
        """Counts, size, schema version, oldest and newest event; never writes."""

    def prune_events(self, before: float, *, limit: int | None = None,
                     dry_run: bool = False) -> EventsPruned:
        """Remove events older than ``before`` (Unix seconds), at most about ``limit``."""

    def prune_control(self, before: float, *, now: float, dry_run: bool = False) -> int:
        """Remove control history, snapshots and expired pauses older than ``before``; never
        a pause or halt active at ``now``. Returns the records removed."""

    def prune_records(self, before: float, *, dry_run: bool = False) -> dict[str, int]:
        """Remove the records :data:`RECORD_PRUNE` allows that are older than ``before``:
        settled approval requests and their history, autonomy audit and feedback, runs.
        Returns the rows removed (or that would be) by table."""


@runtime_checkable
class Prunable(Protocol):
    """A port that removes its records older than a cutoff (the span store's)."""

    def prune(self, before: float) -> object:
        """Remove records older than ``before`` (Unix seconds); returns what went."""


def span_port(backend: object) -> Prunable | None:
    """The backend's span and score store, when it offers one that can prune."""
    from closedloop.store._base import SpanBackend

    if not isinstance(backend, SpanBackend):
        return None
    spans = backend.span_store()
    return spans if isinstance(spans, Prunable) else None


def _counts(result: object) -> dict[str, int]:
    """What a span store's ``prune`` returned (a dataclass of counts, or one count), by kind."""
    if is_dataclass(result) and not isinstance(result, type):
        return {name: int(value) for name, value in asdict(result).items()}
    return {"spans": int(result)} if isinstance(result, int) else {}


CONTROL_PRUNE: tuple[tuple[str, str], ...] = (
    ("control_history",
     "at < %(before)s AND NOT EXISTS (SELECT 1 FROM {s}control_stops AS stop WHERE "
     "stop.task_type = {s}control_history.task_type AND stop.at = {s}control_history.at AND "
     "(stop.until IS NULL OR stop.until > %(now)s))"),
    ("control_stops", "at < %(before)s AND until IS NOT NULL AND until <= %(now)s"),
    ("control_keys", "at < %(before)s"),
)
"""What ``prune_control`` removes, per table: ``WHERE`` clauses with ``{s}`` for the schema
prefix and ``%(before)s``/``%(now)s`` parameters. A stop is active while ``until`` is null (a
halt) or later than now; its history record (same task type and time) is kept with it."""


APPROVALS_SETTLED: tuple[str, ...] = ("rejected", "expired", "executed", "failed")
"""Approval requests that retention may remove once their last change is older than the
cutoff: decided and done with. Never ``pending``, ``approved`` (waiting for a worker),
``executing`` (under a lease) or ``crashed`` (a person must say whether it took effect)."""

_SETTLED = ", ".join(f"'{status}'" for status in APPROVALS_SETTLED)
_LEVEL_IN_FORCE = (
    "EXISTS (SELECT 1 FROM {s}autonomy_levels AS level WHERE "
    "level.task_type = {s}autonomy_history.task_type AND "
    "level.agent_id = {s}autonomy_history.agent_id AND "
    "level.action_class = {s}autonomy_history.action_class AND "
    "level.at = {s}autonomy_history.at)")
RECORD_PRUNE: tuple[tuple[str, str], ...] = (
    ("approval_history",
     "request_id IN (SELECT request_id FROM {s}approvals WHERE status IN (" + _SETTLED
     + ") AND updated_at < %(before)s)"),
    ("approvals", "status IN (" + _SETTLED + ") AND updated_at < %(before)s"),
    ("autonomy_history", "at < %(before)s AND NOT " + _LEVEL_IN_FORCE),
    ("autonomy_feedback", "at < %(before)s"),
    ("runs", "started < %(before)s"),
    ("run_halts", "at < %(before)s"),
)
"""What ``prune_records`` removes, per table, in this order (a request's history before the
request): ``WHERE`` clauses with ``{s}`` for the schema prefix and a ``%(before)s``
parameter. The memory backend applies the same rules in Python (:func:`approval_settled`,
:func:`level_change_kept`)."""

RUN_TABLES: tuple[str, ...] = ("runs", "run_halts")
"""The tables of :data:`RECORD_PRUNE` that the run port's ``prune_runs`` empties by the same
rules."""

RECORD_TABLES: tuple[str, ...] = (
    "approvals", "approval_history", "autonomy_levels", "autonomy_history",
    "autonomy_feedback", "detector_state", "runs", "run_halts")
"""The tables besides events, spans, scores and control state whose rows ``store info``
counts."""


def record_clauses(prefix: str, *, named: str = "%(before)s") -> list[tuple[str, str]]:
    """:data:`RECORD_PRUNE` for one backend: ``prefix`` is the schema's (``"s".`` or empty),
    ``named`` how its driver writes the ``before`` parameter."""
    return [(table, where.format(s=prefix).replace("%(before)s", named))
            for table, where in RECORD_PRUNE]


def approval_settled(status: str, updated_at: float, before: float) -> bool:
    """Whether retention may remove an approval request (the rule of :data:`RECORD_PRUNE`)."""
    return status in APPROVALS_SETTLED and updated_at < before


def level_change_kept(at: float, level_at: float | None, before: float) -> bool:
    """Whether an autonomy audit record stays: newer than the cutoff, or the record that set
    the level in force (``level_at``: that level's time; ``None``: no level stored)."""
    return at >= before or at == level_at


# ----- operations -----------------------------------------------------------------------


def maintained(backend: object) -> MaintainedBackend:
    """``backend`` (opened, if it was deferred) as the maintenance port, or a
    :class:`~closedloop.StoreError` saying its backend has none."""
    from closedloop.store._registry import DeferredBackend

    if isinstance(backend, DeferredBackend):
        backend = backend.backend()  # the store it could not open at first, or StoreError
    if not isinstance(backend, MaintainedBackend):
        url = getattr(backend, "url", type(backend).__name__)
        raise StoreError(f"store {url} does not support maintenance (info, prune): its "
                         "backend has no info/prune_events/prune_control/prune_records")
    return backend


def store_info(store: Store) -> StoreInfo:
    """What ``store`` holds, read without writing anything."""
    return maintained(store.backend).info()


def prune(store: Store, before: float, *, dry_run: bool = False, limit: int | None = None,
          now: float | None = None) -> PruneReport:
    """Remove from ``store`` events, control records, spans and scores, and the other records
    :data:`RECORD_PRUNE` allows, older than ``before``.

    ``limit`` bounds the events removed by this call (``EventsPruned.more`` says if some remain);
    ``dry_run`` counts what would go and removes nothing.
    """
    backend = maintained(store.backend)
    now = time.time() if now is None else now
    events = backend.prune_events(before, limit=limit, dry_run=dry_run)
    control = backend.prune_control(before, now=now, dry_run=dry_run)
    spans: dict[str, int] | None = None
    port = span_port(backend)
    if port is not None and not dry_run:
        spans = _counts(port.prune(before))
    records = backend.prune_records(before, dry_run=dry_run)
    return PruneReport(url=store.url, before=before, dry_run=dry_run, events=events,
                       control=control, spans=spans, records=records)


def migrate_store(url: str) -> tuple[str, int, int]:
    """Open (creating if needed) the store at ``url`` and apply its pending migrations.

    Returns ``(url without password, version found, version now)``.
    """
    from closedloop.store import open_store

    store = open_store(url)
    try:
        found = getattr(store.backend, "found_version", None)  # set by the opening migration
        if not isinstance(found, int):
            raise StoreError(f"store {store.url} has no schema to migrate")
        return store.url, found, store_info(store).schema_version
    finally:
        store.close()


@dataclass(slots=True)
class Retention:
    """Automatic retention for one store: runs in its writer thread (see the module docstring).

    ``keep`` seconds of events are kept. A run is due when the writer starts and then every
    ``every`` seconds; it removes at most ``limit`` events and, if more are due, the next
    wake-up (at least ``pause`` seconds later) continues. A failing run is logged and
    retried after ``retry`` seconds; it never stops the writer.
    """

    keep: float
    every: float = 3_600.0
    limit: int = 50_000
    pause: float = 1.0
    retry: float = 300.0
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    removed: int = 0
    """Events removed by this policy so far."""
    runs: int = 0
    _next: float = field(default=float("-inf"), repr=False)
    _failing: bool = field(default=False, repr=False)

    def __call__(self, backend: object) -> None:
        """Run a step if one is due; called by the store's writer thread after each wake-up."""
        start = self.monotonic()
        if start < self._next:
            return
        before = self.clock() - self.keep
        try:
            with _STEP:  # a fork waits for the step to end (see _STEP)
                port = maintained(backend)
                events = port.prune_events(before, limit=self.limit)
                control = port.prune_control(before, now=self.clock())
                spans = span_port(port)
                records: dict[str, int] = {}
                if not events.more:
                    if spans is not None:
                        spans.prune(before)
                    records = port.prune_records(before)
        except Exception as exc:  # noqa: BLE001 - retention must never stop the writer
            self._next = start + self.retry
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            log.log(level, "closedloop store %s: retention could not prune (%s); retrying in "
                    "%.0fs", getattr(backend, "url", "?"), _one_line(exc), self.retry)
            return
        self._failing = False
        self.runs += 1
        self.removed += events.events
        self._next = start + (self.pause if events.more else self.every)
        others = sum(records.values())
        if events.events or control or others:
            log.info("closedloop store %s: retention %s removed %d events%s, %d control "
                     "records and %d other records older than %s", getattr(backend, "url", "?"),
                     describe_duration(self.keep), events.events,
                     f" ({len(events.partitions)} day partitions)" if events.partitions
                     else "", control, others, _iso(before))


_STEP = threading.Lock()
"""Held while a retention step runs, and by ``os.fork()`` around the fork: a child forked
while the writer thread was inside SQLite or psycopg could inherit their locks held and
hang; with this, a fork waits for the (bounded) step instead."""

if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_STEP.acquire, after_in_parent=_STEP.release,
                        after_in_child=_STEP.release)


def _iso(ts: float | None) -> str | None:
    if ts is None or not math.isfinite(ts):
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
