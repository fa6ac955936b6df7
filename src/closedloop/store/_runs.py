"""The background writer of run records: a run's start and end never wait on the database.

:meth:`Store.record_run <closedloop.store.Store.record_run>` queues a
:class:`~closedloop.runs.RunRecord` (redacted on the writer's thread); one daemon thread per
store writes them in batches through the backend's run port (one upsert per run id, the last
record wins). A batch the store refuses is kept (up to :data:`MAX_HELD` records, the newest
per run) and written again at the next wake-up; what is still held when the process ends is
logged as lost with the run ids, so the run's steps (in the events, each with its
``run_id``) are what remains of it. Flushed with the store, on SIGTERM and at exit (the
shared :class:`~closedloop._batching.BatchQueue`).
"""

from __future__ import annotations

import logging
import threading

from closedloop._batching import BatchQueue
from closedloop._runstate import RunRecord, RunStore

log = logging.getLogger("closedloop.store")

MAX_HELD = 10_000
"""Run records held at most while the store refuses them (the newest per run)."""


class RunWriter:
    """Queues run records and writes them from a background thread."""

    def __init__(self, runs: RunStore, url: str, *, flush_interval: float = 0.25) -> None:
        self.runs = runs
        self.url = url
        self._held: dict[str, RunRecord] = {}
        self._lock = threading.Lock()
        self._warned = False
        self.lost = 0
        """Records given up on (more than :data:`MAX_HELD` held, or held at exit)."""
        self._queue: BatchQueue[RunRecord] = BatchQueue(
            self._write, name="runs", max_queue=100_000, batch_size=512,
            flush_interval=flush_interval, on_wake=self._retry, on_flush=self._on_flush)
        self.submit = self._queue.submit

    def _write(self, batch: list[RunRecord]) -> None:
        with self._lock:
            for record in batch:
                self._held[record.run_id] = record
        self._retry()

    def _retry(self) -> None:
        with self._lock:
            pending = list(self._held.values())
        if not pending:
            return
        try:
            self.runs.put_runs([r.redacted() for r in pending])
        except Exception as exc:  # noqa: BLE001 - kept and retried; the agent never sees it
            with self._lock:
                over = len(self._held) - MAX_HELD
                if over > 0:
                    for run_id in list(self._held)[:over]:
                        del self._held[run_id]
                    self.lost += over
            if not self._warned:
                self._warned = True
                log.warning("closedloop: cannot write run records to %s (%s: %s); they are "
                            "held and written again when it accepts them", self.url,
                            type(exc).__name__, exc)
            return
        with self._lock:
            for record in pending:
                if self._held.get(record.run_id) is record:
                    del self._held[record.run_id]
            self._warned = False

    def _on_flush(self, final: bool) -> None:
        if final:
            self._retry()
            with self._lock:
                left, self._held = list(self._held), {}
            if left:
                self.lost += len(left)
                log.error("closedloop: %d run record(s) could not be written to %s and are "
                          "lost (their steps are stored with their run_id): %s", len(left),
                          self.url, ", ".join(left[:10]))

    @property
    def held(self) -> int:
        """Records waiting for the store to accept them."""
        with self._lock:
            return len(self._held)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every record queued so far is written; False on timeout or when some
        are held because the store refuses them."""
        return self._queue.flush(timeout) and not self.held

    def close(self, timeout: float | None = 10.0) -> None:
        """Write what is queued (a last try for what is held) and stop the thread."""
        self._queue.flush(timeout, final=True)
        self._queue.close(timeout)
