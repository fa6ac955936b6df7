"""Backpressure around calls to rate-limited, failure-prone downstreams (LLM providers above all).

``bp.call(key, fn, ...)`` / ``await bp.acall(key, fn, ...)``: wait for the key's adaptive
rate and in-flight cap, call, classify the outcome, teach the key's state, and retry
retryable failures with full-jitter backoff within the deadline and the retry budget.

The decision logic is written once, as the generator :meth:`Backpressure._plan`, which does
no I/O: it yields small typed records (:class:`Enter`, :class:`Acquire`, :class:`Confirm`,
:class:`Sleep`, :class:`Call`, :class:`Report`, :class:`Leave`) and two thin drivers carry
them out, one with ``time.sleep`` and one with ``asyncio.sleep`` (both injectable).
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
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import closedloop._redact  # noqa: F401 - puts the redacting filter on closedloop's loggers
from closedloop._errors import ClosedLoopError
from closedloop.control._core import Grant, Limits
from closedloop.control._retry import RetryBudget, RetryPolicy
from closedloop.control._signals import RETRYABLE, Feedback, Signal, classify
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


# ----- the operations the plan yields; the drivers carry them out ---------------------


@dataclass(frozen=True, slots=True)
class Enter:
    """Take one of the key's in-flight places (waits while all are taken)."""


@dataclass(frozen=True, slots=True)
class Leave:
    """Give the in-flight place back."""


@dataclass(frozen=True, slots=True)
class Acquire:
    """Ask the backend for a place in the key's queue (answer: a :class:`Grant`)."""

    key: str
    limits: Limits


@dataclass(frozen=True, slots=True)
class Confirm:
    """Ask whether ``ticket``'s turn has come, ``late`` seconds after it was told to ask."""

    key: str
    limits: Limits
    ticket: int
    late: float = 0.0


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` (``time.sleep`` or ``asyncio.sleep``)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Call:
    """Make the call (its exception, if any, is thrown into the plan)."""


@dataclass(frozen=True, slots=True)
class Report:
    """Teach the key how the call went."""

    key: str
    limits: Limits
    signal: Signal
    admitted_at: float
    retry_after: float | None


Op = Enter | Leave | Acquire | Confirm | Sleep | Call | Report
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
        """Yield typed operations (:data:`Op`); the driver carries each out and sends back
        its result."""
        policy = self.retry
        start = self._clock()
        deadline = start + policy.deadline if policy.deadline is not None else math.inf
        budget = self._budget(key)
        budget.record_call(start)
        attempt = 0
        ticket = -1
        while True:
            attempt += 1
            yield Enter()
            self._inc(key, 1)
            try:
                # a retry keeps the place in the queue its first attempt had (its old ticket
                # is due): it waited its turn once already, it does not wait it again
                sent = self._clock()
                grant: Grant = yield (Confirm(key, limits, ticket) if ticket >= 0
                                      else Acquire(key, limits))
                while not grant.ready:
                    now = self._clock()
                    if now + grant.wait > deadline:
                        cls = (CircuitOpen if grant.reason.startswith("circuit")
                               else DeadlineExceeded)
                        raise cls(f"{key}: {grant.reason or 'no slot'} for another "
                                  f"{grant.wait:.2f}s, past the call's deadline",
                                  key=key, wait=grant.wait)
                    yield Sleep(grant.wait)
                    # how late it comes back: overslept, plus the round trips to the state
                    # (the last one's again for the next); the key catches that up
                    again = self._clock()
                    late = 2.0 * (now - sent) + max(0.0, again - now - grant.wait)
                    sent = again
                    grant = yield (Confirm(key, limits, grant.ticket, late) if grant.reserved
                                   else Acquire(key, limits))
                if grant.reserved and grant.ticket >= 0:
                    ticket = grant.ticket
                error: BaseException | None = None
                value: Any = None
                try:
                    value = yield Call()
                except Exception as exc:  # noqa: BLE001 - classified, then re-raised or retried
                    error = exc
                feedback = self.classifier(error if error is not None else value)
                yield Report(key, limits, feedback.signal, grant.at, feedback.retry_after)
            finally:
                self._inc(key, -1)
            yield Leave()
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
            yield Sleep(delay)

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

    def _do(self, op: Op, sem: Any, aio: bool) -> Any:
        """Carry out one operation other than the call (under asyncio: maybe an awaitable)."""
        b = self.backend
        match op:
            case Enter():
                return sem.acquire()
            case Leave():
                return sem.release()
            case Sleep(seconds=seconds):
                return (self._asleep if aio else self._sleep)(seconds)
            case Acquire(key=key, limits=limits):
                return (b.aacquire if aio else b.acquire)(key, limits)
            case Confirm(key=key, limits=limits, ticket=ticket, late=late):
                return (b.aconfirm if aio else b.confirm)(key, limits, ticket, late)
            case Report(key=key, limits=limits, signal=signal, admitted_at=at,
                        retry_after=retry_after):
                return (b.afeedback if aio else b.feedback)(key, limits, signal, at,
                                                           retry_after)
        raise TypeError(f"not an operation the drivers carry out: {op!r}")

    def call(self, key: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn(*args, **kwargs)`` under the key's backpressure (blocking waits)."""
        limits = self.limits_for(key)
        sem = self._slot(key, limits)
        plan = self._plan(key, limits)
        held = False
        try:
            op = next(plan)
            while True:
                if isinstance(op, Call):
                    try:
                        result: Any = fn(*args, **kwargs)
                    except Exception as exc:  # noqa: BLE001 - the plan decides
                        op = plan.throw(exc)
                        continue
                else:
                    result = self._do(op, sem, aio=False)
                    held = isinstance(op, Enter) or (held and not isinstance(op, Leave))
                op = plan.send(result)
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
        plan = self._plan(key, limits)
        held = False
        try:
            op = next(plan)
            while True:
                if isinstance(op, Call):
                    try:
                        result: Any = await fn(*args, **kwargs)
                    except Exception as exc:  # noqa: BLE001 - the plan decides
                        op = plan.throw(exc)
                        continue
                else:
                    result = self._do(op, sem, aio=True)
                    if inspect.isawaitable(result):
                        result = await result
                    held = isinstance(op, Enter) or (held and not isinstance(op, Leave))
                op = plan.send(result)
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
