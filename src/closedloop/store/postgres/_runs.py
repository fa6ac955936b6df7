"""Run records in a PostgreSQL store's schema: the run port of the PostgreSQL backend (table
``runs``, an appended migration), and the halts of runs (table ``run_halts``, another)."""

from __future__ import annotations

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
from closedloop.store.postgres._backend import _clean_row, _one_line

if TYPE_CHECKING:
    import psycopg

    from closedloop.store.postgres._backend import PostgresBackend

_T = TypeVar("_T")


class PostgresRunStore:
    """Run records in the ``runs`` table of the backend's schema."""

    def __init__(self, backend: PostgresBackend) -> None:
        from psycopg import sql

        self.backend = backend
        s = sql.Identifier(backend.schema)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in RUN_COLUMNS)
        self._select = sql.SQL("SELECT {} FROM {}.runs").format(cols, s)
        self._upsert = sql.SQL(
            "INSERT INTO {}.runs ({}) VALUES ({}) ON CONFLICT (run_id) DO UPDATE SET {}").format(
            s, cols, sql.SQL(", ").join(sql.Placeholder() * len(RUN_COLUMNS)),
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                               for c in RUN_COLUMNS[1:]))
        self._schema = s

    def _on(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        import psycopg

        try:
            with self.backend.pool().connection() as conn:
                return work(conn)
        except psycopg.errors.UndefinedTable:  # a store of an older schema, read-only
            raise StoreError(f"store {self.backend.url} keeps no runs (schema older than "
                             "this closedloop; open it once to migrate)") from None
        except psycopg.Error as exc:
            raise StoreError(f"cannot use store {self.backend.url}: {_one_line(exc)}") from None

    def put_runs(self, records: Sequence[RunRecord]) -> None:
        """Insert or replace the records in one transaction."""
        if self.backend.read_only:
            raise StoreError(f"store {self.backend.url} was opened read-only")
        rows = [_clean_row(r.to_row()) for r in records]

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(self._upsert, rows)
        self._on(work)

    def get_run(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        from psycopg import sql

        def work(conn: psycopg.Connection[Any]) -> RunRecord | None:
            row = conn.execute(sql.SQL("{} WHERE run_id = %s").format(self._select),
                               (run_id,)).fetchone()
            return RunRecord.from_row(row) if row is not None else None
        return self._on(work)

    def list_runs(self, *, since: float | None = None, outcome: str | None = None,
                  limit: int = 50, cursor: str | None = None) -> RunPage:
        """Runs newest first, a page read from ``runs_started``."""
        from psycopg import sql

        check_runs_limit(limit)
        where: list[sql.Composable] = []
        params: list[Any] = []
        if cursor is not None:
            started, run_id = decode_run_cursor(cursor)
            where.append(sql.SQL("(started, run_id) < (%s, %s)"))
            params += [started, run_id]
        if since is not None:
            where.append(sql.SQL("started >= %s"))
            params.append(since)
        if outcome is not None:
            where.append(sql.SQL("outcome = %s"))
            params.append(outcome)
        stmt: sql.Composable = self._select
        if where:
            stmt = sql.SQL("{} WHERE {}").format(stmt, sql.SQL(" AND ").join(where))
        stmt = sql.SQL("{} ORDER BY started DESC, run_id DESC LIMIT {}").format(
            stmt, sql.Literal(limit + 1))

        def work(conn: psycopg.Connection[Any]) -> RunPage:
            return page_of([RunRecord.from_row(r) for r in conn.execute(stmt, params)], limit)
        return self._on(work)

    def summarize_runs(self, *, since: float | None = None,
                       until: float | None = None) -> RunsSummary:
        """The summary of the runs started in ``[since, until)``, grouped in SQL."""
        from psycopg import sql

        where: list[sql.Composable] = []
        params: list[Any] = []
        if since is not None:
            where.append(sql.SQL("started >= %s"))
            params.append(since)
        if until is not None:
            where.append(sql.SQL("started < %s"))
            params.append(until)
        stmt: sql.Composable = sql.SQL(
            "SELECT outcome, count(*), sum(steps), sum(refused), sum(compensated), "
            "sum(input_tokens), sum(output_tokens), sum(cost_usd), sum(ended - started), "
            "count(ended) FROM {}.runs").format(self._schema)
        if where:
            stmt = sql.SQL("{} WHERE {}").format(stmt, sql.SQL(" AND ").join(where))
        stmt = sql.SQL("{} GROUP BY outcome").format(stmt)

        def work(conn: psycopg.Connection[Any]) -> RunsSummary:
            return summary_from_rows(conn.execute(stmt, params).fetchall())
        return self._on(work)

    def prune_runs(self, before: float) -> int:
        """Delete the records of runs started before ``before`` (and halts older than it)."""
        from psycopg import sql

        prefix = f'"{self.backend.schema}".'  # a plain SQL name (parse_url checks it)

        def work(conn: psycopg.Connection[Any]) -> int:
            removed = {table: conn.execute(sql.SQL("DELETE FROM {}.{} WHERE {}").format(
                sql.Identifier(self.backend.schema), sql.Identifier(table), sql.SQL(where)),
                {"before": before}).rowcount
                for table, where in record_clauses(prefix) if table in RUN_TABLES}
            return removed["runs"]
        return self._on(work)

    # ----- halts (RunHaltStore) -------------------------------------------------------------
    def halt_run(self, halt: RunHalt) -> RunHalt:
        """Record ``halt`` unless the run has one (the first wins); the halt in force."""
        from psycopg import sql

        if self.backend.read_only:
            raise StoreError(f"store {self.backend.url} was opened read-only")
        row = _clean_row((halt.run_id, halt.at, halt.by, halt.reason))

        def work(conn: psycopg.Connection[Any]) -> RunHalt:
            with conn.transaction():
                conn.execute(sql.SQL("INSERT INTO {}.run_halts (run_id, at, by, reason) "
                                     "VALUES (%s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING"
                                     ).format(self._schema), row)
                found = conn.execute(sql.SQL("SELECT run_id, reason, by, at FROM "
                                             "{}.run_halts WHERE run_id = %s").format(
                    self._schema), (halt.run_id,)).fetchone()
            assert found is not None
            return RunHalt(run_id=found[0], reason=found[1], by=found[2], at=found[3])
        return self._on(work)

    def run_halts(self, run_ids: Sequence[str]) -> dict[str, RunHalt]:
        """The halts of those of ``run_ids`` that have one (a StoreError when unreadable)."""
        from psycopg import sql

        ids = list(run_ids)[:MAX_HALT_IDS]
        if not ids:
            return {}

        def work(conn: psycopg.Connection[Any]) -> dict[str, RunHalt]:
            rows = conn.execute(sql.SQL("SELECT run_id, reason, by, at FROM {}.run_halts "
                                        "WHERE run_id = ANY(%s)").format(self._schema), (ids,))
            return {r[0]: RunHalt(run_id=r[0], reason=r[1], by=r[2], at=r[3]) for r in rows}
        return self._on(work)
