"""``closedloop report`` (the learning layer's figures per task type) and ``closedloop steps``
(the recorded steps, newest first, a page at a time), for people or scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from closedloop.cli import main
from closedloop.cli._common import (
    EXIT_NO_DATA,
    Since,
    console,
    describe_since,
    echo_json,
    iso,
    literal,
    open_store_to_read,
    store_option,
)

if TYPE_CHECKING:
    from rich.table import Table

    from closedloop.learn import Rate, Report, TaskStats
    from closedloop.runs import RunsSummary
    from closedloop.store import Store
    from closedloop.telemetry import TaskScores

_NONE = "—"
# closedloop.learn's DEFAULT_TOP_ERRORS and DEFAULT_TOP_MESSAGES, spelled out so that
# `closedloop --help` need not import the learning layer (a test checks they agree).
DEFAULT_TOP_ERRORS = DEFAULT_TOP_MESSAGES = 3
MAX_PAGE = 1000  # closedloop.store's largest page, spelled out for the same reason


@main.command()
@click.option("--since", type=Since(), metavar="WHEN",
              help="Only events from WHEN on: an age (30m, 24h, 7d) or a date/ISO datetime "
                   "(2026-11-01, 2026-11-01T08:30:00Z; no zone means UTC).")
@click.option("--task-type", metavar="T", help="Only events of task type T.")
@click.option("--top-errors", type=click.IntRange(min=0), default=DEFAULT_TOP_ERRORS,
              show_default=True, help="How many error types to list per task type.")
@click.option("--top-messages", type=click.IntRange(min=0), default=DEFAULT_TOP_MESSAGES,
              show_default=True,
              help="How many groups of failure messages to show per task type.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON for scripts.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, writable=True),
              metavar="FILE",
              help="Write the report as one self-contained HTML page with charts to FILE.")
@click.option("--window", type=click.Choice(["auto", "hour", "day"]), default="auto",
              show_default=True,
              help="With --html: chart per hour or per day (auto: per hour when the events "
                   "span up to three days).")
@store_option
def report(  # noqa: PLR0917 - click passes every option as an argument
        since: float | None, task_type: str | None, top_errors: int, top_messages: int,
        as_json: bool, html_file: str | None, window: str, store_url: str) -> None:
    """How each task type's feedback loops are doing: one row per task type, plus overall.

    \b
    Columns (a rate with nothing to count shows "—"):
      Runs           steps recorded (every outcome)
      Validation     validation passed on the last attempt, among steps where
                     it ran
      Re-ask         steps that needed more than one attempt, among steps where
                     validation ran
      Re-ask ok      re-asked steps whose validation then passed
      Verification   verifiers all passed, among steps that were verified
      Outcomes       steps per outcome (outcomes that never occurred are left out)
      p50 / p95      latency in ms, nearest rank: a latency that actually occurred
      Mean           mean latency in ms
      Max            slowest step in ms
      Tokens in/out  model tokens, totals and per run (all attempts count)
      Cost (USD)     what the priced steps cost (shown when any step has a
                     cost_usd), how many were priced, and per success: the
                     total over the steps that succeeded
      Top errors     most frequent error types, count and share of the row's runs
      Failure messages
                     why steps failed: the steps' error messages, grouped by
                     replacing every word holding a digit (ids, sizes, line
                     numbers) with <*>; a group of one shows its message

    \b
    --json prints one object (stable keys, times in Unix seconds, rates and
    shares as fractions in [0, 1]):
      {"since", "until", "task_type", "overall": ROW, "task_types": [ROW, ...]}
      ROW = {"task_type" (null for overall), "runs", "first_ts", "last_ts",
             "validation", "reask", "reask_success", "verification",
             "outcomes", "latency", "tokens", "top_errors", "top_messages",
             "cost"}
      each rate  = {"count", "total", "rate"} (rate null when total is 0)
      outcomes   = {OUTCOME: count} for every outcome, zeros included
      latency    = {"p50_ms", "p95_ms", "mean_ms", "max_ms"}
      tokens     = {"input_total", "output_total", "input_per_run",
                    "output_per_run"}
      cost       = {"total_usd" (null: no step priced), "priced" (steps with
                    a cost), "per_success_usd" (null: no success or no cost)}
      top_errors = [{"error_type", "count", "share"}, ...]
      top_messages = [{"error_type", "message" (the group), "example" (its
                     most recent message), "count", "share"}, ...]
      "scores": [{"task_type", "steps", "succeeded", "success_rate",
                  "scores": {NAME: {"n", "mean"}}, "labels": {NAME: {LABEL: n}},
                  "daily": {YYYY-MM-DD: {NAME: mean}}}, ...]
                 semantic scores attached after the fact (`closedloop scores add`),
                 per task type; [] when there are none
      "runs": {"runs", "outcomes": {OUTCOME: n}, "steps", "refused",
               "compensated", "input_tokens", "output_tokens", "cost_usd",
               "mean_duration_s"}
                 the runs (closedloop.Run) started in the window; null with
                 --task-type or for a store that keeps no runs

    \b
    Semantic scores (shown when any were recorded in the window):
      Success        task success rate (outcome succeeded) of the steps
      NAME           mean of each numeric score (satisfaction, quality, ...), and n
      Labels         counts of categorical scores
      By day         each score's daily mean: quality over time

    \b
    Runs (shown when any closedloop.Run started in the window, without --task-type):
      how many, how they ended, their steps (admitted, refused), compensations,
      tokens, cost and mean duration; `closedloop runs list` lists them

    \b
    --html FILE writes one page (no script, nothing fetched from a network: CSS
    and SVG charts inline) instead of printing the tables: a summary, pass
    rates per task type over time with confidence bands, failure clusters
    (count, first/last seen, example trace ids), factors (failure rate per
    value with confidence intervals), cost (total, per success, over time)
    and latency percentiles; charts show the 8 task types with the most
    steps, 10 clusters, 6 factors of 24 values. Stored text is escaped. It
    needs the learn extra for failure clusters (pip install
    'closedloop[learn]'); without it that section says so.

    \b
    Exit codes:
      0  report printed (or written)
      1  nothing to report: no store file, or no event in the window (one line
         on stderr; with --json the empty report is still printed), or the
         store cannot be read
      2  usage error: bad flag value, bad store URL
    """
    from closedloop.learn import report_from_store

    store = open_store_to_read(store_url)
    try:
        result = report_from_store(store, since=since, task_type=task_type,
                                   top_errors=top_errors, top_messages=top_messages)
        shown = as_json or html_file is None  # the page has no scores or runs (yet)
        scores = _scores(store, since, task_type) if shown and not result.empty else []
        runs = _runs(store, since) if shown and task_type is None else None
        page = None
        if html_file is not None and not result.empty:
            from closedloop.learn import html_report

            page = html_report(store, since=since, task_type=task_type,
                               window=None if window == "auto" else window, report=result)
    finally:
        store.close()
    if as_json:
        echo_json({**result.to_dict(), "scores": [s.to_dict() for s in scores],
                   "runs": runs.to_dict() if runs is not None else None})
    if result.empty:
        what = f"task type {task_type!r}" if task_type else "any task type"
        click.echo(f"no events for {what} in {store.url} ({describe_since(since)})", err=True)
        click.get_current_context().exit(EXIT_NO_DATA)
    if page is not None and html_file is not None:
        _write(html_file, page)
        if not as_json:
            click.echo(f"wrote {literal(html_file)} ({len(page.encode()) / 1024:,.0f} KiB)")
        return
    if not as_json:
        _print(result, store.url)
        if scores:
            _print_scores(scores)
        if runs is not None and runs.runs:
            _print_runs(runs)


def _write(path: str, page: str) -> None:
    """Write ``page`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".report-", suffix=".html")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(page)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise click.ClickException(f"cannot write {literal(path)}: "
                                   f"{literal(exc.strerror or exc)}") from None


def _runs(store: Store, since: float | None) -> RunsSummary | None:
    """The runs started in the window (closedloop.Run), or None when the store keeps none."""
    from closedloop.store import run_store_for

    found = run_store_for(store)
    return found.summarize_runs(since=since) if found is not None else None


def _print_runs(runs: RunsSummary) -> None:
    table = _table("Runs (closedloop runs list)", "Runs", "Outcomes", "Steps", "Refused",
                   "Compensated", "Tokens in/out", "Cost", "Mean s")
    table.add_row(
        str(runs.runs), ", ".join(f"{k}: {v}" for k, v in sorted(runs.outcomes.items())),
        str(runs.steps), str(runs.refused), str(runs.compensated),
        f"{runs.input_tokens:,}/{runs.output_tokens:,}",
        _NONE if runs.cost_usd is None else f"${runs.cost_usd:,.4f}",
        _NONE if runs.mean_duration_s is None else f"{runs.mean_duration_s:,.1f}")
    console().print(table)


def _scores(store: Store, since: float | None, task_type: str | None) -> list[TaskScores]:
    """Semantic scores per task type, or none when the telemetry extras are not installed."""
    from closedloop._errors import ConfigError

    try:
        from closedloop.learn import score_summary
        from closedloop.store import span_store_for
    except ImportError:
        return []
    try:
        # the summary reads every event of the window again: only when there are scores
        if not span_store_for(store).scores(since=since):
            return []
        summary = score_summary(store, since=since)
    except ConfigError:  # a backend that holds no scores yet (PostgreSQL: issue 10, later)
        return []
    found = [s for s in summary if task_type is None or s.task_type == task_type]
    return [s for s in found if s.scores or s.labels]


def _print_scores(scores: list[TaskScores]) -> None:
    out = console()
    names = sorted({n for s in scores for n in s.scores})
    labelled = sorted({n for s in scores for n in s.labels})
    table = _table("Semantic scores", "Task type", "Success",
                   *(f"{n} (mean, n)" for n in names), *labelled)
    for s in scores:
        rate = s.success_rate
        table.add_row(
            s.task_type, _NONE if rate is None else f"{rate:.1%} ({s.succeeded}/{s.steps})",
            *(_NONE if s.mean(n) is None else f"{s.mean(n):.3g} ({len(s.scores[n])})"
              for n in names),
            *(", ".join(f"{k}: {v}" for k, v in sorted(s.labels.get(n, {}).items())) or _NONE
              for n in labelled))
    out.print(table)
    if names:
        daily = _table("Scores by day", "Day", "Task type", *names)
        for s in scores:
            for day, means in sorted(s.to_dict()["daily"].items()):
                daily.add_row(day, s.task_type,
                              *(_NONE if n not in means else f"{means[n]:.3g}" for n in names))
        out.print(daily)


def _pct(rate: Rate) -> str:
    value = rate.value
    if value is None:
        return _NONE
    return f"{value:.1%} ({rate.count}/{rate.total})"


def _ms(value: float | None) -> str:
    return _NONE if value is None else f"{value:,.1f}"


def _usd(value: float | None) -> str:
    if value is None:
        return _NONE
    if value >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}" if value >= 0.01 else f"${value:.6f}"


def _per_run(value: float | None) -> str:
    return _NONE if value is None else f"{value:,.0f}"


def _name(row: TaskStats) -> str:
    return row.task_type if row.task_type is not None else "overall"


def _table(title: str, *headers: str) -> Table:
    """A table with the task type (and error type) left-aligned, figures right-aligned.

    A "Message" column is the only one that wraps.
    """
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        text = i == 0 or header in ("Error type", "Message")
        table.add_column(header, justify="left" if text else "right",
                         no_wrap=header != "Message", overflow="fold")
    return table


def _print(result: Report, url: str) -> None:
    from rich.text import Text

    out = console()
    rows = [*result.rows, result.overall]
    window = describe_since(result.since)
    first, last = result.overall.first_ts, result.overall.last_ts
    span = f"{iso(first)} … {iso(last)}" if first is not None and last is not None else ""
    out.print(Text.assemble(("closedloop report", "bold"), f" — {literal(url)}, {window}; "
                            f"events {span}"))

    loops = _table("Feedback loops", "Task type", "Runs", "Validation", "Re-ask", "Re-ask ok",
                   "Verification")
    for row in rows:
        loops.add_row(_name(row), str(row.runs), _pct(row.validation), _pct(row.reask),
                      _pct(row.reask_success), _pct(row.verification),
                      end_section=row is result.rows[-1])
    out.print(loops)

    cost = _table("Latency (ms) and tokens", "Task type", "p50", "p95", "Mean", "Max",
                  "Tokens in", "Tokens out", "In/run", "Out/run")
    for row in rows:
        lat, tok = row.latency, row.tokens
        cost.add_row(_name(row), _ms(lat.p50_ms), _ms(lat.p95_ms), _ms(lat.mean_ms),
                     _ms(lat.max_ms), f"{tok.input_total:,}", f"{tok.output_total:,}",
                     _per_run(tok.input_per_run), _per_run(tok.output_per_run),
                     end_section=row is result.rows[-1])
    out.print(cost)

    if any(row.cost.priced for row in rows):
        usd = _table("Cost (USD)", "Task type", "Total", "Priced steps", "Per success")
        for row in rows:
            c = row.cost
            usd.add_row(_name(row), _usd(c.total_usd), f"{c.priced:,}/{row.runs:,}",
                        _usd(c.per_success_usd), end_section=row is result.rows[-1])
        out.print(usd)

    seen = [o for o, n in result.overall.outcomes.items() if n]
    outcomes = _table("Outcomes", "Task type", *(o.replace("_", " ").capitalize() for o in seen))
    for row in rows:
        outcomes.add_row(_name(row), *(str(row.outcomes.get(o, 0)) for o in seen),
                         end_section=row is result.rows[-1])
    out.print(outcomes)

    if any(row.top_errors for row in rows):
        errors = _table("Top error types", "Task type", "Error type", "Steps", "Share of runs")
        for row in rows:
            for i, err in enumerate(row.top_errors):
                last_one = i == len(row.top_errors) - 1
                errors.add_row(_name(row) if i == 0 else "", err.error_type, str(err.count),
                               f"{err.share:.1%}", end_section=last_one)
        out.print(errors)

    if any(row.top_messages for row in rows):
        messages = _table("Failure messages (grouped; <*> stands for ids and values)",
                          "Task type", "Error type", "Steps", "Message")
        for row in rows:
            for i, msg in enumerate(row.top_messages):
                last_one = i == len(row.top_messages) - 1
                shown = msg.example if msg.count == 1 else msg.message
                messages.add_row(_name(row) if i == 0 else "", msg.error_type, str(msg.count),
                                 shown, end_section=last_one)
        out.print(messages)


@main.command()
@click.option("--since", type=Since(), metavar="WHEN",
              help="Only steps from WHEN on: an age (30m, 24h, 7d) or a date/ISO datetime.")
@click.option("--until", type=Since(), metavar="WHEN",
              help="Only steps before WHEN (same forms as --since).")
@click.option("--task-type", metavar="T", help="Only steps of task type T.")
@click.option("--outcome", metavar="O",
              help="Only steps with outcome O (succeeded, failed, error, blocked, …).")
@click.option("--error-type", metavar="E",
              help="Only steps with error type E (validation, verification, agent, …).")
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=20, show_default=True,
              help="Steps per page.")
@click.option("--cursor", metavar="C",
              help="Print the page after the one that ended with C (same filters).")
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON for scripts.")
@store_option
def steps(  # noqa: PLR0917 - click passes every option as an argument
        since: float | None, until: float | None, task_type: str | None, outcome: str | None,
        error_type: str | None, limit: int, cursor: str | None, as_json: bool,
        store_url: str) -> None:
    """The recorded steps, newest first, one page at a time.

    \b
    Each page ends with a cursor: run the same command with --cursor C for the
    next page (pages stay exact while new steps arrive: they come before the
    first page, never into a later one).

    \b
    --json prints one object:
      {"steps": [STEP, ...], "next_cursor": C (null on the last page)}
      STEP = every field of the step's event (ts in Unix seconds, "time" as
             ISO-8601 UTC, "detail" with the issues and exception)

    \b
    Exit codes:
      0  page printed
      1  no step matches (one line on stderr; with --json the empty page is
         still printed), or the store cannot be read
      2  usage error: bad flag value, bad store URL, a cursor of another store
    """
    store = open_store_to_read(store_url)
    try:
        found = store.steps(since=since, until=until, task_type=task_type, outcome=outcome,
                            error_type=error_type, limit=limit, cursor=cursor)
    finally:
        store.close()
    if as_json:
        echo_json({"steps": [s.to_dict() for s in found.steps],
                   "next_cursor": found.next_cursor})
    if not found.steps:
        click.echo(f"no steps match in {store.url}", err=True)
        click.get_current_context().exit(EXIT_NO_DATA)
    if as_json:
        return
    from rich import box
    from rich.table import Table

    table = Table(title=f"Steps, newest first — {literal(store.url)}", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for header in ("Time", "Trace id"):
        table.add_column(header, no_wrap=True)
    for header in ("Task type", "Outcome", "Error type"):
        table.add_column(header, overflow="fold")
    table.add_column("ms", justify="right", no_wrap=True)
    table.add_column("Message", ratio=1, overflow="fold")
    for s in found.steps:
        table.add_row(iso(s.ts), s.trace_id, s.task_type, s.outcome, s.error_type or _NONE,
                      _ms(s.latency_ms), s.error_message or _NONE)
    out = console()
    out.print(table)
    if found.next_cursor is not None:
        out.print(f"next page: --cursor {found.next_cursor}")
