"""``closedloop store``: what a store holds, its migrations, retention, dead letters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from closedloop.cli import main
from closedloop.cli._common import _ParamType, echo_json, iso, say, store_option

if TYPE_CHECKING:
    from closedloop.store import PruneReport, StoreInfo


@main.group()
def store() -> None:
    """The event store: what it holds, migrations, retention, dead letters."""


class Duration(_ParamType):
    """An age such as ``12h``, ``30d`` or ``2w``, in seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float:
        if isinstance(value, float):
            return value
        from closedloop._errors import ConfigError
        from closedloop.store import parse_duration

        try:
            return parse_duration(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


@store.command("info")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def info(store_url: str, as_json: bool) -> None:
    """Show the store's backend, schema version, counts, size and oldest and newest event.

    Read only: nothing is created, migrated or written. Keys of --json: backend, url,
    schema_version, latest_version, pending_migrations, events, oldest_event,
    newest_event (Unix seconds, and *_time in ISO), spans, scores (null where the store
    keeps none), control_stops, control_halts, control_history, records (rows of the other
    tables that grow, by table: approvals, approval_history, autonomy_levels,
    autonomy_history, autonomy_feedback, detector_state, runs), size_bytes, free_bytes,
    partitions (PostgreSQL day partitions), retention_s (this environment's automatic
    retention, null: none).
    """
    from closedloop._runtime import current_runtime
    from closedloop.cli._common import open_store_to_read
    from closedloop.store import store_info

    target = open_store_to_read(store_url)
    try:
        found = store_info(target)
    finally:
        target.close()
    retention = current_runtime().retention
    if as_json:
        echo_json({**found.to_dict(), "retention_s": retention})
        return
    for label, value in _info_lines(found, retention):
        say(f"{label:<11}{value}")


def _info_lines(found: StoreInfo, retention: float | None) -> list[tuple[str, str]]:
    from closedloop.store import RETENTION_ENV, describe_duration

    if found.backend == "memory":
        schema = "none (in this process only)"
    elif found.pending_migrations:
        schema = (f"version {found.schema_version} of {found.latest_version}: "
                  f"{found.pending_migrations} migration(s) pending; run `closedloop store "
                  "migrate`")
    else:
        schema = f"version {found.schema_version} (current; no migration pending)"
    events = f"{found.events:,}"
    if found.oldest_event is not None and found.newest_event is not None:
        events += f", oldest {iso(found.oldest_event)}, newest {iso(found.newest_event)}"
    halts = f" ({found.control_halts} halted)" if found.control_halts else ""
    lines = [("store", found.url), ("backend", found.backend), ("schema", schema),
             ("events", events),
             ("spans", "-" if found.spans is None else f"{found.spans:,}"),
             ("scores", "-" if found.scores is None else f"{found.scores:,}"),
             ("control", f"{found.control_stops} stop(s) in force{halts}, "
                         f"{found.control_history:,} history record(s)")]
    records = found.records
    for label, parts in _RECORD_LINES:
        shown = [f"{records[table]:,} {what}" for table, what in parts if table in records]
        if shown:
            lines.append((label, ", ".join(shown)))
    if found.size_bytes is not None:
        size = _size(found.size_bytes) + (" on disk" if found.backend == "sqlite" else
                                          " in the database")
        if found.free_bytes:
            size += f" ({_size(found.free_bytes)} freed by deletes, reused by new writes)"
        lines.append(("size", size))
    if found.backend == "postgresql":
        days = found.partitions
        span = f": {days[0]} … {days[-1]}" if len(days) > 1 else f": {days[0]}" if days else ""
        lines.append(("partitions", f"{len(days)} day(s){span}"))
    keep = "none (keeps everything)" if retention is None else describe_duration(retention)
    lines.append(("retention", f"{keep}, for agents with this environment "
                               f"(${RETENTION_ENV})"))
    return lines


_RECORD_LINES = (
    ("approvals", (("approvals", "request(s)"), ("approval_history", "history record(s)"))),
    ("autonomy", (("autonomy_levels", "level(s)"), ("autonomy_history", "audit record(s)"),
                  ("autonomy_feedback", "feedback record(s)"),
                  ("detector_state", "detector state(s)"))),
    ("runs", (("runs", "run record(s)"),)),
)
"""How ``store info`` shows :attr:`StoreInfo.records`: a line per kind, its tables' counts."""


_PRUNED = {"approvals": "approval request(s)", "approval_history": "approval history record(s)",
           "autonomy_history": "autonomy audit record(s)",
           "autonomy_feedback": "autonomy feedback record(s)", "runs": "run record(s)"}
"""How ``store prune`` names the rows it removed from each table of
:attr:`PruneReport.records`."""


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    raise AssertionError  # pragma: no cover - the loop always returns


@store.command("migrate")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
def migrate(store_url: str, as_json: bool) -> None:
    """Apply the store's pending schema migrations (creating the store if there is none).

    Other commands that only read (report, traces, status, store info) never migrate;
    agents migrate the store they open. Run this before upgrading agents, with a role that
    may change the schema. Safe while agents run and when several processes migrate at
    once. Keys of --json: url, from_version, to_version.
    """
    from closedloop.store import migrate_store

    url, found, now = migrate_store(store_url)
    if as_json:
        echo_json({"url": url, "from_version": found, "to_version": now})
    elif found == now:
        say(f"{url} is at schema version {now}: no migration pending")
    elif found == 0:
        say(f"created {url} at schema version {now}")
    else:
        say(f"migrated {url} from schema version {found} to {now}")


@store.command("prune")
@click.option("--older-than", "older_than", type=Duration(), required=True, metavar="AGE",
              help="Remove what is older than AGE: 12h, 30d, 2w (hours, days, weeks).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def prune(older_than: float, dry_run: bool, store_url: str, as_json: bool) -> None:
    """Remove events and control history older than --older-than.

    Spans and scores too where the store prunes them through its span port; approval
    requests settled (rejected, expired, executed, failed) before then, with their history;
    the autonomy audit trail and feedback; run records. Never an active pause or halt, a
    pending, approved, executing or crashed approval request, an autonomy level, or the
    audit record that set a level in force. SQLite deletes in short transactions (agents keep
    writing) and reuses the space freed; PostgreSQL drops whole day partitions, so it
    keeps every event of the cutoff's UTC day. The store's schema is used as it is, never
    migrated. Keys of --json: url, before (Unix seconds) and before_time, dry_run, events,
    partitions, kept_from, more, approximate (events of large PostgreSQL partitions counted
    by the planner's statistics), control_records, spans (spans, traces and scores removed;
    null: this store has no span port, or a dry run), records (the other rows removed, by
    table).
    """
    import time

    from closedloop.cli._common import open_store_to_read
    from closedloop.store import prune as prune_store

    before = time.time() - older_than
    # opened as it is (no migration); the maintenance port writes through its own connection
    target = open_store_to_read(store_url)
    try:
        report = prune_store(target, before, dry_run=dry_run)
    finally:
        target.close()
    if as_json:
        echo_json(report.to_dict())
        return
    say(_prune_line(report))


def _prune_line(report: PruneReport) -> str:
    pruned = report.events
    verb = "would remove" if report.dry_run else "removed"
    about = "about " if pruned.approximate else ""
    line = (f"{verb} {about}{pruned.events:,} events older than {iso(report.before)} from "
            f"{report.url}")
    if pruned.partitions:
        first, last = pruned.partitions[0], pruned.partitions[-1]
        line += (f" ({len(pruned.partitions)} day partition(s): "
                 f"{first}{f' … {last}' if last != first else ''})")
    if report.spans:
        line += "".join(f", {n:,} {kind}" for kind, n in report.spans.items())
    others = {table: n for table, n in report.records.items() if n}
    line += "".join(f", {n:,} {_PRUNED.get(table, table)}" for table, n in others.items())
    line += f", and {report.control:,} control record(s)"
    if pruned.kept_from is not None and pruned.kept_from < report.before:
        line += (f"; events from {iso(pruned.kept_from)} on are kept (whole days are "
                 "dropped)")
    return line


@store.command("import-deadletter")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def import_deadletter(file: Path, store_url: str, as_json: bool) -> None:
    """Write the events in dead-letter FILE into the store, each exactly once.

    Safe to run again, or on a file whose events partly reached the store: an event already
    stored (same timestamp and trace id) is skipped. Lines that are not a whole event (a
    write cut short by a full disk) are counted as malformed and skipped. Keys of --json:
    read, imported, already_stored, malformed.
    """
    from closedloop._errors import StoreError
    from closedloop.store import import_dead_letter, open_store

    if not file.is_file():  # before the store is opened (and perhaps created) for nothing
        raise StoreError(f"no dead-letter file at {file}")
    target = open_store(store_url)
    try:
        result = import_dead_letter(file, target)
    finally:
        target.close()
    if as_json:
        echo_json(result.to_dict())
        return
    say(f"imported {result.imported} events from {click.format_filename(file)} into "
        f"{target.url} ({result.already_stored} already stored, {result.malformed} "
        "malformed lines skipped)")
