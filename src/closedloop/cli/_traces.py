"""``closedloop traces list|show|diff``: read back the spans the telemetry pipeline stored."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from closedloop._errors import ConfigError
from closedloop.cli import main
from closedloop.cli._common import (
    EXIT_NO_DATA,
    Since,
    console,
    echo_json,
    iso,
    literal,
    say,
    store_option,
    styled,
)
from closedloop.cli._common import open_store_to_read as _open

if TYPE_CHECKING:
    from closedloop._events import StepEvent
    from closedloop.store import Store
    from closedloop.telemetry import SpanStore, StoredSpan


@contextmanager
def reading(store_url: str) -> Iterator[tuple[Store, SpanStore]]:
    """The store at ``store_url`` opened read-only, and its spans and scores; closed after."""
    # a missing extra is named by the command group (closedloop.cli._Group)
    from closedloop.telemetry import span_store_for

    store = _open(store_url)
    try:
        yield store, span_store_for(store)
    finally:
        store.close()


def _trace(spans: SpanStore, trace_id: str) -> list[StoredSpan]:
    found = spans.trace(trace_id.strip())
    if not found:
        say(f"error: no spans for trace {trace_id}", err=True)
        sys.exit(EXIT_NO_DATA)
    return found


@main.group()
def traces() -> None:
    """Execution traces: list them, show one as a tree, diff two."""


@traces.command("list")
@store_option
@click.option("--task-type", help="Only traces of this task type.")
@click.option("--since", type=Since(), help="Only traces started since (24h, 7d, a date).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many traces to list at most.")
@click.option("--cursor", help="Continue a listing: the next_cursor a previous page gave.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON for scripts: the traces and the next page's cursor.")
def list_traces(  # noqa: PLR0917 - click passes every option as an argument
        store_url: str, task_type: str | None, since: float | None, limit: int,
        cursor: str | None, as_json: bool) -> None:
    """The most recent traces, newest first, a page at a time."""
    with reading(store_url) as (_, spans):
        page = spans.traces(limit=limit, task_type=task_type, cursor=cursor,
                            since_ns=int(since * 1e9) if since is not None else None)
    if as_json:
        echo_json(page.to_dict())
        return
    if not page.traces:
        click.echo("no traces", err=True)
        sys.exit(EXIT_NO_DATA)
    rows = [(t.trace_id, iso(t.start_ns / 1e9), t.task_type or "-", t.outcome or "-",
             str(t.spans), f"{(t.end_ns - t.start_ns) / 1e6:.1f}") for t in page.traces]
    for line in columns(("trace id", "started", "task type", "outcome", "spans", "ms"), rows,
                        right=(4, 5)):
        click.echo(line)
    if page.next_cursor is not None:
        say(f"more: --cursor {page.next_cursor}")


def columns(header: Sequence[str], rows: Sequence[Sequence[str]], *,
            right: tuple[int, ...] = ()) -> list[str]:
    """``header`` and ``rows`` as lines of aligned columns, every cell printed literally.

    Plain text rather than a rich table: a listing prints without loading rich (a third of
    the command's time).
    """
    cells = [[literal(c) for c in row] for row in (header, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in cells]


@traces.command("show")
@click.argument("trace_id")
@store_option
@click.option("--content/--no-content", default=False,
              help="Also print captured (redacted) content and each step's proposal.")
@click.option("--json", "as_json", is_flag=True, help="Print the spans as JSON.")
def show_trace(trace_id: str, store_url: str, content: bool, as_json: bool) -> None:
    """One trace as a tree, with timings, verdicts and their messages, and its steps.

    Each step recorded under the trace is listed first: its step id, parent step and run,
    model, versions, labels, cost and proposal digest (with --content, the proposal).
    """
    from rich.text import Text
    from rich.tree import Tree

    from closedloop.learn import span_label, verdict_messages
    from closedloop.telemetry import iter_children

    trace_id = trace_id.strip()
    with reading(store_url) as (store, store_spans):
        spans = store_spans.trace(trace_id)
        steps = [] if as_json else list(store.events(trace_id=trace_id))
    if as_json:
        if not spans:
            say(f"error: no spans for trace {trace_id}", err=True)
            sys.exit(EXIT_NO_DATA)
        echo_json([s.to_dict() for s in spans])
        return
    if not spans and not steps:
        say(f"error: no spans for trace {trace_id}", err=True)
        sys.exit(EXIT_NO_DATA)
    root = Tree(f"trace {trace_id}")
    for event in steps:
        node = root.add(styled(step_line(event), "red" if event.error_type else ""))
        if content and event.proposal is not None:
            node.add(Text(literal(f"proposal: {event.proposal}", newlines=True), style="dim"))
    nodes: list[Tree] = [root]
    for depth, span in iter_children(spans):
        del nodes[depth + 1:]
        node = nodes[-1].add(styled(span_label(span), "red" if span.status == 2 else ""))
        failed = span.attributes.get("closedloop.verdict.passed") is False
        for message in verdict_messages(span):
            node.add(styled(message, "red" if failed else "yellow"))
        if content:
            for key, text in span.content.items():
                node.add(Text(literal(f"{key}: {text}", newlines=True), style="dim"))
        nodes.append(node)
    console().print(root)


def step_line(event: StepEvent) -> str:
    """One line for a recorded step: what it was, who ran it, with what (stored text as is:
    the caller prints it as data)."""
    parts = [f"step {event.step_id or '(no step id: recorded before schema v3)'}",
             f"{event.task_type} {event.outcome}", f"{event.latency_ms:.1f} ms"]
    for name in ("parent_step_id", "run_id", "agent_version", "prompt_version"):
        value = getattr(event, name)
        if value is not None:
            parts.append(f"{name.removesuffix('_id')}={value}")
    if event.model is not None or event.provider is not None:
        parts.append(f"model={event.model or '?'} ({event.provider or '?'})")
    tokens = f"tokens={event.input_tokens}/{event.output_tokens}"
    if event.cached_input_tokens:
        tokens += f" ({event.cached_input_tokens} cached)"
    parts.append(tokens)
    if event.cost_usd is not None:
        parts.append(f"cost=${event.cost_usd:.6f}")
    if event.labels:
        parts.append("labels=" + ",".join(f"{k}={v}" for k, v in sorted(event.labels.items())))
    if event.proposal_digest is not None:
        parts.append(f"proposal=sha256:{event.proposal_digest}")
    return "  ".join(parts)


@traces.command("diff")
@click.argument("trace_a")
@click.argument("trace_b")
@store_option
@click.option("--all", "show_all", is_flag=True, help="Show identical stages too.")
@click.option("--json", "as_json", is_flag=True, help="Print every aligned stage as JSON.")
def diff(trace_a: str, trace_b: str, store_url: str, show_all: bool, as_json: bool) -> None:
    """Stage by stage: where trace B diverged from trace A (inputs, outputs, verdicts)."""
    from closedloop.learn import diff_traces, first_divergence

    with reading(store_url) as (_, spans):
        rows = diff_traces(_trace(spans, trace_a), _trace(spans, trace_b))
    if as_json:
        echo_json([r.to_dict() for r in rows])
        return
    first = first_divergence(rows)
    if first is None:
        click.echo("no divergence: every stage decided the same")
        return
    say(f"first divergence: {first.path} #{first.occurrence}")
    for row in rows:
        if not (row.diverges or show_all):
            continue
        a = f"{row.a.duration_ms:.1f} ms" if row.a else "missing"
        b = f"{row.b.duration_ms:.1f} ms" if row.b else "missing"
        say(f"{'!' if row.diverges else ' '} {row.path} #{row.occurrence}: A {a} | B {b}")
        for key, (va, vb) in row.differences.items():
            say(f"    {key}: A={va!r}  B={vb!r}")


def _import_check(spec: str) -> tuple[str, Any]:
    """``package.module:name`` → ``(name, callable)``; a class is instantiated without args."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"check {spec!r} must be given as package.module:name")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import check {spec}: {exc}") from None
    if isinstance(target, type):
        target = target()
    if not callable(target):
        raise ConfigError(f"check {spec} is not callable")
    return attr, target


@main.command()
@click.option("--task-type", required=True, help="Replay the recorded steps of this task type.")
@click.option("--validator", "validator_specs", multiple=True, metavar="MODULE:NAME",
              help="A validator to run on each recorded final proposal (repeatable).")
@click.option("--verifier", "verifier_specs", multiple=True, metavar="MODULE:NAME",
              help="A verifier to run on each recorded (input, result) (repeatable).")
@click.option("--since", type=Since(), help="Only steps since (24h, 7d, a date).")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the replay as JSON.")
def replay(  # noqa: PLR0917 - click passes every option as an argument
        task_type: str, validator_specs: tuple[str, ...], verifier_specs: tuple[str, ...],
        since: float | None, store_url: str, as_json: bool) -> None:
    """Re-run today's validators and verifiers on the proposals recorded in traces."""
    from closedloop.learn import replay as run_replay

    if not validator_specs and not verifier_specs:
        raise ConfigError("give at least one --validator or --verifier to replay")
    validators = [_import_check(s) for s in validator_specs]
    verifiers = [_import_check(s) for s in verifier_specs]
    with reading(store_url) as (store, _):
        report = run_replay(store, task_type, validators=validators, verifiers=verifiers,
                            since=since)
    if as_json:
        echo_json(report.to_dict())
        return
    if not report.steps:
        say(f"error: no recorded steps of {task_type}", err=True)
        sys.exit(EXIT_NO_DATA)
    say(f"{report.steps} steps of {task_type}: {report.verification_failures} "
        f"verification failures, {report.successes} succeeded, "
        f"{report.not_replayable} without a recorded proposal")
    for sentence in report.sentences():
        say(sentence)
