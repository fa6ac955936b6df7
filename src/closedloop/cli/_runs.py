"""``closedloop runs list|show|halt``: the runs (:class:`closedloop.Run`) a store keeps.

``list`` pages through the run records newest first; ``show RUN_ID`` prints one run's record
(and its halt, if one was recorded) and its steps (the events carrying its id, compensations
included), or, for a run whose record was never written (its process died), what its steps
say. ``halt RUN_ID --reason`` records a halt that the run's process sees at its next poll.
Stored text is printed literally.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from closedloop.cli import main
from closedloop.cli._common import (
    EXIT_NO_DATA,
    Since,
    echo_json,
    iso,
    open_store_to_read,
    open_store_to_write,
    say,
    store_option,
)

if TYPE_CHECKING:
    from closedloop.runs import RunRecord

MAX_RUNS_PAGE = 1000  # closedloop._runstate.MAX_RUNS_PAGE, spelled out (start-up)
MAX_RUN_STEPS = 10_000
"""``runs show`` lists at most this many steps of a run (the oldest first)."""


@main.group()
def runs() -> None:
    """Runs of agents (closedloop.Run): list them, show one with its steps, halt one."""


def _duration(record: RunRecord) -> str:
    d = record.duration_s
    return "-" if d is None else f"{d:.1f}"


def _cost(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


@runs.command("list")
@store_option
@click.option("--since", type=Since(), help="Only runs started since (24h, 7d, a date).")
@click.option("--outcome", help="Only runs that ended so (succeeded, budget_exceeded, halted, "
                                "aborted, error, running).")
@click.option("--limit", type=click.IntRange(1, MAX_RUNS_PAGE), default=20, show_default=True,
              help="How many runs to list at most.")
@click.option("--cursor", help="Continue a listing: the next_cursor a previous page gave.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON for scripts: the runs and the next page's cursor.")
def list_runs(  # noqa: PLR0917 - click passes every option as an argument
        store_url: str, since: float | None, outcome: str | None, limit: int,
        cursor: str | None, as_json: bool) -> None:
    """The most recent runs, newest first: outcome, steps, tokens, cost, duration."""
    from closedloop.cli._traces import columns

    store = open_store_to_read(store_url)
    try:
        page = store.runs().list_runs(since=since, outcome=outcome, limit=limit, cursor=cursor)
    finally:
        store.close()
    if as_json:
        echo_json(page.to_dict())
        return
    if not page.runs:
        click.echo("no runs", err=True)
        sys.exit(EXIT_NO_DATA)
    rows = [(r.run_id, iso(r.started), r.name or "-", r.outcome, str(r.steps), str(r.refused),
             f"{r.input_tokens}/{r.output_tokens}", _cost(r.cost_usd), _duration(r))
            for r in page.runs]
    for line in columns(("run id", "started", "name", "outcome", "steps", "refused",
                         "tokens in/out", "cost", "s"), rows, right=(4, 5, 6, 7, 8)):
        click.echo(line)
    if page.next_cursor is not None:
        say(f"more: --cursor {page.next_cursor}")


@runs.command("show")
@click.argument("run_id")
@store_option
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: the run's record (null if none) and its steps.")
def show_run(run_id: str, store_url: str, as_json: bool) -> None:
    """One run: its record (outcome, why, budgets, usage) and its steps, oldest first."""
    from closedloop.cli._traces import step_line
    from closedloop.runs import RunHaltStore
    from closedloop.store import EventQuery

    run_id = run_id.strip()
    store = open_store_to_read(store_url)
    try:
        port = store.runs()
        record = port.get_run(run_id)
        halt = (port.run_halts([run_id]).get(run_id) if isinstance(port, RunHaltStore)
                else None)
        # filtered here too: a plug-in backend may not know EventQuery.run_id
        steps = [e for e in store.backend.iter_events(EventQuery(run_id=run_id,
                                                                 limit=MAX_RUN_STEPS))
                 if e.run_id == run_id]
    finally:
        store.close()
    if as_json:
        echo_json({"run": record.to_dict() if record is not None else None,
                   "halt": halt.to_dict() if halt is not None else None,
                   "steps": [e.to_dict() for e in steps]})
        return
    if record is None and not steps:
        say(f"error: no run {run_id}", err=True)
        sys.exit(EXIT_NO_DATA)
    if record is None:
        say(f"run {run_id}: no record (its process ended before writing it); "
            f"{len(steps)} step(s)")
    else:
        say(f"run {record.run_id}  {record.name or '-'}  {record.outcome}"
            + (f" ({record.error_type})" if record.error_type else ""))
        say(f"  started {iso(record.started)}"
            + (f", ended {iso(record.ended)} ({_duration(record)} s)" if record.ended else ""))
        if record.message:
            say(f"  why: {record.message}")
        say(f"  steps {record.steps} admitted, {record.refused} refused, {record.failed} "
            f"failed, {record.compensated} compensated; tokens {record.input_tokens}/"
            f"{record.output_tokens}; cost {_cost(record.cost_usd)}")
        if record.budgets:
            say("  budgets " + ", ".join(f"{k}={v:g}" for k, v in record.budgets.items()))
        if record.parent_run_id:
            say(f"  parent run {record.parent_run_id}")
        if record.labels:
            say("  labels " + ",".join(f"{k}={v}" for k, v in sorted(record.labels.items())))
    if halt is not None:
        say(f"  halt recorded {iso(halt.at)} by {halt.by}: {halt.reason}")
    for event in steps:
        line = step_line(event)
        if event.error_message:
            line += f"  error={event.error_type}: {event.error_message}"
        say(f"  {line}")
    if len(steps) == MAX_RUN_STEPS:
        say(f"  (only the first {MAX_RUN_STEPS} steps are shown)")


@runs.command("halt")
@click.argument("run_id")
@click.option("--reason", required=True, help="Why the run must stop (recorded).")
@click.option("--by", "by", default=None, help="Who halts it (default user@host (pid)).")
@store_option
def halt(run_id: str, reason: str, by: str | None, store_url: str) -> None:
    """Halt RUN_ID wherever it runs: recorded in the store (who, when, why); the run's process
    refuses every step it starts from its next poll on (0.25 s by default) and the run ends
    halted.

    \b
    Exit codes:
      0  the halt is recorded (or the run was halted already: the first halt is shown)
      1  no such run, it has ended, or the store cannot be read or written
      2  usage error (no --reason, bad store URL)
    """
    from closedloop import ConfigError
    from closedloop.runs import halt_run

    store = open_store_to_write(store_url)
    try:
        try:
            done = halt_run(run_id, reason=reason, by=by, store=store)
        except ConfigError as exc:
            if not reason.strip():
                raise
            say(f"error: {exc}", err=True)
            sys.exit(EXIT_NO_DATA)
    finally:
        store.close()
    say(f"halted run {done.run_id} (by {done.by} at {iso(done.at)}: {done.reason}); its "
        "process refuses every step it starts from its next poll on")
