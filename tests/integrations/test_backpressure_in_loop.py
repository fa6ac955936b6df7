"""A real provider SDK in a loop step: its 429s and Retry-After drive closedloop's backpressure."""

from __future__ import annotations

import random
import time

import openai
import pytest

import closedloop as cl
from closedloop.control import Backpressure, BackpressureError, RetryPolicy
from closedloop.integrations import instrument_openai
from integrations._wire_server import Reply, WireServer
from integrations.test_openai import MESSAGES, client, completion


def test_an_openai_429_is_retried_after_its_retry_after_by_the_loops_backpressure(
    wire: WireServer, memory_store: cl.Store
) -> None:
    wire.script(Reply(status=429, headers={"retry-after-ms": "300"},
                      body={"error": {"message": "slow down", "type": "rate_limit"}}),
                Reply(body=completion("ok")))
    sdk = instrument_openai(client(wire))  # max_retries=0: closedloop owns the retries
    limiter = Backpressure()

    def agent(task: str, attempt: cl.Attempt) -> str:
        assert attempt.backpressure is not None
        reply = attempt.backpressure.call("openai/gpt-4o", sdk.chat.completions.create,
                                          model="gpt-4o", messages=MESSAGES)
        return str(reply.choices[0].message.content)

    loop = cl.Loop(agent, task_type="chat", backpressure=limiter, store=memory_store)
    started = time.monotonic()
    result = loop.run("hello")
    waited = time.monotonic() - started

    assert result.ok
    assert result.proposal == "ok"
    assert len(wire.requests) == 2  # one refused, one retried: no retry storm
    assert waited >= 0.3  # the provider's Retry-After was honoured
    status = limiter.status()["openai/gpt-4o"]
    assert status["counts"]["overloaded"] == 1
    assert status["counts"]["ok"] == 1
    assert result.event is not None
    assert result.event.input_tokens == 12  # usage of the successful call, recorded by itself


def test_a_provider_that_keeps_refusing_is_given_up_on_within_the_deadline(
    wire: WireServer, memory_store: cl.Store
) -> None:
    wire.script(*[Reply(status=503, body={"error": {"message": "down"}}) for _ in range(50)])
    sdk = instrument_openai(client(wire))
    # a virtual clock that only the limiter's own waits move: what it spends is exact
    clock = [0.0]

    def wait(seconds: float) -> None:
        clock[0] += seconds

    # a retry budget that never binds, and seeded jitter: the deadline is what stops it
    deadline = 0.5
    policy = RetryPolicy(deadline=deadline)
    limiter = Backpressure(retry=policy, budget_min_per_second=1000.0, clock=lambda: clock[0],
                           sleep=wait, rng=random.Random(3))

    def agent(task: str, attempt: cl.Attempt) -> str:
        assert attempt.backpressure is not None
        attempt.backpressure.call("openai/gpt-4o", sdk.chat.completions.create,
                                  model="gpt-4o", messages=MESSAGES)
        return "unreachable"

    loop = cl.Loop(agent, task_type="chat", backpressure=limiter, store=memory_store)
    # the provider's 503, or flow control's own "no slot before the deadline"
    with pytest.raises((openai.InternalServerError, BackpressureError)):
        loop.run("hello")
    assert 0 < clock[0] <= deadline  # it backed off, and never waited past the deadline
    # a few retries, bounded by the policy: not a storm
    assert 1 < len(wire.requests) <= policy.max_attempts
    assert memory_store.flush()
    (event,) = memory_store.events()
    assert (event.outcome, event.error_type) == ("error", "agent")
