"""LangGraph adapter: a node as a closed-loop step, approval through ``interrupt``.

:func:`langgraph_node` turns a :class:`~closedloop.Loop` into a LangGraph node. The node runs
one step of the loop on the task it reads from the graph's state and returns the state update
made of the step's outcome. A step the gate sends for approval (the ``approve`` level
without an inline approver, or a risk rule) becomes a durable approval request
(docs/approvals.md) and the node pauses the graph with LangGraph's ``interrupt``; resumed
with the decision (``Command(resume={"approved": True, "by": "alice"})``, or anything once
the request was decided from ``closedloop approvals``), the approved proposal is executed
exactly once:

- the proposing step runs inside a LangGraph ``@task``, whose result the checkpointer keeps:
  a resumed node (LangGraph re-runs a node from its start) never proposes again, and asks
  about the same request;
- the action runs through :meth:`~closedloop.Loop.run_approved` with the request's id: one
  claim per request, the request id as the executor's idempotency key
  (:func:`closedloop.current_idempotency_key`). A node re-run after the action (a crash, an
  error later in the node) finds the request executed and reports it: it never acts twice.

Sync nodes, or ``async`` ones (``asynchronous=True``). See docs/frameworks.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from langgraph.func import task
from langgraph.types import interrupt

from closedloop._errors import ConfigError
from closedloop._events import Outcome
from closedloop.approvals import ApprovalStatus, approve, get_request, reject
from closedloop.loop import Loop, StepResult

__all__ = ["NodeOutcome", "langgraph_node"]


@dataclass(frozen=True, slots=True)
class NodeOutcome:
    """What a closed-loop node's step came to, for its ``update`` function.

    ``outcome`` is the step's (``succeeded``, ``failed``, ``rejected``, ``expired``,
    ``awaiting_approval``...); ``result`` the executor's return value when it ran in this
    node (None when a worker executed the approved request elsewhere); ``approval_id`` the
    durable request's id when the step needed approval; ``message`` why it did not succeed.
    """

    outcome: str
    result: Any = None
    proposal: Any = None
    step_id: str | None = None
    approval_id: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        """The step succeeded."""
        return self.outcome == Outcome.SUCCEEDED.value


def _from_result(result: StepResult[Any, Any]) -> NodeOutcome:
    return NodeOutcome(outcome=result.outcome.value, result=result.result,
                       proposal=result.proposal, step_id=result.step_id,
                       approval_id=result.approval_id, message=result.error_message)


def _default_update(state: Any, outcome: NodeOutcome) -> dict[str, Any]:
    return {"closedloop": asdict(outcome)}


def langgraph_node(
    loop: Loop,
    *,
    task_input: Callable[[Any], Any] | None = None,
    update: Callable[[Any, NodeOutcome], Any] | None = None,
    by: str | None = None,
    asynchronous: bool = False,
) -> Any:
    """A LangGraph node (``graph.add_node("apply", langgraph_node(loop, ...))``) running one
    step of ``loop``.

    ``task_input(state)`` is the step's task (default: the state itself); ``update(state,
    outcome)`` the node's state update from a :class:`NodeOutcome` (default:
    ``{"closedloop": {...the outcome's fields...}}``). The graph needs a checkpointer
    (``interrupt`` does). When the step awaits approval, the node interrupts with
    ``{"approval_id", "task_type", "proposal" (redacted), "risk"}``; resume it with
    ``Command(resume=DECISION)`` where ``DECISION`` is ``{"approved": bool, "by": name,
    "reason": text}`` (recorded as that person's decision), or anything when the request was
    already decided elsewhere. ``by`` names this graph in the request's history.
    ``asynchronous=True``: an ``async`` node (for ``graph.ainvoke`` and a loop with ``async``
    hooks), running the step with ``arun`` / ``arun_approved``.
    """
    if not isinstance(loop, Loop):
        raise ConfigError(f"langgraph_node needs a closedloop.Loop, got {loop!r}")
    read_task = task_input or (lambda state: state)
    make_update = update or _default_update
    store = loop.store
    worker = by or f"langgraph:{loop.task_type}"

    if asynchronous:
        @task(name=f"closedloop:{loop.task_type}")  # type: ignore[arg-type]
        async def apropose(task_value: Any) -> dict[str, Any]:
            # checkpointed by LangGraph: on resume the node gets this back, not a new proposal
            return asdict(_from_result(await loop.arun(task_value)))

        async def anode(state: Any) -> Any:
            first = NodeOutcome(**await apropose(read_task(state)))
            request_id = _ask(loop, first)
            if request_id is None:
                return make_update(state, first)
            if get_request(request_id, store=store).status is ApprovalStatus.APPROVED:
                result = await loop.arun_approved(request_id, by=worker)
                if result is not None and result.outcome is not Outcome.AWAITING_APPROVAL:
                    return make_update(state, _from_result(result))
            return make_update(state, _report(loop, request_id, first))

        chosen: Any = anode
    else:
        @task(name=f"closedloop:{loop.task_type}")  # type: ignore[arg-type]
        def propose(task_value: Any) -> dict[str, Any]:
            # checkpointed by LangGraph: on resume the node gets this back, not a new proposal
            return asdict(_from_result(loop.run(task_value)))

        def node(state: Any) -> Any:
            first = NodeOutcome(**propose(read_task(state)).result())
            request_id = _ask(loop, first)
            if request_id is None:
                return make_update(state, first)
            if get_request(request_id, store=store).status is ApprovalStatus.APPROVED:
                result = loop.run_approved(request_id, by=worker)
                if result is not None and result.outcome is not Outcome.AWAITING_APPROVAL:
                    return make_update(state, _from_result(result))
            return make_update(state, _report(loop, request_id, first))

        chosen = node
    chosen.__name__ = f"closedloop_{loop.task_type.replace('.', '_')}"
    chosen.loop = loop
    return chosen  # typed Any: LangGraph's add_node infers the state type from the node


def _ask(loop: Loop, first: NodeOutcome) -> str | None:
    """The request to execute once decided (after ``interrupt``), or None when the step
    needed no approval. Records the decision the graph was resumed with."""
    if first.outcome != Outcome.AWAITING_APPROVAL.value or first.approval_id is None:
        return None
    store = loop.store
    request_id = first.approval_id
    request = get_request(request_id, store=store)
    decision = interrupt({"approval_id": request_id, "task_type": request.task_type,
                          "proposal": request.proposal, "risk": request.risk})
    request = get_request(request_id, store=store)  # decided meanwhile, perhaps
    if request.status is ApprovalStatus.PENDING and isinstance(decision, Mapping) \
            and "approved" in decision:
        who = str(decision.get("by") or "")
        reason = str(decision.get("reason") or "")
        if decision["approved"]:
            approve(request_id, by=who, reason=reason, store=store)
        else:
            reject(request_id, by=who, reason=reason or "rejected", store=store)
    return request_id


def _report(loop: Loop, request_id: str, first: NodeOutcome) -> NodeOutcome:
    """What became of a request this node did not (or no longer can) execute."""
    request = get_request(request_id, store=loop.store)
    status = request.status
    recorded = request.result or {}
    if status is ApprovalStatus.EXECUTED or status is ApprovalStatus.FAILED:
        # executed already (by this node before it was re-run, or by a worker): never again
        return NodeOutcome(outcome=str(recorded.get("outcome") or status.value),
                           proposal=first.proposal, step_id=recorded.get("step_id"),
                           approval_id=request_id, message=recorded.get("error_message"))
    if status is ApprovalStatus.REJECTED:
        reason = next((d.reason for d in reversed(request.history)
                       if d.action == "rejected" and d.reason), None)
        return NodeOutcome(outcome=Outcome.REJECTED.value, proposal=first.proposal,
                           step_id=first.step_id, approval_id=request_id,
                           message=reason)
    return NodeOutcome(outcome=status.value if status is ApprovalStatus.EXPIRED
                       else Outcome.AWAITING_APPROVAL.value, proposal=first.proposal,
                       step_id=first.step_id, approval_id=request_id,
                       message=f"approval request {request_id} is {status.value}")
