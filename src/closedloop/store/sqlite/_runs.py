"""Run records in a SQLite store's file: the run port of the SQLite backend (table ``runs``,
an appended migration), and the halts of runs (table ``run_halts``, another)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from closedloop._errors import StoreError
from closedloop._runstate import (
    MAX_HALT_IDS,
    RUN_COLUMNS,
    RunHalt,
    RunPage,
    RunRecord,
    RunsSummary,
    check_runs_limit,
    decode_run_cursor,
    page_of,
    summary_from_rows,
)
from closedloop.store._retention import RUN_TABLES, record_clauses

if TYPE_CHECKING:
    from closedloop.store.sqlite._backend import SQLiteBackend

_T = TypeVar("_T")
_SELECT = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"
_UPSERT = (f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(RUN_COLUMNS))})")


def _missing_table(exc: sqlite3.Error) -> bool:
    return "no such table: run" in str(exc)


class SQLiteRunStore:
    """Run records in the ``runs`` table of the backend's file."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self.backend = backend

    def put_runs(self, records: Sequence[RunRecord]) -> None:
        """Insert or replace the records in one transaction (the writer thread's connection)."""
        if self.backend.read_only:
            raise StoreError(f"store {self.backend.url} was opened read-only")
        from closedloop.store.sqlite._backend import rollback

        conn = self.backend._writer_conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_UPSERT, [r.to_row() for r in records])
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise

    def _read(self, work: Callable[[sqlite3.Connection], _T], empty: _T) -> _T:
        try:
            conn = self.backend._reader()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.backend.url}: {exc}") from None
        try:
            return work(conn)
        except sqlite3.Error as exc:
            if _missing_table(exc):  # a store of an older schema, opened read-only
                return empty
            raise StoreError(f"cannot read store {self.backend.url}: {exc}") from None
        finally:
            conn.close()

    def get_run(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        def work(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(f"{_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
            return RunRecord.from_row(row) if row is not None else None
        return self._read(work, None)

    def list_runs(self, *, since: float | None = None, outcome: str | None = None,
                  limit: int = 50, cursor: str | None = None) -> RunPage:
        """Runs newest first, a page read from ``runs_started``."""
        check_runs_limit(limit)
        where: list[str] = []
        params: list[Any] = []
        if cursor is not None:
            started, run_id = decode_run_cursor(cursor)
            where.append("(started < ? OR (started = ? AND run_id < ?))")
            params += [started, started, run_id]
        if since is not None:
            where.append("started >= ?")
            params.append(since)
        if outcome is not None:
            where.append("outcome = ?")
            params.append(outcome)
        sql = (_SELECT + (f" WHERE {' AND '.join(where)}" if where else "")
               + f" ORDER BY started DESC, run_id DESC LIMIT {limit + 1}")

        def work(conn: sqlite3.Connection) -> RunPage:
            return page_of([RunRecord.from_row(r) for r in conn.execute(sql, params)], limit)
        return self._read(work, RunPage(runs=[]))

    def summarize_runs(self, *, since: float | None = None,
                       until: float | None = None) -> RunsSummary:
        """The summary of the runs started in ``[since, until)``, grouped in SQL."""
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("started >= ?")
            params.append(since)
        if until is not None:
            where.append("started < ?")
            params.append(until)
        sql = ("SELECT outcome, count(*), sum(steps), sum(refused), sum(compensated), "
               "sum(input_tokens), sum(output_tokens), sum(cost_usd), "
               "sum(ended - started), count(ended) FROM runs"
               + (f" WHERE {' AND '.join(where)}" if where else "") + " GROUP BY outcome")

        def work(conn: sqlite3.Connection) -> RunsSummary:
            return summary_from_rows(conn.execute(sql, params).fetchall())
        return self._read(work, summary_from_rows([]))

    def prune_runs(self, before: float) -> int:
        """Delete the records of runs started before ``before`` (and halts older than it)."""
        conn = self.backend._writer_conn()
        removed = {table: conn.execute(f"DELETE FROM {table} WHERE {where}",
                                       {"before": before}).rowcount
                   for table, where in record_clauses("", named=":before")
                   if table in RUN_TABLES}
        return removed["runs"]

    # ----- halts (RunHaltStore) -------------------------------------------------------------
    def halt_run(self, halt: RunHalt) -> RunHalt:
        """Record ``halt`` unless the run has one (the first wins); the halt in force."""
        if self.backend.read_only:
            raise StoreError(f"store {self.backend.url} was opened read-only")
        try:
            conn = self.backend._reader()
            try:
                conn.execute("INSERT OR IGNORE INTO run_halts (run_id, at, by, reason) "
                             "VALUES (?, ?, ?, ?)", (halt.run_id, halt.at, halt.by, halt.reason))
                row = conn.execute(_HALT_SELECT + " WHERE run_id = ?",
                                   (halt.run_id,)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write store {self.backend.url}: {exc}") from None
        return _halt(row)

    def run_halts(self, run_ids: Sequence[str]) -> dict[str, RunHalt]:
        """The halts of those of ``run_ids`` that have one (a StoreError when unreadable; a
        read-only store of an older schema has none)."""
        ids = list(run_ids)[:MAX_HALT_IDS]
        if not ids:
            return {}
        sql = f"{_HALT_SELECT} WHERE run_id IN ({', '.join('?' * len(ids))})"
        try:
            conn = self.backend._reader()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.backend.url}: {exc}") from None
        try:
            return {row[0]: _halt(row) for row in conn.execute(sql, ids)}
        except sqlite3.Error as exc:
            if self.backend.read_only and _missing_table(exc):
                return {}
            raise StoreError(f"cannot read store {self.backend.url}: {exc}") from None
        finally:
            conn.close()


_HALT_SELECT = "SELECT run_id, reason, by, at FROM run_halts"


def _halt(row: Sequence[Any]) -> RunHalt:
    return RunHalt(run_id=row[0], reason=row[1], by=row[2], at=row[3])

