"""The background batched writer: recording never waits on disk I/O.

``submit`` appends to a bounded in-memory queue (a ``deque`` append, no lock) and returns; a
daemon thread drains the queue in batches into the backend. Overflow policy: when the queue
holds ``max_queue`` events, new events are *not* queued and are counted as ``dropped`` (the
agent is never blocked). A batch the backend refuses is retried with backoff; if it still
fails it goes to a dead-letter JSON-lines file next to the store and is counted, and if even
that fails it is counted as ``lost`` and logged. Every count is visible in :class:`WriterStats`
and logged on close. Pending events are flushed on ``close()`` and at interpreter exit; after
``fork()`` the child starts a fresh queue and thread of its own.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from closedloop._events import StepEvent
from closedloop.store._base import EventBackend

log = logging.getLogger("closedloop.store")


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterStats:
    """What the writer did with the events it was given."""

    written: int
    queued: int
    dropped: int
    dead_lettered: int
    lost: int
    write_errors: int

    @property
    def not_written(self) -> int:
        """Events that did not reach the store (dead-lettered ones can be re-imported)."""
        return self.dropped + self.dead_lettered + self.lost


class _Marker:
    """Put in the queue by ``flush``: set once everything before it is written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


class BatchWriter:
    """Writes submitted events to a backend from one background thread, in batches."""

    def __init__(
        self,
        backend: EventBackend,
        *,
        max_queue: int = 100_000,
        batch_size: int = 4096,
        flush_interval: float = 0.25,
        dead_letter: Path | None = None,
        retry_delays: Sequence[float] = (0.05, 0.25, 1.0),
    ) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.dead_letter = dead_letter
        self.retry_delays = tuple(retry_delays)
        self._closed = False
        self._reset()
        _writers.add(self)

    def _reset(self) -> None:
        self._queue: deque[StepEvent | _Marker] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._written = 0
        self._dropped = 0
        self._dead_lettered = 0
        self._lost = 0
        self._write_errors = 0
        self._warned_drop = False
        self._markers = 0

    # -- producer side (the agent's thread) ---------------------------------------------

    def submit(self, event: StepEvent) -> bool:
        """Queue one event without blocking; False if it could not be queued (counted)."""
        queue = self._queue
        if len(queue) >= self.max_queue or self._closed:
            self._count_drop()
            return False
        queue.append(event)
        if self._thread is None:
            self._start()
        if len(queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()
        return True

    def _count_drop(self) -> None:
        with self._lock:
            self._dropped += 1
            warn = not self._warned_drop
            self._warned_drop = True
        if warn:
            why = "closed" if self._closed else f"full ({self.max_queue} events)"
            log.warning("closedloop store %s: writer queue %s; events are being dropped "
                        "and counted", self.backend.url, why)

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="closedloop-store-writer",
                                            daemon=True)
            self._thread.start()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every event submitted before this call is written; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            if not self._queue:
                return True
            self._start()
        marker = _Marker()
        with self._lock:
            self._markers += 1
        self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> WriterStats:
        """Flush, stop the thread and close the backend; later submits are dropped."""
        if not self._closed:
            self._closed = True
            if self._thread is not None and self._thread.is_alive():
                self._stopping = True
                self._wake.set()
                self._thread.join(timeout)
                if self._thread.is_alive():
                    log.error("closedloop store %s: writer did not finish within %ss; %d "
                              "events still queued", self.backend.url, timeout,
                              len(self._queue))
            elif self._queue:
                self._drain()  # no thread (never started or after fork): write inline
                self.backend.close()
            stats = self.stats()
            if stats.not_written:
                log.warning("closedloop store %s: %d events not written (dropped=%d, "
                            "dead-lettered=%d to %s, lost=%d)", self.backend.url,
                            stats.not_written, stats.dropped, stats.dead_lettered,
                            self.dead_letter, stats.lost)
        return self.stats()

    def stats(self) -> WriterStats:
        """A snapshot of the counters."""
        return WriterStats(written=self._written, queued=len(self._queue),
                           dropped=self._dropped, dead_lettered=self._dead_lettered,
                           lost=self._lost, write_errors=self._write_errors)

    # -- consumer side (the writer thread) ----------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                self._drain()
                if self._stopping and not self._queue:
                    break
        finally:
            try:
                self.backend.close()
            except Exception:  # closing must not raise in a daemon thread
                log.exception("closedloop store %s: error closing backend", self.backend.url)

    def _drain(self) -> None:
        queue = self._queue
        size = self.batch_size
        # Snapshot the length *before* reading the marker count: a flush marker among the
        # first n items was counted before it was appended, so the count cannot miss it.
        n = len(queue)
        with self._lock:
            markers = self._markers
        popleft = queue.popleft
        items = [popleft() for _ in range(n)]  # only this thread pops: n items are there
        if not markers:
            for start in range(0, n, size):
                self._write(items[start:start + size])  # type: ignore[arg-type]
            return
        batch: list[StepEvent] = []
        for item in items:
            if type(item) is _Marker:
                if batch:
                    self._write(batch)
                    batch = []
                with self._lock:
                    self._markers -= 1
                item.done.set()
                continue
            batch.append(item)  # type: ignore[arg-type]
            if len(batch) >= size:
                self._write(batch)
                batch = []
        if batch:
            self._write(batch)

    def _write(self, batch: list[StepEvent]) -> None:
        delays = self.retry_delays
        for attempt in range(len(delays) + 1):
            try:
                self.backend.write_batch(batch)
            except Exception as exc:  # noqa: BLE001 - any backend failure is retried, then kept
                self._write_errors += 1
                if attempt < len(delays):
                    log.warning("closedloop store %s: write of %d events failed (%s); "
                                "retrying", self.backend.url, len(batch), exc)
                    time.sleep(delays[attempt])
                    continue
                log.error("closedloop store %s: write of %d events failed after %d tries: %s",
                          self.backend.url, len(batch), attempt + 1, exc)
                self._keep(batch)
                return
            self._written += len(batch)
            return

    def _keep(self, batch: list[StepEvent]) -> None:
        if self.dead_letter is not None:
            try:
                with self.dead_letter.open("a", encoding="utf-8") as fh:
                    for event in batch:
                        fh.write(json.dumps(event._asdict(), default=str) + "\n")
            except OSError as exc:
                log.error("closedloop store: cannot write dead-letter file %s: %s",
                          self.dead_letter, exc)
            else:
                self._dead_lettered += len(batch)
                return
        self._lost += len(batch)

    def _after_fork_in_child(self) -> None:
        self._reset()


def _close_all_at_exit() -> None:
    for writer in list(_writers):
        try:
            writer.close(timeout=10.0)
        except Exception:  # exit handlers must not raise
            log.exception("closedloop store: error closing writer at exit")


def _after_fork_in_child() -> None:
    for writer in list(_writers):
        writer._after_fork_in_child()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
