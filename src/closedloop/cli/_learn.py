"""``closedloop trends``, ``failures`` and ``factors``: the learning layer's answers to "how is
each task type doing over time", "where do failures cluster" and "what goes with failure"."""

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
    from closedloop.learn import Change, Estimate, Factors, FailureClusters, Trends

_NONE = "—"
_BARS = "▁▂▃▄▅▆▇█"
WINDOWS = ("hour", "day", "week")  # closedloop.store.WINDOWS, spelled out for --help's sake
_LABELS = {
    "validation_pass_rate": "Validation pass",
    "reask_rate": "Re-ask",
    "verification_pass_rate": "Verification pass",
    "failure_rate": "Failure rate",
    "latency_p50_ms": "p50 latency",
    "latency_p95_ms": "p95 latency",
    "tokens_per_step": "Tokens/step",
    "tokens_per_success": "Tokens/success",
    "cost_per_step": "Cost/step",
    "cost_per_success": "Cost/success",
}


def sparkline(values: list[float | None]) -> str:
    """One bar per value (a space for None), scaled from the smallest to the largest."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = high - low
    return "".join(" " if v is None else _BARS[0 if span == 0 else min(
        len(_BARS) - 1, int((v - low) / span * len(_BARS)))] for v in values)


def _value(name: str, value: float) -> str:
    if name.endswith("_rate"):
        return f"{value:.1%}"
    if name.endswith("_ms"):
        return f"{value:,.1f} ms"
    if name.startswith("cost"):
        return f"${value:,.4f}"
    return f"{value:,.0f}"


def _delta(name: str, value: float) -> str:
    if name.endswith("_rate"):
        return f"{value * 100:+.1f} pts"
    if name.endswith("_ms"):
        return f"{value:+,.1f} ms"
    if name.startswith("cost"):
        return f"{'+' if value >= 0 else '-'}${abs(value):,.4f}"
    return f"{value:+,.0f}"


def _change(name: str, change: Change | None) -> str:
    if change is None:
        return _NONE
    if not change.significant:
        return "no significant change"
    return f"{_delta(name, change.delta)} ({_delta(name, change.low)} … " \
           f"{_delta(name, change.high)})"


def _estimate(name: str, e: Estimate | None) -> str:
    return _NONE if e is None else _value(name, e.value)


def _value_name(value: str | None) -> str:
    return "(none)" if value is None else value


@main.command()
@click.option("--task-type", metavar="T", help="Only steps of task type T.")
@click.option("--by", default="task_type", show_default=True, metavar="DIM",
              help="Split by task_type, model, agent_version, prompt_version or label:KEY.")
@click.option("--window", type=click.Choice(WINDOWS), default="day", show_default=True,
              help="Period length (UTC; weeks start on Monday).")
@click.option("--periods", type=click.IntRange(min=2, max=10_000), metavar="N",
              help="Periods to show, up to the newest step (default: 48 hours, 30 days or "
                   "26 weeks).")
@click.option("--since", type=Since(), metavar="WHEN",
              help="From WHEN on instead of --periods: an age (7d) or a date/ISO datetime.")
@click.option("--json", "as_json", is_flag=True, help="Print the trends as JSON for scripts.")
@store_option
def trends(  # noqa: PLR0917 - click passes every option as an argument
        task_type: str | None, by: str, window: str, periods: int | None,
        since: float | None, as_json: bool, store_url: str) -> None:
    """How each task type (model, version, label value) does period after period.

    \b
    Per value and period: validation and verification pass rates, re-ask and
    failure rates, p50/p95 latency, tokens and cost per step and per success.
    The last period is compared with the one before, with a 95 % confidence
    interval: a change whose interval includes 0 is shown as "no significant
    change" (rates: Wilson/Newcombe; latency percentiles: estimated from a
    histogram of nine buckets per decade, changed only when the two intervals
    do not overlap; means and per-success figures: normal intervals).

    \b
    --json prints {"by", "window", "task_type", "since", "until", "confidence",
    "periods": [START, ...], "series": [{"value", "steps", "points": [{"start",
    "steps", "figures": {NAME: {"value", "low", "high"}}}], "changes": {NAME:
    {"before", "after", "delta", "low", "high", "significant"}}}]}; times in
    Unix seconds, rates as fractions.

    \b
    Exit codes: 0 printed; 1 no step in the window, or the store cannot be
    read; 2 usage error (bad --by, bad store URL).
    """
    from closedloop.learn import trends as compute

    store = open_store_to_read(store_url)
    try:
        result = compute(store, by=by, window=window, periods=periods, since=since,
                         task_type=task_type)
    finally:
        store.close()
    if as_json:
        echo_json(result.to_dict())
    if result.empty:
        click.echo(f"no steps in {literal(store.url)} ({describe_since(result.since)})",
                   err=True)
        click.get_current_context().exit(EXIT_NO_DATA)
    if not as_json:
        _print_trends(result, store.url)


def _print_trends(result: Trends, url: str) -> None:
    from rich.table import Table
    from rich.text import Text

    from closedloop.learn import METRICS

    out = console()
    first, last = result.periods[0], result.periods[-1]
    out.print(Text.assemble(("closedloop trends", "bold"), f" — {literal(url)}, by "
                            f"{literal(result.by)}, {len(result.periods)} {result.window}s "
                            f"from {iso(first)} to {iso(last)}; last {result.window} against "
                            "the one before (95 % intervals)"))
    table = Table(title_justify="left")
    table.add_column(literal(result.by), overflow="fold")
    table.add_column("Steps", justify="right")
    table.add_column("Figure", no_wrap=True)
    table.add_column("Trend", no_wrap=True)
    table.add_column("Previous", justify="right", no_wrap=True)
    table.add_column("Last", justify="right", no_wrap=True)
    table.add_column("Change", overflow="fold", min_width=21)
    index = {start: i for i, start in enumerate(result.periods)}
    for s in result.series:
        rows = [m for m in METRICS if any(m in p.figures for p in s.points)]
        for i, name in enumerate(rows):
            line: list[float | None] = [None] * len(result.periods)
            for p in s.points:
                if name in p.figures:
                    line[index[p.start]] = p.figures[name].value
            change = s.changes.get(name)
            table.add_row(
                _value_name(s.value) if i == 0 else "", f"{s.steps:,}" if i == 0 else "",
                _LABELS[name], sparkline(line),
                _NONE if change is None else _value(name, change.before),
                _estimate(name, s.points[-1].figures.get(name)) if s.points
                and s.points[-1].start == last else _NONE,
                _change(name, change), end_section=i == len(rows) - 1)
    out.print(table)


@main.command()
@click.option("--task-type", metavar="T", help="Only steps of task type T.")
@click.option("--window", type=click.Choice(WINDOWS), default="day", show_default=True,
              help="Period of each cluster's trend.")
@click.option("--since", type=Since(), metavar="WHEN",
              help="Only failures from WHEN on: an age (7d) or a date/ISO datetime.")
@click.option("--top", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="How many clusters to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the clusters as JSON for scripts.")
@store_option
def failures(  # noqa: PLR0917 - click passes every option as an argument
        task_type: str | None, window: str, since: float | None, top: int, as_json: bool,
        store_url: str) -> None:
    """Where failures cluster: failed steps grouped by what went wrong.

    \b
    A failed check (validation, verification, blocked) is grouped by its
    failing issues' checks and codes, refined by the template of their texts
    (mined by drain3: words that vary, such as ids and tag values, become
    <*>); any other failure (an exception) by the template of its message.
    Each cluster: its failures and share of all failures, the task types and
    models it hits, where (issue locations), first and last seen, a trend of
    its failures per period, the change of its share of all steps from the
    previous period to the last (95 % interval; noise is shown as "no
    significant change") and the newest trace ids (`closedloop traces show`).

    \b
    --json prints {"window", "task_type", "since", "until", "failures", "steps",
    "clusters": [{"id", "error_type", "title", "count", "share", "first_ts",
    "last_ts", "periods": [{"start", "count"}], "change", "task_types",
    "models", "locations", "groups", "examples"}]}.

    \b
    Exit codes: 0 printed; 1 no failure in the window, or the store cannot be
    read; 2 usage error (drain3 missing: pip install 'closedloop[learn]').
    """
    from closedloop.learn import failure_clusters

    store = open_store_to_read(store_url)
    try:
        result = failure_clusters(store, window=window, since=since, task_type=task_type,
                                  top=top)
    finally:
        store.close()
    if as_json:
        echo_json(result.to_dict())
    if result.empty:
        click.echo(f"no failed steps in {literal(store.url)} ({describe_since(since)})",
                   err=True)
        click.get_current_context().exit(EXIT_NO_DATA)
    if not as_json:
        _print_failures(result, store.url)


def _counts(pairs: tuple[tuple[str | None, int], ...], n: int = 3) -> str:
    shown = ", ".join(f"{_value_name(k)} {v:,}" for k, v in pairs[:n])
    return shown + (f", +{len(pairs) - n} more" if len(pairs) > n else "")


def _print_failures(result: FailureClusters, url: str) -> None:
    from rich.table import Table
    from rich.text import Text

    out = console()
    out.print(Text.assemble(("closedloop failures", "bold"), f" — {literal(url)}, "
                            f"{result.failures:,} failed of {result.steps:,} steps, "
                            f"{len(result.clusters)} largest clusters; trend per "
                            f"{result.window}"))
    table = Table(title_justify="left")
    for header, kw in (("Cluster", {"no_wrap": True}), ("Failures", {"justify": "right"}),
                       ("What went wrong", {"ratio": 3, "overflow": "fold"}),
                       ("Where", {"ratio": 2, "overflow": "fold"}),
                       ("Seen", {"no_wrap": True}), ("Trend", {"overflow": "fold"})):
        table.add_column(header, **kw)
    for c in result.clusters:
        where = "; ".join(filter(None, (
            f"task types: {_counts(c.task_types)}", f"models: {_counts(c.models)}",
            f"at: {_counts(c.locations)}" if c.locations else "")))
        trend = sparkline([float(n) for _, n in c.periods])
        table.add_row(c.id, f"{c.count:,} ({c.share:.0%})", f"[{c.error_type}] {c.title}",
                      where, f"{iso(c.first_ts)}\n{iso(c.last_ts)}",
                      f"{trend}\n{_change('failure_rate', c.change)}", end_section=True)
    out.print(table)
    out.print("Newest failures of each cluster (closedloop traces show ID):")
    for c in result.clusters:
        out.print(f"  {c.id}: {' '.join(c.examples) or _NONE}")


@main.command()
@click.option("--task-type", metavar="T", required=True, help="The task type to examine.")
@click.option("--since", type=Since(), metavar="WHEN",
              help="Only steps from WHEN on: an age (7d) or a date/ISO datetime.")
@click.option("--min-steps", type=click.IntRange(min=1), default=30, show_default=True,
              help="Values with fewer steps count for --json's spread, not for display.")
@click.option("--json", "as_json", is_flag=True, help="Print the factors as JSON for scripts.")
@store_option
def factors(task_type: str, since: float | None, min_steps: int, as_json: bool,
            store_url: str) -> None:
    """Which dimension of a step goes with its failure, ranked by how much it explains.

    \b
    Dimensions: model, agent_version, prompt_version, every label (label:KEY),
    hour_of_day (UTC) and input_tokens (1-2-5 size classes). Per value: the
    failure rate (failed, error or blocked; refusals by control left out) with
    its 95 % Wilson interval. "Explains": the share of the uncertainty about
    failure that knowing the value removes (information gain over entropy),
    with the G-test's p-value; "significant" when p < 0.05 divided by the
    number of dimensions.

    \b
    --json prints {"task_type", "since", "until", "steps", "failures",
    "failure_rate", "confidence", "factors": [{"dimension", "explained",
    "information_bits", "g", "dof", "p_value", "significant", "spread",
    "values": [{"value", "steps", "failures", "rate": {"value", "low",
    "high"}}]}]}.

    \b
    Exit codes: 0 printed; 1 no step of T in the window, or the store cannot be
    read; 2 usage error.
    """
    from closedloop.learn import factors as compute

    store = open_store_to_read(store_url)
    try:
        result = compute(store, task_type=task_type, since=since, min_steps=min_steps)
    finally:
        store.close()
    if as_json:
        echo_json(result.to_dict())
    if result.empty:
        click.echo(f"no steps of task type {literal(repr(task_type))} in "
                   f"{literal(store.url)} ({describe_since(since)})", err=True)
        click.get_current_context().exit(EXIT_NO_DATA)
    if not as_json:
        _print_factors(result, store.url, min_steps)


def _print_factors(result: Factors, url: str, min_steps: int) -> None:
    from rich.table import Table
    from rich.text import Text

    out = console()
    rate = result.failures / result.steps
    out.print(Text.assemble(("closedloop factors", "bold"), f" — {literal(url)}, task type "
                            f"{literal(result.task_type)}: {result.failures:,} failed of "
                            f"{result.steps:,} steps ({rate:.1%})"))
    if not result.factors:
        out.print("no dimension has two values yet: record model, agent_version, "
                  "prompt_version or labels")
        return
    table = Table(title_justify="left")
    table.add_column("Dimension", overflow="fold")
    table.add_column("Explains", justify="right", no_wrap=True)
    table.add_column("p-value", justify="right", no_wrap=True)
    table.add_column("Failure rate per value (95 % interval, steps)", overflow="fold")
    for f in result.factors:
        shown = [v for v in f.values if v.steps >= min_steps]
        if len(shown) < 2:
            shown = list(f.values)
        values = "\n".join(
            f"{_value_name(v.value)}: {v.rate.value:.1%} ({v.rate.low:.1%} to {v.rate.high:.1%}, "
            f"{v.steps:,})" for v in shown[:6])
        if len(shown) > 6:
            values += f"\n… {len(shown) - 6} more"
        table.add_row(f.dimension, f"{f.explained:.1%}",
                      (f"{f.p_value:.2g}" if f.p_value >= 1e-16 else "<1e-16")
                      + (" *" if f.significant else ""), values,
                      end_section=True)
    out.print(table)
    out.print("* significant: more than chance (p below 0.05 over the dimensions tested)")
