"""The background batched writer: recording never waits on disk I/O, and nothing is lost quietly.

``submit`` appends to a bounded in-memory queue (a ``deque`` append, no lock) and returns; a
daemon thread drains the queue in batches into the backend. Overflow policy when the queue
holds ``max_queue`` events: ``"drop"`` (the default; the agent is never blocked) refuses new
events and counts them as ``dropped``; ``"block"`` makes ``record`` wait up to
``block_timeout`` seconds for room first, for users who prefer waiting to losing.

When the backend refuses a batch because of its environment (disk full, read-only file,
store not openable yet), the real error is logged once, with the fix, and the agent keeps
working: the batch and every later one are **held** in memory, up to ``max_held`` events,
and written, oldest first, as soon as a retry (with backoff, ``retry_delays``) succeeds.
Beyond that bound, and for whatever is still held when the process ends, events go to a
**dead-letter** JSON-lines file: next to the store by default, or, when that cannot be
written (it is on the full disk), in ``fallback_dir`` (the temporary directory, usually
another filesystem). A batch refused for its content (a constraint, a bad value) is
dead-lettered at once. ``closedloop store import-deadletter FILE`` writes a dead-letter file
back, idempotently. Only when even that fails are events counted as ``lost``. Every count is
in :class:`WriterStats` and logged on close. Pending events are flushed on ``close()``, at
interpreter exit and on SIGTERM; after ``fork()`` the child starts a fresh queue and thread
of its own. The queue and its thread are :class:`closedloop._batching.BatchQueue`, shared
with the telemetry pipeline.

A backend whose ``concurrent_batches`` is 2 (PostgreSQL: each batch is one ``COPY`` on a
pooled connection of its own, and the server does the index upkeep in one backend process
per connection) gets two batches at a time: every other batch goes to a second thread, the
**lane**, while the writer thread writes the next one itself. Each batch stays one
transaction, all or nothing, counted as written only once it is committed; a refused batch in
the lane is held (or dead-lettered) before the one written beside it, so held events stay
oldest first. At most one batch is in the lane: memory stays bounded.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from queue import SimpleQueue

from closedloop._batching import BatchQueue, Overflow
from closedloop._events import StepEvent
from closedloop._redact import redact_events
from closedloop.store._base import EventBackend, EventSink
from closedloop.store.sqlite import disk_full

log = logging.getLogger("closedloop.store")

REFUSED_CONTENT: tuple[type[Exception], ...] = (
    sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, TypeError,
    ValueError)
"""Errors that say the batch itself is unacceptable: retrying it cannot help."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterStats:
    """What the writer did with the events it was given.

    ``held`` events are waiting in memory for the store to accept writes again; like
    ``queued`` ones they are not lost (yet). ``dead_lettered`` ones are in a dead-letter file.
    """

    written: int
    queued: int
    dropped: int
    dead_lettered: int
    lost: int
    write_errors: int
    held: int = 0

    @property
    def not_written(self) -> int:
        """Events that did not reach the store (dead-lettered ones can be re-imported)."""
        return self.dropped + self.dead_lettered + self.lost


def describe(error: object) -> str:
    """The error's text, with SQLite's extended code name when it has one."""
    name = getattr(error, "sqlite_errorname", None)
    return f"{error} ({name})" if name else str(error)


def fix_hint(error: object, url: str, path: Path | None = None) -> str:
    """What an operator can do about a store error, in one sentence.

    The error text alone can mislead (a full disk can surface as "disk I/O error" when
    SQLite's shared-memory file cannot grow), so the store's folder is looked at too.
    """
    text = str(error).lower()
    if path is not None and disk_full(path):
        text += " disk is full"
    if "full" in text or "no space" in text or "quota" in text:
        return f"free space on the disk that holds {url}, or set CLOSEDLOOP_STORE to a store " \
               "on another disk"
    if "read-only" in text or "readonly" in text or "permission" in text \
            or "unable to open" in text or "not a folder" in text:
        return f"make {url} and its folder writable by this user, or set CLOSEDLOOP_STORE to " \
               "a writable sqlite:///PATH"
    if "locked" in text or "busy" in text:
        return "another process holds the store's write lock; find it, or give this process " \
               "its own store"
    if "newer than" in text:
        return "upgrade closedloop"
    return "fix the cause above, or set CLOSEDLOOP_STORE to a writable sqlite:///PATH"


_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


class _Lane:
    """A second thread writing one batch at a time (``write(batch)``), for backends that take
    two batches at once; ``submit`` returns the batch's future (its exception, if refused)."""

    def __init__(self, write: Callable[[list[StepEvent]], None]) -> None:
        self._write = write
        self._jobs: SimpleQueue[tuple[list[StepEvent], Future[None]] | None] = SimpleQueue()
        # a daemon: it still runs during the exit handlers that flush the writer
        self._thread = threading.Thread(target=self._run, name="closedloop-store-lane",
                                        daemon=True)
        self._thread.start()

    def submit(self, batch: list[StepEvent]) -> Future[None]:
        future: Future[None] = Future()
        self._jobs.put((batch, future))
        return future

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch, future = job
            try:
                self._write(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the writer thread
                future.set_exception(exc)
            else:
                future.set_result(None)

    def close(self, timeout: float | None) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


class BatchWriter:
    """Writes submitted events to a backend from one background thread, in batches."""

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
        fallback_dir: Path | None = None,
        retry_delays: Sequence[float] = (0.05, 0.25, 1.0, 5.0),
    ) -> None:
        self.backend = backend
        self.dead_letter = dead_letter
        self.fallback_dir = fallback_dir
        self.max_held = max_held
        self.retry_delays = tuple(retry_delays)
        self._written = 0
        self._dead_lettered = 0
        self._lost = 0
        self._write_errors = 0
        self._held: deque[StepEvent] = deque()
        self._outage = False
        self._failures = 0
        self._retry_at = 0.0
        self._dead_letter_used: Path | None = None
        self._lane: _Lane | None = None
        self._in_lane: tuple[Future[None], list[StepEvent]] | None = None
        self._concurrent = getattr(backend, "concurrent_batches", 1) > 1
        self.sinks: tuple[EventSink, ...] = ()
        """Where each batch also goes, redacted, before the backend (see
        :class:`~closedloop.store.EventSink`); replaced whole, never changed in place."""
        self.maintenance: Callable[[], object] | None = None
        """Run by the writer thread after each wake-up while the store accepts writes
        (automatic retention, :class:`~closedloop.store._retention.Retention`)."""
        self._queue: BatchQueue[StepEvent] = BatchQueue(
            self._write, name="store-writer", max_queue=max_queue, batch_size=batch_size,
            flush_interval=flush_interval, overflow=overflow, block_timeout=block_timeout,
            on_exit=self._exit, on_wake=self._tick, on_flush=self._settle)
        self.submit = self._queue.submit
        """``submit(event) -> bool``: queue an event (False: refused and counted)."""
        self.submit_many = self._queue.submit_many
        """``submit_many(events) -> bool``: queue several events at once (all refused, and
        counted, if they do not fit)."""
        open_error = getattr(backend, "open_error", None)
        if open_error is not None:
            self._begin_outage(open_error)
        _writers.add(self)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every event submitted before this call is written; False on timeout,
        or when events are still held because the store refuses them."""
        return self._queue.flush(timeout) and not self._held

    def close(self, timeout: float | None = 10.0) -> WriterStats:
        """Flush, stop the thread and close the backend; later submits are dropped."""
        if not self._queue.closed:
            self._queue.close(timeout)
            stats = self.stats()
            if stats.not_written:
                log.warning("closedloop store %s: %d events not written (dropped=%d, "
                            "dead-lettered=%d to %s, lost=%d)", self.backend.url,
                            stats.not_written, stats.dropped, stats.dead_lettered,
                            self._dead_letter_used or self.dead_letter, stats.lost)
        return self.stats()

    def stats(self) -> WriterStats:
        """A snapshot of the counters."""
        return WriterStats(written=self._written, queued=self._queue.queued,
                           dropped=self._queue.dropped, dead_lettered=self._dead_lettered,
                           lost=self._lost, write_errors=self._write_errors,
                           held=len(self._held))

    # -- the writer thread ----------------------------------------------------------------

    def _write(self, batch: list[StepEvent]) -> None:
        batch = redact_events(batch)  # before the backend, held or dead-lettered
        if self.sinks:
            self._fan_out(batch)
        if self._outage:
            self._land()
            self._hold(batch)
            if time.monotonic() >= self._retry_at:
                self._retry()
            return
        if self._concurrent and self._in_lane is None:
            if self._lane is None:
                self._lane = _Lane(self.backend.write_batch)
            self._in_lane = (self._lane.submit(batch), batch)
            return
        try:
            self.backend.write_batch(batch)
        except Exception as exc:  # noqa: BLE001 - a failure is held or dead-lettered, never raised
            self._land()  # the older batch first
            self._refused(batch, exc)
            return
        self._land()
        self._written += len(batch)

    def _land(self) -> None:
        """Wait for the batch in the lane, if any; count it, or hold or dead-letter it."""
        if self._in_lane is None:
            return
        future, batch = self._in_lane
        self._in_lane = None
        exc = future.exception()
        if exc is None:
            self._written += len(batch)
        else:
            self._refused(batch, exc if isinstance(exc, Exception) else RuntimeError(exc))

    def _fan_out(self, batch: list[StepEvent]) -> None:
        for sink in self.sinks:
            try:
                sink.submit_many(batch)
            except Exception:  # a sink must not stop the store's writes
                log.exception("closedloop store %s: event sink %r failed", self.backend.url,
                              getattr(sink, "name", sink))

    def _refused(self, batch: list[StepEvent], exc: Exception) -> None:
        self._write_errors += 1
        if isinstance(exc, REFUSED_CONTENT):
            log.error("closedloop store %s: a batch of %d events was refused: %s; it goes to "
                      "the dead-letter file", self.backend.url, len(batch), describe(exc))
            self._to_dead_letter(batch)
            return
        self._begin_outage(exc)
        self._hold(batch)

    def _begin_outage(self, exc: object) -> None:
        self._schedule_retry()
        if self._outage:
            log.debug("closedloop store %s: still cannot write: %s", self.backend.url,
                      describe(exc))
            return
        self._outage = True
        path = getattr(self.backend, "path", None)
        log.error("closedloop store %s: cannot write events: %s. The agent keeps running; up to "
                  "%d events are held in memory and written when the store accepts them again, "
                  "beyond that they go to a dead-letter file (%s). Fix: %s.", self.backend.url,
                  describe(exc), self.max_held, self.dead_letter or "none configured",
                  fix_hint(exc, self.backend.url, path if isinstance(path, Path) else None))

    def _schedule_retry(self) -> None:
        delays = self.retry_delays or (1.0,)
        self._retry_at = time.monotonic() + delays[min(self._failures, len(delays) - 1)]
        self._failures += 1

    def _hold(self, batch: list[StepEvent]) -> None:
        held = self._held
        held.extend(batch)
        excess = len(held) - self.max_held
        if excess > 0:  # the oldest go to the dead-letter file: memory stays bounded
            self._to_dead_letter([held.popleft() for _ in range(excess)])

    def _retry(self) -> bool:
        """Write the held events, oldest first; True when none is left."""
        held = self._held
        size = self._queue.batch_size
        while held:
            batch = list(islice(held, size))
            try:
                self.backend.write_batch(batch)
            except Exception as exc:  # noqa: BLE001 - still failing: retry later
                self._write_errors += 1
                if isinstance(exc, REFUSED_CONTENT):
                    for _ in batch:
                        held.popleft()
                    self._to_dead_letter(batch)
                    continue
                self._begin_outage(exc)
                return False
            for _ in batch:
                held.popleft()
            self._written += len(batch)
        if self._outage:
            log.warning("closedloop store %s: writes are accepted again; held events written",
                        self.backend.url)
        self._outage = False
        self._failures = 0
        return True

    def _tick(self) -> None:
        self._land()
        if self._outage and time.monotonic() >= self._retry_at:
            self._retry()
        if self.maintenance is not None and not self._outage:
            self.maintenance()

    def _settle(self, final: bool) -> None:
        """At a flush: try the held events now; at the end, dead-letter what is still held."""
        self._land()
        if self._held and not self._retry() and final:
            held, self._held = list(self._held), deque()
            self._to_dead_letter(held)

    def _exit(self) -> None:
        self._settle(final=True)
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.close(timeout=None)
        self.backend.close()

    # -- the dead-letter file ---------------------------------------------------------------

    def _dead_letter_paths(self) -> list[Path]:
        if self.dead_letter is None:
            return []
        return [self.dead_letter, fallback_dead_letter(self.dead_letter, self.fallback_dir)]

    def _to_dead_letter(self, events: list[StepEvent]) -> None:
        text = "".join(json.dumps(e._asdict(), default=str) + "\n" for e in events)
        errors: list[str] = []
        for path in self._dead_letter_paths():
            try:
                _append(path, text)
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror or exc}")
                continue
            self._dead_lettered += len(events)
            if path != self._dead_letter_used:
                self._dead_letter_used = path
                log.warning("closedloop store %s: events are being dead-lettered to %s%s; "
                            "write them back with `closedloop store import-deadletter %s "
                            "--store %s`", self.backend.url, path,
                            f" (could not write {'; '.join(errors)})" if errors else "",
                            path, self.backend.url)
            return
        self._lost += len(events)
        log.error("closedloop store %s: %d events lost: no dead-letter file could be written "
                  "(%s)", self.backend.url, len(events),
                  "; ".join(errors) or "none configured")


def fallback_dead_letter(dead_letter: Path, folder: Path | None = None) -> Path:
    """Where ``dead_letter`` goes when it cannot be written (its disk is full or read-only).

    By default a folder of this user's in the temporary directory, usually on another
    filesystem (often in memory); the name keeps stores with the same file name apart.
    """
    if folder is None:
        user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        folder = Path(tempfile.gettempdir()) / f"closedloop-deadletter-{user}"
    digest = hashlib.sha256(os.fsencode(dead_letter.absolute())).hexdigest()[:10]
    return folder / f"{dead_letter.stem}-{digest}{dead_letter.suffix}"


def _append(path: Path, text: str) -> None:
    """Append whole lines, or nothing: a failed write is cut back to where it started."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        data = text.encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            with suppress(OSError):  # if even this fails, the importer skips a torn line
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _close_all_at_exit() -> None:
    for writer in list(_writers):
        try:
            writer.close(timeout=10.0)
        except Exception:  # exit handlers must not raise
            log.exception("closedloop store: error closing writer at exit")


def _after_fork_in_child() -> None:
    # the queue starts empty in the child (see BatchQueue); so do the child's own counts
    for writer in list(_writers):
        writer._written = writer._dead_lettered = writer._lost = writer._write_errors = 0
        writer._held = deque()
        writer._lane = writer._in_lane = None  # the lane's thread stayed in the parent
        writer._outage = False
        writer._failures = 0


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
