"""closedloop.Run: the run id in every step, budgets refused before the step acts, halts,
the run's own outcome and record; sync and async."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest

import closedloop as cl
from closedloop import ErrorType, Outcome
from closedloop.loop import Admission
from closedloop.telemetry import MemoryExporter, Telemetry


class Calls:
    """An agent that counts its calls and reports the usage it is told to."""

    def __init__(self, tokens: tuple[int, int] = (0, 0), cost: float | None = None) -> None:
        self.n = 0
        self.tokens = tokens
        self.cost = cost

    def __call__(self, task: Any, attempt: cl.Attempt) -> Any:
        self.n += 1
        attempt.record_usage(*self.tokens, cost_usd=self.cost)
        return task


def loop(store: cl.Store, agent: Any = None, **kw: Any) -> cl.Loop:
    return cl.Loop(agent or Calls(), task_type=kw.pop("task_type", "t"), store=store,
                   guards=kw.pop("guards", ()), **kw)


def stored(store: cl.Store) -> list[cl.StepEvent]:
    assert store.flush()
    return list(store.events())


# ----- the run id -----------------------------------------------------------------------------

def test_every_step_inside_a_run_records_its_id_and_steps_outside_do_not(
        memory_store: cl.Store) -> None:
    lp = loop(memory_store)
    lp.run(0)
    with cl.Run("task", store=memory_store) as run:
        assert cl.current_run_id() == run.run_id and cl.current_run() is run
        lp.run(1)
        lp.run(2)
    assert cl.current_run_id() is None
    lp.run(3)
    assert [e.run_id for e in stored(memory_store)] == [None, run.run_id, run.run_id, None]


def test_a_nested_step_joins_the_run_and_an_explicit_run_id_is_not_governed(
        memory_store: cl.Store) -> None:
    inner = loop(memory_store, task_type="inner")
    outer = loop(memory_store, lambda task, attempt: inner.run(task).event, task_type="outer")
    with cl.Run(store=memory_store, max_steps=2) as run:
        outer.run(1)  # two steps of the run: outer, and inner as its child
        other = inner.run(2, run_id="elsewhere")  # another run's step: not refused, not counted
    events = {e.task_type + str(e.run_id == run.run_id): e for e in stored(memory_store)}
    assert events["innerTrue"].parent_step_id == events["outerTrue"].step_id
    assert other.ok and other.event is not None and other.event.run_id == "elsewhere"
    assert run.steps == 2 and run.outcome is Outcome.SUCCEEDED


async def test_concurrent_tasks_of_an_async_run_share_its_id(memory_store: cl.Store) -> None:
    lp = loop(memory_store)
    async with cl.Run(store=memory_store) as run:
        await asyncio.gather(*(lp.arun(i) for i in range(5)))
    assert {e.run_id for e in stored(memory_store)} == {run.run_id}
    assert run.steps == 5


def test_a_thread_joins_the_run_when_the_context_is_copied(memory_store: cl.Store) -> None:
    lp = loop(memory_store)
    with cl.Run(store=memory_store) as run:
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(lp.run, 1))
        t.start()
        t.join()
    assert [e.run_id for e in stored(memory_store)] == [run.run_id]


# ----- budgets --------------------------------------------------------------------------------

def test_the_step_after_the_step_budget_is_refused_before_the_agent_runs(
        memory_store: cl.Store) -> None:
    agent = Calls()
    lp = loop(memory_store, agent)
    with cl.Run("r", store=memory_store, max_steps=2) as run:
        assert lp.run(1).ok and lp.run(2).ok
        refused = lp.run(3)
        again = lp.run(4)
    assert agent.n == 2
    assert refused.outcome is Outcome.BUDGET_EXCEEDED
    assert refused.error_type is ErrorType.BUDGET_EXCEEDED
    assert "step budget spent: 2 of 2" in (refused.error_message or "")
    assert again.outcome is Outcome.BUDGET_EXCEEDED
    assert run.outcome is Outcome.BUDGET_EXCEEDED and (run.steps, run.refused) == (2, 2)
    assert [e.outcome for e in stored(memory_store)] == ["succeeded", "succeeded",
                                                         "budget_exceeded", "budget_exceeded"]
    with pytest.raises(cl.NotExecuted):
        refused.raise_for_outcome()


async def test_the_token_budget_counts_every_step_and_refuses_once_spent(
        memory_store: cl.Store) -> None:
    agent = Calls(tokens=(300, 100))
    lp = loop(memory_store, agent)
    async with cl.Run(store=memory_store, max_tokens=1000) as run:
        results = [await lp.arun(i) for i in range(4)]
    assert [r.outcome for r in results] == [Outcome.SUCCEEDED] * 3 + [Outcome.BUDGET_EXCEEDED]
    assert agent.n == 3  # 1200 tokens after the third step: the fourth never ran
    assert (run.input_tokens, run.output_tokens) == (900, 300)
    assert run.outcome is Outcome.BUDGET_EXCEEDED
    assert "token budget spent: 1200 of 1000" in (run.message or "")


def test_model_usage_outside_any_step_counts_against_the_token_budget(
        memory_store: cl.Store) -> None:
    agent = Calls()
    lp = loop(memory_store, agent)
    with cl.Run(store=memory_store, max_tokens=500) as run:
        run.record_usage(400, 99)
        assert lp.run(1).ok
        run.record_usage(0, 1)
        assert lp.run(2).outcome is Outcome.BUDGET_EXCEEDED
    assert agent.n == 1


def test_the_cost_budget(memory_store: cl.Store) -> None:
    agent = Calls(cost=0.4)
    lp = loop(memory_store, agent)
    with cl.Run(store=memory_store, max_cost_usd=1.0) as run:
        outcomes = [lp.run(i).outcome for i in range(4)]
    assert outcomes == [Outcome.SUCCEEDED] * 3 + [Outcome.BUDGET_EXCEEDED]
    assert run.cost_usd == pytest.approx(1.2)
    assert "cost budget spent" in (run.message or "")


def test_the_wall_time_budget_by_the_runs_clock(memory_store: cl.Store) -> None:
    now = [100.0]
    lp = loop(memory_store)
    with cl.Run(store=memory_store, max_seconds=30, clock=lambda: now[0]) as run:
        assert lp.run(1).ok
        now[0] = 129.9
        assert lp.run(2).ok
        now[0] = 130.0
        assert lp.run(3).outcome is Outcome.BUDGET_EXCEEDED
    assert "time budget spent: 30.0s of 30s" in (run.message or "")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, float("nan")])
def test_a_bad_budget_is_a_config_error(bad: Any) -> None:
    with pytest.raises(cl.ConfigError, match="max_steps"):
        cl.Run(max_steps=bad)


# ----- halts and outcomes ---------------------------------------------------------------------

def test_a_halted_run_refuses_every_later_step_and_ends_halted(memory_store: cl.Store) -> None:
    agent = Calls()
    lp = loop(memory_store, agent)
    with cl.Run(store=memory_store) as run:
        assert lp.run(1).ok
        run.halt("operator says stop")
        refused = lp.run(2)
    assert agent.n == 1
    assert (refused.outcome, refused.error_type) == (Outcome.HALTED, ErrorType.RUN_HALTED)
    assert run.outcome is Outcome.HALTED and "operator says stop" in (run.message or "")


class HaltOne:
    """A guard that halts one task type, as fault control does."""

    def __init__(self, task_type: str) -> None:
        self.task_type = task_type

    def admit(self, task_type: str) -> Admission | None:
        return Admission.halted(f"{task_type} halted") if task_type == self.task_type else None

    def observe(self, event: cl.StepEvent) -> None:
        pass


async def test_a_halted_task_type_halts_the_run_for_every_task_type(
        memory_store: cl.Store) -> None:
    agent = Calls()
    bad = loop(memory_store, agent, task_type="deploy", guards=(HaltOne("deploy"),))
    good = loop(memory_store, agent, task_type="read")
    async with cl.Run(store=memory_store) as run:
        assert (await good.arun(1)).ok
        assert (await bad.arun(2)).outcome is Outcome.HALTED
        later = await good.arun(3)
    assert agent.n == 1
    assert later.error_type is ErrorType.RUN_HALTED
    assert run.outcome is Outcome.HALTED and "deploy" in (run.message or "")


def test_an_exception_ends_the_run_in_error_and_propagates(memory_store: cl.Store) -> None:
    run = cl.Run(store=memory_store)
    with pytest.raises(KeyError), run:
        raise KeyError("boom")
    assert run.outcome is Outcome.ERROR and "KeyError" in (run.message or "")


def test_abort_ends_the_run_aborted(memory_store: cl.Store) -> None:
    agent = Calls()
    lp = loop(memory_store, agent)
    with cl.Run(store=memory_store) as run:
        run.abort("wrong ticket")
        assert lp.run(1).error_type is ErrorType.RUN_HALTED
    assert agent.n == 0
    assert run.outcome is Outcome.ABORTED and "wrong ticket" in (run.message or "")


def test_a_run_is_entered_once() -> None:
    run = cl.Run(store=None)
    with run:
        pass
    with pytest.raises(cl.ConfigError, match="used once"), run:
        pass


def test_a_child_run_counts_against_its_parents_budget(memory_store: cl.Store) -> None:
    agent = Calls(tokens=(10, 0))
    lp = loop(memory_store, agent)
    with cl.Run("parent", store=memory_store, max_steps=3) as parent:
        lp.run(1)
        with cl.Run("child", store=memory_store) as child:
            results = [lp.run(i).outcome for i in range(3)]
    assert results == [Outcome.SUCCEEDED, Outcome.SUCCEEDED, Outcome.BUDGET_EXCEEDED]
    assert child.outcome is Outcome.BUDGET_EXCEEDED and child.steps == 2
    assert parent.steps == 3 and parent.input_tokens == 30
    assert child.record().parent_run_id == parent.run_id


# ----- the record -----------------------------------------------------------------------------

def test_the_record_is_written_when_the_run_starts_and_when_it_ends(
        memory_store: cl.Store) -> None:
    agent = Calls(tokens=(5, 7), cost=0.01)
    lp = loop(memory_store, agent)
    with cl.Run("ticket-42", store=memory_store, max_steps=1,
                labels={"tier": "gold"}) as run:
        assert memory_store.flush()
        started = memory_store.runs().get_run(run.run_id)
        assert started is not None and started.outcome == "running" and started.ended is None
        lp.run(1)
        lp.run(2)
    assert memory_store.flush()
    record = memory_store.runs().get_run(run.run_id)
    assert record is not None
    assert (record.name, record.outcome, record.error_type) == (
        "ticket-42", "budget_exceeded", "budget_exceeded")
    assert (record.steps, record.refused, record.failed) == (1, 1, 0)
    assert (record.input_tokens, record.output_tokens) == (5, 7)
    assert record.cost_usd == pytest.approx(0.01)
    assert record.budgets == {"max_steps": 1} and record.labels == {"tier": "gold"}
    assert record.ended is not None and record.ended >= record.started


def test_failed_steps_are_counted(memory_store: cl.Store) -> None:
    lp = loop(memory_store, validators=[lambda p: "never valid"], max_attempts=1)
    with cl.Run(store=memory_store) as run:
        lp.run(1)
    assert run.failed == 1 and run.outcome is Outcome.SUCCEEDED


def test_the_record_is_redacted_when_stored(memory_store: cl.Store) -> None:
    secret = "sk-proj-" + "Q" * 40
    with cl.Run(f"key {secret}", store=memory_store) as run:
        run.halt(f"leaked {secret}")
    assert memory_store.flush()
    record = memory_store.runs().get_run(run.run_id)
    assert record is not None and record.name is not None and record.message is not None
    assert "QQQQ" not in record.name + record.message


# ----- spans ----------------------------------------------------------------------------------

def test_the_run_is_one_trace_whose_root_names_it(memory_store: cl.Store) -> None:
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter])
    lp = loop(memory_store, telemetry=pipeline)
    with cl.Run("triage", store=memory_store, telemetry=pipeline, max_steps=1) as run:
        lp.run(1)
        lp.run(2)
        with pipeline.span("user work") as user:
            pass
    pipeline.flush(5.0)
    spans = exporter.finished()
    (root,) = [s for s in spans if s.name == "invoke_agent triage"]
    assert {s.trace_id for s in spans} == {root.trace_id}
    assert root.attributes["closedloop.run_id"] == run.run_id
    assert root.attributes["closedloop.outcome"] == "budget_exceeded"
    assert root.attributes["closedloop.run.steps"] == 1
    steps = [s for s in spans if s.name == "closedloop.step"]
    assert len(steps) == 2 and all(s.parent_id == root.span_id for s in steps)
    assert all(s.attributes["closedloop.run_id"] == run.run_id for s in steps)
    assert user.record.attributes["closedloop.run_id"] == run.run_id
    assert {e.trace_id for e in stored(memory_store)} == {root.trace_id}
    pipeline.shutdown()


class Unreadable:
    """A guard whose control state cannot be read."""

    def admit(self, task_type: str) -> None:
        raise cl.ControlUnavailable("ledger unreadable")

    def observe(self, event: cl.StepEvent) -> None:
        pass


@pytest.mark.parametrize("traced", [False, True])
def test_tracing_never_changes_a_refusal(memory_store: cl.Store, traced: bool) -> None:
    pipeline = Telemetry([MemoryExporter()]) if traced else None
    agent = Calls()
    lp = loop(memory_store, agent, guards=(Unreadable(),), telemetry=pipeline)
    result = lp.run(1)  # refused (fail closed), traced or not: never raised
    assert result.outcome is Outcome.CONTROL_UNAVAILABLE and agent.n == 0
    if pipeline is not None:
        pipeline.shutdown()


def test_traces_list_shows_a_run_as_one_trace_with_its_name_and_outcome(
        store: cl.Store) -> None:
    from closedloop.telemetry import StoreExporter, span_store_for

    pipeline = Telemetry([StoreExporter(store)])
    lp = loop(store, telemetry=pipeline)
    with cl.Run("triage", store=store, telemetry=pipeline, max_steps=1) as run:
        lp.run(1)
        lp.run(2)
    pipeline.shutdown()
    (trace,) = span_store_for(store).traces(limit=10).traces
    assert (trace.task_type, trace.outcome) == ("triage", "budget_exceeded")
    assert trace.spans > 2 and run.outcome is Outcome.BUDGET_EXCEEDED
