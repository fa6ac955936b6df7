"""One bounded, never-blocking batch queue for everything closedloop writes in the background.

The event store's writer and the telemetry pipeline both take items on the agent's path and
hand them, in batches, to something slow (SQLite, an OTLP collector) from one daemon thread.
:class:`BatchQueue` is that mechanism, once:

- ``submit`` is a ``deque.append`` (no lock) and never waits; when ``max_queue`` items are
  waiting, or after ``close``, the item is refused and counted as ``dropped`` (logged once).
- The thread wakes every ``flush_interval`` seconds, or as soon as a batch is full, and
  passes batches of at most ``batch_size`` to ``write``. What ``write`` does with a failure
  (retry, dead-letter, count) is its owner's business; an exception from it is logged.
- ``flush`` waits until everything submitted before the call has been written; ``close``
  flushes, stops the thread and runs ``on_exit`` in the worker thread (so a per-thread
  connection is closed by the thread that opened it).
- After ``fork()`` the child starts with an empty queue and no thread: the parent's pending
  items are the parent's to write.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("closedloop")


class _Marker:
    """Put in the queue by ``flush``: set once everything before it is written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_queues: weakref.WeakSet[BatchQueue[object]] = weakref.WeakSet()


class BatchQueue(Generic[T]):
    """Items submitted from any thread, written in batches by one background thread."""

    def __init__(
        self,
        write: Callable[[list[T]], object],
        *,
        name: str,
        max_queue: int,
        batch_size: int,
        flush_interval: float,
        on_exit: Callable[[], object] | None = None,
    ) -> None:
        self.write = write
        self.name = name
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.on_exit = on_exit
        self.closed = False
        self._reset()
        _queues.add(self)  # type: ignore[arg-type]

    def _reset(self) -> None:
        self._queue: deque[T | _Marker] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._markers = 0
        self.dropped = 0
        self._warned = False

    # -- producer side (the agent's threads) --------------------------------------------

    def submit(self, item: T) -> bool:
        """Queue one item without blocking; False (and counted) if it was refused."""
        queue = self._queue
        if len(queue) >= self.max_queue or self.closed:
            self._drop(1)
            return False
        queue.append(item)
        if self._thread is None:
            self._start()
        elif len(queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()
        return True

    def submit_many(self, items: Sequence[T]) -> bool:
        """Queue several items at once; all refused (and counted) if they do not fit."""
        queue = self._queue
        if len(queue) + len(items) > self.max_queue or self.closed:
            self._drop(len(items))
            return False
        queue.extend(items)
        if self._thread is None:
            self._start()
        elif len(queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()
        return True

    @property
    def queued(self) -> int:
        """Items waiting to be written (flush markers not counted)."""
        return len(self._queue) - self._markers

    def _drop(self, n: int) -> None:
        with self._lock:
            self.dropped += n
            warn = not self._warned
            self._warned = True
        if warn:
            why = "closed" if self.closed else f"full ({self.max_queue} items)"
            log.warning("closedloop %s: queue %s; items are being dropped and counted",
                        self.name, why)

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=f"closedloop-{self.name}",
                                            daemon=True)
            self._thread.start()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every item submitted before this call is written; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            if not self._queue:
                return True
            if self.closed:
                self._drain()
                return True
            self._start()
        marker = _Marker()
        with self._lock:
            self._markers += 1
        self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Write what is queued, stop the thread; later submits are refused. False on timeout."""
        if self.closed:
            return True
        self.closed = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
            if thread.is_alive():
                log.error("closedloop %s: writer did not finish within %ss; %d items still "
                          "queued", self.name, timeout, self.queued)
                return False
            return True
        # never started, or inherited across fork: write here, in the caller's thread
        self._drain()
        self._exit()
        return True

    # -- consumer side (the worker thread) ------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(self.flush_interval)
                self._wake.clear()
                self._drain()
                if self._stopping and not self._queue:
                    break
        finally:
            self._exit()

    def _exit(self) -> None:
        if self.on_exit is not None:
            try:
                self.on_exit()
            except Exception:  # the worker thread must end cleanly whatever happens
                log.exception("closedloop %s: error while closing", self.name)

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
        batch: list[T] = []
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

    def _write(self, batch: list[T]) -> None:
        try:
            self.write(batch)
        except Exception:  # the owner's write decides what a failure means; never crash here
            log.exception("closedloop %s: writing a batch of %d failed", self.name, len(batch))


def _after_fork_in_child() -> None:
    for queue in list(_queues):
        queue._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
