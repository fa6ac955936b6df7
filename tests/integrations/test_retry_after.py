"""Parsing a provider's Retry-After: milliseconds, seconds, or an HTTP date."""

from __future__ import annotations

from closedloop.integrations import retry_after_seconds


def test_milliseconds_take_precedence() -> None:
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25


def test_seconds() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0


def test_http_dates_are_relative_to_now() -> None:
    headers = {"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}
    assert retry_after_seconds(headers, now=lambda: 1445412480.0) == 10.0


def test_garbage_is_none() -> None:
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
