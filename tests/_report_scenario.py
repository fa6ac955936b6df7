"""Real :class:`closedloop.Loop` runs with known faults, latencies and tokens, for report tests.

``run_scenario`` records ten steps over three task types; the tests work the report's figures
out by hand from them. Latencies come from an injected clock that only the agent moves, so each
step's latency is exactly its task's ``ms``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import closedloop as cl
from closedloop.loop import Admission


class ManualClock:
    """A monotonic clock that moves only when told to (seconds, like ``perf_counter``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000.0


class WallClock:
    """The wall clock a step's timestamp comes from; ticks one second per step."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@dataclass(frozen=True)
class Task:
    """What the simulated agent proposes on attempt 1, 2, …, how long it takes, and
    whether the executed action really lands (what the verifier finds)."""

    proposals: tuple[str, ...]
    ms: float
    lands: bool = True


TOKENS_IN, TOKENS_OUT = 100, 10
"""Tokens the simulated model uses per attempt."""


def _agent(clock: ManualClock) -> Callable[[Task, cl.Attempt], str]:
    def agent(task: Task, attempt: cl.Attempt) -> str:
        attempt.record_usage(TOKENS_IN, TOKENS_OUT)
        if attempt.number == 1:
            clock.advance_ms(task.ms)
        proposal = task.proposals[attempt.number - 1]
        if proposal == "raise":
            raise RuntimeError("model timed out")
        return proposal

    return agent


def well_formed(proposal: str) -> str | None:
    """Validator: only "good" proposals pass; anything else is re-asked."""
    return None if proposal == "good" else f"proposal {proposal!r} is malformed"


def lands(task: Task, result: str) -> bool:
    """Verifier: the real outcome matches the intent only when the task says so."""
    return task.lands


def execute(proposal: str) -> str:
    return proposal


class PauseAll:
    """A guard that refuses every step, as fault control does during a spike."""

    def admit(self, task_type: str) -> Admission:
        return Admission.paused("validation failure spike")

    def observe(self, event: cl.StepEvent) -> None:
        return None


PROVISION = (
    Task(("good",), 10),
    Task(("good",), 20),
    Task(("bad", "good"), 30),
    Task(("bad", "bad"), 40),
    Task(("good",), 50, lands=False),
    Task(("bad", "good"), 60, lands=False),
)


def run_scenario(store: cl.Store, start: float) -> None:
    """Record the ten steps, with timestamps start+1 … start+10, and flush them."""
    clock, wall = ManualClock(), WallClock(start)
    agent = _agent(clock)

    def run(task_type: str, tasks: tuple[Task, ...], **options: Any) -> None:
        loop = cl.Loop(agent, task_type=task_type, validators=[well_formed], store=store,
                       clock=clock, wallclock=wall, **options)
        for task in tasks:
            loop.run(task)

    run("provision", PROVISION, executor=execute, verifiers=[lands], max_attempts=2)
    run("summarize", (Task(("good",), 5),))
    with pytest.raises(RuntimeError, match="model timed out"):
        run("summarize", (Task(("raise",), 7),))
    run("review", (Task(("good",), 3),), executor=execute, autonomy="suggest")
    # refused by fault control before the agent runs: no attempt, no time
    run("review", (Task(("good",), 1),), executor=execute, guards=[PauseAll()])
    assert store.flush()
