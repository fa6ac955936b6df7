"""Approval requests in the process's memory: the approval port of the ``memory://`` backend.

The same rules as the SQL backends (:mod:`closedloop._approvals` decides), under one lock;
nothing survives the process, so no other process can execute what this one was asked.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from closedloop._approvals import (
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
    decode_cursor,
    new_token,
    page,
    plan_decision,
    plan_retry,
)
from closedloop._errors import ApprovalError
from closedloop._redact import redact_value
from closedloop.store._retention import approval_settled


class MemoryApprovals:
    """Requests in a dict, history in lists; thread-safe."""

    def __init__(self) -> None:
        self._requests: dict[str, ApprovalRequest] = {}
        self._history: dict[str, builtins.list[Decision]] = {}
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "MemoryApprovals()"

    def _found(self, request_id: str) -> ApprovalRequest:
        found = self._requests.get(request_id)
        if found is None:
            raise ApprovalError(f"no approval request {request_id!r}", "not_found")
        return found

    def _put(self, request: ApprovalRequest, *entries: Decision) -> ApprovalRequest:
        self._requests[request.request_id] = request
        self._history[request.request_id].extend(entries)
        return request

    def create(self, request: ApprovalRequest) -> ApprovalRequest:
        with self._lock:
            found = self._requests.get(request.request_id)
            if found is not None:
                return replace(found, history=tuple(self._history[found.request_id]))
            self._requests[request.request_id] = replace(request, history=())
            self._history[request.request_id] = list(request.history)
            return request

    def get(self, request_id: str) -> ApprovalRequest | None:
        with self._lock:
            found = self._requests.get(request_id)
            if found is None:
                return None
            return replace(found, history=tuple(self._history[request_id]))

    def list(self, *, status: ApprovalStatus | str | None = None,
             task_type: str | None = None, limit: int = 50,
             cursor: str | None = None) -> ApprovalPage:
        check_limit(limit)
        wanted = check_status(status)
        after = decode_cursor(cursor) if cursor is not None else None
        with self._lock:
            rows = [r for r in self._requests.values()
                    if (wanted is None or r.status is wanted)
                    and (task_type is None or r.task_type == task_type)
                    and (after is None or (r.created_at, r.request_id) < after)]
        rows.sort(key=lambda r: (r.created_at, r.request_id), reverse=True)
        return page(rows[:limit + 1], limit)

    def status_counts(self, *, task_type: str, since: float) -> dict[tuple[str, str], int]:
        """Requests of ``task_type`` created at or after ``since`` per ``(agent, status)``
        (:class:`~closedloop.approvals.ApprovalCounts`)."""
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            for r in self._requests.values():
                if r.task_type == task_type and r.created_at >= since:
                    key = (r.agent_id, r.status.value)
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def decide(self, request_id: str, *, approve: bool, by: str, reason: str = "",
               revise: bool = False, now: float | None = None) -> ApprovalRequest:
        now = time.time() if now is None else now
        with self._lock:
            found = self._found(request_id)
            change = plan_decision(found, approve=approve, by=by, reason=reason, revise=revise,
                                   now=now)
            self._put(replace(found, status=change.status, approvers=change.approvers,
                              revise=change.revise, updated_at=now), *change.entries)
            if change.error is not None:
                raise change.error
            return replace(self._requests[request_id],
                           history=tuple(self._history[request_id]))

    def expire(self, *, now: float | None = None) -> builtins.list[str]:
        now = time.time() if now is None else now
        with self._lock:
            due = [r for r in self._requests.values() if r.status is ApprovalStatus.PENDING
                   and r.expires_at is not None and r.expires_at <= now]
            for r in due:
                self._put(replace(r, status=ApprovalStatus.EXPIRED, updated_at=now),
                          Decision(at=now, action="expired", by="closedloop",
                                   reason="no decision before it expired"))
            return [r.request_id for r in due]

    def claim(self, request_id: str | None = None, *, by: str, lease_s: float,
              task_types: Sequence[str] | None = None,
              portable: Sequence[int] = (PORTABLE_TEXT,),
              now: float | None = None) -> Claim | None:
        now = time.time() if now is None else now
        lease_s = check_lease(lease_s)
        by = check_name(by)
        with self._lock:
            if request_id is not None:
                found = self._requests.get(request_id)
                candidates = [found] if found is not None else []
            else:
                candidates = sorted(
                    (r for r in self._requests.values()
                     if r.status is ApprovalStatus.APPROVED and r.portable in portable
                     and (task_types is None or r.task_type in task_types)),
                    key=lambda r: (r.updated_at, r.request_id))
            for r in candidates:
                if r.status is not ApprovalStatus.APPROVED:
                    continue
                token = new_token()
                claimed = replace(r, status=ApprovalStatus.EXECUTING, lease_epoch=r.lease_epoch + 1,
                                  lease_until=now + lease_s, updated_at=now)
                self._tokens[r.request_id] = token
                self._put(claimed, Decision(at=now, action="claimed", by=by,
                                            reason=f"lease epoch {claimed.lease_epoch}"))
                return Claim(request=replace(claimed, history=tuple(
                    self._history[r.request_id])), token=token, epoch=claimed.lease_epoch,
                             lease_until=now + lease_s)
            return None

    def _holds(self, request_id: str, token: str) -> ApprovalRequest | None:
        found = self._requests.get(request_id)
        if found is None or found.status is not ApprovalStatus.EXECUTING \
                or self._tokens.get(request_id) != token:
            return None
        return found

    def renew(self, request_id: str, token: str, *, lease_s: float,
              now: float | None = None) -> bool:
        now = time.time() if now is None else now
        lease_s = check_lease(lease_s)
        with self._lock:
            found = self._holds(request_id, token)
            if found is None:
                return False
            self._requests[request_id] = replace(found, lease_until=now + lease_s)
            return True

    def finish(self, request_id: str, token: str, *, ok: bool, result: Mapping[str, Any],
               reason: str = "", now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            found = self._holds(request_id, token)
            if found is None:
                return False
            status = ApprovalStatus.EXECUTED if ok else ApprovalStatus.FAILED
            self._tokens.pop(request_id, None)
            self._put(replace(found, status=status, result=redact_value(dict(result)),
                              lease_until=None, updated_at=now),
                      Decision(at=now, action=status.value, by="closedloop",
                               reason=clean_reason(reason)))
            return True

    def reap(self, *, now: float | None = None) -> builtins.list[str]:
        now = time.time() if now is None else now
        with self._lock:
            dead = [r for r in self._requests.values() if r.status is ApprovalStatus.EXECUTING
                    and r.lease_until is not None and r.lease_until < now]
            for r in dead:
                self._tokens.pop(r.request_id, None)
                self._put(replace(r, status=ApprovalStatus.CRASHED, updated_at=now),
                          Decision(at=now, action="crashed", by="closedloop",
                                   reason="the executing process stopped renewing its lease; "
                                          "it may or may not have executed"))
            return [r.request_id for r in dead]

    def retry(self, request_id: str, *, by: str, reason: str,
              now: float | None = None) -> ApprovalRequest:
        now = time.time() if now is None else now
        with self._lock:
            found = self._found(request_id)
            entry = plan_retry(found, by=by, reason=reason, now=now)
            self._put(replace(found, status=ApprovalStatus.APPROVED, updated_at=now), entry)
            return replace(self._requests[request_id],
                           history=tuple(self._history[request_id]))

    def prune(self, before: float, *, dry_run: bool = False) -> dict[str, int]:
        """Forget the requests settled before ``before``, with their history
        (:func:`~closedloop.store._retention.approval_settled`)."""
        with self._lock:
            old = [i for i, r in self._requests.items()
                   if approval_settled(r.status.value, r.updated_at, before)]
            removed = {"approval_history": sum(len(self._history[i]) for i in old),
                       "approvals": len(old)}
            if not dry_run:
                for i in old:
                    del self._requests[i], self._history[i]
                    self._tokens.pop(i, None)
        return removed

    def counts(self) -> dict[str, int]:
        """Rows held, by the SQL backends' table names."""
        with self._lock:
            return {"approvals": len(self._requests),
                    "approval_history": sum(map(len, self._history.values()))}

    def note(self, request_id: str, *, action: str, by: str, reason: str,
             now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self._found(request_id)
            self._history[request_id].append(Decision(at=now, action=action,
                                                      by=check_name(by),
                                                      reason=clean_reason(reason)))
