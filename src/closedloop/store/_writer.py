"""The background batched writer: recording never waits on disk I/O.

``submit`` appends to a bounded in-memory queue (a ``deque`` append, no lock) and returns; a
daemon thread drains the queue in batches into the backend. Overflow policy: when the queue
holds ``max_queue`` events, new events are *not* queued and are counted as ``dropped`` (the
agent is never blocked). A batch the backend refuses is retried with backoff; if it still
fails it goes to a dead-letter JSON-lines file next to the store and is counted, and if even
that fails it is counted as ``lost`` and logged. Every count is visible in :class:`WriterStats`
and logged on close. Pending events are flushed on ``close()`` and at interpreter exit; after
``fork()`` the child starts a fresh queue and thread of its own. The queue and its thread are
:class:`closedloop._batching.BatchQueue`, shared with the telemetry pipeline.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from closedloop._batching import BatchQueue
from closedloop._events import StepEvent
from closedloop._redact import redact_event
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
        self.dead_letter = dead_letter
        self.retry_delays = tuple(retry_delays)
        self._written = 0
        self._dead_lettered = 0
        self._lost = 0
        self._write_errors = 0
        self._queue: BatchQueue[StepEvent] = BatchQueue(
            self._write, name="store-writer", max_queue=max_queue, batch_size=batch_size,
            flush_interval=flush_interval, on_exit=backend.close)
        self.submit = self._queue.submit
        """``submit(event) -> bool``: queue an event without blocking (False: refused)."""
        _writers.add(self)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every event submitted before this call is written; False on timeout."""
        return self._queue.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> WriterStats:
        """Flush, stop the thread and close the backend; later submits are dropped."""
        if not self._queue.closed:
            self._queue.close(timeout)
            stats = self.stats()
            if stats.not_written:
                log.warning("closedloop store %s: %d events not written (dropped=%d, "
                            "dead-lettered=%d to %s, lost=%d)", self.backend.url,
                            stats.not_written, stats.dropped, stats.dead_lettered,
                            self.dead_letter, stats.lost)
        return self.stats()

    def stats(self) -> WriterStats:
        """A snapshot of the counters."""
        return WriterStats(written=self._written, queued=self._queue.queued,
                           dropped=self._queue.dropped, dead_lettered=self._dead_lettered,
                           lost=self._lost, write_errors=self._write_errors)

    def _write(self, batch: list[StepEvent]) -> None:
        batch = [redact_event(e) for e in batch]  # before any backend or dead-letter file
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


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
