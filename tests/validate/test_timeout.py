"""with_timeout: a hung or crashing check is its own failure, never the agent's, never a pass."""

from __future__ import annotations

import threading

import pytest

import closedloop as cl
from closedloop.validate import CheckTimeout, JsonSchemaValidator, with_timeout


def test_a_fast_check_returns_its_verdict() -> None:
    check = with_timeout(JsonSchemaValidator({"type": "integer"}), 5)
    assert check(3).passed
    assert not check("x").passed


def test_the_name_is_kept_for_the_loop() -> None:
    assert with_timeout(JsonSchemaValidator({}), 1).name == "json_schema"  # type: ignore[attr-defined]


def test_a_hung_check_raises_check_timeout() -> None:
    release = threading.Event()

    def hangs(proposal: object) -> None:
        release.wait(10)

    with pytest.raises(CheckTimeout, match=r"did not finish within 0\.05 s"):
        with_timeout(hangs, 0.05)(1)
    release.set()


def test_a_crash_is_re_raised_in_the_caller() -> None:
    def crashes(proposal: object) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        with_timeout(crashes, 1)(1)


def test_works_for_two_argument_verifiers() -> None:
    check = with_timeout(lambda intent, result: intent == result, 1)
    assert check(1, 1) is True


def test_timeout_must_be_positive() -> None:
    with pytest.raises(cl.ConfigError):
        with_timeout(lambda p: None, 0)


def test_a_timed_out_validator_is_a_validator_error_in_the_loop(memory_store: cl.Store) -> None:
    release = threading.Event()

    def hangs(proposal: object) -> None:
        release.wait(10)

    loop = cl.Loop(lambda t, a: "p", task_type="t", store=memory_store,
                   validators=[with_timeout(hangs, 0.05, name="slow_policy")])
    result = loop.run("x")
    release.set()
    assert (result.outcome, result.error_type) == (cl.Outcome.ERROR, cl.ErrorType.VALIDATOR_ERROR)
    assert result.validation[-1].check == "slow_policy"
    assert not result.validation[-1].passed


def test_a_timed_out_verifier_is_a_verifier_error_in_the_loop(memory_store: cl.Store) -> None:
    release = threading.Event()

    def hangs(intent: object, result: object) -> None:
        release.wait(10)

    loop = cl.Loop(lambda t, a: "p", task_type="t", store=memory_store,
                   executor=lambda p: "done", verifiers=[with_timeout(hangs, 0.05)])
    result = loop.run("x")
    release.set()
    assert result.error_type is cl.ErrorType.VERIFIER_ERROR


async def test_an_async_check_is_awaited_under_the_deadline() -> None:
    import asyncio

    async def slow(intent: object, result: object) -> bool:
        await asyncio.sleep(10)
        return True

    async def fast(intent: object, result: object) -> bool:
        return True

    assert await with_timeout(fast, 1)(1, 1) is True
    with pytest.raises(CheckTimeout):
        await with_timeout(slow, 0.05)(1, 1)


async def test_a_timed_out_async_verifier_is_a_verifier_error_in_arun(
    memory_store: cl.Store,
) -> None:
    import asyncio

    async def slow(intent: object, result: object) -> None:
        await asyncio.sleep(10)

    loop = cl.Loop(lambda t, a: "p", task_type="t", store=memory_store,
                   executor=lambda p: "done", verifiers=[with_timeout(slow, 0.05)])
    result = await loop.arun("x")
    assert result.error_type is cl.ErrorType.VERIFIER_ERROR
    assert result.error_message is not None
    assert "CheckTimeout" in result.error_message
