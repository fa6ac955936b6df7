"""The approvals JSON API end to end: a real ``closedloop serve`` process (uvicorn on a free
loopback port), real HTTP with httpx, requests stored in SQLite or PostgreSQL as the loop
stores them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

import closedloop as cl
from closedloop.approvals import approvals_for

from .conftest import TOKEN, Served, make_request, start_serve, stored

pytestmark = pytest.mark.slow


def test_list_pages_with_the_stores_cursor_and_filters(served: Served) -> None:
    kind = f"deploy-{uuid.uuid4().hex[:8]}"
    made = [make_request(served.store_url, task_type=kind, created=time.time() - 10 + i)
            for i in range(3)]
    make_request(served.store_url, task_type="other")
    with served.client(token=None) as http:  # reads on loopback need no token
        first = http.get("/api/v1/approvals", params={"task_type": kind, "limit": 2,
                                                      "status": "pending"})
        assert first.status_code == 200, first.text
        page = first.json()
        assert [r["request_id"] for r in page["requests"]] == [made[2].request_id,
                                                               made[1].request_id]
        assert page["next_cursor"]
        second = http.get("/api/v1/approvals", params={"task_type": kind, "limit": 2,
                                                       "cursor": page["next_cursor"]}).json()
    assert [r["request_id"] for r in second["requests"]] == [made[0].request_id]
    assert second["next_cursor"] is None
    listed = page["requests"][0]
    assert listed["status"] == "pending" and listed["task_type"] == kind
    assert json.loads(listed["proposal"]) == {"action": "run_instances", "count": 2}
    assert "history" not in listed and "sealed" not in listed


def test_show_has_proposal_risk_verdicts_and_history(served: Served) -> None:
    made = make_request(served.store_url, destructive=True)
    with served.client(token=None) as http:
        shown = http.get(f"/api/v1/approvals/{made.request_id}").json()
    assert json.loads(shown["proposal"]) == {"action": "run_instances", "count": 2}
    assert shown["proposal_digest"] == made.proposal_digest
    assert shown["risk"]["destructive"] is True and shown["destructive"] is True
    assert shown["risk"]["items"] == [{"address": "aws_db_instance.main", "action": "delete"}]
    assert shown["verdicts"] == [{"check": "tags", "passed": True}]
    assert [h["action"] for h in shown["history"]] == ["requested"]
    assert shown["history"][0]["by"] == "agent-1@host"
    assert shown["notification"]["state"] == "unsent"
    assert "sealed" not in shown


def test_approve_records_who_and_why_once(served: Served) -> None:
    made = make_request(served.store_url)
    with served.client() as http:
        done = http.post(f"/api/v1/approvals/{made.request_id}/approve",
                         json={"by": "alice", "reason": "checked the plan"})
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "approved"
        again = http.post(f"/api/v1/approvals/{made.request_id}/approve",
                          json={"by": "bob"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_pending"
    after = stored(served.store_url, made.request_id)
    assert after.status.value == "approved" and after.approvers == ("alice",)
    assert [(d.action, d.by, d.reason) for d in after.history][-1] == (
        "approved", "alice", "checked the plan")


def test_a_destructive_request_needs_two_distinct_approvers(served: Served) -> None:
    made = make_request(served.store_url, destructive=True, two_approvers=True)
    path = f"/api/v1/approvals/{made.request_id}/approve"
    with served.client() as http:
        first = http.post(path, json={"by": "alice"})
        twice = http.post(path, json={"by": "Alice"})
        second = http.post(path, json={"by": "bob"})
    assert (first.status_code, first.json()["status"], first.json()["approvers"]) == (
        200, "pending", ["alice"])
    assert (twice.status_code, twice.json()["error"]["code"]) == (409, "same_approver")
    assert (second.json()["status"], second.json()["approvers"]) == ("approved",
                                                                      ["alice", "bob"])


def test_self_approval_is_refused_with_403(served: Served) -> None:
    made = make_request(served.store_url, requested_by="carol")
    with served.client() as http:
        for me in ("carol", "agent-1", " CAROL "):
            refused = http.post(f"/api/v1/approvals/{made.request_id}/approve",
                                json={"by": me})
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "self_approval"
    assert stored(served.store_url, made.request_id).status.value == "pending"


def test_writes_without_the_token_or_with_a_wrong_one_are_401(served: Served) -> None:
    made = make_request(served.store_url)
    path = f"/api/v1/approvals/{made.request_id}/approve"
    with served.client(token=None) as http:
        missing = http.post(path, json={"by": "alice"})
        wrong = http.post(path, json={"by": "alice"},
                          headers={"Authorization": "Bearer " + "x" * len(TOKEN)})
        basic = http.post(path, json={"by": "alice"}, headers={"Authorization": TOKEN})
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_token")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "bad_token")
    assert basic.status_code == 401
    assert stored(served.store_url, made.request_id).status.value == "pending"
    for answer in (missing, wrong, basic):
        assert TOKEN not in answer.text


def test_an_expired_request_is_410_and_marked_expired(served: Served) -> None:
    made = make_request(served.store_url, created=time.time() - 120, expires_in=60)
    with served.client() as http:
        late = http.post(f"/api/v1/approvals/{made.request_id}/approve", json={"by": "alice"})
        assert late.status_code == 410, late.text
        assert late.json()["error"]["code"] == "expired"
        shown = http.get(f"/api/v1/approvals/{made.request_id}").json()
        again = http.post(f"/api/v1/approvals/{made.request_id}/reject",
                          json={"by": "alice", "reason": "too late anyway"})
    assert shown["status"] == "expired"
    assert shown["history"][-1]["action"] == "expired"
    assert (again.status_code, again.json()["error"]["code"]) == (410, "expired")


def test_a_request_a_listing_marked_expired_is_410_too(served: Served) -> None:
    made = make_request(served.store_url, created=time.time() - 120, expires_in=60)
    with served.client() as http:
        listed = http.get("/api/v1/approvals", params={"status": "expired"}).json()
        assert made.request_id in [r["request_id"] for r in listed["requests"]]
        late = http.post(f"/api/v1/approvals/{made.request_id}/approve", json={"by": "alice"})
    assert (late.status_code, late.json()["error"]["code"]) == (410, "expired")


def test_reject_needs_a_reason_and_can_ask_for_a_revision(served: Served) -> None:
    made = make_request(served.store_url)
    path = f"/api/v1/approvals/{made.request_id}/reject"
    with served.client() as http:
        bare = http.post(path, json={"by": "alice"})
        assert (bare.status_code, bare.json()["error"]["code"]) == (422, "invalid")
        not_bool = http.post(path, json={"by": "alice", "reason": "x", "revise": "yes"})
        assert not_bool.status_code == 422
        done = http.post(path, json={"by": "alice", "reason": "use t3.micro", "revise": True})
    assert done.status_code == 200, done.text
    body = done.json()
    assert (body["status"], body["revise"]) == ("rejected", True)
    assert body["history"][-1] | {"at": 0, "time": ""} == {
        "at": 0, "time": "", "action": "rejected", "by": "alice", "reason": "use t3.micro"}


def test_a_crashed_request_is_retried_and_a_pending_one_is_not(served: Served) -> None:
    made = make_request(served.store_url)
    other = make_request(served.store_url)
    with cl.open_store(served.store_url) as store:
        approvals = approvals_for(store)
        approvals.decide(made.request_id, approve=True, by="alice")
        claim = approvals.claim(made.request_id, by="worker-1", lease_s=1.0)
        assert claim is not None
        assert approvals.reap(now=time.time() + 60) == [made.request_id]
    with served.client() as http:
        crashed = http.get(f"/api/v1/approvals/{made.request_id}").json()
        assert crashed["status"] == "crashed"
        no_reason = http.post(f"/api/v1/approvals/{made.request_id}/retry",
                              json={"by": "alice"})
        assert no_reason.status_code == 422
        done = http.post(f"/api/v1/approvals/{made.request_id}/retry",
                         json={"by": "alice", "reason": "the API shows no instance"})
        refused = http.post(f"/api/v1/approvals/{other.request_id}/retry",
                            json={"by": "alice", "reason": "x"})
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "approved"
    assert done.json()["history"][-1]["action"] == "retried"
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "not_retryable")


HOSTILE = {"name": "</script><script>alert(1)</script>", "markup": "[bold red]x[/] <b>y</b>",
           "ansi": "\x1b[31mred\x1b[0m\r\x07", "bidi": "\u202eevil", "amp": "&lt; & \u2028"}


def test_stored_hostile_text_comes_back_as_data_untouched(served: Served) -> None:
    made = make_request(served.store_url, proposal=HOSTILE, task_type="<img src=x>",
                        requested_by="[red]mallory[/red]")
    with served.client(token=None) as http:
        shown = http.get(f"/api/v1/approvals/{made.request_id}")
        listed = http.get("/api/v1/approvals", params={"task_type": "<img src=x>"})
    for answer in (shown, listed):
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'none'" in answer.headers["content-security-policy"]
        raw = answer.content
        assert all(b not in raw for b in (b"<", b">", b"\x1b", b"\r", b"\x07")), raw[:300]
        raw.decode("ascii")  # every other character is escaped too
    body = shown.json()
    assert json.loads(body["proposal"]) == HOSTILE
    assert body["proposal"] == made.proposal
    assert (body["task_type"], body["requested_by"]) == ("<img src=x>", "[red]mallory[/red]")
    assert listed.json()["requests"][0]["proposal"] == made.proposal


def test_a_secret_in_a_proposal_is_never_served(served: Served) -> None:
    secret = "AKIAIOSFODNN7EXAMPLE"
    made = make_request(served.store_url, proposal={"key": secret, "n": 1})
    with served.client(token=None) as http:
        shown = http.get(f"/api/v1/approvals/{made.request_id}")
    assert secret not in shown.text
    assert "sealed" not in shown.json()


def test_bad_input_is_a_json_error_and_changes_nothing(served: Served) -> None:
    made = make_request(served.store_url)
    path = f"/api/v1/approvals/{made.request_id}/approve"
    with served.client() as http:
        cases = {
            "unknown id": (http.get("/api/v1/approvals/" + "0" * 32), 404, "not_found"),
            "unknown path": (http.get("/api/v1/nothing"), 404, "not_found"),
            "wrong method": (http.delete(path), 405, "method_not_allowed"),
            "limit 0": (http.get("/api/v1/approvals", params={"limit": 0}), 422, "invalid"),
            "limit huge": (http.get("/api/v1/approvals", params={"limit": 10**9}), 422,
                           "invalid"),
            "bad status": (http.get("/api/v1/approvals", params={"status": "bogus"}), 422,
                           "invalid"),
            "bad cursor": (http.get("/api/v1/approvals", params={"cursor": "%%%"}), 422,
                           "invalid"),
            "unknown query": (http.get("/api/v1/approvals", params={"sort": "x"}), 422,
                              "invalid"),
            "not json": (http.post(path, content=b"{by: alice",
                                   headers={"content-type": "application/json"}), 400,
                         "bad_json"),
            "a list": (http.post(path, json=["alice"]), 400, "bad_json"),
            "a form": (http.post(path, data={"by": "alice"}), 415, "unsupported_media_type"),
            "too large": (http.post(path, json={"by": "alice", "reason": "x" * 70_000}), 413,
                          "too_large"),
            "unknown field": (http.post(path, json={"by": "alice", "as": "root"}), 422,
                              "invalid"),
            "no by": (http.post(path, json={"reason": "ok"}), 422, "invalid"),
            "by not text": (http.post(path, json={"by": ["alice"]}), 422, "invalid"),
            "by unprintable": (http.post(path, json={"by": "al\x1bice"}), 422, "invalid"),
        }
    for case, (answer, status, code) in cases.items():
        assert answer.status_code == status, (case, answer.text)
        assert answer.headers["content-type"] == "application/json", case
        assert answer.json()["error"]["code"] == code, case
        assert "\n" not in answer.json()["error"]["message"], case
    assert stored(served.store_url, made.request_id).status.value == "pending"


def test_a_chunked_body_is_bounded_too(served: Served) -> None:
    made = make_request(served.store_url)

    def chunks() -> Iterator[bytes]:
        yield b'{"by": "alice", "reason": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    with served.client() as http:
        answer = http.post(f"/api/v1/approvals/{made.request_id}/approve", content=chunks(),
                           headers={"content-type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert stored(served.store_url, made.request_id).status.value == "pending"


def test_metrics_and_the_api_share_one_port(served: Served) -> None:
    with served.client(token=None) as http:
        metrics = http.get("/metrics")
        health = http.get("/api/v1/health")
    assert metrics.status_code == 200 and b"closedloop" in metrics.content
    assert health.json()["status"] == "ok" and health.json()["writable"] is True


def test_a_server_without_a_token_is_read_only(tmp_path: object, store_url: str) -> None:
    made = make_request(store_url)
    served = start_serve(store_url, token=None)
    try:
        with served.client(token=None) as http:
            assert http.get(f"/api/v1/approvals/{made.request_id}").status_code == 200
            refused = http.post(f"/api/v1/approvals/{made.request_id}/approve",
                                json={"by": "alice"})
            with_one = http.post(f"/api/v1/approvals/{made.request_id}/approve",
                                 json={"by": "alice"},
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        served.stop()
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "read_only")
    assert with_one.status_code == 403
    assert stored(store_url, made.request_id).status.value == "pending"


def _serve_once(store_url: str, *args: str, token: str | None = None
                ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in __import__("os").environ.items() if k != "CLOSEDLOOP_API_TOKEN"}
    if token is not None:
        env["CLOSEDLOOP_API_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "closedloop", "serve", "--port", "0",
                           "--store", store_url, *args], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


@pytest.mark.parametrize("addr", ["0.0.0.0", "::", "192.0.2.1", "example.org"])
def test_a_bind_beyond_loopback_without_a_token_is_refused_in_one_line(
        tmp_path: object, addr: str) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    cl.open_store(url).close()
    done = _serve_once(url, "--addr", addr)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "beyond loopback" in done.stderr and "CLOSEDLOOP_API_TOKEN" in done.stderr


def test_a_weak_token_is_refused_without_showing_it(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    cl.open_store(url).close()
    done = _serve_once(url, token="short-secret")
    assert done.returncode == 2
    assert "at least 16" in done.stderr and "short-secret" not in done.stderr


def test_beyond_loopback_every_request_needs_the_token(store_url: str) -> None:
    made = make_request(store_url)
    served = start_serve(store_url, "--addr", "0.0.0.0")
    try:
        with served.client(token=None) as anonymous, served.client() as http:
            for path in (f"/api/v1/approvals/{made.request_id}", "/api/v1/approvals",
                         "/metrics", "/api/v1/health"):
                assert anonymous.get(path).status_code == 401, path
                assert http.get(path).status_code == 200, path
    finally:
        code = served.stop()
    assert code == 0
    assert TOKEN not in "".join(served.err)
    assert "every request needs it" in served.err[0]


def test_httpx_sees_a_clear_401_body_for_a_missing_token(served: Served) -> None:
    answer = httpx.post(f"{served.url}/api/v1/approvals/x/approve", json={"by": "a"},
                        trust_env=False)
    assert answer.status_code == 401
    assert answer.json() == {"error": {"code": "missing_token", "message": (
        "this needs the API token, sent as a bearer token in the Authorization header")}}


def test_a_loopback_server_answers_only_to_loopback_host_names(store_url: str) -> None:
    served = start_serve(store_url, "--public-url", "https://approvals.example:8443")
    try:
        with served.client(token=None) as http:
            rebound = http.get("/api/v1/approvals", headers={"Host": "evil.example:80"})
            own = [http.get("/api/v1/approvals", headers={"Host": host}).status_code
                   for host in ("localhost:9464", "127.0.0.1", "[::1]:9464",
                                "approvals.example:8443")]
    finally:
        served.stop()
    assert (rebound.status_code, rebound.json()["error"]["code"]) == (400, "bad_host")
    assert own == [200, 200, 200, 200]
