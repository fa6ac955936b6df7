"""The event store: where every step's event lands, chosen by URL.

``sqlite:///PATH`` (the default; a relative PATH is relative to the working directory,
``sqlite:////abs/path`` is absolute), ``memory://``, ``postgresql://USER@HOST/DB?schema=NAME``
(the ``postgres`` extra) or a plug-in's scheme (:mod:`closedloop.store._registry`). A plain
file path is read as a SQLite file. ``CLOSEDLOOP_STORE`` sets the default; without it the
default is ``$XDG_DATA_HOME/closedloop/closedloop.db`` (``~/.local/share/...``).

Each backend also keeps, next to its events, the spans and scores of its traces (the
:class:`SpanBackend` port: ``backend.span_store()``, a :class:`SpanStore`), the durable
record of pauses and halts (the :class:`ControlStateBackend` port: ``control_ledger()``), the
autonomy levels of its task types with their audit trail (the :class:`LevelBackend` port:
``level_store()``, a :class:`~closedloop.autonomy.LevelStore`) and durable approval requests
(the :class:`ApprovalBackend` port: ``approval_store()``, an :class:`ApprovalStore`;
:func:`approval_store_for`).
No module outside this package opens a database.

Questions about the events are answered where they are (the query port,
:mod:`closedloop.store._query`): :meth:`Store.summary` gives the per-task-type figures of
``closedloop report`` (SQL on SQLite and PostgreSQL, through migration 5's indexes) and
:meth:`Store.steps` pages through steps newest first with an opaque cursor.

Telemetry that cannot write drops and counts, it never stops the agent: recording never
raises, a store that refuses writes has its events held, then dead-lettered (see
:mod:`closedloop.store._writer`), and the default store opens even when its file cannot be
opened yet (the cause is logged once, with the fix; events are held until it opens).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from closedloop._approvals import ApprovalStore
from closedloop._batching import Overflow
from closedloop._errors import ConfigError, StoreError
from closedloop._events import StepEvent
from closedloop._runstate import RunPage, RunRecord, RunsSummary, RunStore
from closedloop._spans import Pruned, SpanStore
from closedloop.store._base import (
    ApprovalBackend,
    ControlStateBackend,
    EventBackend,
    EventQuery,
    EventSink,
    LevelBackend,
    RunBackend,
    SinkStats,
    SpanBackend,
    approval_store_for,
    level_store_for,
    run_store_for,
    span_store_for,
)
from closedloop.store._deadletter import ImportResult, import_dead_letter
from closedloop.store._keeper import ROLLUP_EVERY_S, RollupKeeper, check_every
from closedloop.store._learn import (
    FAILURE_OUTCOMES,
    REFUSAL_OUTCOMES,
    WINDOW_OFFSETS,
    WINDOWS,
    Dimension,
    ExampleKey,
    FactorCell,
    FactorMargins,
    FailureCell,
    LearnQueries,
    MarginQueries,
    SeriesCell,
    check_span,
    check_window,
    factor_events,
    failure_events,
    failure_example_events,
    hour_of_day,
    latency_bounds,
    latency_bucket,
    margins_of_cells,
    parse_dimension,
    period_of,
    period_steps_events,
    series_events,
    size_bucket,
    size_code,
)
from closedloop.store._query import (
    MAX_PAGE,
    EventQueries,
    EventSummary,
    MessageGroup,
    StepFilter,
    StepPage,
    TaskFigures,
    page_of_events,
    parse_label_filter,
    summarize_events,
)
from closedloop.store._registry import open_backend, redact_url, register_scheme, sqlite_path
from closedloop.store._retention import (
    DEFAULT_RETENTION,
    RETENTION_ENV,
    EventsPruned,
    MaintainedBackend,
    PruneReport,
    Retention,
    StoreInfo,
    describe_duration,
    migrate_store,
    parse_duration,
    parse_retention,
    prune,
    retention_from_env,
    store_info,
)
from closedloop.store._runs import RunWriter
from closedloop.store._writer import BatchWriter, WriterStats
from closedloop.store.memory import MemoryBackend, MemoryLevelStore, MemorySpanStore
from closedloop.store.sqlite import (
    SCHEMA_VERSION,
    SQLiteBackend,
    SQLiteLedger,
    SQLiteLevelStore,
    SQLiteReader,
    SQLiteSpanStore,
)

__all__ = [
    "DEFAULT_RETENTION",
    "FAILURE_OUTCOMES",
    "MAX_PAGE",
    "REFUSAL_OUTCOMES",
    "RETENTION_ENV",
    "ROLLUP_EVERY_S",
    "SCHEMA_VERSION",
    "WINDOWS",
    "WINDOW_OFFSETS",
    "ApprovalBackend",
    "ApprovalStore",
    "ControlStateBackend",
    "Dimension",
    "EventBackend",
    "EventQueries",
    "EventQuery",
    "EventSink",
    "EventSummary",
    "EventsPruned",
    "ExampleKey",
    "FactorCell",
    "FactorMargins",
    "FailureCell",
    "ImportResult",
    "LearnQueries",
    "LevelBackend",
    "MaintainedBackend",
    "MarginQueries",
    "MemoryBackend",
    "MemoryLevelStore",
    "MemorySpanStore",
    "MessageGroup",
    "PruneReport",
    "Pruned",
    "Retention",
    "RollupKeeper",
    "RunBackend",
    "RunPage",
    "RunRecord",
    "RunStore",
    "RunWriter",
    "RunsSummary",
    "SQLiteBackend",
    "SQLiteLedger",
    "SQLiteLevelStore",
    "SQLiteSpanStore",
    "SeriesCell",
    "SinkStats",
    "SpanBackend",
    "SpanStore",
    "StepFilter",
    "StepPage",
    "Store",
    "StoreInfo",
    "TaskFigures",
    "WriterStats",
    "approval_store_for",
    "check_window",
    "default_store",
    "default_store_url",
    "describe_duration",
    "factor_events",
    "failure_events",
    "failure_example_events",
    "hour_of_day",
    "import_dead_letter",
    "is_default_store",
    "latency_bounds",
    "latency_bucket",
    "level_store_for",
    "margins_of_cells",
    "migrate_store",
    "open_backend",
    "open_store",
    "parse_dimension",
    "parse_duration",
    "parse_label_filter",
    "parse_retention",
    "period_of",
    "period_steps_events",
    "prune",
    "register_scheme",
    "reset_default_store",
    "retention_from_env",
    "run_store_for",
    "series_events",
    "size_bucket",
    "size_code",
    "span_store_for",
    "store_info",
    "summarize_events",
]

ENV_VAR = "CLOSEDLOOP_STORE"


class Store:
    """A backend plus the batched writer in front of it.

    ``record`` never raises and, under the default ``overflow="drop"``, never blocks: when
    ``max_queue`` events are waiting, new ones are dropped and counted. ``overflow="block"``
    waits up to ``block_timeout`` seconds for room instead (in asyncio code that wait stalls
    the event loop too: prefer a larger ``max_queue`` there). Events the backend refuses are
    held (up to ``max_held``) and written when it accepts them again, else dead-lettered to
    ``dead_letter`` (or a file of that name in the temporary directory, when the store's disk
    is full). See :mod:`closedloop.store._writer`.
    """

    def __init__(
        self,
        backend: EventBackend,
        *,
        max_queue: int = 100_000,
        batch_size: int = 4096,
        flush_interval: float = 0.25,
        overflow: Overflow = "drop",
        block_timeout: float = 5.0,
        max_held: int = 100_000,
        dead_letter: Path | None = None,
        retention: Retention | str | float | None = None,
        rollup_every: float | None = ROLLUP_EVERY_S,
    ) -> None:
        if rollup_every is not None:
            check_every(rollup_every)  # before anything is started
        self.backend = backend
        self.url = backend.url
        self._writer = BatchWriter(backend, max_queue=max_queue, batch_size=batch_size,
                                   flush_interval=flush_interval, overflow=overflow,
                                   block_timeout=block_timeout, max_held=max_held,
                                   dead_letter=dead_letter)
        self.retention: Retention | None = None
        """Automatic retention: events and control records (spans and scores through a span
        port) older than its ``keep`` are removed by the writer thread; ``None``: everything
        is kept."""
        self.set_retention(retention)
        self.record = self._writer.submit
        """``record(event) -> bool``: queue an event; False (and counted) if it was dropped."""
        self._runs: RunWriter | None = None
        self._runs_lock = threading.Lock()
        fold = getattr(backend, "fold_rollups", None)
        self.rollups: RollupKeeper | None = (
            RollupKeeper(fold, every=rollup_every, name=self.url)
            if fold is not None and rollup_every is not None
            and not getattr(backend, "read_only", False) else None)
        """Keeps the learning roll-ups current for readers (a backend that has them, a
        writable handle, ``rollup_every`` seconds apart; see :mod:`closedloop.store._keeper`);
        ``None``: queries fold what they need themselves."""

    def record_run(self, record: RunRecord) -> bool:
        """Queue a run's record (:class:`closedloop.Run` does, at its start and end); written
        by a background thread, redacted there (:class:`~closedloop.store.RunWriter`). False
        when the backend keeps no runs or the queue is full."""
        writer = self._runs
        if writer is None:
            with self._runs_lock:
                writer = self._runs
                if writer is None:
                    runs = run_store_for(self)
                    if runs is None:
                        return False
                    writer = self._runs = RunWriter(runs, self.url)
        return writer.submit(record)

    def runs(self) -> RunStore:
        """The run records kept next to the events (a :class:`~closedloop.ConfigError` for a
        backend that keeps none)."""
        runs = run_store_for(self)
        if runs is None:
            raise ConfigError(f"store {self.url} keeps no runs: its backend has no run port "
                              "(use a sqlite:///, postgresql:// or memory:// store)")
        return runs

    def set_retention(self, retention: Retention | str | float | None) -> None:
        """Keep ``retention`` (``"30d"``, seconds, a :class:`Retention`; ``None`` or ``"off"``:
        everything) from now on. A run starts with the writer's next wake-up."""
        if not isinstance(retention, Retention):
            keep = parse_retention(retention)
            retention = None if keep is None else Retention(keep)
        self.retention = retention
        self._writer.maintenance = (None if retention is None
                                    else functools.partial(retention, self.backend))

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until everything recorded so far is written.

        False on timeout, or when events are held because the backend refuses them.
        Run records too (:meth:`record_run`).
        """
        ok = self._writer.flush(timeout)
        runs = self._runs
        return (runs.flush(timeout) if runs is not None else True) and ok

    def close(self, timeout: float | None = 10.0) -> WriterStats:
        """Flush and stop writing; returns the final counts (of events)."""
        runs = self._runs
        if runs is not None:
            runs.close(timeout)
        if self.rollups is not None:
            self.rollups.close(timeout)
        return self._writer.close(timeout)

    def stats(self) -> WriterStats:
        """Written, queued, held, dropped, dead-lettered and lost counts."""
        return self._writer.stats()

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        """Where every event also goes (see :meth:`add_sink`)."""
        return self._writer.sinks

    def add_sink(self, sink: EventSink) -> None:
        """Send every event recorded from now on to ``sink`` too (redacted, from the
        writer's thread, see :class:`EventSink`). Adding a sink twice adds it once."""
        if not isinstance(sink, EventSink):
            raise ConfigError(f"not an event sink: {type(sink).__name__} (it needs name, "
                              "submit_many, flush, close and stats)")
        writer = self._writer
        if sink not in writer.sinks:
            writer.sinks = (*writer.sinks, sink)

    def remove_sink(self, sink: EventSink) -> None:
        """Stop sending events to ``sink`` (a no-op when it was not added)."""
        writer = self._writer
        writer.sinks = tuple(s for s in writer.sinks if s is not sink)

    def sink_stats(self) -> dict[str, SinkStats]:
        """Each sink's counts, by its name."""
        return {sink.name: sink.stats() for sink in self._writer.sinks}

    def events(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        limit: int | None = None,
        trace_id: str | None = None,
    ) -> Iterator[StepEvent]:
        """Read stored events, oldest first (call :meth:`flush` first to see your own)."""
        query = EventQuery(since=since, until=until, task_type=task_type, limit=limit,
                           trace_id=trace_id)
        return self.backend.iter_events(query)

    def summary(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        outcome: str | None = None,
        error_type: str | None = None,
        top_messages: int = 3,
    ) -> EventSummary:
        """The figures of the stored steps with ``since <= ts < until`` (and the other
        filters), per task type and overall: in the database when the backend answers
        :class:`EventQueries`, else in one pass over :meth:`events`."""
        where = StepFilter(since=since, until=until, task_type=task_type, outcome=outcome,
                           error_type=error_type)
        backend = self.backend
        if isinstance(backend, EventQueries):
            found = backend.summarize(where, top_messages=top_messages)
            if found is not None:
                return found
        events = self.events(since=since, until=until, task_type=task_type)
        return summarize_events((e for e in events if where.matches(e)),
                                top_messages=top_messages)

    def steps(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        outcome: str | None = None,
        error_type: str | None = None,
        model: str | None = None,
        label: tuple[str, str] | None = None,
        run_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> StepPage:
        """One page of stored steps, newest first: pass the page's ``next_cursor`` back (with
        the same filters) for the next one. ``label``: ``(key, value)``, steps whose label
        ``key`` is ``value``; ``run_id``: the steps of one run. A backend without
        :class:`EventQueries` is read whole for each page, keeping only the page in memory."""
        where = StepFilter(since=since, until=until, task_type=task_type, outcome=outcome,
                           error_type=error_type, model=model, label=label,
                           run_id=run_id)
        return self._steps(where, limit, cursor, after=False)

    def steps_after(
        self,
        cursor: str | None,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        outcome: str | None = None,
        error_type: str | None = None,
        model: str | None = None,
        label: tuple[str, str] | None = None,
        run_id: str | None = None,
        limit: int = 50,
    ) -> StepPage:
        """The stored steps after ``cursor`` (a page's ``head_cursor``, or this method's
        ``next_cursor``; None: from the first), oldest first, with the filters of
        :meth:`steps`: what a live view polls for. ``next_cursor`` is the position of the
        last step listed (None: nothing new; keep the cursor you have). A step stored late
        with a time before the cursor's (another process's delayed batch) is not listed."""
        where = StepFilter(since=since, until=until, task_type=task_type, outcome=outcome,
                           error_type=error_type, model=model, label=label,
                           run_id=run_id)
        return self._steps(where, limit, cursor, after=True)

    def _steps(self, where: StepFilter, limit: int, cursor: str | None, *,
               after: bool) -> StepPage:
        backend = self.backend
        if isinstance(backend, EventQueries):
            if after:
                return backend.list_steps_after(where, limit=limit, cursor=cursor)
            return backend.list_steps(where, limit=limit, cursor=cursor)
        events = self.events(since=where.since, until=where.until, task_type=where.task_type)
        return page_of_events(events, where, limit=limit, cursor=cursor, url=self.url,
                              after=after)

    def task_types(self) -> list[str]:
        """Every task type with a stored step, sorted (in the database when the backend
        answers :class:`EventQueries`: one index probe per task type)."""
        backend = self.backend
        if isinstance(backend, EventQueries):
            return backend.task_types()
        return sorted({e.task_type for e in self.events()})

    # ----- the learning layer's aggregations (closedloop.store._learn) ---------------------
    def _learn(self, since: float | None, until: float | None, task_type: str | None
               ) -> tuple[StepFilter, LearnQueries | None]:
        where = StepFilter(since=since, until=until, task_type=task_type)
        backend = self.backend
        return where, backend if isinstance(backend, LearnQueries) else None

    def _matching(self, where: StepFilter) -> Iterator[StepEvent]:
        events = self.events(since=where.since, until=where.until, task_type=where.task_type)
        return (e for e in events if where.matches(e))

    def series(self, *, by: Dimension | str = "task_type", window: str = "day",
               since: float | None = None, until: float | None = None,
               task_type: str | None = None) -> list[SeriesCell]:
        """Per value of ``by`` (a :class:`Dimension` or its name: ``task_type``, ``model``,
        ``agent_version``, ``prompt_version``, ``label:KEY``) and per ``window`` period
        (hour, day, week), the figures of the stored steps (:class:`SeriesCell`), ordered by
        value then period: in the database when the backend computes them."""
        dimension = parse_dimension(by) if isinstance(by, str) else by
        check_window(window)
        where, backend = self._learn(since, until, task_type)
        found = None if backend is None else backend.series(where, by=dimension,
                                                             window=window)
        if found is None:
            found = series_events(self._matching(where), dimension, window)
        check_span(c.period for c in found)
        return found

    def factor_counts(self, *, since: float | None = None, until: float | None = None,
                      task_type: str | None = None) -> list[FactorCell]:
        """Steps and failures of the stored steps (refusals left out) per combination of
        model, agent and prompt version, labels, UTC hour of day and input size."""
        where, backend = self._learn(since, until, task_type)
        found = None if backend is None else backend.factor_counts(where)
        return found if found is not None else factor_events(self._matching(where))

    def factor_margins(self, *, since: float | None = None, until: float | None = None,
                       task_type: str | None = None) -> FactorMargins:
        """Steps and failures of the stored steps (refusals left out) per value of each
        factor alone (:class:`FactorMargins`): from the backend's roll-up when it keeps one,
        else added up from :meth:`factor_counts`."""
        where, _ = self._learn(since, until, task_type)
        backend = self.backend
        found = backend.factor_margins(where) if isinstance(backend, MarginQueries) else None
        return found if found is not None else margins_of_cells(
            self.factor_counts(since=since, until=until, task_type=task_type))

    def failure_counts(self, *, window: str = "day", since: float | None = None,
                       until: float | None = None, task_type: str | None = None
                       ) -> list[FailureCell]:
        """Failed stored steps per error type, message group, task type, model and period."""
        check_window(window)
        where, backend = self._learn(since, until, task_type)
        found = None if backend is None else backend.failure_counts(where, window=window)
        return found if found is not None else failure_events(self._matching(where), window)

    def failure_examples(self, keys: list[ExampleKey], *, per_key: int = 3,
                         since: float | None = None, until: float | None = None,
                         task_type: str | None = None
                         ) -> dict[ExampleKey, list[tuple[float, str]]]:
        """The newest ``per_key`` ``(ts, trace_id)`` of the failed steps of each
        ``(task_type, error_type or "", group)``, newest first."""
        where, backend = self._learn(since, until, task_type)
        found = (None if backend is None
                 else backend.failure_examples(where, keys, per_key=per_key))
        return (found if found is not None
                else failure_example_events(self._matching(where), keys, per_key))

    def period_steps(self, *, window: str = "day", since: float | None = None,
                     until: float | None = None, task_type: str | None = None
                     ) -> dict[int, int]:
        """Stored steps per ``window`` period (index: :func:`period_of`)."""
        check_window(window)
        where, backend = self._learn(since, until, task_type)
        found = None if backend is None else backend.period_steps(where, window=window)
        return found if found is not None else period_steps_events(self._matching(where),
                                                                   window)

    def count(self) -> int:
        """How many events the backend holds (not counting queued ones)."""
        return self.backend.count()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"


def open_store(
    url: str | os.PathLike[str],
    *,
    read_only: bool = False,
    max_queue: int = 100_000,
    batch_size: int = 4096,
    flush_interval: float = 0.25,
    overflow: Overflow = "drop",
    block_timeout: float = 5.0,
    max_held: int = 100_000,
    create: bool = True,
    defer: bool = False,
    retention: Retention | str | float | None = None,
    rollup_every: float | None = ROLLUP_EVERY_S,
) -> Store:
    """Open (creating and migrating if needed) the store at ``url``.

    ``read_only`` (readers such as ``closedloop report``) opens an existing store without
    ever writing it: no migration, a file that is not a closedloop store is a
    :class:`~closedloop.StoreError`, and a store on a read-only mount can be read.

    With ``create=False`` (readers such as ``closedloop report``) a SQLite file that does not
    exist is a :class:`~closedloop.StoreError` instead of a new empty store. A malformed URL
    is a :class:`~closedloop.ConfigError`; a path that cannot be opened is a
    :class:`~closedloop.StoreError`, each with a one-line reason, unless ``defer=True``: then
    the store is returned anyway, the cause is logged once with the fix, and events are held
    until the file can be opened (what :func:`default_store` does, so that an agent starts
    even on a full or read-only disk). ``overflow``, ``block_timeout`` and ``max_held``: see
    :class:`Store`. ``retention`` (``"30d"``; default ``None``, keep everything): see
    :class:`Store` and :mod:`closedloop.store._retention`. ``rollup_every`` (seconds;
    ``None``: off): how often a writable store folds new rows into the learning roll-ups
    from a thread of its own, see :mod:`closedloop.store._keeper`.

    Schemes other than ``sqlite`` and ``memory`` (``postgresql``, plug-ins) are opened through
    the scheme registry (:mod:`closedloop.store._registry`), with ``create`` (never with
    ``read_only``) and ``defer`` as above; their dead-letter file is
    :func:`dead_letter_for_url`.
    """
    text = os.fspath(url).strip()
    if not text:
        raise ConfigError("store URL is empty; use sqlite:///PATH or memory://")
    if rollup_every is not None:
        check_every(rollup_every)  # before a backend is opened
    create = create and not read_only

    def store(backend: EventBackend, dead_letter: Path | None = None) -> Store:
        return Store(backend, max_queue=max_queue, batch_size=batch_size,
                     flush_interval=flush_interval, overflow=overflow,
                     block_timeout=block_timeout, max_held=max_held, dead_letter=dead_letter,
                     retention=retention, rollup_every=rollup_every)

    if text == "memory://":
        return store(MemoryBackend())
    if text.startswith("sqlite:///"):
        path = sqlite_path(text)
    elif "://" in text or text.startswith("sqlite:"):
        # every other scheme (PostgreSQL, plug-ins) comes from the registry
        backend = open_backend(text, create=create, defer=defer, read_only=read_only)
        return store(backend, dead_letter_for_url(backend.url))
    else:
        path = Path(text).expanduser()
    if read_only and path.is_file():
        return store(SQLiteReader(path))
    if not create and not path.exists():
        raise StoreError(f"no store at {path}; run `closedloop demo` or point --store at one")
    if not create and not path.is_file():
        raise StoreError(f"cannot read store {path}: not a file")
    backend = SQLiteBackend(path, defer=defer)
    return store(backend, dead_letter_path(path))


def dead_letter_path(store_path: Path) -> Path:
    """Where a SQLite store's dead-letter file goes by default: next to it."""
    return store_path.with_name(store_path.name + ".deadletter.jsonl")


def dead_letter_for_url(url: str) -> Path:
    """Where the dead-letter file of a store that is not a file goes: the user's data folder.

    One file per store (named for the scheme and a digest of the URL without its password).
    """
    safe = redact_url(url)
    digest = hashlib.sha256(safe.encode()).hexdigest()[:10]
    scheme = safe.split(":", 1)[0] or "store"
    return _data_dir() / "deadletter" / f"{scheme}-{digest}.jsonl"


def _data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return Path(base).expanduser() / "closedloop"


def default_store_url() -> str:
    """``$CLOSEDLOOP_STORE``, else the SQLite file in the user's data directory."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env
    return f"sqlite:///{_data_dir() / 'closedloop.db'}"


def default_store() -> Store:
    """The current runtime's store, which loops record into unless given one; opened on first
    use (see :mod:`closedloop._runtime`)."""
    from closedloop._runtime import current_runtime

    return current_runtime().store


def is_default_store(store: object) -> bool:
    """True when ``store`` is the current runtime's store; never opens it to find out."""
    from closedloop._runtime import current_runtime

    return current_runtime().has_store(store)


def reset_default_store() -> None:
    """Close the process runtime (its store among the rest) and start afresh from the
    environment: the same as :func:`closedloop.reset`."""
    from closedloop._runtime import reset

    reset()
