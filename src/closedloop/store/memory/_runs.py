"""Run records in memory: the run port of the memory backend."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from closedloop._runstate import (
    RunPage,
    RunRecord,
    RunsSummary,
    check_runs_limit,
    decode_run_cursor,
    page_of,
    summarize_runs,
)


class MemoryRunStore:
    """Run records in a dict; thread-safe; nothing survives the process."""

    def __init__(self) -> None:
        self._runs: dict[str, RunRecord] = {}
        self._lock = threading.Lock()

    def put_runs(self, records: Sequence[RunRecord]) -> None:
        """Insert or replace each record."""
        with self._lock:
            for r in records:
                self._runs[r.run_id] = r

    def get_run(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        with self._lock:
            return self._runs.get(run_id)

    def list_runs(self, *, since: float | None = None, outcome: str | None = None,
                  limit: int = 50, cursor: str | None = None) -> RunPage:
        """Runs newest first (by start, then id)."""
        check_runs_limit(limit)
        after = decode_run_cursor(cursor) if cursor is not None else None
        with self._lock:
            runs = list(self._runs.values())
        chosen = sorted((r for r in runs
                         if (since is None or r.started >= since)
                         and (outcome is None or r.outcome == outcome)
                         and (after is None or (r.started, r.run_id) < after)),
                        key=lambda r: (r.started, r.run_id), reverse=True)
        return page_of(chosen[:limit + 1], limit)

    def summarize_runs(self, *, since: float | None = None,
                       until: float | None = None) -> RunsSummary:
        """The summary of the runs started in ``[since, until)``."""
        with self._lock:
            runs = list(self._runs.values())
        return summarize_runs(r for r in runs if (since is None or r.started >= since)
                              and (until is None or r.started < until))

    def prune_runs(self, before: float, *, dry_run: bool = False) -> int:
        """Forget the runs started before ``before`` (``dry_run``: only count them)."""
        with self._lock:
            old = [k for k, r in self._runs.items() if r.started < before]
            if not dry_run:
                for k in old:
                    del self._runs[k]
        return len(old)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)
