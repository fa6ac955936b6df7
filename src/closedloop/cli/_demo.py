"""``closedloop demo``: the design's provisioning story on this machine, then a summary."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import click

from closedloop._errors import ConfigError
from closedloop.cli import main
from closedloop.cli._common import console, echo_json, literal, store_option

if TYPE_CHECKING:
    from closedloop.demo import DemoSummary, MigrationSummary


@main.command()
@click.option("--scenario", type=click.Choice(["provisioning", "migrations"]),
              default="provisioning", show_default=True,
              help="provisioning: EC2 plans against moto. migrations: schema migrations on a "
                   "real PostgreSQL (--pg).")
@click.option("--requests", "count", type=int, default=None, metavar="N",
              help="How many requests (provisioning, default 200) or migration tasks "
                   "(migrations, default 40) the agent receives.")
@click.option("--seed", type=int, default=7, show_default=True,
              help="Seed of the requests and of the simulated model's mistakes.")
@click.option("--pg", "pg_url", default="postgresql://postgres@127.0.0.1:5432/test",
              show_default=True, metavar="URL",
              help="migrations: the PostgreSQL to migrate, in a schema of its own "
                   "(cl_demo_mig_<random>, dropped at the end).")
@click.option("--autonomy", type=click.Choice(["suggest", "approve", "autonomous"]),
              default="autonomous", show_default=True,
              help="The agent's level. provisioning: approve queues every plan for a person "
                   "(`closedloop approvals`), destructive ones marked. migrations: destructive "
                   "SQL waits for approval at every level.")
@click.option("--keep", is_flag=True, help="migrations: keep the demo's schema at the end.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON for scripts.")
@store_option
def demo(*, scenario: str, count: int | None, seed: int, pg_url: str, autonomy: str, keep: bool,
         as_json: bool, store_url: str) -> None:
    """Run an agent through closedloop, locally, and compare with its injected mistakes.

    provisioning (default): a seeded simulated LLM proposes EC2 provisioning plans and makes
    the mistakes of the design: malformed plans (caught by validation and re-asked),
    well-formed but wrong ones (caught by verifying the launched instances with boto3), and
    destructive ones (blocked). The plans run against moto's local EC2 API on 127.0.0.1.
    Every step's event, its trace and a ground-truth score land in the store, for report,
    traces, replay, scores and serve; run it again and they are appended.

    With --autonomy approve every plan waits in the store as an approval request (a plan
    that terminates or deletes is marked destructive): decide them with `closedloop
    approvals`, then `closedloop worker --app closedloop.demo:worker --once --store URL`
    executes the approved ones, once each, against the demo's EC2, which the demo keeps in
    the file DB.ec2 next to a SQLite store (or $CLOSEDLOOP_DEMO_EC2).

    migrations: a seeded migration agent proposes PostgreSQL schema migrations, each task a
    run of guarded steps: bad SQL caught by validation, destructive SQL waiting as a durable
    approval request, migrations applied in a transaction (rolled back when they fail
    mid-way), verified against information_schema and compensated when wrong.
    """
    if count is not None and count < 1:
        raise ConfigError(f"--requests must be at least 1, got {count}")
    if scenario == "migrations":
        _migrations(count=count or 40, seed=seed, pg_url=pg_url, autonomy=autonomy, keep=keep,
                    as_json=as_json, store_url=store_url)
        return
    count = count or 200
    from closedloop.demo import require_demo_extras, run_demo, state_path_for

    require_demo_extras()
    ec2_state = None
    if autonomy == "approve":
        ec2_state = state_path_for(store_url)
        if store_url.startswith("memory://"):
            raise ConfigError("--autonomy approve leaves its requests in the store for a "
                              "person and a worker: pass --store sqlite:///PATH")
        if ec2_state is None:
            raise ConfigError("--autonomy approve keeps the demo's EC2 in a file for the "
                              "worker: use a sqlite:/// store or set CLOSEDLOOP_DEMO_EC2=PATH")
    def provision(progress: Progress | None) -> DemoSummary:
        return run_demo(count, seed, store_url, progress=progress, autonomy=autonomy,
                        ec2_state=ec2_state)

    # moto builds its EC2 backend on the first call: a few seconds before step one
    summary = _with_progress(provision, "provisioning", "starting the local EC2 API (moto)…",
                             count, quiet=as_json)
    if as_json:
        echo_json(summary.to_dict())
    else:
        _print(summary)
        _print_next_steps(summary)


Progress: TypeAlias = Callable[[int, int, str], None]
"""``progress(done, total, outcome)``: what a demo reports after each request."""
_T = TypeVar("_T")


def _with_progress(run: Callable[[Progress | None], _T], verb: str, starting: str, total: int,
                   *, quiet: bool) -> _T:
    """``run(progress)`` with a progress bar on a terminal's stderr (the outcomes so far as
    its text), or ``run(None)`` for --json and pipes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        return run(None)
    columns = (TextColumn(f"[bold]{verb}[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.description}"), TimeElapsedColumn())
    with Bar(*columns, console=err, transient=True) as bar:
        task = bar.add_task(starting, total=total)
        tally: dict[str, int] = {}

        def advance(done: int, total: int, outcome: str) -> None:
            tally[outcome] = tally.get(outcome, 0) + 1
            text = "  ".join(f"{k} {v}" for k, v in sorted(tally.items()))
            bar.update(task, completed=done, description=text)

        return run(advance)


def _print_next_steps(s: DemoSummary) -> None:
    """The commands that show the run's steps: traces, replay, scores, metrics."""
    steps = s.next_steps()
    if steps:  # plain text: a store URL is data, never markup
        click.echo("\n".join(["Next steps:", *(f"  {literal(line)}" for line in steps)]))


def _print(s: DemoSummary) -> None:
    from rich.table import Table
    from rich.text import Text

    injected = s.ledger.counts()
    expected = s.ledger.expected_outcomes(s.max_attempts)
    level = "" if s.autonomy == "autonomous" else f", autonomy {s.autonomy}"
    table = Table(title=f"closedloop demo: {s.requests} EC2 provisioning requests "
                        f"(seed {s.seed}{level})", title_justify="left")
    table.add_column("Step outcome")
    table.add_column("Steps", justify="right")
    table.add_column("Ground truth (simulated model)", style="dim")
    table.add_row("Succeeded, verified", str(s.succeeded),
                  f"correct plans: {expected['succeeded']}")
    table.add_row("  of which re-asked and fixed", str(s.reasked_fixed),
                  f"malformed proposals in all: {injected['malformed']}")
    table.add_row(f"Failed validation ({s.max_attempts} attempts)", str(s.failed_validation),
                  f"never well-formed: {expected['failed_validation']}")
    table.add_row("Blocked (destructive)", str(s.blocked),
                  f"destructive plans: {injected['destructive']}")
    table.add_row("Caught by verification", str(s.caught_by_verification),
                  f"semantically wrong plans: {injected['semantic']}")
    if s.suggested:
        table.add_row("Suggested (not executed)", str(s.suggested), "")
    if s.waiting:
        destructive = sum(w.destructive for w in s.waiting)
        table.add_row("Waiting for approval", str(len(s.waiting)), "")
        table.add_row("  of which destructive", str(destructive),
                      "terminate or delete: a person decides")
    if s.unverified:
        table.add_row("Could not verify", str(s.unverified), "")
    if s.errors:
        table.add_row("Errors", str(s.errors), s.first_error or "")
    table.add_section()
    table.add_row("Production instances running",
                  f"{s.production_running}/{s.production_instances}", "")
    table.add_row("Tokens in / out", f"{s.input_tokens:,} / {s.output_tokens:,}", "")
    table.add_row("Step latency p50 / p95",
                  f"{s.latency_p50_ms:.1f} / {s.latency_p95_ms:.1f} ms", "")
    table.add_row("Events written", str(s.events_written),
                  f"{s.events_lost} not written" if s.events_lost else "")
    out = console()
    out.print(table)
    if s.waiting:
        _print_waiting(s)
    if s.store_url.startswith("memory://"):
        out.print("Events were kept in memory only: pass --store sqlite:///PATH to keep them.")
        return
    url = literal(s.store_url)
    out.print(Text.assemble("Events are in ", (url, "bold"), ". See the learning signals: ",
                            (f"closedloop report --store '{url}'", "bold")), soft_wrap=True)


def _print_waiting(s: DemoSummary, shown: int = 5) -> None:
    """What is waiting for a person: the first few requests, destructive ones first."""
    from rich.table import Table
    from rich.text import Text

    ordered = sorted(s.waiting, key=lambda w: not w.destructive)
    table = Table(title=f"Waiting for approval: {len(s.waiting)} request(s)",
                  title_justify="left")
    table.add_column("Request")
    table.add_column("Plan")
    table.add_column("Risk")
    for w in ordered[:shown]:
        table.add_row(Text(literal(w.request_id)), Text(literal(w.plan)),
                      "destructive" if w.destructive else "")
    if len(ordered) > shown:
        table.add_row("…", f"{len(ordered) - shown} more: closedloop approvals list", "")
    console().print(table)


def _migrations(*, count: int, seed: int, pg_url: str, autonomy: str, keep: bool, as_json: bool,
                store_url: str) -> None:
    from importlib.util import find_spec

    for name in ("psycopg", "sqlglot"):  # looked up, not imported: only the demo opens one
        if find_spec(name) is None:
            raise ConfigError(f"the migrations demo needs psycopg and sqlglot ({name} is "
                              "missing): pip install 'closedloop[postgres,validators]'")
    from closedloop.demo import run_migrations_demo

    def migrate(progress: Progress | None) -> MigrationSummary:
        return run_migrations_demo(count, seed, store_url, progress=progress, pg_url=pg_url,
                                   autonomy=autonomy, keep=keep)

    summary = _with_progress(migrate, "migrating", "creating the demo's schema…", count,
                             quiet=as_json)
    if as_json:
        echo_json(summary.to_dict())
    else:
        _print_migrations(summary)


def _print_migrations(s: MigrationSummary) -> None:
    from rich.table import Table
    from rich.text import Text

    injected = s.ledger.counts()
    expected = s.ledger.expected_outcomes(s.max_attempts, s.autonomy)
    table = Table(title=f"closedloop demo: {s.tasks} schema migrations on PostgreSQL "
                        f"(seed {s.seed}, {s.autonomy})", title_justify="left")
    table.add_column("Task outcome")
    table.add_column("Tasks", justify="right")
    table.add_column("Ground truth (simulated agent)", style="dim")
    table.add_row("Applied, verified, recorded", str(s.succeeded),
                  f"correct migrations: {expected['succeeded']}")
    table.add_row("  of which re-asked and fixed", str(s.reasked_fixed),
                  f"bad SQL proposals in all: {injected['syntax']}")
    table.add_row(f"Failed validation ({s.max_attempts} attempts)", str(s.failed_validation),
                  f"never valid SQL: {expected['failed_validation']}")
    table.add_row("Awaiting approval", str(len(s.awaiting_approval)),
                  f"destructive migrations: {injected['destructive']}")
    if s.suggested:
        table.add_row("Suggested only", str(s.suggested), "")
    table.add_row("Verification failed, compensated", str(s.compensated),
                  f"wrong schema: {injected['wrong_schema']}")
    table.add_row("Failed mid-way, rolled back", str(s.rolled_back),
                  f"fails mid-way: {injected['midway']}")
    for label, value in (("Compensation failed", s.compensation_failed),
                         ("Rollback left changes", s.rollback_leaked),
                         ("Blocked", s.blocked)):
        if value:
            table.add_row(label, str(value), "")
    if s.errors:
        table.add_row("Errors", str(s.errors), Text(literal(s.first_error or "")))
    table.add_section()
    table.add_row("Base tables intact", "yes" if s.base_intact else "NO", "")
    table.add_row("Tokens in / out", f"{s.input_tokens:,} / {s.output_tokens:,}", "")
    table.add_row("Runs / events written", f"{s.runs} / {s.events_written}",
                  f"{s.events_lost} not written" if s.events_lost else "")
    out = console()
    out.print(table)
    for p in s.awaiting_approval:  # stored text: printed as data, never markup
        out.print(Text.assemble("  awaiting approval: task ", str(p.task), " request ",
                                (literal(p.approval_id), "bold"), ": ", literal(p.risk)),
                  soft_wrap=True)
    where = "kept" if s.kept else "dropped"
    out.print(Text.assemble("Schema ", (literal(s.schema), "bold"), f" {where}."),
              soft_wrap=True)
    if s.store_url.startswith("memory://"):
        out.print("Events were kept in memory only: pass --store sqlite:///PATH to keep them.")
        return
    store = f"--store {shlex.quote(s.store_url)}"
    steps = [f"closedloop runs list {store}",
             f"closedloop approvals list --status pending --task-type pg.migrate {store}",
             f"closedloop report {store}"]
    click.echo("\n".join(["Next steps:", *(f"  {literal(line)}" for line in steps)]))
