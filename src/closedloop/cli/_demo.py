"""``closedloop demo``: the design's provisioning story on this machine, then a summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from closedloop._errors import ConfigError
from closedloop.cli import main
from closedloop.cli._common import console, echo_json, literal, store_option

if TYPE_CHECKING:
    from closedloop.demo import DemoSummary


@main.command()
@click.option("--requests", "count", type=int, default=200, show_default=True, metavar="N",
              help="How many provisioning requests the agent receives.")
@click.option("--seed", type=int, default=7, show_default=True,
              help="Seed of the requests and of the simulated model's mistakes.")
@click.option("--autonomy", type=click.Choice(["suggest", "approve", "autonomous"]),
              default="autonomous", show_default=True,
              help="The agent's level: approve queues every plan for a person "
                   "(`closedloop approvals`), destructive ones marked.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON for scripts.")
@store_option
def demo(count: int, seed: int, autonomy: str, as_json: bool, store_url: str) -> None:
    """Run an EC2 provisioning agent through closedloop, locally, with no account.

    A seeded simulated LLM proposes provisioning plans and makes the mistakes of the design:
    malformed plans (caught by validation and re-asked), well-formed but wrong ones (caught
    by verifying the launched instances with boto3), and destructive ones (blocked). The
    plans run against moto's local EC2 API on 127.0.0.1. Every step's event, its trace and
    a ground-truth score land in the store, for report, traces, replay, scores and serve;
    run it again and they are appended.

    With --autonomy approve every plan waits in the store as an approval request (a plan
    that terminates or deletes is marked destructive): decide them with `closedloop
    approvals`, then `closedloop worker --app closedloop.demo:worker --once --store URL`
    executes the approved ones, once each, against the demo's EC2, which the demo keeps in
    the file DB.ec2 next to a SQLite store (or $CLOSEDLOOP_DEMO_EC2).
    """
    if count < 1:
        raise ConfigError(f"--requests must be at least 1, got {count}")
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
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    err = Console(stderr=True)
    if as_json or not err.is_terminal:
        summary = run_demo(count, seed, store_url, autonomy=autonomy, ec2_state=ec2_state)
    else:
        columns = (TextColumn("[bold]provisioning[/]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            # moto builds its EC2 backend on the first call: a few seconds before step one
            task = bar.add_task("starting the local EC2 API (moto)…", total=count)
            tally: dict[str, int] = {}

            def advance(done: int, total: int, outcome: str) -> None:
                tally[outcome] = tally.get(outcome, 0) + 1
                text = "  ".join(f"{k} {v}" for k, v in sorted(tally.items()))
                bar.update(task, completed=done, description=text)

            summary = run_demo(count, seed, store_url, progress=advance, autonomy=autonomy,
                               ec2_state=ec2_state)
    if as_json:
        echo_json(summary.to_dict())
    else:
        _print(summary)
        _print_next_steps(summary)


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
