"""``closedloop scores add|list``: attach judgements to traces after the fact, and read them."""

from __future__ import annotations

import sys

import click

from closedloop.cli import main
from closedloop.cli._common import (
    EXIT_NO_DATA,
    Since,
    echo_json,
    iso,
    open_store_to_write,
    say,
    store_option,
)
from closedloop.cli._common import open_store_to_read as _open


def _value(text: str) -> float | bool | str:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "good", "up", "+1"):
        return True
    if lowered in ("false", "no", "bad", "down", "-1"):
        return False
    try:
        return float(text)
    except ValueError:
        return text


@main.group()
def scores() -> None:
    """Semantic scores: user satisfaction, outcome quality, any named judgement."""


@scores.command("add")
@click.argument("trace_id")
@click.argument("name")
@click.argument("value")
@store_option
@click.option("--span", "span_id", help="Score one span of the trace instead of all of it.")
@click.option("--comment", help="Why; kept with the score.")
@click.option("--source", type=click.Choice(["human", "rule", "model"]), default="human",
              show_default=True, help="Who judged: a person, a rule or a model.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored score as JSON.")
def add(  # noqa: PLR0917 - click passes every option as an argument
        trace_id: str, name: str, value: str, store_url: str, span_id: str | None,
        comment: str | None, source: str, as_json: bool) -> None:
    """Attach score NAME=VALUE to TRACE_ID (a number, true/false, or a category)."""
    from closedloop.telemetry import record_score

    store = open_store_to_write(store_url)
    try:
        score = record_score(trace_id, name, _value(value), span_id=span_id, comment=comment,
                             source=source, store=store)
    finally:
        store.close()
    if as_json:
        echo_json(score.to_dict())
    else:
        shown = score.label if score.value is None else f"{score.value:g}"
        say(f"scored {score.trace_id} {score.name}={shown} ({score.source})")


@scores.command("list")
@store_option
@click.option("--trace", "trace_id", help="Only scores of this trace.")
@click.option("--name", help="Only scores with this name.")
@click.option("--since", type=Since(), help="Only scores given since (24h, 7d, a date).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_scores(store_url: str, trace_id: str | None, name: str | None, since: float | None,
                as_json: bool) -> None:
    """Scores, oldest first."""
    from closedloop.telemetry import span_store_for

    found = span_store_for(_open(store_url)).scores(trace_id=trace_id, name=name, since=since)
    if as_json:
        echo_json([s.to_dict() for s in found])
        return
    if not found:
        click.echo("no scores", err=True)
        sys.exit(EXIT_NO_DATA)
    for s in found:
        shown = s.label if s.value is None else f"{s.value:g}"
        extra = f"  # {s.comment}" if s.comment else ""
        say(f"{iso(s.ts)}  {s.trace_id}  {s.name}={shown}  ({s.source}){extra}")


@scores.command("export")
@store_option
@click.option("--otlp-http", "endpoint", required=True, metavar="URL",
              help="OTLP/HTTP logs endpoint, e.g. http://collector:4318/v1/logs.")
@click.option("--name", help="Only scores with this name.")
@click.option("--since", type=Since(), help="Only scores given since (24h, 7d, a date).")
def export(store_url: str, endpoint: str, name: str | None, since: float | None) -> None:
    """Send scores to a collector as gen_ai.evaluation.result events."""
    from closedloop.telemetry import otlp_http_scores, span_store_for

    found = span_store_for(_open(store_url)).scores(name=name, since=since)
    if not found:
        click.echo("no scores", err=True)
        sys.exit(EXIT_NO_DATA)
    exporter = otlp_http_scores(endpoint)
    try:
        ok = exporter.export(found)
    finally:
        exporter.shutdown()
    if not ok:
        say(f"error: the collector at {endpoint} did not accept the scores", err=True)
        sys.exit(1)
    say(f"exported {len(found)} scores to {endpoint}")
