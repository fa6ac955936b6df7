"""closedloop.tool: a function an agent calls, guarded as a closed-loop step; sync and async."""

from __future__ import annotations

import inspect
import typing
from typing import Any, Literal

import pytest

import closedloop as cl
from closedloop import ErrorType, Outcome
from closedloop.loop import Admission
from closedloop.telemetry import MemoryExporter, Telemetry


class Bucket:
    """The world a tool acts on."""

    def __init__(self) -> None:
        self.items: dict[str, int] = {}
        self.calls = 0


def make(world: Bucket, store: cl.Store, **kw: Any) -> Any:
    @cl.tool(store=store, guards=(), **kw)
    def put(name: str, size: int = 1, kind: Literal["a", "b"] = "a") -> str:
        """Put an item in the bucket.

        More text the model does not need."""
        world.calls += 1
        world.items[name] = size if size < 100 else 99  # the outcome drifts above 99
        return f"put {name}"
    return put


def make_async(world: Bucket, store: cl.Store, **kw: Any) -> Any:
    @cl.tool(store=store, guards=(), **kw)
    async def put(name: str, size: int = 1) -> str:
        """Put an item in the bucket."""
        world.calls += 1
        world.items[name] = size if size < 100 else 99
        return f"put {name}"
    return put


def size_matches(world: Bucket) -> Any:
    def check(call: dict[str, Any], result: str) -> str | None:
        got = world.items.get(call["name"])
        return None if got == call.get("size", 1) else f"size is {got}, asked {call['size']}"
    return check


def events(store: cl.Store) -> list[cl.StepEvent]:
    assert store.flush()
    return list(store.events())


# ----- the function as frameworks see it --------------------------------------------------------

def test_the_wrapper_keeps_the_functions_name_doc_signature_and_hints(
        memory_store: cl.Store) -> None:
    put = make(Bucket(), memory_store)
    assert put.__name__ == "put" and put.__doc__.startswith("Put an item")
    assert inspect.signature(put) == inspect.signature(put.__wrapped__)
    assert list(inspect.signature(put).parameters) == ["name", "size", "kind"]
    assert typing.get_type_hints(put)["size"] is int
    assert not inspect.iscoroutinefunction(put)
    aput = make_async(Bucket(), memory_store)
    assert inspect.iscoroutinefunction(aput) and aput.__name__ == "put"


def test_a_valid_call_returns_the_result_and_is_recorded(memory_store: cl.Store) -> None:
    world = Bucket()
    put = make(world, memory_store, verifiers=[size_matches(world)])
    assert put("x", size=3) == "put x"
    (event,) = events(memory_store)
    assert (event.task_type, event.agent_id, event.outcome) == ("put", "tool:put", "succeeded")
    assert event.proposal == '{"name":"x","size":3}'
    assert event.verification_passed is True


# ----- arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "kwargs", "expected"), [
    ((), {"size": 2}, "missing name: required argument 'name' is missing"),
    ((), {"name": "x", "colour": "red"}, "unexpected colour: unexpected argument 'colour'"),
    ((), {"name": 3}, "type name: must be str, got int 3"),
    ((), {"name": "x", "size": "2"}, "type size: must be int, got str '2'"),
    ((), {"name": "x", "size": True}, "type size: must be int, got bool True"),
    ((), {"name": "x", "kind": "c"}, "type kind: must be Literal['a', 'b'], got str 'c'"),
    (("x",), {"name": "y"}, "argument 'name' was given twice"),
    (("x", 1, "a", 4), {}, "1 positional argument(s) too many"),
])
def test_invalid_arguments_are_returned_to_the_model_and_nothing_runs(
        memory_store: cl.Store, args: tuple[Any, ...], kwargs: dict[str, Any],
        expected: str) -> None:
    world = Bucket()
    put = make(world, memory_store)
    with cl.Run(store=memory_store):
        answer = put(*args, **kwargs)
    assert isinstance(answer, cl.ToolFeedback) and isinstance(answer, str)
    assert expected in answer, answer
    assert answer.startswith("closedloop: put was not called: its arguments are invalid")
    assert answer.outcome == "failed" and answer.error_type == "validation"
    assert world.calls == 0
    (event,) = events(memory_store)
    assert (event.outcome, event.error_type, event.validation_passed) == (
        "failed", "validation", False)


def test_the_users_validators_see_the_arguments(memory_store: cl.Store) -> None:
    world = Bucket()
    put = make(world, memory_store,
               validators=[lambda call: None if call["name"].islower() else "name: lower case"])
    answer = put(name="X")
    assert "lower case" in answer and world.calls == 0
    assert put(name="x") == "put x"


def test_invalid_calls_are_bounded_per_run(memory_store: cl.Store) -> None:
    world = Bucket()
    put = make(world, memory_store, max_invalid=2)
    with cl.Run(store=memory_store):
        assert "invalid call 1 of at most 2" in put(name=1)
        assert put(name="ok") == "put ok"  # a valid call in between does not reset the count
        assert "invalid call 2 of at most 2" in put(name=2)
        with pytest.raises(cl.ToolRefused, match="3 invalid calls in run") as refused:
            put(name=3)
    assert refused.value.result.error_type is ErrorType.VALIDATION
    with cl.Run(store=memory_store):  # another run starts afresh
        assert "invalid call 1 of" in put(name=4)


def test_outside_a_run_invalid_calls_are_bounded_in_a_row(memory_store: cl.Store) -> None:
    put = make(Bucket(), memory_store, max_invalid=1)
    assert "invalid call 1 of at most 1" in put(name=1)
    assert put(name="ok") == "put ok"  # resets the streak
    assert "invalid call 1 of at most 1" in put(name=1)
    with pytest.raises(cl.ToolRefused, match="2 invalid calls in a row"):
        put(name=1)


async def test_an_async_tool_validates_and_acts(memory_store: cl.Store) -> None:
    world = Bucket()
    put = make_async(world, memory_store, verifiers=[size_matches(world)])
    async with cl.Run(store=memory_store) as run:
        answer = await put(nam="x")
        assert "missing name" in answer and world.calls == 0
        assert await put(name="x", size=2) == "put x"
    assert world.items == {"x": 2}
    assert [e.run_id for e in events(memory_store)] == [run.run_id] * 2


def test_the_functions_exception_propagates_after_it_is_recorded(
        memory_store: cl.Store) -> None:
    @cl.tool(store=memory_store, guards=())
    def explode(n: int) -> int:
        raise ValueError(f"no {n}")

    with pytest.raises(ValueError, match="no 3"):
        explode(3)
    (event,) = events(memory_store)
    assert (event.outcome, event.error_type) == ("error", "executor")


# ----- verification ----------------------------------------------------------------------------

def test_a_mismatch_is_returned_with_its_differences(memory_store: cl.Store) -> None:
    world = Bucket()
    put = make(world, memory_store, verifiers=[size_matches(world)])
    answer = put(name="x", size=500)
    assert isinstance(answer, cl.ToolFeedback)
    assert answer.startswith("closedloop: put ran, but its outcome does not match the intent")
    assert "size is 99, asked 500" in answer
    assert answer.error_type == "verification"
    (event,) = events(memory_store)
    assert event.verification_passed is False


# ----- the gate --------------------------------------------------------------------------------

def test_a_suggest_only_tool_never_acts(memory_store: cl.Store) -> None:
    world = Bucket()
    put = make(world, memory_store, autonomy="suggest")
    answer = put(name="x")
    assert "not executed: this tool only suggests" in answer and world.calls == 0
    assert answer.outcome == "suggested"


def test_the_approver_decides(memory_store: cl.Store) -> None:
    world = Bucket()
    asked: list[Any] = []

    def approver(task: Any, proposal: dict[str, Any]) -> bool:
        asked.append(dict(proposal))
        return bool(proposal["name"] != "prod")

    put = make(world, memory_store, autonomy="approve", approver=approver)
    assert "the approver rejected it" in put(name="prod")
    assert put(name="dev") == "put dev"
    assert asked == [{"name": "prod"}, {"name": "dev"}] and world.items == {"dev": 1}


def test_irreversible_calls_above_the_risk_threshold_need_approval(
        memory_store: cl.Store) -> None:
    world = Bucket()
    asked: list[str] = []

    def approver(task: Any, proposal: dict[str, Any]) -> bool:
        asked.append(proposal["name"])
        return False

    put = make(world, memory_store, irreversible=True, approver=approver, approve_above=0.5,
               risk=lambda call: 0.9 if call["name"].startswith("prod") else 0.1)
    assert put(name="dev") == "put dev"  # below the threshold: autonomous
    assert "rejected" in put(name="prod-db")
    assert asked == ["prod-db"]
    with cl.Run(store=memory_store, approve_irreversible_above=0.95):
        assert put(name="prod-db") == "put prod-db"  # the run's threshold wins
    with cl.Run(store=memory_store, approve_irreversible_above=0.0):
        assert "rejected" in put(name="dev-2")
    assert asked == ["prod-db", "dev-2"]


def test_an_irreversible_call_without_an_approver_awaits_approval(
        memory_store: cl.Store) -> None:
    world = Bucket()
    put = make(world, memory_store, irreversible=True)
    answer = put(name="x")
    assert "needs a human's approval" in answer and answer.outcome == "awaiting_approval"
    assert world.calls == 0


def test_an_irreversible_tool_cannot_have_a_compensation(memory_store: cl.Store) -> None:
    with pytest.raises(cl.ConfigError, match="irreversible"):
        make(Bucket(), memory_store, irreversible=True, compensate=lambda r, **kw: None)


# ----- refusals --------------------------------------------------------------------------------

def test_a_spent_run_budget_raises_tool_refused(memory_store: cl.Store) -> None:
    world = Bucket()
    put = make(world, memory_store)
    with cl.Run(store=memory_store, max_steps=1) as run:
        put(name="a")
        with pytest.raises(cl.ToolRefused, match="step budget spent") as refused:
            put(name="b")
    assert refused.value.result.outcome is Outcome.BUDGET_EXCEEDED
    assert world.calls == 1 and run.outcome is Outcome.BUDGET_EXCEEDED


class Halted:
    def admit(self, task_type: str) -> Admission:
        return Admission.halted(f"{task_type} halted by a human")

    def observe(self, event: cl.StepEvent) -> None:
        pass


async def test_a_halted_task_type_raises_tool_refused(memory_store: cl.Store) -> None:
    @cl.tool(store=memory_store, guards=(Halted(),))
    async def act(n: int) -> int:
        return n

    with pytest.raises(cl.ToolRefused, match="halted by a human"):
        await act(1)


# ----- tracing ---------------------------------------------------------------------------------

def test_each_call_is_an_execute_tool_span(memory_store: cl.Store) -> None:
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter])
    world = Bucket()
    put = make(world, memory_store, verifiers=[size_matches(world)], telemetry=pipeline)
    with cl.Run("agent", store=memory_store, telemetry=pipeline) as run:
        put(name="x")
        put(name=1)
    pipeline.flush(5.0)
    spans = exporter.finished()
    tools = [s for s in spans if s.name == "execute_tool put"]
    assert len(tools) == 2
    ok, bad = tools
    assert ok.attributes["gen_ai.operation.name"] == "execute_tool"
    assert ok.attributes["gen_ai.tool.name"] == "put"
    assert ok.attributes["gen_ai.tool.description"] == "Put an item in the bucket."
    assert ok.attributes["closedloop.outcome"] == "succeeded"
    assert ok.attributes["closedloop.run_id"] == run.run_id
    assert bad.attributes["closedloop.outcome"] == "failed"
    children = {s.name for s in spans if s.parent_id == ok.span_id}
    assert children == {"closedloop.validate", "closedloop.act", "closedloop.verify"}
    assert not [s for s in spans if s.name.startswith("invoke_agent tool:")]
    pipeline.shutdown()


def test_the_runtimes_pipeline_traces_tools_it_installs_later(memory_store: cl.Store) -> None:
    put = make(Bucket(), memory_store)
    put(name="untraced")
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter])
    previous = cl.current_runtime().set_telemetry(pipeline)
    try:
        put(name="traced")
    finally:
        cl.current_runtime().set_telemetry(previous)
    pipeline.flush(5.0)
    assert [s.name for s in exporter.finished() if s.name.startswith("execute_tool")] == [
        "execute_tool put"]
    pipeline.shutdown()


def test_a_tool_follows_the_runtime_that_configure_installs(tmp_path: Any) -> None:
    @cl.tool
    def act(n: int) -> int:
        return n

    first = cl.configure(store="memory://")
    act(1)
    second = cl.configure(store="memory://")
    act(2)
    assert second.store.flush()
    assert [e.proposal for e in second.store.events()] == ['{"n":2}']
    assert first is not second


def test_a_refusal_leaving_the_run_ends_it_as_its_budget_says(memory_store: cl.Store) -> None:
    put = make(Bucket(), memory_store)
    run = cl.Run(store=memory_store, max_steps=1)

    def agent() -> None:
        with run:
            put(name="a")
            put(name="b")  # raises ToolRefused, which the agent does not catch

    with pytest.raises(cl.ToolRefused):
        agent()
    assert run.outcome is Outcome.BUDGET_EXCEEDED


def test_feedback_survives_a_deep_copy_and_pickling(memory_store: cl.Store) -> None:
    # agent frameworks deep-copy tool outputs into their run state (the Agents SDK does)
    import copy
    import pickle

    put = make(Bucket(), memory_store)
    answer = put(name=3)
    for clone in (copy.deepcopy(answer), pickle.loads(pickle.dumps(answer))):
        assert isinstance(clone, cl.ToolFeedback) and clone == answer
        assert (clone.outcome, clone.error_type, clone.step_id, clone.issues) == (
            answer.outcome, answer.error_type, answer.step_id, answer.issues)


def test_the_argument_check_takes_absent_fitting_and_subclassed_arguments_and_checks_the_rest(
        ) -> None:
    from closedloop.runs._tool import ToolCall, _ArgumentCheck, _Signature

    class Name(str):
        pass

    def put(name: str, size: int = 1, ratio: float = 1.0,
            kind: Literal["a", "b"] = "a") -> None:
        return None

    check = _ArgumentCheck(_Signature(put, True))
    fine: list[dict[str, Any]] = [
        {"name": "x"}, {"name": "x", "size": 2, "ratio": 2, "kind": "b"},
        {"name": Name("x")}, {"name": "x", "ratio": 0.5}]
    for args in fine:
        assert check(ToolCall(args)) is None, args
    wrong: list[tuple[dict[str, Any], str]] = [
        ({"name": "x", "kind": "c"}, "kind"), ({"name": "x", "size": True}, "size"),
        ({"name": "x", "ratio": "1"}, "ratio"), ({"name": 1, "kind": "a"}, "name")]
    for args, name in wrong:
        verdict = check(ToolCall(args))
        assert verdict is not None and [i.location for i in verdict.issues] == [name], args
