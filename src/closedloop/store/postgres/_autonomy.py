"""Autonomy levels in a PostgreSQL store's schema: the level-store port of the PostgreSQL
backend, shared by every process and machine using the store.

The same tables and rules as the SQLite store's (:mod:`closedloop.store.sqlite._autonomy`),
created by the store's migrations. It runs on the backend's connection pool (plain kept
connections for a store opened read-only), so a dashboard page of level reads opens no
connection of its own (it opened 17, 135 ms of the page, each count planned on a cold server
process). A pooled connection whose server process had gone (a restart, a killed backend)
fails its first statement, before anything is done on it, and the call is made once more on
another, so a server that was away is used again at once. A call that finds no pooled
connection free within :data:`POOL_WAIT_S` (the pool busy with telemetry, or empty while the
server is away) opens one of its own, as every call did before: telemetry never holds a
level read for long, and a refused connection fails closed at once instead of after the
pool's timeout. Each call sets the statement timeout for itself and resets it before the
connection goes back; a connection left inside a transaction or in a failed state is
closed, never returned. A level change is one transaction under an advisory lock on the
schema. Every failure is :class:`~closedloop.ControlUnavailable` (the autonomy layer then
fails closed). Reads never create anything: a schema from before the autonomy tables has no
levels. The evidence port counts from the hourly evidence roll-up
(:mod:`closedloop.store.postgres._evidence`), folded first by a writable store's level store
(at most every :data:`~closedloop.store._evidence.FOLD_EVERY_S`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from closedloop._autonomy_state import (
    EvidenceGroup,
    Feedback,
    LevelChange,
    LevelRecord,
    change_from_row,
    change_of,
    feedback_from_row,
    feedback_row,
    history_row,
    level_from_row,
    level_row,
    redacted_feedback,
    redacted_record,
)
from closedloop._errors import ControlUnavailable, StoreError
from closedloop.store._evidence import Folds, evidence_groups
from closedloop.store.postgres import _evidence
from closedloop.store.postgres._backend import (
    MIGRATIONS,
    _clean,
    _Connections,
    _one_line,
    locked_work,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

    _Pool = ConnectionPool[psycopg.Connection[Any]] | _Connections

_T = TypeVar("_T")
_LEVEL_COLUMNS = "agent_id, task_type, action_class, level, ceiling, by, at, reason, evidence"
_SQL = {
    "levels": f"SELECT {_LEVEL_COLUMNS} FROM {{s}}.autonomy_levels "
              "ORDER BY task_type, agent_id, action_class",
    "levels_of": f"SELECT {_LEVEL_COLUMNS} FROM {{s}}.autonomy_levels WHERE task_type = %s "
                 "ORDER BY task_type, agent_id, action_class",
    "level": f"SELECT {_LEVEL_COLUMNS} FROM {{s}}.autonomy_levels WHERE task_type = %s AND "
             "agent_id = %s AND action_class = %s",
    "upsert": f"INSERT INTO {{s}}.autonomy_levels ({_LEVEL_COLUMNS}) VALUES "
              "(%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (task_type, agent_id, "
              "action_class) DO UPDATE SET level = EXCLUDED.level, ceiling = EXCLUDED.ceiling, "
              "by = EXCLUDED.by, at = EXCLUDED.at, reason = EXCLUDED.reason, "
              "evidence = EXCLUDED.evidence",
    "log": "INSERT INTO {s}.autonomy_history (at, agent_id, task_type, action_class, "
           "old_level, new_level, kind, by, reason, evidence) VALUES "
           "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
    "history": "SELECT at, agent_id, task_type, action_class, old_level, new_level, kind, by, "
               "reason, evidence FROM {s}.autonomy_history ORDER BY at DESC, id DESC LIMIT %s",
    "history_of": "SELECT at, agent_id, task_type, action_class, old_level, new_level, kind, "
                  "by, reason, evidence FROM {s}.autonomy_history WHERE task_type = %s "
                  "ORDER BY at DESC, id DESC LIMIT %s",
    "put_feedback": "INSERT INTO {s}.autonomy_feedback (step_id, agreed, by, at, note) VALUES "
                    "(%s, %s, %s, %s, %s) ON CONFLICT (step_id) DO UPDATE SET "
                    "agreed = EXCLUDED.agreed, by = EXCLUDED.by, at = EXCLUDED.at, "
                    "note = EXCLUDED.note",
    "feedback": "SELECT step_id, agreed, by, at, note FROM {s}.autonomy_feedback "
                "WHERE at >= %s ORDER BY at",
    "put_detector": "INSERT INTO {s}.detector_state (name, at, state) VALUES (%s, %s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET at = EXCLUDED.at, state = EXCLUDED.state",
    "detector": "SELECT state FROM {s}.detector_state WHERE name = %s",
}
EVIDENCE_TIMEOUT_S = 300.0
"""How long the evidence's grouped query may take: it reads every step of a task type since
its level was set when there is no roll-up yet, and the first fold (not a read on a step's
path, which keeps the short timeout)."""
_AUTONOMY_V = next(i + 1 for i, m in enumerate(MIGRATIONS) if "autonomy_levels" in m)
"""The migration that creates the autonomy tables."""
POOL_WAIT_S = 0.05
"""How long a call waits for a free pooled connection before it opens one of its own."""


class PostgresLevelStore:
    """Levels, their audit trail, feedback on suggestions and detector states in a
    PostgreSQL store's schema."""

    def __init__(self, connections: Callable[[], _Pool],
                 connect: Callable[[bool], psycopg.Connection[Any]], schema: str, url: str, *,
                 statement_timeout: float = 10.0, fold: bool = False) -> None:
        from psycopg import sql

        self.fold = fold
        """Fold new steps into the evidence roll-up before counting (a writable store's)."""
        self._folds = Folds(self._fold)
        self._connections = connections
        """This process's pool (:meth:`~closedloop.store.postgres.PostgresBackend.pool`)."""
        self._connect = connect
        """A new connection (``autocommit``) when the pool has none free."""
        self.schema = schema
        self.url = url
        self._statement_timeout = statement_timeout
        s = sql.Identifier(schema)
        self._q = {name: sql.SQL(text).format(s=s) for name, text in _SQL.items()}

    def __repr__(self) -> str:
        return f"PostgresLevelStore({self.url!r})"

    def _run(self, what: str, work: Callable[[psycopg.Connection[Any]], _T], *,
             absent: Callable[[], _T] | None = None, write: bool = False,
             timeout: float | None = None) -> _T:
        """``work`` on a pooled connection (``write``: one transaction under the schema's
        autonomy lock), or ``absent()`` where the tables do not exist yet; each statement
        may take ``timeout`` seconds (default: the store's ``statement_timeout``)."""
        import psycopg

        try:
            try:
                return self._attempt(work, absent, write, timeout)
            except _Gone:  # that pooled connection's server process had gone: once afresh
                return self._attempt(work, absent, write, timeout)
        except (psycopg.Error, StoreError, OSError, _Gone) as exc:
            cause = exc.__cause__ if isinstance(exc, _Gone) else exc
            raise ControlUnavailable(f"cannot {what} autonomy levels in {self.url}: "
                                     f"{_one_line(cause or exc)}") from None

    def _attempt(self, work: Callable[[psycopg.Connection[Any]], _T],
                 absent: Callable[[], _T] | None, write: bool, timeout: float | None) -> _T:
        import psycopg

        with self._connection() as conn:
            try:  # the first statement: nothing is done yet if the connection had gone
                conn.execute("SELECT set_config('statement_timeout', %s, false)",
                             (f"{int((timeout or self._statement_timeout) * 1000)}ms",))
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if conn.closed or conn.broken:
                    raise _Gone from exc
                raise
            try:
                # no tables: nothing stored here yet, unless the schema says they should
                # exist (then the record is broken: fail closed)
                return locked_work(conn, self.schema, "autonomy", work, write=write,
                                   absent=absent, tables_since=_AUTONOMY_V)
            finally:
                _give_back(conn)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection, or one of its own when none is free within
        :data:`POOL_WAIT_S` (closed afterwards)."""
        pool = self._connections()
        if isinstance(pool, _Connections):  # a read-only store's: no pool to wait for
            with pool.connection() as conn:
                yield conn
            return
        from psycopg_pool import PoolTimeout

        with ExitStack() as stack:
            try:
                conn = stack.enter_context(pool.connection(timeout=POOL_WAIT_S))
            except PoolTimeout:
                conn = stack.enter_context(self._connect(True))
            yield conn

    def levels(self, task_type: str | None = None) -> list[LevelRecord]:
        """Every stored level (of ``task_type``), by task type, agent and class."""
        rows = self._run("read", lambda conn: conn.execute(
            self._q["levels"] if task_type is None else self._q["levels_of"],
            () if task_type is None else (_clean(task_type),)).fetchall(), absent=list)
        return [level_from_row(r) for r in rows]

    def set_level(self, record: LevelRecord, *, kind: str = "set",
                  only_from: Collection[str | None] | None = None) -> LevelChange | None:
        """Store ``record`` and its audit entry in one transaction (see the port)."""
        record = redacted_record(record)
        row = tuple(_clean(v) for v in level_row(record))

        def work(conn: psycopg.Connection[Any]) -> LevelChange | None:
            found = conn.execute(self._q["level"], (row[1], row[0], row[2])).fetchone()
            old = level_from_row(found) if found else None
            if only_from is not None and (None if old is None else old.level) not in only_from:
                return None
            change = change_of(old, record, kind)
            conn.execute(self._q["upsert"], row)
            conn.execute(self._q["log"], tuple(_clean(v) for v in history_row(change)))
            return change

        return self._run("write", work, write=True)

    def history(self, *, task_type: str | None = None, limit: int = 50) -> list[LevelChange]:
        """Recent level changes (of ``task_type``), newest first."""
        n = max(0, int(limit))
        rows = self._run("read", lambda conn: conn.execute(
            self._q["history"] if task_type is None else self._q["history_of"],
            (n,) if task_type is None else (_clean(task_type), n)).fetchall(), absent=list)
        return [change_from_row(r) for r in rows]

    def put_feedback(self, feedback: Feedback) -> None:
        """Record feedback on a suggestion (the last one per step id counts)."""
        row = tuple(_clean(v) for v in feedback_row(redacted_feedback(feedback)))
        self._run("write", lambda conn: conn.execute(self._q["put_feedback"], row),
                  write=True)

    def feedback(self, *, since: float | None = None) -> list[Feedback]:
        """Feedback recorded at or after ``since``, oldest first."""
        rows = self._run("read", lambda conn: conn.execute(
            self._q["feedback"], (float("-inf") if since is None else since,)).fetchall(),
            absent=list)
        return [feedback_from_row(r) for r in rows]

    def evidence_groups(self, task_type: str, *, since: float,
                        classes: bool) -> list[EvidenceGroup] | None:
        """``task_type``'s steps since ``since`` grouped in SQL (the evidence port,
        :class:`~closedloop.autonomy.EvidenceQueries`); a schema without the tables: None."""
        task = _clean(task_type)

        def work(conn: psycopg.Connection[Any]) -> list[EvidenceGroup]:
            if self.fold:
                self._folds(conn)
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return evidence_groups(
                    _evidence.evidence_rows(conn, self.schema, task, since=since,
                                            classes=classes),
                    _evidence.feedback_rows(conn, self.schema, task, since=since,
                                            classes=classes))

        return self._run("count the evidence of", work, absent=lambda: None,
                         timeout=max(self._statement_timeout, EVIDENCE_TIMEOUT_S))

    def _fold(self, conn: psycopg.Connection[Any]) -> None:
        """Fold the new steps into the evidence roll-up on the count's connection; the count
        stays exact without it, only slower."""
        import psycopg

        with suppress(psycopg.Error):
            _evidence.refresh(conn, self.schema)

    def put_detector(self, name: str, state: dict[str, Any], *, at: float) -> None:
        """Save a detector's state under ``name``."""
        text = json.dumps(state, allow_nan=False)
        self._run("write", lambda conn: conn.execute(self._q["put_detector"],
                                                     (_clean(name), at, text)), write=True)

    def detector(self, name: str) -> dict[str, Any] | None:
        """The state saved under ``name``, if any."""
        row = self._run("read", lambda conn: conn.execute(
            self._q["detector"], (_clean(name),)).fetchone(), absent=lambda: None)
        if row is None:
            return None
        state: dict[str, Any] = json.loads(row[0])
        return state


class _Gone(Exception):
    """A pooled connection failed its first statement at the connection level."""


def _give_back(conn: psycopg.Connection[Any]) -> None:
    """Leave ``conn`` as the pool's other users expect it: outside any transaction, with the
    server's statement timeout; closed (so the pool drops it) when that cannot be done."""
    import psycopg
    from psycopg.pq import TransactionStatus

    if conn.closed:
        return
    if conn.info.transaction_status == TransactionStatus.IDLE:
        with suppress(psycopg.Error):
            conn.execute("RESET statement_timeout")
            return
    conn.close()
