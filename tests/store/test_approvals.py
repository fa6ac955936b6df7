"""One contract for the approval port: what loops, workers, ``closedloop approvals`` and the
HTTP API rely on, whichever store keeps the requests.

Parametrized over memory, SQLite and PostgreSQL (``any_url``), or over the backends shared
between processes (``shared_url``), see ``conftest.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

import closedloop as cl
from closedloop._approvals import (
    KEY_ENV,
    PORTABLE_NO,
    PORTABLE_SEALED,
    PORTABLE_TEXT,
    ApprovalRequest,
    ApprovalStatus,
    digest,
    exact_texts,
    new_request,
)
from closedloop._errors import ApprovalError
from closedloop._events import proposal_text
from closedloop.store import ApprovalStore, approval_store_for

SRC = str(Path(__file__).resolve().parents[2] / "src")
T0 = 1_790_000_000.0
SECRET = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
def store(any_url: str) -> Iterator[cl.Store]:
    s = cl.open_store(any_url)
    yield s
    s.close()


@pytest.fixture
def approvals(store: cl.Store) -> ApprovalStore:
    return approval_store_for(store)


def request(i: int = 0, *, task_type: str = "deploy", proposal: object = None,
            expires_in: float | None = None, destructive: bool = False,
            two: bool = False, now: float = T0) -> ApprovalRequest:
    return new_request(
        task_type=task_type, agent_id="agent-1",
        proposal={"n": i, "plan": "launch"} if proposal is None else proposal,
        task_input={"ask": i}, requested_by="agent-1@host", step_id=f"{i:032x}",
        trace_id=f"{i + 1:032x}", run_id="run-1",
        verdicts=[{"check": "tags", "passed": True, "issues": []}],
        risk={"summary": "deletes 1 resource", "destructive": destructive,
              "items": [{"address": "aws_db_instance.main", "action": "delete"}]}
        if destructive else None,
        expires_in=expires_in, two_approvers=two, now=now)


def test_a_request_reads_back_as_created(approvals: ApprovalStore) -> None:
    made = approvals.create(request(1, destructive=True))
    got = approvals.get(made.request_id)
    assert got is not None
    assert got.status is ApprovalStatus.PENDING
    assert (got.task_type, got.agent_id, got.requested_by) == ("deploy", "agent-1",
                                                                "agent-1@host")
    assert (got.step_id, got.trace_id, got.run_id) == (f"{1:032x}", f"{2:032x}", "run-1")
    assert json.loads(got.proposal) == {"n": 1, "plan": "launch"}
    assert got.proposal_digest == digest(proposal_text({"n": 1, "plan": "launch"}))
    assert json.loads(got.task_input or "") == {"ask": 1}
    assert got.portable == PORTABLE_TEXT and got.sealed is None
    assert got.verdicts == [{"check": "tags", "passed": True, "issues": []}]
    assert got.risk is not None and got.risk["items"][0]["action"] == "delete"
    assert got.destructive
    assert got.created_at == T0 and got.expires_at is None
    assert [(d.action, d.by) for d in got.history] == [("requested", "agent-1@host")]
    assert approvals.get("nope") is None


def test_creating_a_request_twice_stores_it_once(approvals: ApprovalStore) -> None:
    made = request(1)
    first = approvals.create(made)
    again = approvals.create(made)
    assert again.request_id == first.request_id
    assert len(approvals.list().requests) == 1
    got = approvals.get(first.request_id)
    assert got is not None and len(got.history) == 1


def test_listing_is_newest_first_filtered_and_paged(approvals: ApprovalStore) -> None:
    made = [approvals.create(request(i, task_type="a" if i % 2 else "b", now=T0 + i))
            for i in range(7)]
    approvals.decide(made[3].request_id, approve=False, by="alice", reason="no")
    ids = [r.request_id for r in approvals.list().requests]
    assert ids == [m.request_id for m in reversed(made)]
    assert [r.request_id for r in approvals.list(task_type="a").requests] == [
        made[5].request_id, made[3].request_id, made[1].request_id]
    assert [r.request_id for r in approvals.list(status="rejected").requests] == [
        made[3].request_id]
    assert [r.request_id for r in approvals.list(status="pending", task_type="a").requests] \
        == [made[5].request_id, made[1].request_id]
    seen, cursor = [], None
    while True:
        got = approvals.list(limit=3, cursor=cursor)
        seen += [r.request_id for r in got.requests]
        cursor = got.next_cursor
        if cursor is None:
            break
    assert seen == ids
    with pytest.raises(cl.ConfigError):
        approvals.list(status="maybe")
    with pytest.raises(cl.ConfigError):
        approvals.list(cursor="not-a-cursor")


def test_a_decision_records_who_when_and_why(approvals: ApprovalStore) -> None:
    made = approvals.create(request(1))
    done = approvals.decide(made.request_id, approve=True, by="alice", reason="looks right",
                            now=T0 + 5)
    assert done.status is ApprovalStatus.APPROVED and done.approvers == ("alice",)
    assert [(d.action, d.by, d.reason, d.at) for d in done.history][1:] == [
        ("approved", "alice", "looks right", T0 + 5)]
    with pytest.raises(ApprovalError) as again:
        approvals.decide(made.request_id, approve=False, by="bob", reason="too late")
    assert again.value.code == "not_pending"


def test_nobody_approves_their_own_request(approvals: ApprovalStore) -> None:
    made = approvals.create(request(1))
    for me in ("agent-1@host", "AGENT-1@host ", "agent-1"):
        with pytest.raises(ApprovalError) as refused:
            approvals.decide(made.request_id, approve=True, by=me, reason="mine")
        assert refused.value.code == "self_approval"
    got = approvals.get(made.request_id)
    assert got is not None and got.status is ApprovalStatus.PENDING
    assert [d.action for d in got.history] == ["requested"]


def test_a_destructive_request_can_need_two_distinct_approvers(
        approvals: ApprovalStore) -> None:
    made = approvals.create(request(1, destructive=True, two=True))
    assert made.approvals_needed == 2
    first = approvals.decide(made.request_id, approve=True, by="alice", reason="ok")
    assert first.status is ApprovalStatus.PENDING and first.approvers == ("alice",)
    with pytest.raises(ApprovalError) as same:
        approvals.decide(made.request_id, approve=True, by="Alice", reason="ok again")
    assert same.value.code == "same_approver"
    assert approvals.claim(made.request_id, by="w", lease_s=30) is None  # not approved yet
    second = approvals.decide(made.request_id, approve=True, by="bob", reason="ok")
    assert second.status is ApprovalStatus.APPROVED
    assert second.approvers == ("alice", "bob")
    # two approvers are asked only for destructive requests
    plain = approvals.create(request(2, two=True))
    assert plain.approvals_needed == 1


def test_a_rejection_can_ask_for_a_revision(approvals: ApprovalStore) -> None:
    made = approvals.create(request(1))
    done = approvals.decide(made.request_id, approve=False, by="alice",
                            reason="use t3.small", revise=True)
    assert done.status is ApprovalStatus.REJECTED and done.revise
    assert done.history[-1].reason == "use t3.small"


def test_an_expired_request_is_marked_and_never_approved(approvals: ApprovalStore) -> None:
    made = approvals.create(request(1, expires_in=60))
    late = approvals.create(request(2, expires_in=600))
    with pytest.raises(ApprovalError) as refused:
        approvals.decide(made.request_id, approve=True, by="alice", reason="ok", now=T0 + 61)
    assert refused.value.code == "expired"
    got = approvals.get(made.request_id)
    assert got is not None and got.status is ApprovalStatus.EXPIRED
    assert [d.action for d in got.history] == ["requested", "expired"]
    third = approvals.create(request(3, expires_in=60))
    assert approvals.expire(now=T0 + 100) == [third.request_id]
    assert approvals.expire(now=T0 + 100) == []
    still = approvals.get(late.request_id)
    assert still is not None and still.status is ApprovalStatus.PENDING


def test_an_approved_request_is_claimed_once(approvals: ApprovalStore) -> None:
    made = approvals.create(request(1))
    assert approvals.claim(by="w1", lease_s=30) is None  # pending: nothing to claim
    approvals.decide(made.request_id, approve=True, by="alice", reason="ok")
    claim = approvals.claim(by="w1", lease_s=30, now=T0 + 10)
    assert claim is not None and claim.request.request_id == made.request_id
    assert claim.epoch == 1 and claim.lease_until == T0 + 40
    assert claim.request.status is ApprovalStatus.EXECUTING
    assert approvals.claim(by="w2", lease_s=30) is None
    assert approvals.claim(made.request_id, by="w2", lease_s=30) is None
    assert approvals.renew(made.request_id, claim.token, lease_s=30)
    assert not approvals.renew(made.request_id, "f" * 32, lease_s=30)
    assert not approvals.finish(made.request_id, "f" * 32, ok=True, result={})
    assert approvals.finish(made.request_id, claim.token, ok=True,
                            result={"outcome": "succeeded"}, reason="verified")
    assert not approvals.finish(made.request_id, claim.token, ok=True, result={})
    got = approvals.get(made.request_id)
    assert got is not None and got.status is ApprovalStatus.EXECUTED
    assert got.result == {"outcome": "succeeded"}
    assert [d.action for d in got.history] == ["requested", "approved", "claimed", "executed"]


def test_claims_pick_by_task_type_and_portability(approvals: ApprovalStore) -> None:
    a = approvals.create(request(1, task_type="a"))
    b = approvals.create(request(2, task_type="b"))
    secret = approvals.create(request(3, task_type="a", proposal={"password": "hunter2x"}))
    for r in (a, b, secret):
        approvals.decide(r.request_id, approve=True, by="alice", reason="ok")
    assert secret.portable == PORTABLE_NO
    first = approvals.claim(by="w", lease_s=30, task_types=["a"])
    assert first is not None and first.request.request_id == a.request_id
    assert approvals.claim(by="w", lease_s=30, task_types=["a"]) is None  # only unportable
    only = approvals.claim(by="w", lease_s=30, task_types=["a"], portable=[PORTABLE_NO])
    assert only is not None and only.request.request_id == secret.request_id
    other = approvals.claim(by="w", lease_s=30)
    assert other is not None and other.request.request_id == b.request_id


def test_a_lease_that_runs_out_is_crashed_never_re_run(approvals: ApprovalStore) -> None:
    made = approvals.create(request(1))
    approvals.decide(made.request_id, approve=True, by="alice", reason="ok")
    claim = approvals.claim(by="w1", lease_s=30, now=T0)
    assert claim is not None
    assert approvals.reap(now=T0 + 29) == []
    assert approvals.reap(now=T0 + 31) == [made.request_id]
    got = approvals.get(made.request_id)
    assert got is not None and got.status is ApprovalStatus.CRASHED
    assert approvals.claim(by="w2", lease_s=30) is None
    # the stale executor's late finish is fenced off
    assert not approvals.finish(made.request_id, claim.token, ok=True, result={})
    # a human retries it: a new claim, a new token and epoch
    with pytest.raises(cl.ConfigError):
        approvals.retry(made.request_id, by="alice", reason=" ")
    again = approvals.retry(made.request_id, by="alice", reason="checked: it never ran")
    assert again.status is ApprovalStatus.APPROVED
    second = approvals.claim(by="w2", lease_s=30)
    assert second is not None and second.epoch == 2 and second.token != claim.token
    assert not approvals.renew(made.request_id, claim.token, lease_s=30)
    assert approvals.finish(made.request_id, second.token, ok=False,
                            result={"outcome": "error"}, reason="executor raised")
    got = approvals.get(made.request_id)
    assert got is not None and got.status is ApprovalStatus.FAILED
    assert [d.action for d in got.history] == [
        "requested", "approved", "claimed", "crashed", "retried", "claimed", "failed"]
    with pytest.raises(ApprovalError) as nope:
        approvals.retry(approvals.create(request(2)).request_id, by="a", reason="r")
    assert nope.value.code == "not_retryable"


def test_unknown_requests_are_refused(approvals: ApprovalStore) -> None:
    for act in (lambda: approvals.decide("x" * 32, approve=True, by="a", reason="r"),
                lambda: approvals.retry("x" * 32, by="a", reason="r"),
                lambda: approvals.note("x" * 32, action="refused", by="a", reason="r")):
        with pytest.raises(ApprovalError) as err:
            act()
        assert err.value.code == "not_found"


def test_every_stored_text_is_redacted(approvals: ApprovalStore) -> None:
    made = approvals.create(request(1, proposal={"key": SECRET, "n": 1}))
    approvals.decide(made.request_id, approve=False, by="alice",
                     reason=f"leaked {SECRET} in it")
    approvals.note(made.request_id, action="refused", by="w", reason=f"again {SECRET}")
    got = approvals.get(made.request_id)
    assert got is not None
    assert SECRET not in json.dumps(got.to_dict(sealed=True))
    assert got.proposal_digest == digest(proposal_text({"key": SECRET, "n": 1}))
    assert got.portable == PORTABLE_NO
    with pytest.raises(ApprovalError) as err:
        exact_texts(got)
    assert err.value.code == "cannot_execute"


def test_a_secret_proposal_is_sealed_with_a_key(approvals: ApprovalStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv(KEY_ENV, key)
    proposal = {"key": SECRET, "n": 1}
    made = approvals.create(request(1, proposal=proposal))
    got = approvals.get(made.request_id)
    assert got is not None and got.portable == PORTABLE_SEALED
    assert SECRET not in got.proposal and SECRET not in (got.sealed or "")
    text, intent = exact_texts(got)
    assert text == proposal_text(proposal) and intent == proposal_text({"ask": 1})
    monkeypatch.setenv(KEY_ENV, Fernet.generate_key().decode())
    with pytest.raises(ApprovalError) as wrong:
        exact_texts(got)
    assert wrong.value.code == "cannot_execute"
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ApprovalError):
        exact_texts(got)


def test_a_request_survives_reopening(shared_url: str) -> None:
    with cl.open_store(shared_url) as first:
        made = approval_store_for(first).create(request(1))
    with cl.open_store(shared_url) as second:
        got = approval_store_for(second).get(made.request_id)
    assert got is not None and got.proposal_digest == made.proposal_digest


_RACER = textwrap.dedent("""
    import sys
    import closedloop as cl
    from closedloop.store import approval_store_for
    store = cl.open_store(sys.argv[1])
    approvals = approval_store_for(store)
    got = []
    for _ in range(int(sys.argv[3])):
        claim = approvals.claim(by=sys.argv[2], lease_s=60)
        if claim is not None:
            got.append(claim.request.request_id)
            approvals.finish(claim.request.request_id, claim.token, ok=True, result={})
    print(" ".join(got))
    store.close()
""")


def test_processes_racing_for_approved_requests_claim_each_once(shared_url: str) -> None:
    n = 30
    with cl.open_store(shared_url) as store:
        approvals = approval_store_for(store)
        ids = []
        for i in range(n):
            made = approvals.create(request(i, now=T0 + i))
            approvals.decide(made.request_id, approve=True, by="alice", reason="ok")
            ids.append(made.request_id)
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, shared_url, f"w{k}", str(n)],
                              stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
             for k in range(3)]
    claimed = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        claimed += out.split()
    assert sorted(claimed) == sorted(ids)  # every one, none twice


def test_a_deferred_store_keeps_requests_once_it_can_open(tmp_path: Path) -> None:
    blocker = tmp_path / "not-yet"
    blocker.write_text("a file where the store's folder should be")
    url = f"sqlite:///{blocker / 'events.db'}"
    store = cl.open_store(url, defer=True)
    try:
        approvals = approval_store_for(store)
        with pytest.raises(cl.StoreError):  # fails closed: nothing is asked, nothing runs
            approvals.create(request(1))
        blocker.unlink()
        made = approvals.create(request(1))
        assert approvals.get(made.request_id) is not None
    finally:
        store.close()
