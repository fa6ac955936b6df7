"""Approval requests in a SQLite store's file: the approval port of the SQLite backend.

Tables ``approvals`` and ``approval_history`` (the approvals migration of
:data:`~closedloop.store.sqlite.MIGRATIONS`). Every change is one ``BEGIN
IMMEDIATE`` transaction: SQLite lets one writer in at a time, so reading the row and writing
its new state cannot interleave with another process's change. A claim is a conditional
``UPDATE … WHERE status = 'approved' … RETURNING``: of two processes racing for one request,
one gets the row, the other none. A connection per call (requests are few), so a forked or
restarted process never shares one.

Fails closed: a store that cannot be read or written raises :class:`~closedloop.StoreError`
with one line, and nothing was decided, claimed or executed.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
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
from closedloop.store.sqlite._backend import _connect, rollback

if TYPE_CHECKING:
    from closedloop.store.sqlite._backend import SQLiteBackend

_T = TypeVar("_T")
_COLS = ", ".join(COLUMNS)
_GET = f"SELECT {_COLS} FROM approvals WHERE request_id = ?"
_LOG = "INSERT INTO approval_history (request_id, at, action, by, reason) VALUES (?, ?, ?, ?, ?)"
_CLAIM = (f"UPDATE approvals SET status = 'executing', lease_token = ?, "
          "lease_epoch = lease_epoch + 1, lease_until = ?, updated_at = ? "
          f"WHERE request_id = ? AND status = 'approved' RETURNING {_COLS}")
_CRASHED = ("the executing process stopped renewing its lease; it may or may not have "
            "executed")


class SQLiteApprovals:
    """Approval requests in the file of a :class:`~closedloop.store.SQLiteBackend`."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self._backend = backend
        self.path = backend.path
        self.url = backend.url

    def __repr__(self) -> str:
        return f"SQLiteApprovals({str(self.path)!r})"

    # ----- connections ----------------------------------------------------------------------
    def _read(self, work: Callable[[sqlite3.Connection], _T], absent: Callable[[], _T]) -> _T:
        try:
            with closing(self._backend._reader()) as conn:
                return work(conn)
        except sqlite3.OperationalError as exc:
            if str(exc).startswith("no such table"):  # a store of an older schema, read-only
                return absent()
            raise StoreError(f"cannot read approvals in {self.url}: {exc}") from None
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot read approvals in {self.url}: {exc}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self._backend.read_only:
            raise StoreError(f"store {self.url} was opened read-only")
        if self._backend.open_error is not None:  # a deferred store: open (migrate) it now
            self._backend._open()
        try:
            conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot write approvals in {self.url}: {exc}") from None
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(conn)
            raise StoreError(f"cannot write approvals in {self.url}: {exc}") from None
        except BaseException:
            rollback(conn)
            raise
        finally:
            conn.close()

    @staticmethod
    def _history(conn: sqlite3.Connection, request_id: str) -> list[Decision]:
        rows = conn.execute("SELECT at, action, by, reason FROM approval_history "
                            "WHERE request_id = ? ORDER BY rowid", (request_id,)).fetchall()
        return [decision_from_row(r) for r in rows]

    def _found(self, conn: sqlite3.Connection, request_id: str) -> ApprovalRequest:
        row = conn.execute(_GET, (request_id,)).fetchone()
        if row is None:
            raise ApprovalError(f"no approval request {request_id!r}", "not_found")
        return from_row(row)

    # ----- the port -------------------------------------------------------------------------
    def create(self, request: ApprovalRequest) -> ApprovalRequest:
        with self._write() as conn:
            row = conn.execute(_GET, (request.request_id,)).fetchone()
            if row is not None:
                return from_row(row, self._history(conn, request.request_id))
            conn.execute(f"INSERT INTO approvals ({_COLS}) VALUES "
                         f"({', '.join('?' * len(COLUMNS))})", to_row(request))
            conn.executemany(_LOG, [(request.request_id, d.at, d.action, d.by, d.reason)
                                    for d in request.history])
        return request

    def get(self, request_id: str) -> ApprovalRequest | None:
        def work(conn: sqlite3.Connection) -> ApprovalRequest | None:
            row = conn.execute(_GET, (request_id,)).fetchone()
            return None if row is None else from_row(row, self._history(conn, request_id))

        return self._read(work, lambda: None)

    def list(self, *, status: ApprovalStatus | str | None = None,
             task_type: str | None = None, limit: int = 50,
             cursor: str | None = None) -> ApprovalPage:
        check_limit(limit)
        wanted = check_status(status)
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if wanted is not None:
            where.append("status = ?")
            params.append(wanted.value)
        if task_type is not None:
            where.append("task_type = ?")
            params.append(task_type)
        if cursor is not None:
            where.append("(created_at, request_id) < (?, ?)")
            params.extend(decode_cursor(cursor))
        sql = (f"SELECT {_COLS} FROM approvals" + (" WHERE " + " AND ".join(where) if where
                                                   else "")
               + " ORDER BY created_at DESC, request_id DESC LIMIT ?")
        rows = self._read(lambda conn: conn.execute(sql, [*params, limit + 1]).fetchall(), list)
        return page([from_row(r) for r in rows], limit)

    def status_counts(self, *, task_type: str, since: float) -> dict[tuple[str, str], int]:
        """Requests of ``task_type`` created at or after ``since`` per ``(agent, status)``,
        counted in SQL (:class:`~closedloop.approvals.ApprovalCounts`)."""
        rows = self._read(lambda conn: conn.execute(
            "SELECT agent_id, status, count(*) FROM approvals WHERE task_type = ? AND "
            "created_at >= ? GROUP BY 1, 2", (task_type, since)).fetchall(), list)
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def decide(self, request_id: str, *, approve: bool, by: str, reason: str = "",
               revise: bool = False, now: float | None = None) -> ApprovalRequest:
        now = time.time() if now is None else now
        with self._write() as conn:
            found = self._found(conn, request_id)
            change = plan_decision(found, approve=approve, by=by, reason=reason, revise=revise,
                                   now=now)
            conn.execute("UPDATE approvals SET status = ?, approvers = ?, revise = ?, "
                         "updated_at = ? WHERE request_id = ?",
                         (change.status.value, _json_list(change.approvers), change.revise, now,
                          request_id))
            conn.executemany(_LOG, [(request_id, d.at, d.action, d.by, d.reason)
                                    for d in change.entries])
            decided = from_row(conn.execute(_GET, (request_id,)).fetchone(),
                               self._history(conn, request_id))
        if change.error is not None:
            raise change.error
        return decided

    def _due(self, where: str, now: float) -> bool:
        """Whether a request matches ``where`` (:data:`EXPIRE_DUE`, :data:`REAP_DUE`): asked
        in a read, so that listing requests takes no write lock when nothing is due."""
        return bool(self._read(lambda conn: conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM approvals WHERE {where.replace('%s', '?')})",
            (now,)).fetchone()[0], absent=lambda: 0))

    def expire(self, *, now: float | None = None) -> builtins.list[str]:
        now = time.time() if now is None else now
        if not self._due(EXPIRE_DUE, now):
            return []
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "UPDATE approvals SET status = 'expired', updated_at = ? WHERE "
                f"{EXPIRE_DUE.replace('%s', '?')} RETURNING request_id",
                (now, now)).fetchall()]
            conn.executemany(_LOG, [(i, now, "expired", "closedloop",
                                     "no decision before it expired") for i in ids])
        return ids

    def claim(self, request_id: str | None = None, *, by: str, lease_s: float,
              task_types: Sequence[str] | None = None,
              portable: Sequence[int] = (PORTABLE_TEXT,),
              now: float | None = None) -> Claim | None:
        now = time.time() if now is None else now
        lease_s = check_lease(lease_s)
        by = check_name(by)
        token = new_token()
        with self._write() as conn:
            if request_id is None:
                where = ["status = 'approved'",
                         f"portable IN ({', '.join(str(int(p)) for p in portable) or 'NULL'})"]
                params: builtins.list[Any] = []
                if task_types is not None:
                    where.append(f"task_type IN ({', '.join('?' * len(task_types)) or 'NULL'})")
                    params.extend(task_types)
                row = conn.execute("SELECT request_id FROM approvals WHERE "
                                   + " AND ".join(where) + " ORDER BY updated_at, request_id "
                                   "LIMIT 1", params).fetchone()
                if row is None:
                    return None
                request_id = str(row[0])
            got = conn.execute(_CLAIM, (token, now + lease_s, now, request_id)).fetchone()
            if got is None:
                return None
            claimed = from_row(got)
            conn.execute(_LOG, (request_id, now, "claimed", by,
                                f"lease epoch {claimed.lease_epoch}"))
            history = self._history(conn, request_id)
        return Claim(request=from_row(got, history), token=token, epoch=claimed.lease_epoch,
                     lease_until=now + lease_s)

    def renew(self, request_id: str, token: str, *, lease_s: float,
              now: float | None = None) -> bool:
        now = time.time() if now is None else now
        lease_s = check_lease(lease_s)
        with self._write() as conn:
            return conn.execute(
                "UPDATE approvals SET lease_until = ? WHERE request_id = ? AND lease_token = ? "
                "AND status = 'executing'", (now + lease_s, request_id, token)).rowcount == 1

    def finish(self, request_id: str, token: str, *, ok: bool, result: Mapping[str, Any],
               reason: str = "", now: float | None = None) -> bool:
        now = time.time() if now is None else now
        status = ApprovalStatus.EXECUTED if ok else ApprovalStatus.FAILED
        with self._write() as conn:
            done = conn.execute(
                "UPDATE approvals SET status = ?, result = ?, lease_token = NULL, "
                "lease_until = NULL, updated_at = ? WHERE request_id = ? AND lease_token = ? "
                "AND status = 'executing'",
                (status.value, result_text(result), now, request_id, token)).rowcount == 1
            if done:
                conn.execute(_LOG, (request_id, now, status.value, "closedloop",
                                    clean_reason(reason)))
            return done

    def reap(self, *, now: float | None = None) -> builtins.list[str]:
        now = time.time() if now is None else now
        if not self._due(REAP_DUE, now):
            return []
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "UPDATE approvals SET status = 'crashed', lease_token = NULL, updated_at = ? "
                f"WHERE {REAP_DUE.replace('%s', '?')} RETURNING request_id",
                (now, now)).fetchall()]
            conn.executemany(_LOG, [(i, now, "crashed", "closedloop", _CRASHED) for i in ids])
        return ids

    def retry(self, request_id: str, *, by: str, reason: str,
              now: float | None = None) -> ApprovalRequest:
        now = time.time() if now is None else now
        with self._write() as conn:
            found = self._found(conn, request_id)
            entry = plan_retry(found, by=by, reason=reason, now=now)
            conn.execute("UPDATE approvals SET status = 'approved', updated_at = ? "
                         "WHERE request_id = ?", (now, request_id))
            conn.execute(_LOG, (request_id, entry.at, entry.action, entry.by, entry.reason))
            return from_row(conn.execute(_GET, (request_id,)).fetchone(),
                            self._history(conn, request_id))

    def note(self, request_id: str, *, action: str, by: str, reason: str,
             now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as conn:
            self._found(conn, request_id)
            conn.execute(_LOG, (request_id, now, action, check_name(by), clean_reason(reason)))


def _json_list(values: Sequence[str]) -> str:
    import json

    return json.dumps(list(values))
