"""Which indexes of PostgreSQL's ``events`` each query of the store reads, and how long it takes.

Run: ``PYTHONPATH=src python bench/pg_plans.py URL`` with the URL of a store that holds events
(``bench/report.py stores`` builds one of 1M: ``postgresql://...?schema=
closedloop_bench_report_1000000``). Opened read-only: nothing is migrated or written.

Every query the store's read paths send (the report's summary, step listings with and without
filters and a cursor, the task types, a trace's steps as the dashboard's trace page reads
them, a run's steps, a time range, the learning layer's aggregations, the score summary's
join, retention's look at late events) runs once as the store sends it, with each SELECT it
issues first run under ``EXPLAIN (ANALYZE, FORMAT JSON)`` on the same connection (same
snapshot, same ``SET LOCAL`` settings): printed are the indexes of ``events`` (its day
partitions' indexes by the parent's name) the plan scans, the scan kinds, and the time.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg

import closedloop as cl
from closedloop.store import StepFilter
from closedloop.store._base import EventQuery
from closedloop.store._learn import Dimension

_PARTITION_INDEX = re.compile(r"events_(\d{8}|default)_(.*?)_idx\d*$")
_seen: list[tuple[set[str], float]] = []


def _parent(conn: psycopg.Connection[Any], index: str, schema: str) -> str:
    row = conn.execute(
        "SELECT p.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s AND n.nspname = %s", (index, schema)).fetchone()
    return index if row is None else str(row[0])


def _walk(node: dict[str, Any], out: set[str]) -> None:
    if "Index Name" in node:
        out.add(f"{node['Node Type'].replace(' Scan', '')}:{node['Index Name']}")
    elif node.get("Node Type") == "Seq Scan" and node.get("Relation Name", "").startswith("events"):
        out.add(f"Seq:{node['Relation Name']}" if node["Relation Name"] == "events_default"
                else "Seq:events")
    for child in node.get("Plans", []):
        _walk(child, out)


def _explained(conn: psycopg.Connection[Any], query: Any, params: Any) -> None:
    text = query.as_string(conn) if hasattr(query, "as_string") else str(query)
    if not text.lstrip().upper().startswith(("SELECT", "WITH")) or "pg_attribute" in text:
        return
    with psycopg.ClientCursor(conn) as cur:  # its own cursor: the caller's is untouched
        cur.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {text}", params)
        row = cur.fetchone()
    assert row is not None
    plan = row[0][0] if isinstance(row[0], list) else json.loads(row[0])[0]
    found: set[str] = set()
    _walk(plan["Plan"], found)
    named = set()
    for item in found:
        kind, _, name = item.partition(":")
        parent = name
        for candidate in _schemas:
            parent = _parent(conn, name, candidate)
            if parent != name:
                break
        named.add(f"{kind}:{parent}")
    _seen.append((named, plan["Execution Time"]))


_schemas: list[str] = []
_busy: list[bool] = []


def _patch() -> None:
    for cls in (psycopg.Cursor, psycopg.ServerCursor):
        original = cls.execute

        def execute(self: Any, query: Any, params: Any = None, *a: Any,
                    _original: Callable[..., Any] = original, **k: Any) -> Any:
            if not _busy:
                _busy.append(True)
                try:
                    _explained(self.connection, query, params)
                finally:
                    _busy.clear()
            return _original(self, query, params, *a, **k)

        cls.execute = execute  # type: ignore[method-assign]


def main() -> None:
    url = sys.argv[1]
    _schemas.append(url.rsplit("schema=", 1)[1])
    store = cl.open_store(url, read_only=True, create=False)
    backend: Any = store.backend
    oldest = next(iter(backend.iter_events(EventQuery(limit=1)))).ts
    last = backend.list_steps(StepFilter(), limit=1).steps[0]
    some = backend.list_steps(StepFilter(outcome="failed"), limit=1).steps[0]
    day = 86_400.0
    page = backend.list_steps(StepFilter(), limit=20)
    from closedloop.learn import report_from_store

    cases: list[tuple[str, Callable[[], object]]] = [
        ("report (summary)", lambda: report_from_store(store)),
        ("report, one task type, last 7 days", lambda: backend.summarize(
            StepFilter(task_type=last.task_type, since=last.ts - 7 * day), top_messages=10)),
        ("steps, newest 20", lambda: backend.list_steps(StepFilter(), limit=20)),
        ("steps, next page", lambda: backend.list_steps(StepFilter(), limit=20,
                                                         cursor=page.next_cursor)),
        ("steps after the newest (live poll)", lambda: backend.list_steps_after(
            StepFilter(), limit=50, cursor=page.next_cursor)),
        ("steps, task type", lambda: backend.list_steps(StepFilter(task_type=last.task_type),
                                                        limit=20)),
        ("steps, outcome failed", lambda: backend.list_steps(StepFilter(outcome="failed"),
                                                             limit=20)),
        ("steps, a model no step has (the roll-up's hours)", lambda: backend.list_steps(
            StepFilter(model="nothing"), limit=20)),
        ("steps, run id (none)", lambda: backend.list_steps(StepFilter(run_id="nothing"),
                                                            limit=20)),
        ("steps, last 24 h", lambda: backend.list_steps(StepFilter(since=last.ts - day),
                                                        limit=20)),
        ("task types", backend.task_types),
        ("trace page (trace_id, ORDER BY ts LIMIT 50)", lambda: list(backend.iter_events(
            EventQuery(trace_id=some.trace_id, limit=50)))),
        ("a run's steps (cli runs show)", lambda: list(backend.iter_events(
            EventQuery(run_id="nothing")))),
        ("events in one hour", lambda: list(backend.iter_events(
            EventQuery(since=oldest + day, until=oldest + day + 3600)))),
        ("trends: series by task type, per day", lambda: backend.series(
            StepFilter(since=last.ts - 7 * day), by=Dimension("task_type"), window="day")),
        ("trends: series by task type, per day, all time (the overview)", lambda:
            backend.series(StepFilter(), by=Dimension("task_type"), window="day")),
        ("factors", lambda: backend.factor_counts(StepFilter(since=last.ts - 7 * day))),
        ("failures: counts", lambda: backend.failure_counts(
            StepFilter(since=last.ts - 7 * day), window="day")),
        ("failures: examples", lambda: backend.failure_examples(
            StepFilter(since=last.ts - 7 * day),
            [(last.task_type, "verification", "x"), (last.task_type, "agent", "")],
            per_key=3)),
        ("period steps", lambda: backend.period_steps(StepFilter(since=last.ts - 7 * day),
                                                      window="day")),
        ("score summary", lambda: backend.span_store().score_summary()),
        ("retention: late events (dry run)", lambda: backend.prune_events(
            oldest, dry_run=True)),
    ]
    _patch()
    print(f"store {url}, load {os.getloadavg()[0]:.2f}")
    print("| query | events indexes read (per statement) | EXPLAIN ANALYZE ms | wall ms |")
    print("| --- | --- | --- | --- |")
    for name, call in cases:
        _seen.clear()
        start = time.perf_counter()
        call()
        wall = (time.perf_counter() - start) * 1e3
        used = "; ".join(", ".join(sorted(s)) or "-" for s, _ in _seen)
        explain = sum(t for _, t in _seen)
        print(f"| {name} | {used} | {explain:.1f} | {wall:.1f} |", flush=True)
    store.close()


if __name__ == "__main__":
    main()
