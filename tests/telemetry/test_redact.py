"""Redaction of captured content: provider keys, tokens, AWS keys, e-mails, user patterns, caps."""

from __future__ import annotations

import pytest

from closedloop.telemetry import Capture, Redactor
from closedloop.telemetry._redact import truncate

SECRETS = {
    "openai_key": "sk-proj-" + "a1B2" * 12,
    "anthropic_key": "sk-ant-api03-" + "x9Y8" * 10,
    "google_key": "AIza" + "S" * 35,
    "github_token": "ghp_" + "A1b2" * 9,
    "slack_token": "xoxb-1234567890-abcdefghij",
    "huggingface_token": "hf_" + "q" * 34,
    "aws_access_key": "AKIA" + "ABCDEFGHIJKLMNOP",
    "email": "jane.doe+ops@example.co.uk",
}


@pytest.mark.parametrize(("kind", "secret"), sorted(SECRETS.items()))
def test_known_secrets_are_redacted_by_kind(kind: str, secret: str) -> None:
    out = Redactor()(f"use {secret} now")
    assert secret not in out
    assert out == f"use [REDACTED:{kind}] now"


def test_bearer_tokens_are_redacted() -> None:
    out = Redactor()("sent Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig")
    assert "eyJ" not in out
    assert out == "sent Bearer [REDACTED:bearer]"


def test_authorization_headers_keep_their_scheme() -> None:
    out = Redactor()("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig")
    assert out == "Authorization: Bearer [REDACTED:authorization]"


def test_aws_secret_keys_are_redacted_with_their_assignment() -> None:
    out = Redactor()("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert "wJalr" not in out


def test_user_patterns_are_redacted_as_custom() -> None:
    out = Redactor([r"ACCT-\d{6}"])("account ACCT-123456 is overdue")
    assert out == "account [REDACTED:custom] is overdue"


def test_ordinary_text_is_left_alone() -> None:
    text = "Create a t3.micro in eu-west-1 with 20 GiB of gp3 storage."
    assert Redactor()(text) == text


def test_truncation_is_marked_with_the_original_length() -> None:
    assert truncate("x" * 30, 10) == "x" * 10 + "…[truncated 20 of 30 chars]"


def test_capture_redacts_before_capping() -> None:
    capture = Capture(max_chars=20)
    out = capture.apply({"prompt": "bob@example.com " + "y" * 50})
    assert out["prompt"].startswith("[REDACTED:email] yyy")
    assert out["prompt"].endswith("chars]")


def test_capture_none_sends_no_content() -> None:
    assert Capture.none().apply({"prompt": "hello"}) == {}


def test_data_content_is_captured_as_json() -> None:
    assert Capture().apply({"args": {"region": "eu-west-1"}}) == {
        "args": '{"region": "eu-west-1"}'}
