"""Where spans and scores live locally: the store's own SQLite file, or memory.

Spans and scores sit next to the step events (migration 2 of :mod:`closedloop.store`), so one
file answers "what happened" (events), "why" (spans) and "how good was it" (scores), offline.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from closedloop._errors import ConfigError, StoreError

if TYPE_CHECKING:
    from closedloop.store import Store

TASK_TYPE = "closedloop.task_type"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSpan:
    """A span as read back from the store (ids as hex, times in ns since the epoch)."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    status: int
    status_message: str | None
    attributes: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    content: dict[str, str] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        """End minus start, in milliseconds."""
        return (self.end_ns - self.start_ns) / 1e6

    def to_row(self) -> tuple[Any, ...]:
        """The span as a row of the ``spans`` table."""
        return (self.trace_id, self.span_id, self.parent_id, self.name, self.kind,
                self.start_ns, self.end_ns, self.status, self.status_message,
                json.dumps(self.attributes, default=repr),
                json.dumps(self.events, default=repr) if self.events else None,
                json.dumps(self.content) if self.content else None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"trace_id": self.trace_id, "span_id": self.span_id,
                "parent_id": self.parent_id, "name": self.name, "kind": self.kind,
                "start_ns": self.start_ns, "end_ns": self.end_ns,
                "duration_ms": round(self.duration_ms, 3), "status": self.status,
                "status_message": self.status_message, "attributes": self.attributes,
                "events": self.events, "content": self.content}


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSummary:
    """One trace in a listing: when, how long, how many spans, and its first step's labels."""

    trace_id: str
    start_ns: int
    end_ns: int
    spans: int
    task_type: str | None
    outcome: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"trace_id": self.trace_id, "start_ns": self.start_ns, "end_ns": self.end_ns,
                "duration_ms": round((self.end_ns - self.start_ns) / 1e6, 3),
                "spans": self.spans, "task_type": self.task_type, "outcome": self.outcome}


@dataclass(frozen=True, slots=True, kw_only=True)
class Score:
    """A judgement attached after the fact to a trace (or one span of it).

    ``value`` is numeric (a rating, a quality score; booleans count as 1/0) and/or ``label``
    is categorical ("good", "wrong_region"); ``source`` says who judged: ``human``, ``rule``
    or ``model``.
    """

    trace_id: str
    name: str
    value: float | None = None
    label: str | None = None
    span_id: str | None = None
    comment: str | None = None
    source: str = "human"
    ts: float = 0.0

    def to_row(self) -> tuple[Any, ...]:
        """The score as a row of the ``scores`` table."""
        return (self.ts, self.trace_id, self.span_id, self.name, self.value, self.label,
                self.comment, self.source)

    def to_event(self) -> dict[str, Any]:
        """The score as a ``gen_ai.evaluation.result`` event (name plus attributes)."""
        attrs: dict[str, Any] = {"gen_ai.evaluation.name": self.name,
                                 "closedloop.score.source": self.source}
        if self.value is not None:
            attrs["gen_ai.evaluation.score.value"] = self.value
        if self.label is not None:
            attrs["gen_ai.evaluation.score.label"] = self.label
        if self.comment:
            attrs["gen_ai.evaluation.explanation"] = self.comment
        return {"name": "gen_ai.evaluation.result", "timestamp": self.ts,
                "trace_id": self.trace_id, "span_id": self.span_id, "attributes": attrs}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"ts": self.ts, "trace_id": self.trace_id, "span_id": self.span_id,
                "name": self.name, "value": self.value, "label": self.label,
                "comment": self.comment, "source": self.source}


@runtime_checkable
class SpanStore(Protocol):
    """Reads and writes spans and scores; ``write_spans`` is called from one thread."""

    def write_spans(self, spans: Sequence[StoredSpan]) -> None:
        """Persist a batch of spans, all or nothing."""

    def trace(self, trace_id: str) -> list[StoredSpan]:
        """Every span of one trace, by start time."""

    def traces(self, *, limit: int = 20, task_type: str | None = None,
               since_ns: int | None = None) -> list[TraceSummary]:
        """The most recent traces first."""

    def add_score(self, score: Score) -> None:
        """Persist one score."""

    def scores(self, *, trace_id: str | None = None, name: str | None = None,
               since: float | None = None) -> list[Score]:
        """Scores, oldest first."""

    def spans_since(self, cursor: int) -> tuple[list[StoredSpan], int]:
        """Spans written after ``cursor`` (0 = from the start) and the new cursor."""


class SQLiteSpanStore:
    """Spans and scores in the store's SQLite file (tables from migration 2).

    ``read_only`` reads an existing store without ever writing it (the CLI's readers).
    ``defer`` (the span store of a store that could not be opened yet): a file that cannot be
    opened now is not an error here; writes fail (counted by the pipeline) until the store's
    own writer has opened and migrated it.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False,
                 defer: bool = False) -> None:
        from closedloop.store._sqlite import SQLiteBackend, SQLiteReader

        self.path = Path(path)
        self.read_only = read_only
        # creates and migrates the file if needed; read-only, checks it is a closedloop store
        if read_only:
            SQLiteReader(self.path)
        else:
            SQLiteBackend(self.path, defer=defer)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            # a connection is never shared with a forked child: it opens its own
            if self.read_only:
                from closedloop.store._sqlite import connect_read_only

                conn = connect_read_only(self.path)
            else:
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def write_spans(self, spans: Sequence[StoredSpan]) -> None:
        """Insert the batch in one transaction."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                             [s.to_row() for s in spans])
            conn.execute("COMMIT")
        except BaseException:
            from closedloop.store._sqlite import rollback

            rollback(conn)  # never masks the real error ("database or disk is full")
            raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read spans from {self.path}: {exc}") from None

    def trace(self, trace_id: str) -> list[StoredSpan]:
        """Every span of one trace, by start time."""
        rows = self._query("SELECT * FROM spans WHERE trace_id = ? ORDER BY start_ns, rowid",
                           (trace_id.lower(),))
        return [_span(r) for r in rows]

    def traces(self, *, limit: int = 20, task_type: str | None = None,
               since_ns: int | None = None) -> list[TraceSummary]:
        """The most recent traces first, labelled by their first step span."""
        where: list[str] = []
        params: list[Any] = []
        if since_ns is not None:
            where.append("start_ns >= ?")
            params.append(since_ns)
        sql = ("SELECT trace_id, MIN(start_ns), MAX(end_ns), COUNT(*), "
               f"(SELECT attributes FROM spans s2 WHERE s2.trace_id = spans.trace_id "
               f"AND json_extract(s2.attributes, '$.\"{TASK_TYPE}\"') IS NOT NULL "
               "ORDER BY s2.start_ns LIMIT 1) FROM spans")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " GROUP BY trace_id ORDER BY MIN(start_ns) DESC"
        out = []
        for trace_id, start, end, n, attrs_json in self._query(sql, params):
            attrs = json.loads(attrs_json) if attrs_json else {}
            summary = TraceSummary(trace_id=trace_id, start_ns=start, end_ns=end, spans=n,
                                   task_type=attrs.get(TASK_TYPE),
                                   outcome=attrs.get("closedloop.outcome"))
            if task_type is not None and summary.task_type != task_type:
                continue
            out.append(summary)
            if len(out) >= limit:
                break
        return out

    def add_score(self, score: Score) -> None:
        """Insert one score."""
        try:
            self._conn().execute("INSERT INTO scores VALUES (?,?,?,?,?,?,?,?)", score.to_row())
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write score to {self.path}: {exc}") from None

    def scores(self, *, trace_id: str | None = None, name: str | None = None,
               since: float | None = None) -> list[Score]:
        """Scores, oldest first."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("trace_id", trace_id), ("name", name)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        sql = "SELECT * FROM scores" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._query(sql + " ORDER BY ts, rowid", params)
        return [Score(ts=r[0], trace_id=r[1], span_id=r[2], name=r[3], value=r[4], label=r[5],
                      comment=r[6], source=r[7]) for r in rows]

    def spans_since(self, cursor: int) -> tuple[list[StoredSpan], int]:
        """Spans with a rowid above ``cursor``, and the highest rowid seen."""
        rows = self._query("SELECT rowid, * FROM spans WHERE rowid > ? ORDER BY rowid",
                           (cursor,))
        if not rows:
            return [], cursor
        return [_span(r[1:]) for r in rows], int(rows[-1][0])

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _span(row: Sequence[Any]) -> StoredSpan:
    return StoredSpan(trace_id=row[0], span_id=row[1], parent_id=row[2], name=row[3],
                      kind=row[4], start_ns=row[5], end_ns=row[6], status=row[7],
                      status_message=row[8], attributes=json.loads(row[9]),
                      events=json.loads(row[10]) if row[10] else [],
                      content=json.loads(row[11]) if row[11] else {})


class MemorySpanStore:
    """Spans and scores in lists: the test double, and the partner of ``memory://`` stores."""

    def __init__(self) -> None:
        self._spans: list[StoredSpan] = []
        self._scores: list[Score] = []
        self._lock = threading.Lock()

    def write_spans(self, spans: Sequence[StoredSpan]) -> None:
        """Append the batch."""
        with self._lock:
            self._spans.extend(spans)

    def all_spans(self) -> list[StoredSpan]:
        """Every span written so far, in write order."""
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[StoredSpan]:
        """Every span of one trace, by start time."""
        return sorted((s for s in self.all_spans() if s.trace_id == trace_id.lower()),
                      key=lambda s: s.start_ns)

    def traces(self, *, limit: int = 20, task_type: str | None = None,
               since_ns: int | None = None) -> list[TraceSummary]:
        """The most recent traces first."""
        by_trace: dict[str, list[StoredSpan]] = {}
        for s in self.all_spans():
            if since_ns is None or s.start_ns >= since_ns:
                by_trace.setdefault(s.trace_id, []).append(s)
        out = []
        for trace_id, spans in by_trace.items():
            labelled = sorted((s for s in spans if TASK_TYPE in s.attributes),
                              key=lambda s: s.start_ns)
            attrs = labelled[0].attributes if labelled else {}
            out.append(TraceSummary(trace_id=trace_id, start_ns=min(s.start_ns for s in spans),
                                    end_ns=max(s.end_ns for s in spans), spans=len(spans),
                                    task_type=attrs.get(TASK_TYPE),
                                    outcome=attrs.get("closedloop.outcome")))
        out = [t for t in out if task_type is None or t.task_type == task_type]
        out.sort(key=lambda t: t.start_ns, reverse=True)
        return out[:limit]

    def add_score(self, score: Score) -> None:
        """Append one score."""
        with self._lock:
            self._scores.append(score)

    def scores(self, *, trace_id: str | None = None, name: str | None = None,
               since: float | None = None) -> list[Score]:
        """Scores, oldest first."""
        with self._lock:
            items = list(self._scores)
        return sorted((s for s in items
                       if (trace_id is None or s.trace_id == trace_id)
                       and (name is None or s.name == name)
                       and (since is None or s.ts >= since)), key=lambda s: s.ts)

    def spans_since(self, cursor: int) -> tuple[list[StoredSpan], int]:
        """Spans written after position ``cursor``."""
        with self._lock:
            return list(self._spans[cursor:]), len(self._spans)


_memory_stores: weakref.WeakKeyDictionary[object, MemorySpanStore] = weakref.WeakKeyDictionary()
_memory_lock = threading.Lock()


def span_store_for(store: Store) -> SpanStore:
    """The span store that lives next to ``store``'s events (same SQLite file, or memory)."""
    from closedloop.store import MemoryBackend, SQLiteBackend

    backend = store.backend
    if isinstance(backend, SQLiteBackend):
        return SQLiteSpanStore(backend.path, read_only=backend.read_only,
                               defer=getattr(backend, "open_error", None) is not None)
    if isinstance(backend, MemoryBackend):
        with _memory_lock:
            found = _memory_stores.get(backend)
            if found is None:
                found = _memory_stores[backend] = MemorySpanStore()
            return found
    raise ConfigError(f"store {store.url} cannot hold spans; use a sqlite:/// or memory:// store")


def iter_children(spans: Sequence[StoredSpan]) -> Iterator[tuple[int, StoredSpan]]:
    """``(depth, span)`` in tree order: roots (no parent in the set) first, children by start."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[StoredSpan]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in ids else None
        children.setdefault(parent, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: s.start_ns)

    def walk(parent: str | None, depth: int) -> Iterator[tuple[int, StoredSpan]]:
        for s in children.get(parent, []):
            yield depth, s
            yield from walk(s.span_id, depth + 1)

    yield from walk(None, 0)
