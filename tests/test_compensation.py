"""Compensation: registered rollbacks run newest first when a step's verification fails or
the run is aborted, each checked and recorded; sync and async."""

from __future__ import annotations

from typing import Any

import pytest

import closedloop as cl
from closedloop import Outcome
from closedloop.telemetry import MemoryExporter, Telemetry


class World:
    """Resources created by actions, and the order in which they were undone."""

    def __init__(self) -> None:
        self.live: set[str] = set()
        self.undone: list[str] = []

    def remove(self, name: str) -> None:
        self.undone.append(name)
        self.live.discard(name)

    def gone(self, name: str) -> str | None:
        return None if name not in self.live else f"{name} still exists"


def events(store: cl.Store) -> list[cl.StepEvent]:
    assert store.flush()
    return list(store.events())


def creator(world: World, store: cl.Store, *, verify: bool = True) -> cl.Loop:
    """A loop whose executor creates the proposal's resource and registers its removal."""
    def create(name: str) -> str:
        world.live.add(name)
        run = cl.current_run()
        assert run is not None
        run.on_rollback(world.remove, name, check=world.gone, label=f"remove {name}")
        return name

    def exists(name: str, result: str) -> str | None:
        return None if not name.startswith("bad") else f"{name} came up broken"

    return cl.Loop(lambda task, attempt: task, task_type="create", executor=create,
                   verifiers=[exists] if verify else [], store=store, guards=())


def test_an_aborted_run_undoes_everything_newest_first(memory_store: cl.Store) -> None:
    world = World()
    lp = creator(world, memory_store)
    with cl.Run("build", store=memory_store) as run:
        for name in ("net", "disk", "vm"):
            assert lp.run(name).ok
        run.abort("the ticket was cancelled")
    assert world.undone == ["vm", "disk", "net"] and world.live == set()
    assert run.outcome is Outcome.ABORTED and run.compensated == 3
    comps = [e for e in events(memory_store) if e.agent_id == "closedloop.compensate"]
    steps = {e.step_id: e.trace_id for e in events(memory_store) if e.task_type == "create"
             and e.agent_id != "closedloop.compensate"}
    assert [e.outcome for e in comps] == ["compensated"] * 3
    assert [e.detail["compensation"] for e in comps if e.detail] == [
        "remove vm", "remove disk", "remove net"]
    assert all(e.parent_step_id in steps and e.run_id == run.run_id for e in comps)
    assert all(e.verification_passed is True and e.task_type == "create" for e in comps)
    assert all("run aborted: " in (e.detail or {}).get("reason", "") for e in comps)


def test_an_exception_leaving_the_run_undoes_it_and_still_propagates(
        memory_store: cl.Store) -> None:
    world = World()
    lp = creator(world, memory_store, verify=False)
    run = cl.Run(store=memory_store)

    def agent_task() -> None:
        with run:
            lp.run("a")
            lp.run("b")
            raise RuntimeError("agent crashed")

    with pytest.raises(RuntimeError, match="agent crashed"):
        agent_task()
    assert world.undone == ["b", "a"]
    assert run.outcome is Outcome.ERROR


def test_a_run_that_succeeds_undoes_nothing(memory_store: cl.Store) -> None:
    world = World()
    lp = creator(world, memory_store)
    with cl.Run(store=memory_store) as run:
        lp.run("a")
    assert world.undone == [] and world.live == {"a"} and run.compensated == 0


def test_a_budget_ending_undoes_only_when_asked(memory_store: cl.Store) -> None:
    world = World()
    lp = creator(world, memory_store)
    with cl.Run(store=memory_store, max_steps=1):
        lp.run("a")
        lp.run("b")
    assert world.undone == []
    with cl.Run(store=memory_store, max_steps=1,
                rollback_on=("error", "aborted", "budget_exceeded")) as run:
        lp.run("c")
        lp.run("d")
    assert world.undone == ["c"] and run.outcome is Outcome.BUDGET_EXCEEDED


def test_a_failed_verification_undoes_that_step_at_once(memory_store: cl.Store) -> None:
    world = World()
    lp = creator(world, memory_store)
    with cl.Run(store=memory_store) as run:
        assert lp.run("good").ok
        failed = lp.run("bad-vm")
        assert failed.outcome is Outcome.FAILED
        assert world.undone == ["bad-vm"]  # before the step returned; "good" stays
    assert world.live == {"good"} and run.compensated == 1
    (comp,) = [e for e in events(memory_store) if e.agent_id == "closedloop.compensate"]
    assert comp.parent_step_id == failed.step_id and comp.trace_id == failed.trace_id
    assert "verification failed: " in (comp.detail or {})["reason"]
    assert "bad-vm came up broken" in (comp.detail or {})["reason"]


async def test_async_compensations_under_async_with(memory_store: cl.Store) -> None:
    world = World()

    async def remove(name: str) -> None:
        world.remove(name)

    async def gone(name: str) -> str | None:
        return world.gone(name)

    async def create(name: str) -> str:
        world.live.add(name)
        run = cl.current_run()
        assert run is not None
        run.on_rollback(remove, name, check=gone)
        return name

    lp = cl.Loop(lambda task, attempt: task, task_type="create", executor=create,
                 verifiers=[lambda n, r: None if n != "bad" else "broken"],
                 store=memory_store, guards=())
    async with cl.Run(store=memory_store) as run:
        await lp.arun("a")
        await lp.arun("bad")  # undone at once, awaited by the async driver
        assert world.undone == ["bad"]
        await lp.arun("b")
        run.abort("stop")
    assert world.undone == ["bad", "b", "a"] and run.compensated == 3


def test_a_rollback_that_raises_or_leaves_the_state_is_recorded_as_failed(
        memory_store: cl.Store) -> None:
    world = World()

    def broken(name: str) -> None:
        raise OSError(f"cannot delete {name}")

    def forgetful(name: str) -> None:
        world.undone.append(name)  # says it removed it, but did not

    with cl.Run(store=memory_store) as run:
        world.live |= {"x", "y", "z"}
        run.on_rollback(world.remove, "x", check=world.gone)
        run.on_rollback(broken, "y", check=world.gone)
        run.on_rollback(forgetful, "z", check=world.gone)
        run.abort("test")
    assert world.undone == ["z", "x"]  # the one that raised did not stop the others
    comps = {(e.detail or {})["compensation"]: e for e in events(memory_store)}
    assert comps["forgetful"].outcome == "compensation_failed"
    assert "forgetful.check: state not restored: [error] invalid: z still exists" in (
        comps["forgetful"].error_message or "")
    assert comps["broken"].outcome == "compensation_failed"
    assert "OSError: cannot delete y" in (comps["broken"].error_message or "")
    assert comps["remove"].outcome == "compensated"
    assert run.compensated == 1 and run.failed == 2
    assert all(e.error_type == ("compensation" if e.outcome != "compensated" else None)
               for e in comps.values())


def test_an_async_rollback_in_a_sync_run_fails_clearly(memory_store: cl.Store) -> None:
    async def remove(name: str) -> None:
        pass

    with cl.Run(store=memory_store) as run:
        run.on_rollback(remove, "x")
        run.abort("test")
    (event,) = events(memory_store)
    assert event.outcome == "compensation_failed"
    assert "is async; use `async with Run(...)`" in (event.error_message or "")


# ----- tools -----------------------------------------------------------------------------------

def guarded(world: World, store: cl.Store, **kw: Any) -> Any:
    def undo(result: str, name: str) -> None:
        world.remove(name)

    def undone(result: str, name: str) -> str | None:
        return world.gone(name)

    @cl.tool(store=store, guards=(), compensate=undo, verify_compensation=undone,
             verifiers=[lambda call, result: None if not call["name"].startswith("bad")
                        else "came up broken"], **kw)
    def create(name: str) -> str:
        world.live.add(name)
        return name
    return create


def test_a_tools_mismatch_is_rolled_back_then_told_to_the_model(
        memory_store: cl.Store) -> None:
    world = World()
    create = guarded(world, memory_store)
    with cl.Run(store=memory_store) as run:
        answer = create(name="bad-1")
        assert "came up broken" in answer and "rolled back" in answer
        assert world.undone == ["bad-1"]
        create(name="ok")
        run.abort("done testing")
    assert world.undone == ["bad-1", "ok"] and world.live == set()
    outcomes = [e.outcome for e in events(memory_store)]
    assert outcomes == ["failed", "compensated", "succeeded", "compensated"]


def test_a_tools_mismatch_outside_a_run_is_rolled_back_too(memory_store: cl.Store) -> None:
    world = World()
    create = guarded(world, memory_store)
    answer = create(name="bad-1")
    assert "rolled back" in answer and world.undone == ["bad-1"]
    failed, comp = events(memory_store)
    assert comp.outcome == "compensated" and comp.parent_step_id == failed.step_id
    assert comp.run_id is None


async def test_an_async_tools_compensation(memory_store: cl.Store) -> None:
    world = World()

    async def undo(result: str, name: str) -> None:
        world.remove(name)

    @cl.tool(store=memory_store, guards=(), compensate=undo,
             verifiers=[lambda call, result: "broken" if call["name"] == "bad" else None])
    async def create(name: str) -> str:
        world.live.add(name)
        return name

    answer = await create(name="bad")
    assert "rolled back" in answer and world.undone == ["bad"]
    async with cl.Run(store=memory_store) as run:
        await create(name="a")
        await create(name="b")
        run.abort("x")
    assert world.undone == ["bad", "b", "a"]


def test_compensations_are_spans_of_the_run(memory_store: cl.Store) -> None:
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter])
    world = World()
    lp = creator(world, memory_store)
    with cl.Run("r", store=memory_store, telemetry=pipeline) as run:
        lp.run("a")
        run.abort("x")
    pipeline.flush(5.0)
    spans = exporter.finished()
    (root,) = [s for s in spans if s.name == "invoke_agent r"]
    (comp,) = [s for s in spans if s.name == "closedloop.compensate remove a"]
    assert comp.parent_id == root.span_id
    assert comp.attributes["closedloop.outcome"] == "compensated"
    assert root.attributes["closedloop.outcome"] == "aborted"
    pipeline.shutdown()
