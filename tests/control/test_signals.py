"""Classifying downstream answers and reading Retry-After."""

from __future__ import annotations

import httpx
import pytest

from closedloop.control import Signal, classify, parse_retry_after, retry_after_from_headers


def test_retry_after_in_seconds() -> None:
    assert parse_retry_after("7") == 7.0


def test_retry_after_as_an_http_date() -> None:
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now=lambda: now) == 30.0


def test_a_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Tue, 14 Nov 2000 22:13:50 GMT") == 0.0


@pytest.mark.parametrize("bad", ["", "soon", "-", "nan", None])
def test_an_unreadable_retry_after_is_ignored(bad: str | None) -> None:
    assert parse_retry_after(bad) is None


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert retry_after_from_headers({"retry-after-ms": "250", "retry-after": "1"}) == 0.25


def _status_error(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat")
    response = httpx.Response(status, headers=headers, request=request)
    return httpx.HTTPStatusError("boom", request=request, response=response)


@pytest.mark.parametrize(("status", "signal"), [
    (429, Signal.OVERLOADED), (503, Signal.UNAVAILABLE), (502, Signal.UNAVAILABLE),
    (504, Signal.UNAVAILABLE), (408, Signal.TIMEOUT), (400, Signal.REJECTED),
    (422, Signal.REJECTED),
])
def test_http_errors_map_to_their_signal(status: int, signal: Signal) -> None:
    assert classify(_status_error(status)).signal is signal


def test_a_429_carries_its_retry_after() -> None:
    feedback = classify(_status_error(429, {"Retry-After": "3"}))
    assert feedback.retry_after == 3.0


def test_a_returned_429_response_is_overload() -> None:
    assert classify(httpx.Response(429)).signal is Signal.OVERLOADED


def test_timeouts_and_refused_connections_are_unavailability() -> None:
    assert classify(TimeoutError()).signal is Signal.TIMEOUT
    assert classify(httpx.ReadTimeout("slow")).signal is Signal.TIMEOUT
    assert classify(ConnectionRefusedError()).signal is Signal.UNAVAILABLE
    assert classify(httpx.ConnectError("refused")).signal is Signal.UNAVAILABLE


def test_an_ordinary_exception_is_not_backpressure() -> None:
    assert classify(ValueError("bad json")).signal is Signal.ERROR


def test_a_plain_return_value_is_ok() -> None:
    assert classify({"text": "hi"}).signal is Signal.OK
