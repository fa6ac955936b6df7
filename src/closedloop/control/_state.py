"""Where per-key flow-control state lives: in this process (default) or shared (Redis).

A :class:`RateBackend` applies :class:`~closedloop.control._core.KeyState`'s logic to a key's
state atomically. :class:`LocalRates` keeps it in a dict behind a lock: zero setup, one
process. :class:`~closedloop.control.RedisRates` keeps it in Redis, updated by server-side
Lua scripts, so that every worker on every machine shares one provider's limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from closedloop.control._core import Grant, KeyState, Limits
from closedloop.control._signals import Signal


@runtime_checkable
class RateBackend(Protocol):
    """Atomic acquire/confirm/feedback on one key's state, sync and async."""

    def acquire(self, key: str, limits: Limits) -> Grant:
        """Reserve a slot for one call (or say when to ask again)."""

    def confirm(self, key: str, limits: Limits, ticket: int, late: float = 0.0) -> Grant:
        """After waiting for a reserved slot: go, or re-queue if it was cancelled.

        ``late``: how much longer than told the caller slept.
        """

    def feedback(self, key: str, limits: Limits, signal: Signal, admitted_at: float,
                 retry_after: float | None) -> None:
        """Learn from one call's outcome."""

    async def aacquire(self, key: str, limits: Limits) -> Grant:
        """:meth:`acquire` for asyncio."""

    async def aconfirm(self, key: str, limits: Limits, ticket: int,
                       late: float = 0.0) -> Grant:
        """:meth:`confirm` for asyncio."""

    async def afeedback(self, key: str, limits: Limits, signal: Signal, admitted_at: float,
                        retry_after: float | None) -> None:
        """:meth:`feedback` for asyncio."""

    def snapshot(self, key: str, limits: Limits) -> dict[str, Any]:
        """A JSON-ready view of one key's state."""

    def keys(self) -> list[str]:
        """Keys with state."""


class LocalRates:
    """Per-key state in this process; ``clock`` is injectable (virtual time in tests)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._states: dict[str, KeyState] = {}
        self._lock = threading.Lock()

    def state(self, key: str) -> KeyState:
        """The key's state object (created on first use)."""
        state = self._states.get(key)
        if state is None:
            state = self._states.setdefault(key, KeyState())
        return state

    def acquire(self, key: str, limits: Limits) -> Grant:
        with self._lock:
            return self.state(key).acquire(limits, self.clock())

    def confirm(self, key: str, limits: Limits, ticket: int, late: float = 0.0) -> Grant:
        with self._lock:
            return self.state(key).confirm(limits, self.clock(), ticket, late)

    def feedback(self, key: str, limits: Limits, signal: Signal, admitted_at: float,
                 retry_after: float | None) -> None:
        with self._lock:
            self.state(key).feedback(limits, self.clock(), signal, admitted_at=admitted_at,
                                     retry_after=retry_after)

    async def aacquire(self, key: str, limits: Limits) -> Grant:
        return self.acquire(key, limits)

    async def aconfirm(self, key: str, limits: Limits, ticket: int,
                       late: float = 0.0) -> Grant:
        return self.confirm(key, limits, ticket, late)

    async def afeedback(self, key: str, limits: Limits, signal: Signal, admitted_at: float,
                        retry_after: float | None) -> None:
        self.feedback(key, limits, signal, admitted_at, retry_after)

    def snapshot(self, key: str, limits: Limits) -> dict[str, Any]:
        with self._lock:
            out = self.state(key).snapshot(limits, self.clock())
        out["backend"] = "local"
        return out

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._states)
