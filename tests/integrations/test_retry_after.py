"""Parsing a provider's Retry-After: milliseconds, seconds, or an HTTP date; one parser."""

from __future__ import annotations

import pytest

from closedloop.control import parse_retry_after, retry_after_from_headers
from closedloop.integrations import retry_after_seconds

HOSTILE = ["nan", "NaN", "inf", "-inf", "Infinity", "-1", "-0.5", "1e9", "1_000", "0x10",
           "soon", "", " ", "1 2", "Wed, 21 Oct 2015 07:28:10"]


def test_milliseconds_take_precedence() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25


def test_seconds() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": " 1.5 "}) == 1.5


def test_http_dates_are_relative_to_now() -> None:
    headers = {"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}
    assert retry_after_seconds(headers, now=lambda: 1445412480.0) == 10.0


def test_a_date_in_the_past_means_now() -> None:
    headers = {"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}
    assert retry_after_seconds(headers, now=lambda: 1445412500.0) == 0.0


def test_garbage_is_none() -> None:
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


@pytest.mark.parametrize("bad", HOSTILE)
def test_non_finite_negative_or_malformed_seconds_are_refused(bad: str) -> None:
    assert retry_after_seconds({"retry-after": bad}) is None
    assert parse_retry_after(bad) is None


@pytest.mark.parametrize("bad", HOSTILE)
def test_bad_milliseconds_fall_back_to_the_seconds_header(bad: str) -> None:
    assert retry_after_seconds({"retry-after-ms": bad, "retry-after": "2"}) == 2.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, -3, True])
def test_numbers_that_are_not_a_delay_are_refused(bad: float) -> None:
    assert parse_retry_after(bad) is None


@pytest.mark.parametrize("headers", [
    {"retry-after": "7"}, {"retry-after-ms": "1500"}, {"retry-after": "nan"},
    {"retry-after-ms": "inf", "retry-after": "-2"},
    {"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"},
])
def test_the_integrations_and_flow_control_read_headers_alike(headers: dict[str, str]) -> None:
    now = lambda: 1445412470.0  # noqa: E731
    assert retry_after_seconds(headers, now=now) == retry_after_from_headers(headers, now=now)
