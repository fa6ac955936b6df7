"""One bounded batch queue for everything closedloop writes in the background.

The event store's writer and the telemetry pipeline both take items on the agent's path and
hand them, in batches, to something slow (SQLite, an OTLP collector) from one daemon thread.
:class:`BatchQueue` is that mechanism, once:

- ``submit`` is a ``deque.append`` (no lock). Overflow policy when ``max_queue`` items are
  waiting: ``"drop"`` (the default) refuses the item at once; ``"block"`` waits up to
  ``block_timeout`` seconds for the writer to make room, then refuses it. A refused item (and
  any item after ``close``) is counted as ``dropped``, one per item, and logged once.
- The thread wakes every ``flush_interval`` seconds, or as soon as a batch is full, and
  passes batches of at most ``batch_size`` to ``write``. What ``write`` does with a failure
  (hold, retry, dead-letter, count) is its owner's business; an exception from it is logged.
  ``on_wake`` runs after every wake-up (the owner's retries), ``on_flush(final)`` at every
  flush, with ``final`` true when the process is about to end.
- ``flush`` waits until everything submitted before the call has been written; ``close``
  flushes, stops the thread and runs ``on_exit`` in the worker thread (so a per-thread
  connection is closed by the thread that opened it).
- SIGTERM (how containers and service managers stop a process) flushes every queue, within
  :data:`SIGTERM_TIMEOUT` seconds, as a normal exit would, then hands the signal on to the
  handler that was installed before (or, if none, terminates the process as SIGTERM does).
  See :func:`install_sigterm_flush`.
- After ``fork()`` the child starts with an empty queue and no thread: the parent's pending
  items are the parent's to write.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Generic, Literal, TypeVar

import closedloop._redact  # noqa: F401 - puts the redacting filter on closedloop's loggers

T = TypeVar("T")

Overflow = Literal["drop", "block"]
"""What ``submit`` does when the queue is full: refuse at once, or wait for room."""

log = logging.getLogger("closedloop")


class _Marker:
    """Put in the queue by ``flush``: set once everything before it is written."""

    __slots__ = ("done", "final")

    def __init__(self, final: bool = False) -> None:
        self.done = threading.Event()
        self.final = final


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
        overflow: Overflow = "drop",
        block_timeout: float = 5.0,
        on_exit: Callable[[], object] | None = None,
        on_wake: Callable[[], object] | None = None,
        on_flush: Callable[[bool], object] | None = None,
    ) -> None:
        if overflow not in ("drop", "block"):
            raise ValueError(f"overflow must be 'drop' or 'block', got {overflow!r}")
        self.write = write
        self.name = name
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.overflow = overflow
        self.block_timeout = block_timeout
        self.on_exit = on_exit
        self.on_wake = on_wake
        self.on_flush = on_flush
        self.closed = False
        self._reset()
        _queues.add(self)  # type: ignore[arg-type]
        install_sigterm_flush()

    def _reset(self) -> None:
        self._queue: deque[T | _Marker] = deque()
        self._wake = threading.Event()
        self._room = threading.Event()
        # Re-entrant: the SIGTERM handler may flush while the interrupted main thread holds it.
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._markers = 0
        self.dropped = 0
        self._warned = False

    # -- producer side (the agent's threads) --------------------------------------------

    def submit(self, item: T) -> bool:
        """Queue one item; False (and counted) if it was refused (see the overflow policy)."""
        queue = self._queue
        if (len(queue) >= self.max_queue or self.closed) and not self._wait_for_room(1):
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
        if ((len(queue) + len(items) > self.max_queue or self.closed)
                and not self._wait_for_room(len(items))):
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

    def _wait_for_room(self, n: int) -> bool:
        """Under the ``block`` policy, wait until ``n`` more items fit; False if they never do."""
        if self.overflow != "block" or self.closed or n > self.max_queue:
            return False
        if self._thread is None:
            self._start()
        elif threading.current_thread() is self._thread:
            return False  # the writer itself must never wait for itself
        queue = self._queue
        deadline = time.monotonic() + self.block_timeout
        while True:
            self._room.clear()  # before the check, so a drain after it is never missed
            if len(queue) + n <= self.max_queue:
                return not self.closed
            self._wake.set()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # bounded: another waiter may clear the event just after the writer set it
            self._room.wait(min(remaining, 0.05))

    def _drop(self, n: int) -> None:
        with self._lock:
            self.dropped += n
            warn = not self._warned
            self._warned = True
        if warn:
            why = "closed" if self.closed else f"full ({self.max_queue} items)"
            fix = "" if self.closed else (
                "; raise max_queue, or use overflow='block' to wait instead of dropping"
                if self.overflow == "drop" else "; raise max_queue or block_timeout")
            log.warning("closedloop %s: queue %s; items are being dropped and counted%s",
                        self.name, why, fix)

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=f"closedloop-{self.name}",
                                            daemon=True)
            self._thread.start()

    def flush(self, timeout: float | None = 10.0, *, final: bool = False) -> bool:
        """Wait until every item submitted before this call is written; False on timeout.

        ``final``: the process is about to end, so the owner's ``on_flush`` must not keep
        anything in memory (the store's writer dead-letters what its backend refuses).
        """
        marker = self._mark(final)
        return True if marker is None else marker.done.wait(timeout)

    def _mark(self, final: bool) -> _Marker | None:
        """Queue a flush marker for the worker; None when the flush was done right here."""
        if self._thread is None or not self._thread.is_alive():
            if not self._queue:
                return None  # nothing queued, and nothing held: only the worker holds items
            if self.closed:
                self._drain()
                return None
            self._start()
        marker = _Marker(final)
        with self._lock:
            self._markers += 1
        self._queue.append(marker)
        self._wake.set()
        return marker

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
                if self.on_wake is not None:
                    self._call(self.on_wake)
                if self._stopping and not self._queue:
                    break
        finally:
            self._exit()

    def _exit(self) -> None:
        if self.on_exit is not None:
            self._call(self.on_exit)

    def _call(self, hook: Callable[..., object], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # the worker thread must go on (or end cleanly) whatever happens
            log.exception("closedloop %s: error in %r", self.name, hook)

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
        if n:
            self._room.set()  # producers waiting under the block policy may go on
        if not markers:
            for start in range(0, n, size):
                self._write(items[start:start + size])  # type: ignore[arg-type]
            return
        popped = sum(1 for item in items if type(item) is _Marker)
        with self._lock:
            self._markers -= popped  # out of the queue: ``queued`` counts items only
        batch: list[T] = []
        for item in items:
            if type(item) is _Marker:
                if batch:
                    self._write(batch)
                    batch = []
                if self.on_flush is not None:
                    self._call(self.on_flush, item.final)
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


def flush_all(timeout: float, *, final: bool = False) -> bool:
    """Flush every queue in the process at once, within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    queues = list(_queues)
    ok = True
    # Twice: a queue fed by another queue's writer (a store's event sinks) may have been
    # handed items after its marker; the second round writes those too.
    for _round in range(2):
        markers = [m for q in queues if (m := q._mark(final)) is not None]
        for marker in markers:
            ok = marker.done.wait(max(0.0, deadline - time.monotonic())) and ok
        queues = [q for q in queues if q.queued]
        if not queues:
            break
    return ok


SIGTERM_TIMEOUT = 5.0
"""Seconds the SIGTERM handler waits for pending items (env ``CLOSEDLOOP_SIGTERM_TIMEOUT``)."""

_Handler = Callable[[int, FrameType | None], Any] | int | None
_previous_sigterm: _Handler = None


def install_sigterm_flush() -> bool:
    """Flush on SIGTERM, then hand the signal on; True if the handler is in place.

    Done for you when the first queue is created in the main thread. The handler flushes every
    queue within :data:`SIGTERM_TIMEOUT` seconds, then calls the handler that was installed
    before it (yours, or asyncio's), or, when there was none, restores the default action and
    re-raises SIGTERM so the process ends as it would have. A process that ignores SIGTERM, or
    whose handler was set outside Python, is left alone; so is every process when
    ``CLOSEDLOOP_SIGTERM=off``. Install your own handler before closedloop's first queue to
    have it chained; one installed later replaces this one (then flush or exit from it).
    """
    global _previous_sigterm
    if os.environ.get("CLOSEDLOOP_SIGTERM", "").strip().lower() in ("0", "off", "false", "no"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False  # only the main thread may set signal handlers
    try:
        current = signal.getsignal(signal.SIGTERM)
        if current is _on_sigterm:
            return True
        if current is signal.SIG_IGN or current is None:
            return False
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or no SIGTERM here
        return False
    _previous_sigterm = current
    return True


def _sigterm_timeout() -> float:
    try:
        return float(os.environ.get("CLOSEDLOOP_SIGTERM_TIMEOUT", SIGTERM_TIMEOUT))
    except ValueError:
        return SIGTERM_TIMEOUT


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    previous = _previous_sigterm
    chained = callable(previous)
    try:
        # Without a handler to chain to, the process ends right after this: final flush.
        if not flush_all(_sigterm_timeout(), final=not chained):
            log.error("closedloop: SIGTERM: pending items not all written within %ss",
                      _sigterm_timeout())
    except Exception:  # a signal handler must never raise into the interrupted code
        log.exception("closedloop: SIGTERM: flush failed")
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)


def _after_fork_in_child() -> None:
    for queue in list(_queues):
        queue._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
