"""The human part of the loop over HTTP, end to end: a real loop asks for approval, the
webhook announces it, a person approves it through ``closedloop serve``'s API, and the
approved proposal executes once with the request id as its idempotency key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop import approvals as ap

from .conftest import Receiver, start_serve, wait_for

pytestmark = pytest.mark.slow


def test_a_loop_request_is_announced_approved_over_http_and_executed_once(
        tmp_path: Path, receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    calls: list[tuple[Any, str | None]] = []

    def executor(proposal: Any) -> dict[str, Any]:
        calls.append((proposal, cl.current_idempotency_key()))
        return {"applied": proposal}

    with cl.open_store(url) as store:
        loop = cl.Loop(lambda task, attempt: {"type": task["type"], "size": "t3.small"},
                       task_type="deploy", agent_id="deployer", executor=executor,
                       verifiers=[lambda task, result: None], store=store, guards=(),
                       autonomy="approve")
        asked = loop.run({"type": "web"})
        assert asked.outcome is cl.Outcome.AWAITING_APPROVAL and calls == []
        rid = asked.approval_id
        assert rid is not None
        assert store.flush()
        served = start_serve(url, "--webhook", receiver.url, "--notify-interval", "0.2",
                             "--notify-grace", "0")
        try:
            wait_for("the announcement", receiver.delivered)
            with served.client() as http:
                shown = http.get(f"/api/v1/approvals/{rid}").json()
                assert shown["status"] == "pending"
                assert shown["requested_by"].startswith("deployer@")
                refused = http.post(f"/api/v1/approvals/{rid}/approve",
                                    json={"by": shown["requested_by"]})
                assert refused.status_code == 403
                done = http.post(f"/api/v1/approvals/{rid}/approve",
                                 json={"by": "alice", "reason": "size is fine"})
                assert done.json()["status"] == "approved"
                executed = loop.run_approved()
                assert loop.run_approved() is None  # once
                after = http.get(f"/api/v1/approvals/{rid}").json()
        finally:
            assert served.stop() == 0
    body = receiver.delivered()[0]
    assert body["request_id"] == rid and body["task_type"] == "deploy"
    assert executed is not None and executed.outcome is cl.Outcome.SUCCEEDED
    assert calls == [({"type": "web", "size": "t3.small"}, rid)]
    assert after["status"] == "executed"
    actions = [h["action"] for h in after["history"]]
    assert actions[:3] == ["requested", "notified", "approved"]
    with cl.open_store(url) as store:
        assert ap.notification_state(ap.get_request(rid, store=store))["state"] == "sent"
