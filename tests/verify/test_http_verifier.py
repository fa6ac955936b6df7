"""The HTTP verifier against a local server: status, JSON paths, latency, unreachable."""

from __future__ import annotations

import socket

import pytest

import closedloop as cl
from closedloop.verify import AsyncHttpVerifier, HttpVerifier, parse_path


def test_matching_response_passes(http_base: str) -> None:
    check = HttpVerifier(f"{http_base}/health",
                         json={"$.status": "ok", "$.checks[0].ok": True}, max_latency=5.0)
    assert check(None, None).passed


def test_every_mismatch_is_reported(http_base: str) -> None:
    check = HttpVerifier(f"{http_base}/degraded",
                         json={"$.status": "ok", "$.version": "1.4.2"})
    verdict = check(None, None)
    assert [(i.code, i.location) for i in verdict.issues] == [
        ("http_status", f"GET {http_base}/degraded"),
        ("http_json_value", "$.status"),
        ("http_json_missing", "$.version"),
    ]


def test_predicates_check_values(http_base: str) -> None:
    def is_v1(version: str) -> bool:
        return version.startswith("1.")

    def is_v2(version: str) -> bool:
        return version.startswith("2.")

    assert HttpVerifier(f"{http_base}/health", json={"$.version": is_v1})(None, None).passed
    (issue,) = HttpVerifier(f"{http_base}/health", json={"$.version": is_v2})(None, None).issues
    assert "is_v2" in issue.message


def test_latency_over_the_bound_fails(http_base: str) -> None:
    ticks = iter([0.0, 0.75])
    check = HttpVerifier(f"{http_base}/health", max_latency=0.5, clock=lambda: next(ticks))
    (issue,) = check(None, None).issues
    assert issue.code == "http_latency"
    assert "750 ms" in issue.message


def test_non_json_body_is_reported(http_base: str) -> None:
    (issue,) = HttpVerifier(f"{http_base}/text", json={"$.a": 1})(None, None).issues
    assert issue.code == "http_not_json"


def test_url_can_come_from_the_result(http_base: str) -> None:
    check = HttpVerifier(lambda intent, result: f"{http_base}{result}", status=404)
    assert check(None, "/nowhere").passed


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_unreachable_target_is_unknown() -> None:
    verdict = HttpVerifier(f"http://127.0.0.1:{_closed_port()}/health")(None, None)
    assert verdict.unknown is not None
    assert "ConnectError" in verdict.unknown


async def test_async_check_gives_the_same_verdict(http_base: str) -> None:
    check = HttpVerifier(f"{http_base}/degraded", json={"$.status": "ok"})
    assert (await check.acheck(None, None)).issues == check(None, None).issues


def test_json_paths_are_parsed_once_and_checked() -> None:
    assert parse_path('$.a[0]["b c"].d') == ["a", 0, "b c", "d"]
    with pytest.raises(cl.ConfigError):
        parse_path("a.b")
    with pytest.raises(cl.ConfigError):
        parse_path("$.a[*]")


async def test_async_verifier_runs_in_arun(http_base: str, memory_store: cl.Store) -> None:
    check = AsyncHttpVerifier(f"{http_base}/degraded", json={"$.status": "ok"})
    loop = cl.Loop(lambda t, a: "p", task_type="deploy", executor=lambda p: None,
                   verifiers=[check], store=memory_store)
    result = await loop.arun("x")
    assert (result.outcome, result.error_type) == (cl.Outcome.FAILED, cl.ErrorType.VERIFICATION)
    assert result.verification[0].check == "http"
