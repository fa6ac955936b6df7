"""Eventual consistency: re-run a verifier until the real state converges or a deadline passes.

Cloud state lags the API call that changed it: an instance is ``pending`` before ``running``,
a new record is invisible to the first read. :class:`Eventually` polls with a backoff and
records the wait in the verdict, so a slow convergence is visible in the step's record. The
polling decisions are written once (:class:`_Poll`); :class:`Eventually` drives them with
``time.sleep`` and :class:`AsyncEventually` with ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from closedloop._errors import ConfigError
from closedloop._verdict import Issue, Severity, Verdict, as_verdict


class _Poll:
    """One polling run: after each verdict, how long to sleep, or ``None`` to stop."""

    def __init__(self, owner: Eventually) -> None:
        self.owner = owner
        self.started = owner.clock()
        self.deadline = self.started + owner.timeout
        self.delay = owner.interval
        self.checks = 0

    def after(self, verdict: Verdict) -> float | None:
        self.checks += 1
        if verdict.passed:
            return None
        remaining = self.deadline - self.owner.clock()
        if remaining <= 0:
            return None
        delay = min(self.delay, remaining)
        self.delay = min(self.delay * self.owner.backoff, self.owner.max_interval)
        return delay

    def final(self, verdict: Verdict) -> Verdict:
        waited = self.owner.clock() - self.started
        name = verdict.check or self.owner.name
        if self.checks == 1 and verdict.passed:
            return verdict
        span = f"{self.checks} checks over {waited:.2f} s"
        if verdict.passed:
            note = Issue(code="converged", severity=Severity.WARNING,
                         message=f"state converged after {span}")
            return Verdict(issues=(*verdict.issues, note), check=name)
        if verdict.unknown is not None:
            return Verdict(issues=verdict.issues, check=name,
                           unknown=f"{verdict.unknown} (still unknown after {span})")
        note = Issue(code="not_converged",
                     message=f"state did not converge within {self.owner.timeout:g} s "
                             f"({span}); the issues above are from the last check")
        return Verdict(issues=(*verdict.issues, note), check=name)


class Eventually:
    """Wraps a verifier ``(intent, result) -> verdict`` to poll until it passes or times out.

    Failing and unknown verdicts are retried (a target may be briefly unreachable); the last
    one is returned at the deadline with a ``not_converged`` issue, or its unknown reason
    extended with the wait. A pass after waiting carries a ``converged`` warning saying how
    long it took. An exception from the verifier propagates at once (a crashed check).
    """

    def __init__(
        self,
        verifier: Callable[[Any, Any], object],
        *,
        timeout: float = 60.0,
        interval: float = 0.5,
        backoff: float = 2.0,
        max_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        name: str | None = None,
    ) -> None:
        if timeout <= 0 or interval <= 0 or backoff < 1 or max_interval <= 0:
            raise ConfigError("Eventually needs timeout > 0, interval > 0, backoff ≥ 1 and "
                              "max_interval > 0")
        self.verifier = verifier
        self.timeout = timeout
        self.interval = interval
        self.backoff = backoff
        self.max_interval = max_interval
        self.clock = clock
        self.sleep = sleep
        self.name = name or str(getattr(verifier, "name", "") or
                                getattr(verifier, "__qualname__", "verifier"))

    def __call__(self, intent: Any, result: Any) -> Verdict:
        poll = _Poll(self)
        while True:
            verdict = as_verdict(self.verifier(intent, result), self.name)
            delay = poll.after(verdict)
            if delay is None:
                return poll.final(verdict)
            self.sleep(delay)


class AsyncEventually(Eventually):
    """:class:`Eventually` for ``Loop.arun``: awaits async verifiers and sleeps with asyncio."""

    def __init__(self, verifier: Callable[[Any, Any], object], *,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 **options: Any) -> None:
        super().__init__(verifier, **options)
        self.async_sleep = sleep

    async def __call__(self, intent: Any, result: Any) -> Verdict:  # type: ignore[override]
        poll = _Poll(self)
        while True:
            value = self.verifier(intent, result)
            if inspect.isawaitable(value):
                value = await value
            verdict = as_verdict(value, self.name)
            delay = poll.after(verdict)
            if delay is None:
                return poll.final(verdict)
            await self.async_sleep(delay)
