"""One contract for the span/score port: what ``traces``, ``scores``, ``replay`` and ``serve``
rely on, whichever store keeps the spans.

Parametrized over memory, SQLite and PostgreSQL (``any_url``), or over the backends shared
between processes (``shared_url``), see ``conftest.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import closedloop as cl
from closedloop.store import SpanStore
from closedloop.telemetry import Score, StoredSpan, TraceSummary, span_store_for

SRC = str(Path(__file__).resolve().parents[2] / "src")
DAY_NS = 86_400 * 10**9
T0 = 1_790_000_000 * 10**9  # ns


def span(trace: int, n: int, *, start: int | None = None, duration: int = 1000,
         parent: str | None = None, attributes: dict[str, object] | None = None) -> StoredSpan:
    """Span ``n`` of trace ``trace`` (ids derived from both)."""
    begin = T0 + trace * 1000 + n if start is None else start
    return StoredSpan(trace_id=f"{trace:032x}", span_id=f"{trace:08x}{n:08x}", parent_id=parent,
                      name=f"stage {n}", kind=0, start_ns=begin, end_ns=begin + duration,
                      status=0, status_message=None, attributes=dict(attributes or {}))


def step(trace: int, *, start: int | None = None, task_type: str = "deploy",
         outcome: str = "succeeded", spans: int = 3) -> list[StoredSpan]:
    """A step's spans: a labelled root and ``spans - 1`` children."""
    root = span(trace, 0, start=start, attributes={"closedloop.task_type": task_type,
                                                   "closedloop.outcome": outcome})
    return [root] + [span(trace, n, start=root.start_ns + n, parent=root.span_id)
                     for n in range(1, spans)]


@pytest.fixture
def store(any_url: str) -> Iterator[cl.Store]:
    s = cl.open_store(any_url)
    yield s
    s.close()


@pytest.fixture
def spans(store: cl.Store) -> SpanStore:
    return span_store_for(store)


def _summary(trace: int, start: int, end: int, n: int, *, task_type: str | None = "deploy",
             outcome: str | None = "succeeded") -> TraceSummary:
    return TraceSummary(trace_id=f"{trace:032x}", start_ns=start, end_ns=end, spans=n,
                        task_type=task_type, outcome=outcome)


# ----- spans ---------------------------------------------------------------------------------
def test_a_trace_reads_back_every_field_by_start_time(spans: SpanStore) -> None:
    odd = StoredSpan(
        trace_id="ab" * 16, span_id="cd" * 8, parent_id="ef" * 8, name="invoke_agent 東京 🤖",
        kind=3, start_ns=T0 + 5, end_ns=T0 + 9, status=2,
        status_message="failed: «ç» [bold]x[/] \u202e",
        attributes={"closedloop.task_type": "t", "n": 2**40, "f": 0.25, "b": False,
                    "list": ["a", 1], "none": None},
        events=[{"name": "retry", "ts_ns": T0 + 6, "attributes": {"attempt": 2}}],
        content={"closedloop.proposal": "region=eu-west-1\nline 2"})
    first = StoredSpan(
        trace_id="ab" * 16, span_id="01" * 8, parent_id=None, name="closedloop.step", kind=0,
        start_ns=T0, end_ns=T0 + 20, status=0, status_message=None, attributes={})
    spans.write_spans([odd, first])
    assert spans.trace("AB" * 16) == [first, odd]  # ids are matched in lower case
    assert spans.trace("00" * 16) == []


def test_a_trace_listing_is_newest_first_with_its_first_step_labels(spans: SpanStore) -> None:
    spans.write_spans(step(1) + step(2, outcome="failed") + step(3, task_type="plan"))
    page = spans.traces()
    assert page.traces == [
        _summary(3, T0 + 3000, T0 + 3002 + 1000, 3, task_type="plan"),
        _summary(2, T0 + 2000, T0 + 2002 + 1000, 3, outcome="failed"),
        _summary(1, T0 + 1000, T0 + 1002 + 1000, 3)]
    assert page.next_cursor is None


def test_a_trace_written_in_several_batches_is_summarised_whole(spans: SpanStore) -> None:
    # a nested step first (its spans are exported first), then the outer step that started
    # earlier: the outer step labels the trace, and start, end and count cover both batches
    inner = step(7, start=T0 + 500, task_type="inner", outcome="failed")
    outer = step(7, start=T0 + 100, task_type="outer", spans=2)
    spans.write_spans(inner)
    spans.write_spans(outer[::-1])  # children first, as the pipeline exports them
    spans.write_spans([span(7, 9, start=T0 + 5000, duration=10)])  # no labels: changes none
    spans.write_spans([span(7, 8, start=T0 + 200, duration=10)])  # inside: changes no time
    (summary,) = spans.traces().traces
    assert summary == _summary(7, T0 + 100, T0 + 5010, 7, task_type="outer")
    assert spans.traces(task_type="outer").traces == [summary]
    assert spans.traces(task_type="inner").traces == []


@pytest.mark.parametrize("together", [True, False])
def test_of_labelled_spans_starting_together_the_one_with_an_outcome_labels_the_trace(
        spans: SpanStore, together: bool) -> None:
    # the loop labels every span of a step with its task type, only the step span with its
    # outcome; the children are exported first
    root, child = step(4, spans=2)
    child = replace(child, start_ns=root.start_ns, attributes={"closedloop.task_type": "deploy"})
    for batch in ([[child, root]] if together else [[child], [root]]):
        spans.write_spans(batch)
    (summary,) = spans.traces().traces
    assert (summary.task_type, summary.outcome, summary.spans) == ("deploy", "succeeded", 2)


def test_a_trace_listing_filters_by_task_type_and_start(spans: SpanStore) -> None:
    spans.write_spans([s for i in range(10) for s in
                       step(i, task_type="even" if i % 2 == 0 else "odd")])
    odd = spans.traces(task_type="odd").traces
    assert [t.trace_id for t in odd] == [f"{i:032x}" for i in (9, 7, 5, 3, 1)]
    since = spans.traces(since_ns=T0 + 6000).traces  # started at or after
    assert [t.trace_id for t in since] == [f"{i:032x}" for i in (9, 8, 7, 6)]
    assert spans.traces(task_type="none").traces == []
    assert spans.traces(task_type="even", since_ns=T0 + 3000, limit=2).traces == [
        _summary(8, T0 + 8000, T0 + 8002 + 1000, 3, task_type="even"),
        _summary(6, T0 + 6000, T0 + 6002 + 1000, 3, task_type="even")]


def test_pages_of_a_listing_hold_every_trace_once_in_order(spans: SpanStore) -> None:
    # 23 traces, several starting at the same instant (ties are ordered by trace id)
    spans.write_spans([s for i in range(23) for s in step(i, start=T0 + (i // 4) * 10)])
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = spans.traces(limit=5, cursor=cursor)
        seen += [t.trace_id for t in page.traces]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    want = sorted(((T0 + (i // 4) * 10, f"{i:032x}") for i in range(23)), reverse=True)
    assert seen == [t for _, t in want]
    assert pages == 5  # 5 + 5 + 5 + 5 + 3: the last full page already knows it is not the end
    filtered = spans.traces(task_type="deploy", limit=22)
    assert filtered.next_cursor is not None
    assert [t.trace_id for t in spans.traces(task_type="deploy",
                                             cursor=filtered.next_cursor).traces] == [seen[-1]]


def test_a_cursor_that_no_listing_gave_is_a_config_error(spans: SpanStore) -> None:
    for bad in ("nope", "", "bm9wZQ", "!!"):
        with pytest.raises(cl.ConfigError, match="is not one a trace listing gave"):
            spans.traces(cursor=bad)


def test_spans_are_tailed_in_write_order_a_page_at_a_time(spans: SpanStore) -> None:
    assert spans.span_cursor() == 0
    assert spans.spans_since(0) == ([], 0)
    spans.write_spans(step(1))
    cursor = spans.span_cursor()
    batches = [step(i) for i in range(2, 6)]
    for batch in batches:
        spans.write_spans(batch)
    read: list[StoredSpan] = []
    while True:
        page, cursor = spans.spans_since(cursor, limit=5)
        assert len(page) <= 5
        if not page:
            break
        read += page
    assert read == [s for batch in batches for s in batch]
    assert spans.span_cursor() == cursor


# ----- scores --------------------------------------------------------------------------------
def test_scores_are_filtered_and_read_oldest_first(spans: SpanStore) -> None:
    a, b = "a" * 32, "b" * 32
    given = [Score(trace_id=a, name="quality", value=0.5, ts=30.0, source="model",
                   comment="« ok »"),
             Score(trace_id=b, name="quality", label="wrong_region", ts=10.0, span_id="c" * 16),
             Score(trace_id=a, name="satisfaction", value=4.0, label="good", ts=20.0)]
    for s in given:
        spans.add_score(s)
    assert spans.scores() == [given[1], given[2], given[0]]
    assert spans.scores(trace_id=a) == [given[2], given[0]]
    assert spans.scores(name="quality") == [given[1], given[0]]
    assert spans.scores(since=20.0) == [given[2], given[0]]
    assert spans.scores(trace_id=b, name="satisfaction") == []


def _events(store: cl.Store, rows: list[tuple[float, str, str, str]]) -> None:
    for ts, trace, task_type, outcome in rows:
        store.record(cl.StepEvent(
            ts=ts, trace_id=trace, agent_id="a", task_type=task_type, autonomy="autonomous",
            outcome=outcome, attempts=1, input_tokens=1, output_tokens=1, latency_ms=1.0,
            validation_passed=True, verification_passed=None, error_type=None,
            error_message=None, propose_ms=0.0, validate_ms=0.0, act_ms=0.0, verify_ms=0.0,
            detail=None))
    assert store.flush()


def test_score_summaries_join_scores_to_their_traces_latest_step(store: cl.Store) -> None:
    day = 86_400.0
    a, b, c, gone = "a" * 32, "b" * 32, "c" * 32, "d" * 32
    _events(store, [(day * 3, a, "plan", "succeeded"), (day * 3 + 5, a, "apply", "failed"),
                    (day * 3 + 1, b, "plan", "failed"), (day * 4, c, "plan", "succeeded"),
                    (day * 1, gone, "plan", "succeeded"),
                    (day * 3, "f" * 32, "unscored", "succeeded")])
    spans = span_store_for(store)
    for s in [Score(trace_id=a, name="q", value=1.0, ts=day * 3 + 10),
              Score(trace_id=a, name="q", value=0.0, label="bad", ts=day * 4 + 10),
              Score(trace_id=b, name="q", value=4.0, ts=day * 3 + 20),
              Score(trace_id=b, name="mood", label="good", ts=day * 3 + 30),
              Score(trace_id=c, name="mood", label="good", ts=day * 4 + 30),
              Score(trace_id=c, name="mood", label="meh", ts=day * 4 + 40),
              Score(trace_id=gone, name="q", value=9.0, ts=day * 1 + 1),  # step before `since`
              Score(trace_id="e" * 32, name="q", value=9.0, ts=day * 3)]:  # no step at all
        spans.add_score(s)
    summary = {t.task_type: t.to_dict() for t in spans.score_summary(since=day * 2)}
    assert summary == {
        "apply": {"task_type": "apply", "steps": 1, "succeeded": 0, "success_rate": 0.0,
                  "scores": {"q": {"n": 2, "mean": 0.5}}, "labels": {"q": {"bad": 1}},
                  "daily": {"1970-01-04": {"q": 1.0}, "1970-01-05": {"q": 0.0}}},
        "plan": {"task_type": "plan", "steps": 3, "succeeded": 2, "success_rate": 2 / 3,
                 "scores": {"q": {"n": 1, "mean": 4.0}},
                 "labels": {"mood": {"good": 2, "meh": 1}},
                 "daily": {"1970-01-04": {"q": 4.0}}}}
    assert spans.score_summary(since=day * 5) == []  # no score since: no task type
    until = {t.task_type: t for t in spans.score_summary(since=day * 2, until=day * 4)}
    assert until["plan"].steps == 2 and until["plan"].labels == {"mood": {"good": 1}}
    assert until["apply"].mean("q") == 1.0 and len(until["apply"].scores["q"]) == 1


# ----- retention -----------------------------------------------------------------------------
def test_prune_removes_what_is_older_and_keeps_the_rest(spans: SpanStore) -> None:
    old = [s for i in range(5) for s in step(i, start=T0 - 3 * DAY_NS + i)]
    recent = [s for i in range(5, 8) for s in step(i, start=T0 + i)]
    spans.write_spans(old)
    spans.write_spans(recent)
    for i, ts in enumerate((T0 / 1e9 - 3 * 86_400, T0 / 1e9 - 60, T0 / 1e9 + 60)):
        spans.add_score(Score(trace_id=f"{i:032x}", name="q", value=1.0, ts=ts))
    pruned = spans.prune(T0 / 1e9)
    assert (pruned.spans, pruned.traces, pruned.scores) == (15, 5, 2)
    assert [t.trace_id for t in spans.traces().traces] == [f"{i:032x}" for i in (7, 6, 5)]
    assert spans.trace(f"{0:032x}") == []
    assert [s.ts for s in spans.scores()] == [T0 / 1e9 + 60]
    assert spans.prune(T0 / 1e9).spans == 0
    # a late span of a pruned day is stored again (PostgreSQL makes its partition again)
    spans.write_spans(step(9, start=T0 - 3 * DAY_NS))
    assert len(spans.trace(f"{9:032x}")) == 3


def test_prune_cuts_inside_a_day_too(spans: SpanStore) -> None:
    spans.write_spans([s for i in range(10) for s in step(i, start=T0 + i * 10**9)])
    pruned = spans.prune((T0 + 5 * 10**9) / 1e9)
    assert (pruned.spans, pruned.traces) == (15, 5)
    assert [t.trace_id for t in spans.traces().traces] == [f"{i:032x}" for i in
                                                          range(9, 4, -1)]


# ----- one span store per store --------------------------------------------------------------
def test_a_store_has_one_span_store_for_its_life(store: cl.Store) -> None:
    assert span_store_for(store) is span_store_for(store)
    span_store_for(store).write_spans(step(1))
    with cl.open_store("memory://") as other:  # another store holds none of them
        assert span_store_for(other).traces().traces == []


# ----- several processes ---------------------------------------------------------------------
SPAN_WRITER = """
    import sys, time
    import closedloop as cl
    from closedloop.telemetry import StoredSpan, span_store_for
    url, worker, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    while time.time() < start:  # all workers begin together
        time.sleep(0.005)
    spans = span_store_for(cl.open_store(url))
    t0 = 1_790_000_000 * 10**9
    for i in range(n):  # every worker writes one span of each of the same traces, per batch
        spans.write_spans([StoredSpan(
            trace_id=f"{t:032x}", span_id=f"{worker:08x}{i * 100 + t:08x}", parent_id=None,
            name="s", kind=0, start_ns=t0 + i * 86_400 * 10**9 // 4 + worker, end_ns=t0 + i + 10**6,
            status=0, status_message=None, attributes={"w": worker}) for t in range(5)])
"""


def test_span_writers_in_several_processes_and_a_tail_see_every_span_once(
        shared_url: str) -> None:
    workers, n = 4, 60
    with cl.open_store(shared_url) as store:  # made before: the tail starts at its beginning
        tail = span_store_for(store)
        start = time.time() + 1.0
        procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(SPAN_WRITER),
                                   shared_url, str(w), str(n), str(start)],
                                  env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
                                  stderr=subprocess.PIPE, text=True) for w in range(workers)]
        seen: list[str] = []
        cursor = 0
        while any(p.poll() is None for p in procs):  # read while they write
            page, cursor = tail.spans_since(cursor, limit=37)
            seen += [s.span_id for s in page]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
        page, cursor = tail.spans_since(cursor)
        while page:
            seen += [s.span_id for s in page]
            page, cursor = tail.spans_since(cursor)
        assert len(seen) == len(set(seen)) == workers * n * 5
        listed = tail.traces(limit=100).traces
        assert sorted(t.trace_id for t in listed) == [f"{t:032x}" for t in range(5)]
        assert {t.spans for t in listed} == {workers * n}
