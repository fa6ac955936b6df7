"""Approval notifications against webhook receivers of the test's own (real HTTP servers on
loopback): retries with backoff, the outcome in the request's history, nothing lost while the
receiver is down, the generic and the Slack-compatible bodies, and ``closedloop serve``
sending what nobody sent."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop._errors import ConfigError
from closedloop.approvals import (
    ApprovalRequest,
    ApprovalStore,
    Notifier,
    WebhookNotifier,
    approvals_for,
    notification_state,
    notify_created,
    resend_unsent,
)
from closedloop.store import Store

from .conftest import Receiver, make_request, start_serve, stored, wait_for


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = cl.open_store(f"sqlite:///{tmp_path / 'agents.db'}")
    yield s
    s.close()


def _create(store: Store, **kw: Any) -> ApprovalRequest:
    return make_request(store.url, **kw)


def _fast(url: str, **kw: Any) -> WebhookNotifier:
    return WebhookNotifier(url, **{"retries": 5, "backoff": 0.01, "max_backoff": 0.05, **kw})


def test_a_failing_then_recovering_receiver_gets_it_and_it_is_recorded(
        store: Store, receiver: Receiver) -> None:
    receiver.script[:] = [500, 503, 429]
    notifier = _fast(receiver.url)
    cl.configure(store=store, notify=notifier)
    made = _create(store)
    notify_created(made)
    assert notifier.flush(30)
    assert receiver.answers == [500, 503, 429, 200]
    assert {b["request_id"] for b in receiver.bodies} == {made.request_id}
    after = stored(store.url, made.request_id)
    assert [d.action for d in after.history] == ["requested", "notified"]
    assert "4 attempts" in after.history[-1].reason
    assert "s3cr3t" not in after.history[-1].reason  # the webhook's path is never recorded
    assert notification_state(after)["state"] == "sent"
    assert (after.status.value, after.proposal_digest) == ("pending", made.proposal_digest)


def test_a_receiver_that_stays_down_loses_nothing_and_the_resend_delivers(
        store: Store, receiver: Receiver) -> None:
    receiver.script[:] = [500, 500, 500]
    notifier = _fast(receiver.url, retries=2)
    made = _create(store)
    # as the loop's gate calls it: with the approval port that created the request
    notify_created(made, store=approvals_for(store), notifier=notifier)
    assert notifier.flush(30)
    failed = stored(store.url, made.request_id)
    state = notification_state(failed)
    assert state["state"] == "failed" and "HTTP 500" in state["error"]
    assert failed.status.value == "pending"  # the request waits as before
    assert receiver.delivered() == []
    # the next look (serve's, a worker's) sends it again once the round's backoff passed
    assert resend_unsent(store=store, notifier=notifier, now=time.time() + 5) == []
    assert resend_unsent(store=store, notifier=notifier,
                         now=time.time() + 1800) == [made.request_id]
    assert notifier.flush(30)
    assert [b["request_id"] for b in receiver.delivered()] == [made.request_id]
    after = stored(store.url, made.request_id)
    assert [d.action for d in after.history] == ["requested", "notify_failed", "notified"]
    assert notification_state(after)["state"] == "sent"
    assert resend_unsent(store=store, notifier=notifier, now=time.time() + 1800) == []


def test_nothing_listening_is_a_recorded_failure_not_an_error(store: Store) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notifier = _fast(f"http://127.0.0.1:{port}/hook", retries=1)
    made = _create(store)
    notify_created(made, store=store, notifier=notifier)
    assert notifier.flush(30)
    state = notification_state(stored(store.url, made.request_id))
    assert state["state"] == "failed" and "ConnectError" in state["error"]


def test_a_client_error_is_not_retried(store: Store, receiver: Receiver) -> None:
    receiver.script[:] = [400]
    notifier = _fast(receiver.url)
    made = _create(store)
    notify_created(made, store=store, notifier=notifier)
    assert notifier.flush(30)
    assert receiver.answers == [400]
    assert "HTTP 400" in notification_state(stored(store.url, made.request_id))["error"]


def test_a_request_nobody_notified_is_sent_after_the_grace(store: Store,
                                                           receiver: Receiver) -> None:
    notifier = _fast(receiver.url)
    made = _create(store)  # its process had no notifier, or died before notifying
    assert resend_unsent(store=store, notifier=notifier, grace_s=120) == []
    assert resend_unsent(store=store, notifier=notifier, grace_s=120,
                         now=made.created_at + 121) == [made.request_id]
    assert notifier.flush(30)
    assert [b["request_id"] for b in receiver.delivered()] == [made.request_id]
    decided = _create(store)
    approvals_for(store).decide(decided.request_id, approve=True, by="alice")
    assert resend_unsent(store=store, notifier=notifier, now=time.time() + 1800) == []


def test_notify_created_never_raises(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def notify(self, request: ApprovalRequest, *,
                   store: Store | ApprovalStore | None = None) -> None:
            raise RuntimeError("boom")

        def close(self, timeout: float = 10.0) -> None:
            pass

    assert isinstance(Broken(), Notifier)
    made = _create(store)
    with caplog.at_level(logging.ERROR, logger="closedloop"):
        notify_created(made, store=store, notifier=Broken())
    assert "cannot notify" in caplog.text
    assert stored(store.url, made.request_id).status.value == "pending"


def test_the_generic_body(store: Store, receiver: Receiver) -> None:
    notifier = _fast(receiver.url, public_url="https://closedloop.example:9464/")
    made = _create(store, destructive=True,
                   proposal={"key": "AKIAIOSFODNN7EXAMPLE", "drop": "db"})
    body = notifier.payload(stored(store.url, made.request_id))
    assert (body["event"], body["request_id"], body["task_type"]) == (
        "approval.requested", made.request_id, "deploy")
    assert body["destructive"] is True and body["risk"]["summary"] == "deletes 1 database"
    assert body["summary"].startswith("Approval needed: deploy")
    assert body["commands"]["approve"].startswith(f"closedloop approvals approve {made.request_id}")
    assert body["links"]["approve"] == (
        f"https://closedloop.example:9464/api/v1/approvals/{made.request_id}/approve")
    assert body["verdicts"] == [{"check": "tags", "passed": True}]
    assert "AKIAIOSFODNN7EXAMPLE" not in json.dumps(body)
    assert "sealed" not in body


def test_the_slack_body_shows_stored_text_as_text(store: Store) -> None:
    notifier = WebhookNotifier("https://hooks.slack.com/services/T0/B0/XyZsecret")
    assert notifier.format == "slack"
    assert "XyZsecret" not in repr(notifier) and "XyZsecret" not in notifier.shown
    made = _create(store, task_type="<!channel> deploy",
                   proposal={"note": "<http://evil.example|click> & ```"})
    body = notifier.payload(made)
    notifier.close(1)
    text = json.dumps(body)
    assert "<!channel>" not in text and "<http://evil" not in text
    assert "&lt;!channel&gt;" in body["text"]
    assert any(b["type"] == "header" for b in body["blocks"])
    context = body["blocks"][-1]["elements"][0]["text"]
    assert f"closedloop approvals approve {made.request_id}" in context
    proposal_block = body["blocks"][3]["text"]["text"]
    assert "&lt;http://evil.example|click&gt; &amp;" in proposal_block


def test_the_environment_configures_the_notifier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOSEDLOOP_APPROVAL_WEBHOOK", "http://127.0.0.1:9/hook")
    monkeypatch.setenv("CLOSEDLOOP_APPROVAL_WEBHOOK_FORMAT", "slack")
    notifier = cl.reset().notifier
    assert isinstance(notifier, WebhookNotifier) and notifier.format == "slack"
    monkeypatch.delenv("CLOSEDLOOP_APPROVAL_WEBHOOK")
    assert cl.reset().notifier is None
    with pytest.raises(ConfigError, match="http") as bad:
        cl.configure(notify="ftp://files.example/hook/s3cr3t")
    assert "s3cr3t" not in str(bad.value)
    with pytest.raises(ConfigError, match="format"):
        WebhookNotifier("http://127.0.0.1:9/", format="xml")


def test_serve_sends_what_nobody_sent_and_records_it(tmp_path: Path,
                                                     receiver: Receiver) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    made = make_request(url, created=time.time() - 600)  # its agent died before notifying
    receiver.script[:] = [503]
    served = start_serve(url, "--webhook", receiver.url, "--notify-interval", "0.2",
                         "--public-url", "https://approvals.example")
    try:
        wait_for("the notification", receiver.delivered)
        wait_for("its record", lambda: notification_state(
            stored(url, made.request_id))["state"] == "sent")
    finally:
        assert served.stop() == 0
    assert receiver.answers[:2] == [503, 200]
    body = receiver.delivered()[0]
    assert body["request_id"] == made.request_id
    assert body["links"]["show"] == f"https://approvals.example/api/v1/approvals/{made.request_id}"
    assert "s3cr3t" not in "".join(served.err)
    assert "notifying a json webhook http://127.0.0.1" in served.err[0]


def test_configure_with_a_url_notifies_and_closing_the_runtime_delivers(
        store: Store, receiver: Receiver) -> None:
    runtime = cl.configure(store=store, notify=receiver.url)
    notifier = runtime.notifier
    assert isinstance(notifier, WebhookNotifier) and notifier.format == "json"
    made = _create(store)
    notify_created(made)
    cl.reset()  # closes the runtime: what was queued is sent first
    assert [b["request_id"] for b in receiver.delivered()] == [made.request_id]
    assert notification_state(stored(store.url, made.request_id))["state"] == "sent"
