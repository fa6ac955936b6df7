"""Autonomy's approve-mode evidence comes from the approval records, on every backend.

A request a person approved counts as soon as it is decided (before any worker executed it),
a rejected one as rejected, an expired one as expired; pending ones do not count. The step
events alone could not tell: an approved request not yet executed has no executed step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import closedloop as cl
from closedloop import approvals as ap
from closedloop.autonomy import ApprovalDecisions, AutonomyLevels, LevelKey


@pytest.fixture
def store(any_url: str) -> Iterator[cl.Store]:
    s = cl.open_store(any_url)
    yield s
    s.close()


def echo(task: Any, attempt: cl.Attempt) -> Any:
    return task


def queue(store: cl.Store, levels: AutonomyLevels, n: int, *, agent_id: str = "agent-1",
          classify: Any = None) -> list[str]:
    loop = cl.Loop(echo, task_type="t", executor=lambda p: p, store=store, levels=levels,
                   agent_id=agent_id, classify=classify)
    ids = []
    for i in range(n):
        result = loop.run(i)
        assert result.outcome is cl.Outcome.AWAITING_APPROVAL
        assert result.approval_id is not None
        ids.append(result.approval_id)
    store.flush()
    return ids


def test_the_approval_rate_counts_peoples_decisions(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=0.0)
    assert isinstance(levels.decisions, ApprovalDecisions)  # the default with a port
    levels.set("t", "approve", by="alice", reason="start")
    ids = queue(store, levels, 6)
    for rid in ids[:3]:
        ap.approve(rid, by="bob", store=store)
    ap.reject(ids[3], by="bob", reason="wrong type", store=store)
    ap.approvals_for(store).expire(now=time.time() + 10 ** 7)  # the last two expire
    ev = levels.evidence(LevelKey(task_type="t"))
    # nothing executed yet: the events alone would say 0 of 0
    assert (ev.approval.successes, ev.approval.trials, ev.expired) == (3, 4, 2)
    # another agent's key sees none of them
    other = levels.evidence(LevelKey(task_type="t", agent_id="someone-else"))
    assert (other.approval.trials, other.expired) == (0, 0)
    # requests from before the level was entered do not count
    levels.set("t", "approve", by="alice", reason="again, from now")
    assert levels.evidence(LevelKey(task_type="t")).approval.trials == 0


def test_a_class_with_its_own_level_keeps_its_own_decisions(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=0.0)
    levels.set("t", "approve", by="alice", reason="start")
    levels.set("t", "approve", by="alice", reason="start", action_class="big")
    ids = queue(store, levels, 4, classify=lambda p: "big" if p >= 2 else None)
    for rid in ids:
        ap.approve(rid, by="bob", store=store)
    assert levels.evidence(LevelKey(task_type="t")).approval.trials == 2
    big = levels.evidence(LevelKey(task_type="t", action_class="big"))
    assert (big.approval.successes, big.approval.trials) == (2, 2)
