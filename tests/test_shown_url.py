"""URLs in messages, logs and output: one masker hides their secrets, however malformed."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import closedloop as cl
from closedloop._redact import shown_url

# what a password may hold, unencoded as users paste it: anything printable but whitespace
_PASSWORD = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=24)


@given(_PASSWORD)
@example("&P=")  # a query-like password: its "&p=" must not swallow the host
@example("&Zq")  # in a query: an unencoded "&" does not end the secret
@example("&x=Zq")  # nor a "name=" pair of its own
@example("#Zq")  # nor a "#"
def test_a_password_never_shows_whatever_it_holds(password: str) -> None:
    secret = f"Zq{password}"
    for url in (f"postgresql://user:{secret}@db.example:5432/name",
                f"redis://:{secret}@127.0.0.1:6379/0",
                f"postgresql://db.example/name?password={secret}"):
        assert "Zq" not in shown_url(url), url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:p@ss@host:5432/db", "postgresql://u:***@host:5432/db"),
    ("postgresql://u:pa/ss@host/db", "postgresql://u:***@host/db"),
    ("redis://:pa?ss@host:1/0", "redis://:***@host:1/0"),
    ("postgresql://u:pw@[bad/db", "postgresql://u:***@[bad/db"),
    ("http://h:8086/write?db=x&u=a&p=secret", "http://h:8086/write?db=x&u=a&p=***"),
])
def test_the_user_name_and_host_stay_readable(url: str, shown: str) -> None:
    assert shown_url(url) == shown


@pytest.mark.parametrize("url", [
    "sqlite:////tmp/a@b.db", "sqlite:////tmp/x:y@z.db", "postgresql://u@host/db",
    "redis://host:6379/0?x=a@b", "postgresql://host:5432/path@x", "memory://",
])
def test_a_url_without_a_secret_is_shown_as_it_is(url: str) -> None:
    assert shown_url(url) == url


def test_a_store_url_that_cannot_be_parsed_keeps_its_password_out_of_the_error() -> None:
    with pytest.raises(cl.ConfigError) as caught:
        cl.open_store("nosuchscheme://user:hunter2@[broken/db")
    assert "hunter2" not in str(caught.value)
    assert "user:***@" in str(caught.value)
