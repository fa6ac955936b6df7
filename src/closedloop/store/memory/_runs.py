"""Run records in memory: the run port of the memory backend."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from closedloop._runstate import (
    MAX_HALT_IDS,
    RunHalt,
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
        self._halts: dict[str, RunHalt] = {}
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
        """Forget the runs started before ``before`` and older halts (``dry_run``: only count
        them); how many runs."""
        return self.prune(before, dry_run=dry_run)["runs"]

    def prune(self, before: float, *, dry_run: bool = False) -> dict[str, int]:
        """:meth:`prune_runs`, counted by table as the SQL backends' retention does."""
        with self._lock:
            old = [k for k, r in self._runs.items() if r.started < before]
            halts = [k for k, h in self._halts.items() if h.at < before]
            if not dry_run:
                for k in old:
                    del self._runs[k]
                for k in halts:
                    del self._halts[k]
        return {"runs": len(old), "run_halts": len(halts)}

    def counts(self) -> dict[str, int]:
        """Rows held, by table (``store info``)."""
        with self._lock:
            return {"runs": len(self._runs), "run_halts": len(self._halts)}

    def halt_run(self, halt: RunHalt) -> RunHalt:
        """Record ``halt`` unless the run has one (the first wins); the halt in force."""
        with self._lock:
            return self._halts.setdefault(halt.run_id, halt)

    def run_halts(self, run_ids: Sequence[str]) -> dict[str, RunHalt]:
        """The halts of those of ``run_ids`` that have one."""
        with self._lock:
            return {i: self._halts[i] for i in list(run_ids)[:MAX_HALT_IDS] if i in self._halts}
