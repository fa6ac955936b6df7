"""Approval decisions counted in the store (``status_counts``, the approval stores' counting
port) equal those counted from the requests read one by one, on every backend."""

from __future__ import annotations

import random
import time
from typing import Any

import closedloop as cl
from closedloop._approvals import new_request
from closedloop.approvals import ApprovalCounts, approvals_for
from closedloop.autonomy import ApprovalDecisions, LevelKey


class _Reading:
    """The store's approvals without the counting port: every request is read."""

    def __init__(self, inner: Any) -> None:
        self.list = inner.list


def test_counted_decisions_equal_the_requests_read_one_by_one(any_url: str) -> None:
    rng = random.Random(5)
    with cl.open_store(any_url) as store:
        approvals = approvals_for(store)
        assert isinstance(approvals, ApprovalCounts)
        for i in range(60):
            made = approvals.create(new_request(
                task_type=rng.choice(("t", "u")), agent_id=rng.choice(("a1", "a2")),
                proposal={"i": i}, task_input={}, requested_by="agent@host"))
            if rng.random() < 0.7:
                approvals.decide(made.request_id, approve=rng.random() < 0.6, by="alice",
                                 reason="r")
        approvals.expire(now=time.time() + 10 ** 7)
        counted = ApprovalDecisions(store, approvals=approvals)
        read = ApprovalDecisions(store, approvals=_Reading(approvals))  # type: ignore[arg-type]
        for agent in ("*", "a1", "a2", "none"):
            for task in ("t", "u"):
                for since in (0.0, time.time() + 3600):
                    key = LevelKey(task_type=task, agent_id=agent)
                    want = read.decisions(key, since=since, own_classes=frozenset())
                    assert counted.decisions(key, since=since, own_classes=frozenset()) == want
                    assert since or want.approved + want.rejected + want.expired or agent == "none"
