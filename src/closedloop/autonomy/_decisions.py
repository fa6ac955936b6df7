"""Approve-mode evidence from the approval records: what people actually decided.

:class:`ApprovalDecisions` is the :class:`~closedloop.autonomy.DecisionSource` that counts the
decisions on durable approval requests from the store's approval port
(:func:`closedloop.store.approval_store_for`), not from the step events: a request a person
approved counts as approved as soon as it is decided (executed or not yet), a rejected one as
rejected, an expired one as expired; pending ones do not count. :class:`AutonomyLevels` uses
it by default for a store that keeps approval requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from closedloop._approvals import ApprovalCounts, ApprovalStatus
from closedloop.autonomy._evidence import Decisions, step_class

if TYPE_CHECKING:
    from closedloop._approvals import ApprovalRequest, ApprovalStore
    from closedloop._autonomy_state import LevelKey
    from closedloop.store import Store

_APPROVED = frozenset({ApprovalStatus.APPROVED, ApprovalStatus.EXECUTING,
                       ApprovalStatus.EXECUTED, ApprovalStatus.FAILED, ApprovalStatus.CRASHED})
"""Statuses a request reaches only after people approved it."""
_PAGE = 1000
_STEP_SLACK_S = 3600.0
"""How long before a request's creation its step may have started (to find the step's
action class): a step's event is stamped when the step starts."""


class ApprovalDecisions:
    """Counts approved, rejected and expired requests of a key since a time, from ``store``'s
    approval records (created at or after ``since``; at most ``max_requests`` of them are
    read, newest first, to bound the time a status takes).

    The action class of a request is its step's (read from the step's events, only when the
    key has a class, or when classes of the task type have levels of their own). Without
    classes, a store that counts (:class:`~closedloop.approvals.ApprovalCounts`) counts
    every request since ``since`` in the store, none read (``max_requests`` bounds reads
    only).
    """

    def __init__(self, store: Store, *, approvals: ApprovalStore | None = None,
                 max_requests: int = 100_000) -> None:
        if approvals is None:
            from closedloop.store import approval_store_for

            approvals = approval_store_for(store)
        self.store = store
        self.approvals = approvals
        self.max_requests = max_requests

    def _requests(self, task_type: str, since: float) -> list[ApprovalRequest]:
        found: list[ApprovalRequest] = []
        cursor: str | None = None
        while len(found) < self.max_requests:
            page = self.approvals.list(task_type=task_type, limit=_PAGE, cursor=cursor)
            for request in page.requests:
                if request.created_at < since:  # newest first: the rest are older still
                    return found
                found.append(request)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        return found[:self.max_requests]

    def _classes(self, task_type: str, since: float) -> dict[str, str | None]:
        """Request id → the action class its step's events carry."""
        classes: dict[str, str | None] = {}
        for event in self.store.events(task_type=task_type, since=since - _STEP_SLACK_S):
            info = event.detail.get("approval") if event.detail else None
            if isinstance(info, dict) and isinstance(info.get("request_id"), str):
                cls = step_class(event)
                if cls is not None or info["request_id"] not in classes:
                    classes[info["request_id"]] = cls
        return classes

    def decisions(self, key: LevelKey, *, since: float,
                  own_classes: frozenset[str]) -> Decisions:
        """The decisions on ``key``'s requests created since ``since``; for a key without an
        action class, requests whose step had a class in ``own_classes`` do not count."""
        if key.action_class is None and not own_classes and isinstance(self.approvals,
                                                                        ApprovalCounts):
            # no step's class is needed: counted in the store, no request read
            counts = self.approvals.status_counts(task_type=key.task_type, since=since)
            mine = [(ApprovalStatus(status), n) for (agent, status), n in counts.items()
                    if key.agent_id in ("*", agent)]
            return Decisions(approved=sum(n for s, n in mine if s in _APPROVED),
                             rejected=sum(n for s, n in mine if s is ApprovalStatus.REJECTED),
                             expired=sum(n for s, n in mine if s is ApprovalStatus.EXPIRED))
        requests = [r for r in self._requests(key.task_type, since)
                    if key.agent_id in ("*", r.agent_id)]
        if key.action_class is not None or own_classes:
            classes = self._classes(key.task_type, since)
            if key.action_class is not None:
                requests = [r for r in requests if classes.get(r.request_id) == key.action_class]
            else:
                requests = [r for r in requests
                            if classes.get(r.request_id) not in own_classes]
        approved = sum(r.status in _APPROVED for r in requests)
        rejected = sum(r.status is ApprovalStatus.REJECTED for r in requests)
        expired = sum(r.status is ApprovalStatus.EXPIRED for r in requests)
        return Decisions(approved=approved, rejected=rejected, expired=expired)
