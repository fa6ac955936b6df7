"""Approval requests in a PostgreSQL store's schema: the approval port of the PostgreSQL backend.

Tables ``approvals`` and ``approval_history`` (the migration after the report's index). Every
change is one transaction on the backend's pool that locks the request's row (``SELECT … FOR
UPDATE``) before deciding, so concurrent deciders serialise per request; a claim is a
conditional ``UPDATE … WHERE status = 'approved' … RETURNING``, and claiming "the next
approved request" picks it with ``FOR UPDATE SKIP LOCKED``, so racing workers take different
requests and never the same one twice. Text PostgreSQL cannot hold (NUL, lone surrogates) is
replaced by U+FFFD.

Fails closed: any database error is a one-line :class:`~closedloop.StoreError`, and nothing
was decided, claimed or executed.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from closedloop._approvals import (
    COLUMNS,
    PORTABLE_TEXT,
    ApprovalPage,
    ApprovalRequest,
    ApprovalStatus,
    Claim,
    Decision,
    check_lease,
    check_limit,
    check_name,
    check_status,
    clean_reason,
    decision_from_row,
    decode_cursor,
    from_row,
    new_token,
    page,
    plan_decision,
    plan_retry,
    result_text,
    to_row,
)
from closedloop._errors import ApprovalError, StoreError
from closedloop.store._base import EXPIRE_DUE, REAP_DUE
from closedloop.store.postgres._backend import _clean, _clean_row, _one_line

if TYPE_CHECKING:
    import psycopg

    from closedloop.store.postgres._backend import PostgresBackend

_T = TypeVar("_T")
_COLS = ", ".join(COLUMNS)
_SQL = {
    "get": f"SELECT {_COLS} FROM {{s}}.approvals WHERE request_id = %s",
    "lock": f"SELECT {_COLS} FROM {{s}}.approvals WHERE request_id = %s FOR UPDATE",
    "insert": f"INSERT INTO {{s}}.approvals ({_COLS}) VALUES "
              f"({', '.join(['%s'] * len(COLUMNS))}) ON CONFLICT (request_id) DO NOTHING",
    "history": "SELECT at, action, by, reason FROM {s}.approval_history WHERE request_id = %s "
               "ORDER BY id",
    "log": "INSERT INTO {s}.approval_history (request_id, at, action, by, reason) "
           "VALUES (%s, %s, %s, %s, %s)",
    "decide": "UPDATE {s}.approvals SET status = %s, approvers = %s, revise = %s, "
              "updated_at = %s WHERE request_id = %s",
    "expire": "UPDATE {s}.approvals SET status = 'expired', updated_at = %s WHERE "
              f"{EXPIRE_DUE} RETURNING request_id",
    "expire_due": f"SELECT EXISTS (SELECT 1 FROM {{s}}.approvals WHERE {EXPIRE_DUE})",
    "reap_due": f"SELECT EXISTS (SELECT 1 FROM {{s}}.approvals WHERE {REAP_DUE})",
    "claim": "UPDATE {s}.approvals SET status = 'executing', lease_token = %s, "
             "lease_epoch = lease_epoch + 1, lease_until = %s, updated_at = %s "
             f"WHERE request_id = %s AND status = 'approved' RETURNING {_COLS}",
    "renew": "UPDATE {s}.approvals SET lease_until = %s WHERE request_id = %s AND "
             "lease_token = %s AND status = 'executing'",
    "finish": "UPDATE {s}.approvals SET status = %s, result = %s, lease_token = NULL, "
              "lease_until = NULL, updated_at = %s WHERE request_id = %s AND lease_token = %s "
              "AND status = 'executing'",
    "reap": "UPDATE {s}.approvals SET status = 'crashed', lease_token = NULL, updated_at = %s "
            f"WHERE {REAP_DUE} RETURNING request_id",
    "retry": "UPDATE {s}.approvals SET status = 'approved', updated_at = %s "
             "WHERE request_id = %s",
}
_CRASHED = ("the executing process stopped renewing its lease; it may or may not have "
            "executed")


class PostgresApprovals:
    """Approval requests in the schema of a
    :class:`~closedloop.store.postgres.PostgresBackend`, on its connection pool."""

    def __init__(self, backend: PostgresBackend) -> None:
        from psycopg import sql

        self._backend = backend
        self.url = backend.url
        s = sql.Identifier(backend.schema)
        self._q = {name: sql.SQL(text).format(s=s) for name, text in _SQL.items()}

    def __repr__(self) -> str:
        return f"PostgresApprovals({self.url!r})"

    def _run(self, what: str, work: Callable[[psycopg.Connection[Any]], _T], *,
             write: bool = True) -> _T:
        import psycopg

        if write and self._backend.read_only:
            raise StoreError(f"store {self.url} was opened read-only")
        try:
            with self._backend.pool().connection() as conn, conn.transaction():
                return work(conn)
        except psycopg.Error as exc:
            raise StoreError(f"cannot {what} approvals in {self.url}: {_one_line(exc)}") \
                from None

    def _history(self, conn: psycopg.Connection[Any], request_id: str) -> list[Decision]:
        rows = conn.execute(self._q["history"], (request_id,)).fetchall()
        return [decision_from_row(r) for r in rows]

    def _locked(self, conn: psycopg.Connection[Any], request_id: str) -> ApprovalRequest:
        row = conn.execute(self._q["lock"], (_clean(request_id),)).fetchone()
        if row is None:
            raise ApprovalError(f"no approval request {request_id!r}", "not_found")
        return from_row(row)

    def _log(self, conn: psycopg.Connection[Any], request_id: str,
             entries: Sequence[Decision]) -> None:
        with conn.cursor() as cur:
            cur.executemany(self._q["log"], [(request_id, d.at, _clean(d.action), _clean(d.by),
                                              _clean(d.reason)) for d in entries])

    def _full(self, conn: psycopg.Connection[Any], request_id: str) -> ApprovalRequest:
        row = conn.execute(self._q["get"], (request_id,)).fetchone()
        assert row is not None
        return from_row(row, self._history(conn, request_id))

    # ----- the port -------------------------------------------------------------------------
    def create(self, request: ApprovalRequest) -> ApprovalRequest:
        def work(conn: psycopg.Connection[Any]) -> ApprovalRequest:
            added = conn.execute(self._q["insert"], _clean_row(to_row(request))).rowcount
            if added == 1:
                self._log(conn, request.request_id, request.history)
                return request
            return self._full(conn, request.request_id)

        return self._run("write", work)

    def get(self, request_id: str) -> ApprovalRequest | None:
        def work(conn: psycopg.Connection[Any]) -> ApprovalRequest | None:
            row = conn.execute(self._q["get"], (_clean(request_id),)).fetchone()
            return None if row is None else from_row(row, self._history(conn, row[0]))

        return self._run("read", work, write=False)

    def list(self, *, status: ApprovalStatus | str | None = None,
             task_type: str | None = None, limit: int = 50,
             cursor: str | None = None) -> ApprovalPage:
        from psycopg import sql

        check_limit(limit)
        wanted = check_status(status)
        where: builtins.list[sql.Composable] = []
        params: builtins.list[Any] = []
        if wanted is not None:
            where.append(sql.SQL("status = %s"))
            params.append(wanted.value)
        if task_type is not None:
            where.append(sql.SQL("task_type = %s"))
            params.append(_clean(task_type))
        if cursor is not None:
            where.append(sql.SQL("(created_at, request_id) < (%s, %s)"))
            params.extend(decode_cursor(cursor))
        stmt = sql.SQL(f"SELECT {_COLS} FROM {{}}.approvals").format(
            sql.Identifier(self._backend.schema))
        if where:
            stmt = sql.SQL("{} WHERE {}").format(stmt, sql.SQL(" AND ").join(where))
        stmt = sql.SQL("{} ORDER BY created_at DESC, request_id DESC LIMIT %s").format(stmt)
        rows = self._run("read", lambda conn: conn.execute(stmt, [*params, limit + 1])
                         .fetchall(), write=False)
        return page([from_row(r) for r in rows], limit)

    def status_counts(self, *, task_type: str, since: float) -> dict[tuple[str, str], int]:
        """Requests of ``task_type`` created at or after ``since`` per ``(agent, status)``,
        counted in SQL (:class:`~closedloop.approvals.ApprovalCounts`)."""
        from psycopg import sql

        stmt = sql.SQL("SELECT agent_id, status, count(*) FROM {}.approvals WHERE "
                       "task_type = %s AND created_at >= %s GROUP BY 1, 2").format(
            sql.Identifier(self._backend.schema))
        rows = self._run("read", lambda conn: conn.execute(
            stmt, (_clean(task_type), since)).fetchall(), write=False)
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def decide(self, request_id: str, *, approve: bool, by: str, reason: str = "",
               revise: bool = False, now: float | None = None) -> ApprovalRequest:
        at = time.time() if now is None else now
        raised: list[ApprovalError] = []

        def work(conn: psycopg.Connection[Any]) -> ApprovalRequest:
            found = self._locked(conn, request_id)
            change = plan_decision(found, approve=approve, by=by, reason=reason,
                                   revise=revise, now=at)
            conn.execute(self._q["decide"], (change.status.value,
                                             _clean(json.dumps(list(change.approvers))),
                                             change.revise, at, request_id))
            self._log(conn, request_id, change.entries)
            if change.error is not None:
                raised.append(change.error)
            return self._full(conn, request_id)

        decided = self._run("write", work)
        if raised:
            raise raised[0]
        return decided

    def _due(self, query: str, at: float) -> bool:
        """Whether ``query`` (``expire_due``, ``reap_due``) finds a request to change: asked
        in a read, so that listing requests writes nothing when nothing is due."""
        row = self._run("read", lambda conn: conn.execute(self._q[query], (at,)).fetchone(),
                        write=False)
        return bool(row and row[0])

    def expire(self, *, now: float | None = None) -> builtins.list[str]:
        at = time.time() if now is None else now
        if not self._due("expire_due", at):
            return []

        def work(conn: psycopg.Connection[Any]) -> builtins.list[str]:
            ids = [r[0] for r in conn.execute(self._q["expire"], (at, at)).fetchall()]
            self._log_many(conn, ids, at, "expired", "no decision before it expired")
            return ids

        return self._run("write", work)

    def _log_many(self, conn: psycopg.Connection[Any], ids: Sequence[str], at: float,
                  action: str, reason: str) -> None:
        if ids:
            with conn.cursor() as cur:
                cur.executemany(self._q["log"], [(i, at, action, "closedloop", reason)
                                                 for i in ids])

    def claim(self, request_id: str | None = None, *, by: str, lease_s: float,
              task_types: Sequence[str] | None = None,
              portable: Sequence[int] = (PORTABLE_TEXT,),
              now: float | None = None) -> Claim | None:
        from psycopg import sql

        at = time.time() if now is None else now
        lease_s = check_lease(lease_s)
        who = _clean(check_name(by))
        token = new_token()

        def work(conn: psycopg.Connection[Any]) -> Claim | None:
            rid = request_id
            if rid is None:
                where = [sql.SQL("status = 'approved'"), sql.SQL("portable = ANY(%s)")]
                params: builtins.list[Any] = [[int(p) for p in portable]]
                if task_types is not None:
                    where.append(sql.SQL("task_type = ANY(%s)"))
                    params.append([_clean(t) for t in task_types])
                row = conn.execute(sql.SQL(
                    "SELECT request_id FROM {}.approvals WHERE {} ORDER BY updated_at, "
                    "request_id LIMIT 1 FOR UPDATE SKIP LOCKED").format(
                        sql.Identifier(self._backend.schema), sql.SQL(" AND ").join(where)),
                    params).fetchone()
                if row is None:
                    return None
                rid = str(row[0])
            got = conn.execute(self._q["claim"], (token, at + lease_s, at,
                                                  _clean(rid))).fetchone()
            if got is None:
                return None
            claimed = from_row(got)
            self._log(conn, rid, [Decision(at=at, action="claimed", by=who,
                                           reason=f"lease epoch {claimed.lease_epoch}")])
            return Claim(request=from_row(got, self._history(conn, rid)), token=token,
                         epoch=claimed.lease_epoch, lease_until=at + lease_s)

        return self._run("write", work)

    def renew(self, request_id: str, token: str, *, lease_s: float,
              now: float | None = None) -> bool:
        at = time.time() if now is None else now
        lease_s = check_lease(lease_s)
        return self._run("write", lambda conn: conn.execute(
            self._q["renew"], (at + lease_s, _clean(request_id), _clean(token))).rowcount == 1)

    def finish(self, request_id: str, token: str, *, ok: bool, result: Mapping[str, Any],
               reason: str = "", now: float | None = None) -> bool:
        at = time.time() if now is None else now
        status = ApprovalStatus.EXECUTED if ok else ApprovalStatus.FAILED

        def work(conn: psycopg.Connection[Any]) -> bool:
            done = conn.execute(self._q["finish"], (
                status.value, _clean(result_text(result)), at, _clean(request_id),
                _clean(token))).rowcount == 1
            if done:
                self._log(conn, request_id, [Decision(at=at, action=status.value,
                                                      by="closedloop",
                                                      reason=clean_reason(reason))])
            return done

        return self._run("write", work)

    def reap(self, *, now: float | None = None) -> builtins.list[str]:
        at = time.time() if now is None else now
        if not self._due("reap_due", at):
            return []

        def work(conn: psycopg.Connection[Any]) -> builtins.list[str]:
            ids = [r[0] for r in conn.execute(self._q["reap"], (at, at)).fetchall()]
            self._log_many(conn, ids, at, "crashed", _CRASHED)
            return ids

        return self._run("write", work)

    def retry(self, request_id: str, *, by: str, reason: str,
              now: float | None = None) -> ApprovalRequest:
        at = time.time() if now is None else now

        def work(conn: psycopg.Connection[Any]) -> ApprovalRequest:
            found = self._locked(conn, request_id)
            entry = plan_retry(found, by=by, reason=reason, now=at)
            conn.execute(self._q["retry"], (at, request_id))
            self._log(conn, request_id, [entry])
            return self._full(conn, request_id)

        return self._run("write", work)

    def note(self, request_id: str, *, action: str, by: str, reason: str,
             now: float | None = None) -> None:
        at = time.time() if now is None else now

        def work(conn: psycopg.Connection[Any]) -> None:
            self._locked(conn, request_id)
            self._log(conn, request_id, [Decision(at=at, action=action, by=check_name(by),
                                                  reason=clean_reason(reason))])

        self._run("write", work)
