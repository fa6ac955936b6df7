"""Retries that never amplify an outage: full-jitter backoff, a deadline and a retry budget.

The budget follows Finagle's ``RetryBudget`` (and gRPC's retry throttling): every call
deposits ``ratio`` of a token, every retry withdraws one, deposits expire after ``ttl``
seconds, and ``min_per_second`` retries are always allowed so a quiet key can still retry.
A dead downstream therefore sees at most ``1 + ratio`` times the normal request rate,
never ``max_attempts`` times it. Pure logic with an injected ``now``.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from closedloop._errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How one call is retried: attempts, full-jitter exponential backoff, overall deadline."""

    max_attempts: int = 6
    base: float = 0.1
    """Seconds: the first backoff is uniform in ``[0, base]``."""
    cap: float = 20.0
    """Seconds: no single backoff is longer than this."""
    deadline: float | None = 120.0
    """Seconds from the first attempt after which no new attempt (or wait) starts."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base < 0 or self.cap < self.base or (
            self.deadline is not None and self.deadline <= 0
        ):
            raise ConfigError(
                "invalid RetryPolicy: need max_attempts ≥ 1, 0 ≤ base ≤ cap, deadline > 0"
            )

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Full jitter (AWS architecture blog): uniform in ``[0, min(cap, base·2^retry)]``."""
        high = min(self.cap, self.base * 2.0 ** max(0, retry - 1))
        return (rng or random).uniform(0.0, high)


class RetryBudget:
    """Retries allowed as a fraction of recent calls (Finagle/gRPC style), per process."""

    def __init__(self, *, ratio: float = 0.2, min_per_second: float = 1.0,
                 ttl: float = 10.0) -> None:
        if ratio < 0 or min_per_second < 0 or ttl <= 0:
            raise ConfigError("invalid RetryBudget: need ratio ≥ 0, min_per_second ≥ 0, ttl > 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.refused = 0

    def _expire(self, now: float) -> None:
        edge = now - self.ttl
        for q in (self._calls, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def record_call(self, now: float) -> None:
        """A first attempt was made (deposits ``ratio`` of a retry)."""
        self._calls.append(now)

    def balance(self, now: float) -> float:
        """Retries still allowed in the current window."""
        self._expire(now)
        allowance = self.min_per_second * self.ttl + self.ratio * len(self._calls)
        return allowance - len(self._retries)

    def try_withdraw(self, now: float) -> bool:
        """Take one retry if the budget allows it."""
        if self.balance(now) >= 1.0:
            self._retries.append(now)
            return True
        self.refused += 1
        return False
