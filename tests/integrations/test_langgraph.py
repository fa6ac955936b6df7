"""The LangGraph adapter with the real langgraph: a closed-loop node, approval through
``interrupt``, the approved action executed exactly once."""

from __future__ import annotations

from typing import Any, TypedDict

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command

import closedloop as cl
from closedloop import approvals
from closedloop.integrations import NodeOutcome, langgraph_node


class State(TypedDict, total=False):
    bucket: str
    status: str
    result: Any
    approval_id: str | None


class World:
    def __init__(self) -> None:
        self.created: list[tuple[str, str | None]] = []
        self.fail_update = 0

    def create(self, proposal: dict[str, Any]) -> str:
        self.created.append((proposal["name"], cl.current_idempotency_key()))
        return f"created {proposal['name']}"


def propose(task: str, attempt: cl.Attempt) -> dict[str, Any]:
    return {"name": task}


def graph(world: World, store: cl.Store, **loop_options: Any) -> Any:
    options: dict[str, Any] = {"autonomy": "approve", **loop_options}
    loop = cl.Loop(propose, task_type="bucket.create", executor=world.create, store=store,
                   guards=(), **options)

    def update(state: State, outcome: NodeOutcome) -> State:
        if world.fail_update:
            world.fail_update -= 1
            raise RuntimeError("the node failed after the action")
        return {"status": outcome.outcome, "result": outcome.result,
                "approval_id": outcome.approval_id}

    builder = StateGraph(State)
    builder.add_node("apply", langgraph_node(loop, task_input=lambda s: s["bucket"],
                                             update=update))
    builder.add_edge(START, "apply")
    builder.add_edge("apply", END)
    return builder.compile(checkpointer=InMemorySaver())


CONFIG: Any = {"configurable": {"thread_id": "t1"}}


def interrupted(out: dict[str, Any]) -> dict[str, Any]:
    (pending,) = out["__interrupt__"]
    value: dict[str, Any] = pending.value
    return value


def test_approval_interrupts_the_graph_and_the_resumed_node_executes_once(
        store: cl.Store) -> None:
    world = World()
    g = graph(world, store)
    asked = interrupted(g.invoke({"bucket": "logs"}, CONFIG))
    assert world.created == []
    request = approvals.get_request(asked["approval_id"], store=store)
    assert request.status is approvals.ApprovalStatus.PENDING
    assert (asked["task_type"], asked["proposal"]) == ("bucket.create", request.proposal)

    out = g.invoke(Command(resume={"approved": True, "by": "alice", "reason": "ok"}), CONFIG)
    assert (out["status"], out["result"]) == ("succeeded", "created logs")
    # once, with the durable request id as the idempotency key; the same request, not a new one
    assert world.created == [("logs", asked["approval_id"])]
    assert out["approval_id"] == asked["approval_id"]
    done = approvals.get_request(asked["approval_id"], store=store)
    assert done.status is approvals.ApprovalStatus.EXECUTED
    assert [d.action for d in done.history][:2] == ["requested", "approved"]
    assert len(approvals.list_requests(store=store).requests) == 1


def test_a_node_re_run_after_the_action_never_acts_again(store: cl.Store) -> None:
    world = World()
    g = graph(world, store)
    asked = interrupted(g.invoke({"bucket": "logs"}, CONFIG))
    world.fail_update = 1  # the node fails after the action, before LangGraph saves its writes
    with pytest.raises(RuntimeError, match="after the action"):
        g.invoke(Command(resume={"approved": True, "by": "alice"}), CONFIG)
    assert len(world.created) == 1
    out = g.invoke(None, CONFIG)  # retry from the checkpoint: the node runs from its start
    assert out["status"] == "succeeded" and out["approval_id"] == asked["approval_id"]
    assert world.created == [("logs", asked["approval_id"])]
    assert len(approvals.list_requests(store=store).requests) == 1


def test_a_rejection_executes_nothing(store: cl.Store) -> None:
    world = World()
    g = graph(world, store)
    interrupted(g.invoke({"bucket": "prod"}, CONFIG))
    out = g.invoke(Command(resume={"approved": False, "by": "bob", "reason": "not prod"}),
                   CONFIG)
    assert (out["status"], out["result"]) == ("rejected", None)
    assert world.created == []


def test_a_request_decided_and_executed_elsewhere_is_reported_not_re_run(
        store: cl.Store) -> None:
    world = World()
    g = graph(world, store)
    asked = interrupted(g.invoke({"bucket": "logs"}, CONFIG))
    approvals.approve(asked["approval_id"], by="carol", store=store)  # closedloop approvals
    worker_loop = cl.Loop(propose, task_type="bucket.create", executor=world.create,
                          store=store, guards=(), autonomy="approve")
    executed = worker_loop.run_approved(asked["approval_id"], by="worker")
    assert executed is not None and executed.ok
    out = g.invoke(Command(resume="decided"), CONFIG)  # any value: it was decided elsewhere
    assert out["status"] == "succeeded" and out["result"] is None  # the worker's, not ours
    assert world.created == [("logs", asked["approval_id"])]


def test_a_step_that_needs_no_approval_runs_at_once(store: cl.Store) -> None:
    world = World()
    out = graph(world, store, autonomy="autonomous").invoke({"bucket": "logs"}, CONFIG)
    assert (out["status"], out["result"]) == ("succeeded", "created logs")
    assert out["approval_id"] is None and world.created == [("logs", None)]


async def test_an_async_node_with_an_async_executor_interrupts_and_executes_once(
        store: cl.Store) -> None:
    created: list[tuple[str, str | None]] = []

    async def create(proposal: dict[str, Any]) -> str:
        created.append((proposal["name"], cl.current_idempotency_key()))
        return "created"

    loop = cl.Loop(propose, task_type="bucket.create", executor=create, store=store,
                   guards=(), autonomy="approve")
    builder = StateGraph(State)
    builder.add_node("apply", langgraph_node(
        loop, task_input=lambda s: s["bucket"], asynchronous=True,
        update=lambda s, o: {"status": o.outcome, "approval_id": o.approval_id}))
    builder.add_edge(START, "apply")
    builder.add_edge("apply", END)
    g = builder.compile(checkpointer=InMemorySaver())
    asked = interrupted(await g.ainvoke({"bucket": "logs"}, CONFIG))
    assert created == []
    out = await g.ainvoke(Command(resume={"approved": True, "by": "alice"}), CONFIG)
    assert out["status"] == "succeeded" and out["approval_id"] == asked["approval_id"]
    assert created == [("logs", asked["approval_id"])]
    assert len(approvals.list_requests(store=store).requests) == 1
