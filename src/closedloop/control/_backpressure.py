"""Backpressure around calls to rate-limited, failure-prone downstreams (LLM providers above all).

``bp.call(key, fn, ...)`` / ``await bp.acall(key, fn, ...)``: wait for the key's adaptive
rate and in-flight cap, call, classify the outcome, teach the key's state, and retry
retryable failures with full-jitter backoff within the deadline and the retry budget.

The decision logic is written once, as the generator :meth:`Backpressure._plan`, which does
no I/O: it yields operations (acquire a slot, sleep, call, report) and two thin drivers run
them, one with ``time.sleep`` and one with ``asyncio.sleep`` (both injectable).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, ParamSpec, TypeVar

from closedloop._errors import ClosedLoopError
from closedloop.control._core import Grant, Limits
from closedloop.control._retry import RetryBudget, RetryPolicy
from closedloop.control._signals import RETRYABLE, Feedback, classify
from closedloop.control._state import LocalRates, RateBackend

_log = logging.getLogger("closedloop.control")
P = ParamSpec("P")
T = TypeVar("T")


class BackpressureError(ClosedLoopError):
    """A call was not made (or not retried) because of flow control; carries the key."""

    def __init__(self, message: str, *, key: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.wait = wait


class CircuitOpen(BackpressureError):
    """The key's circuit breaker is open and will not let a call through before the deadline."""


class DeadlineExceeded(BackpressureError):
    """The next slot (or retry) for the key comes after the call's deadline."""


# operations the plan yields; the drivers carry them out
_ENTER, _LEAVE, _ACQUIRE, _CONFIRM, _SLEEP, _CALL, _REPORT = range(7)
Op = tuple[int, Any]
Plan = Generator[Op, Any, Any]


class Backpressure:
    """Adaptive per-key rate and concurrency control, circuit breaking and budgeted retries.

    ``limits`` apply to every key unless ``overrides`` has the key. ``backend`` holds the
    per-key state (:class:`LocalRates` by default; :class:`~closedloop.control.RedisRates`
    to share it across processes). ``publish_to`` (a :class:`~closedloop.control.SQLiteLedger`,
    for example ``ledger_for_store(default_store())``) receives :meth:`status` at most every
    ``publish_every`` seconds, so ``closedloop status`` shows in-process limits too.
    ``clock``/``sleep``/``asleep``/``rng`` are injectable for tests and simulations.
    """

    def __init__(
        self,
        *,
        backend: RateBackend | None = None,
        limits: Limits | None = None,
        overrides: Mapping[str, Limits] | None = None,
        retry: RetryPolicy | None = None,
        budget_ratio: float = 0.2,
        budget_min_per_second: float = 1.0,
        classifier: Callable[[BaseException | object], Feedback] = classify,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        asleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        publish_to: Any = None,
        publish_every: float = 5.0,
    ) -> None:
        self.backend: RateBackend = backend if backend is not None else LocalRates(clock=clock)
        self.limits = limits or Limits()
        self.overrides = dict(overrides or {})
        self.retry = retry or RetryPolicy()
        self.classifier = classifier
        self._budget_args = (budget_ratio, budget_min_per_second)
        self._clock = clock
        self._sleep = sleep
        self._asleep = asleep
        self._rng = rng or random.Random()
        self._budgets: dict[str, RetryBudget] = {}
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._aslots: dict[tuple[int, str], asyncio.Semaphore] = {}
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self.publish_to = publish_to
        self.publish_every = publish_every
        self._published = -math.inf
        self.source = f"pid {os.getpid()}@{socket.gethostname()}"

    def limits_for(self, key: str) -> Limits:
        """The limits that apply to ``key``."""
        return self.overrides.get(key, self.limits)

    def _budget(self, key: str) -> RetryBudget:
        budget = self._budgets.get(key)
        if budget is None:
            ratio, floor = self._budget_args
            budget = self._budgets.setdefault(
                key, RetryBudget(ratio=ratio, min_per_second=floor))
        return budget

    # ----- the decision logic, once ------------------------------------------------------
    def _plan(self, key: str, limits: Limits) -> Plan:
        """Yield ``(op, args)``; the driver runs ``op(*args)`` and sends back the result."""
        policy = self.retry
        start = self._clock()
        deadline = start + policy.deadline if policy.deadline is not None else math.inf
        budget = self._budget(key)
        budget.record_call(start)
        attempt = 0
        while True:
            attempt += 1
            yield _ENTER, ()
            self._inc(key, 1)
            try:
                grant: Grant = yield _ACQUIRE, (key, limits)
                while not grant.ready:
                    now = self._clock()
                    if now + grant.wait > deadline:
                        cls = (CircuitOpen if grant.reason.startswith("circuit")
                               else DeadlineExceeded)
                        raise cls(f"{key}: {grant.reason or 'no slot'} for another "
                                  f"{grant.wait:.2f}s, past the call's deadline",
                                  key=key, wait=grant.wait)
                    yield _SLEEP, (grant.wait,)
                    grant = yield ((_CONFIRM, (key, limits, grant.ticket)) if grant.reserved
                                   else (_ACQUIRE, (key, limits)))
                error: BaseException | None = None
                value: Any = None
                try:
                    value = yield _CALL, ()
                except Exception as exc:  # noqa: BLE001 - classified, then re-raised or retried
                    error = exc
                feedback = self.classifier(error if error is not None else value)
                yield _REPORT, (key, limits, feedback.signal, grant.at, feedback.retry_after)
            finally:
                self._inc(key, -1)
            yield _LEAVE, ()
            if feedback.signal not in RETRYABLE:
                if error is not None:
                    raise error
                return value
            now = self._clock()
            delay = max(policy.backoff(attempt, self._rng), feedback.retry_after or 0.0)
            why = None
            if attempt >= policy.max_attempts:
                why = f"{attempt} attempts made"
            elif now + delay > deadline:
                why = "the deadline leaves no time for another attempt"
            elif not budget.try_withdraw(now):
                why = "the retry budget is spent (retries are capped at a fraction of calls)"
            if why is not None:
                if error is not None:
                    error.add_note(f"closedloop: gave up on {key} ({feedback.signal}): {why}")
                    raise error
                return value
            yield _SLEEP, (delay,)

    # ----- drivers: run the plan's operations, nothing else -------------------------------
    def _slot(self, key: str, limits: Limits) -> threading.BoundedSemaphore:
        sem = self._slots.get(key)
        if sem is None:
            with self._lock:
                sem = self._slots.setdefault(key, threading.BoundedSemaphore(limits.max_in_flight))
        return sem

    def _aslot(self, key: str, limits: Limits) -> asyncio.Semaphore:
        ident = (id(asyncio.get_running_loop()), key)
        sem = self._aslots.get(ident)
        if sem is None:
            sem = self._aslots.setdefault(ident, asyncio.Semaphore(limits.max_in_flight))
        return sem

    def _inc(self, key: str, by: int) -> None:
        with self._lock:
            self._in_flight[key] = self._in_flight.get(key, 0) + by

    def call(self, key: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn(*args, **kwargs)`` under the key's backpressure (blocking waits)."""
        limits = self.limits_for(key)
        sem = self._slot(key, limits)
        b = self.backend
        ops: dict[int, Callable[..., Any]] = {
            _ACQUIRE: b.acquire, _CONFIRM: b.confirm, _REPORT: b.feedback,
            _SLEEP: self._sleep, _ENTER: sem.acquire, _LEAVE: sem.release}
        plan = self._plan(key, limits)
        held = False
        try:
            op, arg = next(plan)
            while True:
                if op == _CALL:
                    try:
                        result: Any = fn(*args, **kwargs)
                    except Exception as exc:  # noqa: BLE001 - the plan decides
                        op, arg = plan.throw(exc)
                        continue
                else:
                    result = ops[op](*arg)
                    held = op == _ENTER or (held and op != _LEAVE)
                op, arg = plan.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            if held:
                sem.release()
            self._maybe_publish()

    async def acall(
        self, key: str, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn(*args, **kwargs)`` under the key's backpressure (asyncio sleeps)."""
        limits = self.limits_for(key)
        sem = self._aslot(key, limits)
        b = self.backend
        ops: dict[int, Callable[..., Any]] = {
            _ACQUIRE: b.aacquire, _CONFIRM: b.aconfirm, _REPORT: b.afeedback,
            _SLEEP: self._asleep, _ENTER: sem.acquire, _LEAVE: sem.release}
        plan = self._plan(key, limits)
        held = False
        try:
            op, arg = next(plan)
            while True:
                if op == _CALL:
                    try:
                        result: Any = await fn(*args, **kwargs)
                    except Exception as exc:  # noqa: BLE001 - the plan decides
                        op, arg = plan.throw(exc)
                        continue
                else:
                    result = ops[op](*arg)
                    if inspect.isawaitable(result):
                        result = await result
                    held = op == _ENTER or (held and op != _LEAVE)
                op, arg = plan.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            if held:
                sem.release()
            self._maybe_publish()

    # ----- introspection ------------------------------------------------------------------
    def _maybe_publish(self) -> None:
        if self.publish_to is None:
            return
        now = time.monotonic()
        if now - self._published < self.publish_every:
            return
        self._published = now
        try:
            self.publish_to.publish(self.source, self.status())
        except Exception:  # noqa: BLE001 - status publishing must never break a call
            _log.exception("closedloop: publishing flow-control status failed")

    def status(self) -> dict[str, dict[str, Any]]:
        """Every known key: limits, current rate, ceiling, breaker, in-flight, retry budget."""
        out: dict[str, dict[str, Any]] = {}
        now = self._clock()
        for key in sorted(set(self.backend.keys()) | set(self._budgets)):
            limits = self.limits_for(key)
            snap = self.backend.snapshot(key, limits)
            snap["in_flight"] = self._in_flight.get(key, 0)
            snap["max_in_flight"] = limits.max_in_flight
            budget = self._budgets.get(key)
            if budget is not None:
                snap["retry_budget"] = round(budget.balance(now), 2)
                snap["retries_refused"] = budget.refused
            out[key] = snap
        return out




def default_backpressure() -> Backpressure:
    """The current runtime's :class:`Backpressure` (local state; ``CLOSEDLOOP_REDIS_URL``
    shares it; see :mod:`closedloop._runtime`)."""
    from closedloop._runtime import current_runtime

    return current_runtime().backpressure


def reset_default_backpressure() -> None:
    """Close the process runtime and start afresh: the same as :func:`closedloop.reset`."""
    from closedloop._runtime import reset

    reset()
