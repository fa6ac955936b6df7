"""``closedloop scores add|list``: attach judgements to traces after the fact, and read them."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

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
from closedloop.cli._traces import reading

if TYPE_CHECKING:
    from closedloop.telemetry import Score


# A number as people type it: -1, +2, 0.5, .5, 1e3 (nan, inf and 1_000 are labels).
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _mapping(ctx: click.Context, param: click.Parameter, items: tuple[str, ...]
             ) -> dict[str, float]:
    mapping: dict[str, float] = {}
    for item in items:
        label, sep, number = item.partition("=")
        if not sep or not label.strip() or not _NUMBER.fullmatch(number.strip()):
            raise click.BadParameter(f"{item!r} is not LABEL=NUMBER (e.g. good=1)", ctx, param)
        mapping[label.strip()] = float(number)
    return mapping


def _value(text: str, mapping: dict[str, float]) -> tuple[float | None, str | None]:
    """``(number, label)`` from what the user typed: a number, or a label (maybe mapped)."""
    typed = text.strip()
    if not typed:
        raise click.BadParameter("is empty: give a number or a label", param_hint="VALUE")
    if _NUMBER.fullmatch(typed):
        return float(typed), None
    return mapping.get(typed), typed


def _shown(score: Score) -> str:
    if score.value is None:
        return str(score.label)
    return f"{score.value:g}" if score.label is None else f"{score.label} ({score.value:g})"


@main.group()
def scores() -> None:
    """Semantic scores: user satisfaction, outcome quality, any named judgement."""


# ignore_unknown_options: `-1` is a value, not an option; option-like words are refused below
@scores.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("trace_id")
@click.argument("name")
@click.argument("value")
@store_option
@click.option("--span", "span_id", help="Score one span of the trace instead of all of it.")
@click.option("--comment", help="Why; kept with the score.")
@click.option("--source", type=click.Choice(["human", "rule", "model"]), default="human",
              show_default=True, help="Who judged: a person, a rule or a model.")
@click.option("--map", "mapping", multiple=True, metavar="LABEL=NUMBER", callback=_mapping,
              help="Also give a label a numeric value, e.g. --map good=1 --map bad=0 "
                   "(repeatable); the label is kept too.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored score as JSON.")
def add(  # noqa: PLR0917 - click passes every option as an argument
        trace_id: str, name: str, value: str, store_url: str, span_id: str | None,
        comment: str | None, source: str, mapping: dict[str, float], as_json: bool) -> None:
    """Attach the score NAME=VALUE to the trace TRACE_ID.

    VALUE is a number (-1, 0.5, 4) or else a label, kept as typed (good, wrong_region);
    --map turns labels into numbers as well. Scoring a trace the store has no step or span
    of is allowed (it may be recorded elsewhere) but warned about.
    """
    for word in (trace_id, name, value):
        if word.startswith("-") and not _NUMBER.fullmatch(word):
            raise click.NoSuchOption(word)
    from closedloop.telemetry import record_score, span_store_for

    number, label = _value(value, mapping)
    store = open_store_to_write(store_url)
    try:
        score = record_score(trace_id, name, number, label=label, span_id=span_id,
                             comment=comment, source=source, store=store)
        known = (span_store_for(store).trace(score.trace_id)
                 or next(store.events(trace_id=score.trace_id, limit=1), None) is not None)
    finally:
        store.close()
    if not known:
        say(f"warning: {store.url} has no step or span of trace {score.trace_id}; "
            "the score is stored anyway", err=True)
    if as_json:
        echo_json(score.to_dict())
    else:
        say(f"scored {score.trace_id} {score.name}={_shown(score)} ({score.source})")


@scores.command("list")
@store_option
@click.option("--trace", "trace_id", help="Only scores of this trace.")
@click.option("--name", help="Only scores with this name.")
@click.option("--since", type=Since(), help="Only scores given since (24h, 7d, a date).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_scores(store_url: str, trace_id: str | None, name: str | None, since: float | None,
                as_json: bool) -> None:
    """Scores, oldest first."""
    with reading(store_url) as (_, spans):
        found = spans.scores(trace_id=trace_id, name=name, since=since)
    if as_json:
        echo_json([s.to_dict() for s in found])
        return
    if not found:
        click.echo("no scores", err=True)
        sys.exit(EXIT_NO_DATA)
    for s in found:
        extra = f"  # {s.comment}" if s.comment else ""
        say(f"{iso(s.ts)}  {s.trace_id}  {s.name}={_shown(s)}  ({s.source}){extra}")


@scores.command("export")
@store_option
@click.option("--otlp-http", "endpoint", required=True, metavar="URL",
              help="OTLP/HTTP logs endpoint, e.g. http://collector:4318/v1/logs.")
@click.option("--name", help="Only scores with this name.")
@click.option("--since", type=Since(), help="Only scores given since (24h, 7d, a date).")
def export(store_url: str, endpoint: str, name: str | None, since: float | None) -> None:
    """Send scores to a collector as gen_ai.evaluation.result events."""
    from closedloop.telemetry import otlp_http_scores

    with reading(store_url) as (_, spans):
        found = spans.scores(name=name, since=since)
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
