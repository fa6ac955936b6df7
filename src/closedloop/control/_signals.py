"""What a downstream's answer means for flow control: one :class:`Signal` per failure kind.

Different failures get different reactions: a 429 is backpressure (slow down, keep going), a
503 or a timeout is unavailability (the circuit breaker counts it), a 400 is the caller's own
mistake (never retried, never slows anyone down), and a validation failure is not the
downstream's business at all (fault control watches it, see :mod:`closedloop.control._fault`).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Signal(StrEnum):
    """How a call ended, as far as backpressure is concerned."""

    OK = "ok"
    """The downstream answered normally."""
    OVERLOADED = "overloaded"
    """429 (or a provider's rate-limit error): slow down, retry after the advised delay."""
    UNAVAILABLE = "unavailable"
    """502/503/504 or a refused connection: counted by the circuit breaker, retried."""
    TIMEOUT = "timeout"
    """The call timed out: like unavailability, the downstream may be drowning."""
    REJECTED = "rejected"
    """Another 4xx: the request itself is wrong; never retried, no backpressure."""
    ERROR = "error"
    """Any other exception: not retried, not counted against the downstream."""


RETRYABLE = frozenset({Signal.OVERLOADED, Signal.UNAVAILABLE, Signal.TIMEOUT})
"""Signals worth another attempt (within the retry budget and deadline)."""


@dataclass(frozen=True, slots=True)
class Feedback:
    """A classified call outcome: the signal and the downstream's ``Retry-After``, if any."""

    signal: Signal
    retry_after: float | None = None
    status: int | None = None


_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
"""RFC 9110 delay-seconds (digits), plus the decimal fraction some providers send."""


def parse_retry_after(
    value: str | float | int | None, *, now: Callable[[], float] = time.time
) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date.

    Returns ``None`` for a missing or unreadable value (a bad header must never crash the
    caller): anything but plain digits (with an optional decimal fraction) or a dated GMT
    time, so ``nan``, ``inf``, ``-1`` and ``1e9`` are refused. A date in the past gives ``0.0``.
    The one parser of the package: :func:`closedloop.integrations.retry_after_seconds` uses it.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) and value >= 0 else None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; an obsolete form may parse naive
        return None
    return max(0.0, when.timestamp() - now())


def retry_after_from_headers(
    headers: Mapping[str, str] | Any, *, now: Callable[[], float] = time.time
) -> float | None:
    """``retry-after-ms`` (OpenAI, Anthropic) if present, else ``Retry-After``."""
    if headers is None:
        return None
    get = getattr(headers, "get", None)
    if get is None:
        return None
    ms = get("retry-after-ms") or get("Retry-After-Ms")
    if isinstance(ms, str) and _DELAY_SECONDS.fullmatch(ms.strip()):
        return float(ms) / 1000.0
    return parse_retry_after(get("retry-after") or get("Retry-After"), now=now)


def signal_for_status(status: int) -> Signal:
    """The signal an HTTP status code carries."""
    if status == 429:
        return Signal.OVERLOADED
    if status in (502, 503, 504) or status >= 500:
        return Signal.UNAVAILABLE
    if status == 408:
        return Signal.TIMEOUT
    if 400 <= status < 500:
        return Signal.REJECTED
    return Signal.OK


def _status_and_headers(obj: Any) -> tuple[int | None, Any]:
    status = getattr(obj, "status_code", None)
    headers = getattr(obj, "headers", None)
    response = getattr(obj, "response", None)
    if response is not None:
        if not isinstance(status, int):
            status = getattr(response, "status_code", None)
        if headers is None:
            headers = getattr(response, "headers", None)
    return (status if isinstance(status, int) else None), headers


def classify(outcome: BaseException | object) -> Feedback:
    """The default classifier: an exception raised by the call, or the value it returned.

    Understands HTTP responses and errors that carry ``status_code`` (httpx, openai,
    anthropic, requests), ``TimeoutError`` and connection errors (built-in, httpx). A
    returned response with a 429/5xx status counts as that failure.
    """
    if isinstance(outcome, BaseException):
        status, headers = _status_and_headers(outcome)
        if status is not None:
            return Feedback(signal_for_status(status), retry_after_from_headers(headers), status)
        if isinstance(outcome, TimeoutError | asyncio.TimeoutError) or _named(
            outcome, "Timeout"
        ):
            return Feedback(Signal.TIMEOUT)
        if isinstance(outcome, ConnectionError) or _named(outcome, "ConnectError",
                                                           "APIConnectionError",
                                                           "RemoteProtocolError"):
            return Feedback(Signal.UNAVAILABLE)
        return Feedback(Signal.ERROR)
    status, headers = _status_and_headers(outcome)
    if status is None:
        return Feedback(Signal.OK)
    return Feedback(signal_for_status(status), retry_after_from_headers(headers), status)


def _named(exc: BaseException, *names: str) -> bool:
    # httpx/openai exception classes are matched by name so neither is a hard dependency
    return any(cls.__name__ in names or cls.__name__.endswith(names)
               for cls in type(exc).__mro__)
