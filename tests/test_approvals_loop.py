"""Durable approval in the loop: what a user relies on when a step needs a human's yes.

A gated step stores a request and returns (or waits); an approved request executes exactly
once, in the waiting process or a worker, with the request id as idempotency key, and is
recorded with autonomy ``approve`` and its real outcome under the same step id.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.fernet import Fernet

import closedloop as cl
from closedloop import approvals as ap
from closedloop._approvals import KEY_ENV, PORTABLE_NO, digest
from closedloop._events import proposal_text


class Executor:
    """Records every call and the idempotency key it ran under."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Any, str | None]] = []
        self.fail = fail

    def __call__(self, proposal: Any) -> dict[str, Any]:
        self.calls.append((proposal, cl.current_idempotency_key()))
        if self.fail:
            raise RuntimeError("the API said no")
        return {"applied": proposal}


@pytest.fixture
def store() -> Iterator[cl.Store]:
    s = cl.open_store("memory://")
    yield s
    s.close()


def agent(task: dict[str, Any], attempt: cl.Attempt) -> dict[str, Any]:
    plan = {"type": task["type"], "n": attempt.number}
    if attempt.feedback:
        plan["feedback"] = attempt.feedback
    return plan


def matches(task: dict[str, Any], result: dict[str, Any]) -> str | None:
    return None if result["applied"]["type"] == task["type"] else "wrong type"


def loop(store: cl.Store, executor: Executor, **kw: Any) -> cl.Loop:
    kw.setdefault("autonomy", "approve")
    return cl.Loop(agent, task_type="deploy", agent_id="deployer", executor=executor,
                   verifiers=[matches], store=store, guards=(), **kw)


def events(store: cl.Store) -> list[cl.StepEvent]:
    assert store.flush()
    return list(store.events())


def approve_when_asked(store: cl.Store, *, by: str = "alice", reject: str | None = None,
                       revise: bool = False, count: int = 1) -> threading.Thread:
    """A person who decides each request as soon as it appears (a thread)."""
    done: set[str] = set()

    def person() -> None:
        while len(done) < count:
            for r in ap.list_requests(status="pending", store=store).requests:
                if r.request_id in done:
                    continue
                done.add(r.request_id)
                if reject is None:
                    ap.approve(r.request_id, by=by, reason="fine", store=store)
                else:
                    ap.reject(r.request_id, by=by, reason=reject, revise=revise, store=store)
            threading.Event().wait(0.005)

    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    return thread


def test_a_gated_step_stores_a_request_and_returns(store: cl.Store) -> None:
    executor = Executor()
    result = loop(store, executor).run({"type": "t3.micro"})
    assert result.outcome is cl.Outcome.AWAITING_APPROVAL and executor.calls == []
    assert result.approval_id is not None
    request = ap.get_request(result.approval_id, store=store)
    assert request.status is ap.ApprovalStatus.PENDING
    assert request.step_id == result.step_id and request.trace_id == result.trace_id
    assert request.proposal_digest == digest(proposal_text(result.proposal))
    assert json.loads(request.task_input or "") == {"type": "t3.micro"}
    assert request.requested_by.startswith("deployer@")
    [event] = events(store)
    assert (event.autonomy, event.outcome) == ("approve", "awaiting_approval")
    assert event.detail == {"approval": {"request_id": result.approval_id}}


def test_a_worker_executes_an_approved_request_once(store: cl.Store) -> None:
    executor = Executor()
    gated = loop(store, executor)
    first = gated.run({"type": "t3.micro"})
    assert first.approval_id is not None
    assert gated.run_approved() is None  # pending: nothing to run
    ap.approve(first.approval_id, by="alice", reason="ok", store=store)
    done = gated.run_approved()
    assert done is not None and done.outcome is cl.Outcome.SUCCEEDED
    assert executor.calls == [(first.proposal, first.approval_id)]
    assert done.step_id == first.step_id and done.trace_id == first.trace_id
    assert gated.run_approved() is None
    assert len(executor.calls) == 1
    request = ap.get_request(first.approval_id, store=store)
    assert request.status is ap.ApprovalStatus.EXECUTED
    assert request.result is not None
    assert request.result["executed_digest"] == request.proposal_digest
    assert request.result["outcome"] == "succeeded"
    recorded = events(store)
    assert [(e.step_id, e.autonomy, e.outcome) for e in recorded] == [
        (first.step_id, "approve", "awaiting_approval"),
        (first.step_id, "approve", "succeeded")]
    assert recorded[1].verification_passed is True


def test_the_worker_verifies_with_the_stored_task_input(store: cl.Store) -> None:
    def wrong(proposal: dict[str, Any]) -> dict[str, Any]:
        return {"applied": {**proposal, "type": "m5.huge"}}

    gated = cl.Loop(agent, task_type="deploy", executor=wrong, verifiers=[matches],
                    store=store, guards=(), autonomy="approve")
    first = gated.run({"type": "t3.micro"})
    assert first.approval_id is not None
    ap.approve(first.approval_id, by="alice", store=store)
    done = gated.run_approved()
    assert done is not None and done.outcome is cl.Outcome.FAILED
    assert done.error_type is cl.ErrorType.VERIFICATION
    request = ap.get_request(first.approval_id, store=store)
    assert request.status is ap.ApprovalStatus.EXECUTED  # it ran; verification failed
    assert request.result is not None and request.result["outcome"] == "failed"


def test_an_executor_that_raises_fails_the_request(store: cl.Store) -> None:
    executor = Executor(fail=True)
    gated = loop(store, executor)
    first = gated.run({"type": "t3.micro"})
    assert first.approval_id is not None
    ap.approve(first.approval_id, by="alice", store=store)
    with pytest.raises(RuntimeError, match="the API said no"):
        gated.run_approved()
    request = ap.get_request(first.approval_id, store=store)
    assert request.status is ap.ApprovalStatus.FAILED
    assert events(store)[-1].outcome == "error"
    assert gated.run_approved() is None  # failed: never re-run by itself


def test_a_waiting_step_executes_once_approved(store: cl.Store) -> None:
    executor = Executor()
    person = approve_when_asked(store)
    result = loop(store, executor, approval=cl.ApprovalPolicy(wait=True, poll=0.01)).run(
        {"type": "t3.micro"})
    person.join()
    assert result.outcome is cl.Outcome.SUCCEEDED
    assert executor.calls == [(result.proposal, result.approval_id)]
    [event] = events(store)
    assert (event.autonomy, event.outcome) == ("approve", "succeeded")
    assert event.step_id == result.step_id
    assert ap.get_request(result.approval_id or "", store=store).status \
        is ap.ApprovalStatus.EXECUTED


async def test_an_async_step_awaits_the_decision(store: cl.Store) -> None:
    executor = Executor()
    person = approve_when_asked(store)

    async def async_agent(task: dict[str, Any], attempt: cl.Attempt) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"type": task["type"]}

    gated = cl.Loop(async_agent, task_type="deploy", executor=executor, verifiers=[matches],
                    store=store, guards=(), autonomy="approve",
                    approval=cl.ApprovalPolicy(wait=True, poll=0.01))
    ticks = 0

    async def ticker() -> None:  # the event loop keeps running while the step waits
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    beat = asyncio.create_task(ticker())
    result = await gated.arun({"type": "t3.micro"})
    beat.cancel()
    person.join()
    assert result.outcome is cl.Outcome.SUCCEEDED and len(executor.calls) == 1
    assert ticks > 1


def test_a_rejection_is_recorded_with_who_and_why(store: cl.Store) -> None:
    executor = Executor()
    person = approve_when_asked(store, reject="too big")
    result = loop(store, executor, approval=cl.ApprovalPolicy(wait=True, poll=0.01)).run(
        {"type": "t3.micro"})
    person.join()
    assert result.outcome is cl.Outcome.REJECTED and executor.calls == []
    assert result.error_message == "rejected by alice: too big"
    assert events(store)[0].outcome == "rejected"


def test_a_rejection_asking_for_a_revision_re_asks_the_agent(store: cl.Store) -> None:
    executor = Executor()
    rejecter = approve_when_asked(store, reject="use t3.small", revise=True)
    asked: list[cl.Attempt] = []

    def reviser(task: dict[str, Any], attempt: cl.Attempt) -> dict[str, Any]:
        asked.append(attempt)
        return {"type": "t3.small" if attempt.feedback else task["type"]}

    gated = cl.Loop(reviser, task_type="deploy", executor=executor, store=store, guards=(),
                    autonomy="approve", approval=cl.ApprovalPolicy(wait=True, poll=0.01,
                                                                   timeout=0.5))
    result = gated.run({"type": "t3.micro"})
    rejecter.join()
    assert len(asked) == 2
    assert asked[1].feedback is not None and "use t3.small" in asked[1].feedback
    assert result.attempts == 2 and result.proposal == {"type": "t3.small"}
    # the revised proposal is a new request (nobody decided it within the timeout)
    assert result.outcome is cl.Outcome.AWAITING_APPROVAL
    requests = ap.list_requests(store=store).requests
    assert [r.status for r in requests] == [ap.ApprovalStatus.PENDING,
                                           ap.ApprovalStatus.REJECTED]


def test_an_expired_request_ends_the_step_expired(store: cl.Store) -> None:
    executor = Executor()
    result = loop(store, executor, approval=cl.ApprovalPolicy(
        wait=True, expires_in=0, poll=0.01)).run({"type": "t3.micro"})
    assert result.outcome is cl.Outcome.EXPIRED and executor.calls == []
    assert ap.get_request(result.approval_id or "", store=store).status \
        is ap.ApprovalStatus.EXPIRED
    assert events(store)[0].outcome == "expired"
    with pytest.raises(ap.ApprovalError) as late:
        ap.approve(result.approval_id or "", by="alice", store=store)
    assert late.value.code == "not_pending"


def test_waiting_times_out_and_a_worker_executes_later(store: cl.Store) -> None:
    executor = Executor()
    gated = loop(store, executor, approval=cl.ApprovalPolicy(wait=True, timeout=0))
    result = gated.run({"type": "t3.micro"})
    assert result.outcome is cl.Outcome.AWAITING_APPROVAL and result.approval_id
    ap.approve(result.approval_id, by="alice", store=store)
    assert ap.Worker([gated]).run_once()[0].outcome is cl.Outcome.SUCCEEDED
    assert len(executor.calls) == 1


def test_high_stakes_proposals_gate_even_autonomous_steps(store: cl.Store) -> None:
    executor = Executor()

    def deletes(proposal: dict[str, Any]) -> ap.Risk | None:
        if proposal["type"] == "delete":
            return ap.Risk(summary="deletes the database",
                           items=({"address": "aws_db_instance.main", "action": "delete"},))
        return None

    always_yes_calls: list[Any] = []

    def always_yes(task: object, proposal: object) -> bool:
        always_yes_calls.append(proposal)
        return True

    for level in ("autonomous", "approve"):
        gated = cl.Loop(agent, task_type=f"infra-{level}", executor=executor, store=store,
                        guards=(), autonomy=level, risk_rules=[deletes],
                        approver=always_yes if level == "approve" else None)
        safe = gated.run({"type": "create"})
        assert safe.outcome is cl.Outcome.SUCCEEDED and safe.approval_id is None
        risky = gated.run({"type": "delete"})
        assert risky.outcome is cl.Outcome.AWAITING_APPROVAL, level
        request = ap.get_request(risky.approval_id or "", store=store)
        assert request.destructive and request.risk is not None
        assert request.risk["summary"] == "deletes the database"
        assert request.risk["items"][0]["address"] == "aws_db_instance.main"
    assert [p["type"] for p, _ in executor.calls] == ["create", "create"]
    assert [p["type"] for p in always_yes_calls] == ["create"]  # never asked about the delete


def test_a_destructive_step_can_need_two_approvers(store: cl.Store) -> None:
    executor = Executor()
    gated = loop(store, executor, risk_rules=[lambda p: "drops a table"],
                 approval=cl.ApprovalPolicy(two_approvers=True))
    rid = gated.run({"type": "x"}).approval_id or ""
    ap.approve(rid, by="alice", store=store)
    assert gated.run_approved() is None
    with pytest.raises(ap.ApprovalError) as again:
        ap.approve(rid, by="alice", store=store)
    assert again.value.code == "same_approver"
    ap.approve(rid, by="bob", store=store)
    assert gated.run_approved() is not None and len(executor.calls) == 1


def test_a_crashing_risk_rule_stops_the_step(store: cl.Store) -> None:
    executor = Executor()

    def broken(proposal: object) -> None:
        raise ValueError("bad rule")

    result = loop(store, executor, autonomy="autonomous", risk_rules=[broken]).run({"type": "x"})
    assert result.outcome is cl.Outcome.ERROR and executor.calls == []
    assert result.error_message is not None and "bad rule" in result.error_message


def test_a_loop_without_a_store_never_executes_gated_steps() -> None:
    executor = Executor()
    result = cl.Loop(agent, task_type="t", executor=executor, store=None, guards=(),
                     autonomy="approve").run({"type": "x"})
    assert result.outcome is cl.Outcome.ERROR and result.error_type is cl.ErrorType.APPROVAL
    assert executor.calls == []


def test_the_inline_approver_still_decides(store: cl.Store) -> None:
    executor = Executor()
    yes = loop(store, executor, approver=lambda t, p: True).run({"type": "a"})
    no = loop(store, executor, approver=lambda t, p: False).run({"type": "b"})
    assert (yes.outcome, no.outcome) == (cl.Outcome.SUCCEEDED, cl.Outcome.REJECTED)
    assert yes.approval_id is None and ap.list_requests(store=store).requests == []


def test_a_secret_proposal_executes_only_where_it_can_be_had(
        store: cl.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "AKIAIOSFODNN7EXAMPLE"
    executor = Executor()

    def leaky(task: object, attempt: cl.Attempt) -> dict[str, Any]:
        return {"type": "x", "key": secret}

    gated = cl.Loop(leaky, task_type="deploy", executor=executor, store=store, guards=(),
                    autonomy="approve")
    rid = gated.run({"type": "x"}).approval_id or ""
    request = ap.get_request(rid, store=store)
    assert request.portable == PORTABLE_NO and secret not in request.proposal
    ap.approve(rid, by="alice", store=store)
    assert gated.run_approved() is None  # a worker skips what it cannot execute
    with pytest.raises(ap.ApprovalError) as refused:
        gated.run_approved(rid)
    assert refused.value.code == "cannot_execute"
    request = ap.get_request(rid, store=store)
    assert request.status is ap.ApprovalStatus.APPROVED  # left for the process that asked
    assert request.history[-1].action == "refused" and KEY_ENV in request.history[-1].reason
    # with a key, the exact proposal is sealed and any worker with the key executes it
    monkeypatch.setenv(KEY_ENV, Fernet.generate_key().decode())
    sealed = gated.run({"type": "x"}).approval_id or ""
    ap.approve(sealed, by="alice", store=store)
    done = gated.run_approved(sealed)
    assert done is not None and done.outcome is cl.Outcome.SUCCEEDED
    assert executor.calls == [({"type": "x", "key": secret}, sealed)]


def test_a_retried_crash_executes_again_with_the_same_key(store: cl.Store) -> None:
    executor = Executor()
    gated = loop(store, executor)
    rid = gated.run({"type": "x"}).approval_id or ""
    ap.approve(rid, by="alice", store=store)
    approvals = ap.approvals_for(store)
    claim = approvals.claim(by="doomed", lease_s=0.001)  # a process that dies holding it
    assert claim is not None
    assert approvals.reap(now=claim.lease_until + 1) == [rid]
    assert gated.run_approved() is None  # crashed: never re-run by itself
    ap.retry(rid, by="alice", reason="the instance was never launched", store=store)
    assert gated.run_approved() is not None
    assert executor.calls == [({"type": "x", "n": 1}, rid)]


def test_built_in_risk_rules() -> None:
    pytest.importorskip("sqlglot")
    sql = ap.destructive_sql()
    assert sql("SELECT 1") is None and sql("DELETE FROM t WHERE id = 1") is None
    assert sql({"not": "sql"}) is None
    for text in ("DROP TABLE users", "TRUNCATE t", "DELETE FROM t", "UPDATE t SET a = 1",
                 "ALTER TABLE t DROP COLUMN c"):
        risk = sql(text)
        assert isinstance(risk, ap.Risk) and risk.destructive, text
    plan = {"format_version": "1.2", "planned_values": {}, "resource_changes": [
        {"address": "aws_db_instance.main", "type": "aws_db_instance",
         "change": {"actions": ["delete"]}},
        {"address": "aws_instance.web", "type": "aws_instance",
         "change": {"actions": ["delete", "create"]}},
        {"address": "aws_s3_bucket.logs", "type": "aws_s3_bucket",
         "change": {"actions": ["create"], "after": {}}}]}
    tf = ap.destructive_terraform()
    risk = tf(plan)
    assert isinstance(risk, ap.Risk)
    assert risk.summary == "Terraform plan will delete 1 resource, replace 1 resource"
    assert {i["address"] for i in risk.items} == {"aws_db_instance.main", "aws_instance.web"}
    assert ap.destructive_terraform(allow_destroy=["aws_*"])(plan) is None
    assert tf({"resource_changes": []}) is None


async def test_an_async_worker_executes_with_async_hooks(store: cl.Store) -> None:
    calls: list[str | None] = []

    async def execute(proposal: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        calls.append(cl.current_idempotency_key())
        return {"applied": proposal}

    gated = cl.Loop(agent, task_type="deploy", executor=execute, verifiers=[matches],
                    store=store, guards=(), autonomy="approve")
    first = await gated.arun({"type": "t3.micro"})
    assert first.approval_id is not None
    ap.approve(first.approval_id, by="alice", store=store)
    done = await gated.arun_approved()
    assert done is not None and done.outcome is cl.Outcome.SUCCEEDED
    assert calls == [first.approval_id]
    second = (await gated.arun({"type": "x"})).approval_id or ""
    ap.approve(second, by="bob", store=store)
    with pytest.raises(cl.ConfigError, match="async hooks"):  # refused before any claim
        gated.run_approved(second)
    assert ap.get_request(second, store=store).status is ap.ApprovalStatus.APPROVED


def test_a_traced_step_is_gated_the_same(store: cl.Store) -> None:
    from closedloop.telemetry import StoreExporter, Telemetry

    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    executor = Executor()
    gated = loop(store, executor, telemetry=pipeline)
    person = approve_when_asked(store)
    waited = loop(store, executor, telemetry=pipeline,
                  approval=cl.ApprovalPolicy(wait=True, poll=0.01)).run({"type": "a"})
    person.join()
    returned = gated.run({"type": "b"})
    pipeline.shutdown()
    assert waited.outcome is cl.Outcome.SUCCEEDED and len(executor.calls) == 1
    assert returned.outcome is cl.Outcome.AWAITING_APPROVAL


class Announcer:
    """A notifier that keeps what it was asked to announce (the Notifier port)."""

    def __init__(self) -> None:
        self.announced: list[tuple[str, str]] = []

    def notify(self, request: ap.ApprovalRequest, *, store: Any = None) -> None:
        self.announced.append((request.request_id, request.status.value))

    def close(self, timeout: float = 10.0) -> None:
        """Nothing queued."""


def test_a_request_the_loop_makes_is_announced_at_once(store: cl.Store) -> None:
    announcer = Announcer()
    cl.configure(notify=announcer)
    try:
        result = loop(store, Executor()).run({"type": "t3.micro"})
    finally:
        cl.configure()
    assert result.approval_id is not None
    assert announcer.announced == [(result.approval_id, "pending")]
