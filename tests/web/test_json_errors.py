"""An API error's message is one line of at most 500 characters, whatever it quotes."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from closedloop.web._json import MAX_MESSAGE, error_response


@given(st.text(max_size=3000), st.booleans())
def test_an_error_message_is_one_bounded_line(quoted: str, repr_it: bool) -> None:
    # what the stores raise for an unknown id: the id's repr, up to 10 characters each
    message = f"no approval request {quoted!r}" if repr_it else quoted
    body = json.loads(bytes(error_response(404, "not_found", message).body))
    shown = body["error"]["message"]
    assert "\n" not in shown and len(shown) <= MAX_MESSAGE


def test_a_long_message_is_cut_with_its_length_stated() -> None:
    shown = json.loads(bytes(error_response(404, "not_found", "x" * 5000).body))["error"]["message"]
    assert len(shown) <= MAX_MESSAGE and shown.endswith("of 5000 chars]")
