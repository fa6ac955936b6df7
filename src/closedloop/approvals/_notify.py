"""Notifications of new approval requests: a webhook (generic JSON or Slack-compatible), sent
in the background with retries, its outcome recorded in the request's history.

- Configure it once per process: ``closedloop.configure(notify="https://…")`` (a URL, a
  :class:`WebhookNotifier`, any :class:`Notifier`, or None for none), else from the
  environment: ``$CLOSEDLOOP_APPROVAL_WEBHOOK`` (the URL), ``$CLOSEDLOOP_APPROVAL_WEBHOOK_FORMAT``
  (``json`` or ``slack``; a ``hooks.slack.com`` URL is ``slack`` unless set) and
  ``$CLOSEDLOOP_PUBLIC_URL`` (where ``closedloop serve`` is reached, for the links).
- The hook: whoever creates a request calls :func:`notify_created` right after
  :meth:`~closedloop.approvals.ApprovalStore.create`. It queues the notification and returns at
  once; it never raises and never waits for the webhook.
- What happened is recorded in the request's history (``by closedloop``): ``notified``, or
  ``notify_failed`` with the error once the retries are spent. :func:`notification_state`
  reads it back (the CLI and the HTTP API show it).
- Nothing is lost: :func:`resend_unsent` (``closedloop serve`` calls it periodically, and a
  worker may) sends again every pending request that has no ``notified`` entry: one whose
  process died before notifying (older than ``grace_s``), or whose last attempt failed (after
  a backoff that doubles per failed round, up to an hour). Delivery is at least once: the
  receiver may deduplicate on ``request_id``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from closedloop._approvals import ApprovalRequest, ApprovalStatus, ApprovalStore, iso
from closedloop._errors import ClosedLoopError, ConfigError
from closedloop._redact import clip
from closedloop._webhook import WebhookPoster, check_url, where

if TYPE_CHECKING:
    from closedloop.store import Store

_log = logging.getLogger("closedloop")

WEBHOOK_ENV = "CLOSEDLOOP_APPROVAL_WEBHOOK"
FORMAT_ENV = "CLOSEDLOOP_APPROVAL_WEBHOOK_FORMAT"
PUBLIC_URL_ENV = "CLOSEDLOOP_PUBLIC_URL"
FORMATS = ("json", "slack")
NOTIFIED, NOTIFY_FAILED = "notified", "notify_failed"
"""The history actions that record a notification's outcome."""
BY = "closedloop"
PREVIEW = 2000
"""Characters of the proposal a notification carries (the rest is one link or command away)."""
ROUND_BACKOFF_S = 60.0
MAX_ROUND_BACKOFF_S = 3600.0


@runtime_checkable
class Notifier(Protocol):
    """Tells people that a request waits for them. ``notify`` must return at once and never
    raise; it records the outcome in the request's history (see :func:`record_outcome`)."""

    def notify(self, request: ApprovalRequest, *,
               store: Store | ApprovalStore | None = None) -> None:
        """Queue the notification of ``request`` (kept in ``store``: a store, or its approval
        port; default: the process runtime's store)."""

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (within ``timeout``), then stop."""


def approval_commands(request_id: str) -> dict[str, str]:
    """The CLI commands that act on a request, as notifications show them."""
    return {"show": f"closedloop approvals show {request_id}",
            "approve": f"closedloop approvals approve {request_id}",
            "reject": f"closedloop approvals reject {request_id} --reason 'WHY'"}


def approval_links(request_id: str, public_url: str | None) -> dict[str, str] | None:
    """The HTTP API's URLs for a request under ``public_url`` (None without one)."""
    if not public_url:
        return None
    base = f"{public_url.rstrip('/')}/api/v1/approvals/{request_id}"
    return {"show": base, "approve": f"{base}/approve", "reject": f"{base}/reject"}


def summary_line(request: ApprovalRequest) -> str:
    """One line: what waits, for which task type, asked by whom, and its risk."""
    risk = (request.risk or {}).get("summary") or ("destructive" if request.destructive
                                                   else "no risk rule matched")
    return (f"Approval needed: {request.task_type} (agent {request.agent_id}, asked by "
            f"{request.requested_by}) - {risk}")


def generic_payload(request: ApprovalRequest, *, public_url: str | None = None
                    ) -> dict[str, Any]:
    """The generic JSON body: the request's facts, a proposal preview, commands and links."""
    return {
        "source": "closedloop", "event": "approval.requested",
        "request_id": request.request_id, "task_type": request.task_type,
        "agent_id": request.agent_id, "requested_by": request.requested_by,
        "status": request.status.value, "created": iso(request.created_at),
        "expires": iso(request.expires_at) if request.expires_at is not None else None,
        "summary": summary_line(request), "risk": request.risk,
        "destructive": request.destructive, "approvals_needed": request.approvals_needed,
        "proposal_digest": request.proposal_digest,
        "proposal_preview": clip(request.proposal, PREVIEW),
        "verdicts": [{k: v.get(k) for k in ("check", "passed") if k in v}
                     for v in request.verdicts[:20] if isinstance(v, Mapping)],
        "step_id": request.step_id, "trace_id": request.trace_id,
        "commands": approval_commands(request.request_id),
        "links": approval_links(request.request_id, public_url),
    }


def slack_escape(text: str) -> str:
    """Text for Slack's mrkdwn, shown as written: ``&``, ``<`` and ``>`` escaped (so stored text
    can make no link or mention), and code fences broken."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("```", "`\u200b``"))


def slack_payload(request: ApprovalRequest, *, public_url: str | None = None
                  ) -> dict[str, Any]:
    """A Slack incoming-webhook body (``text`` and Block Kit ``blocks``): the summary, the
    risk, a proposal preview and the commands (and URLs) to approve or reject."""
    rid = request.request_id
    commands = approval_commands(rid)
    links = approval_links(rid, public_url)
    risk = request.risk or {}
    found = risk.get("items")
    items: list[Any] = found if isinstance(found, list) else []
    risk_lines = [f"• {slack_escape(str(i.get('action', '?')))} "
                  f"{slack_escape(str(i.get('address', i)))}"
                  for i in items[:10] if isinstance(i, Mapping)]
    facts = [f"*Task type:* {slack_escape(request.task_type)}",
             f"*Agent:* {slack_escape(request.agent_id)}",
             f"*Asked by:* {slack_escape(request.requested_by)}",
             f"*Request:* `{rid}`"]
    if request.expires_at is not None:
        facts.append(f"*Expires:* {iso(request.expires_at)}")
    risk_text = slack_escape(str(risk.get("summary") or "no risk rule matched"))
    if request.destructive:
        risk_text = f":warning: *Destructive:* {risk_text}"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": clip(
            slack_escape(f"Approval needed: {request.task_type}"), 140)}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in facts]},
        {"type": "section", "text": {"type": "mrkdwn", "text": clip(
            "\n".join([f"*Risk:* {risk_text}", *risk_lines]), 2900)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": clip(
            f"*Proposal:*\n```{slack_escape(clip(request.proposal, PREVIEW))}```", 2900)}},
    ]
    how = [f"`{slack_escape(commands['approve'])}`", f"`{slack_escape(commands['reject'])}`"]
    if links is not None:
        how.append(f"API: POST {slack_escape(links['approve'])} or {slack_escape(links['reject'])}")
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn",
                                                   "text": clip("\n".join(how), 2900)}]})
    return {"text": slack_escape(summary_line(request)), "blocks": blocks,
            "unfurl_links": False, "unfurl_media": False}


class WebhookNotifier:
    """Posts each new request to ``url``: ``format="json"`` (:func:`generic_payload`) or
    ``"slack"`` (:func:`slack_payload`, for a Slack incoming webhook or any compatible one).

    Sent from a background thread with ``retries`` tries more after a failure that may pass,
    ``backoff`` seconds apart and doubling; then the outcome is recorded in the request's
    history. ``public_url`` (default ``$CLOSEDLOOP_PUBLIC_URL``) adds the API's URLs.
    """

    def __init__(self, url: str, *, format: str | None = None,
                 public_url: str | None = None, retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 30.0, timeout: float = 5.0, max_pending: int = 1000,
                 headers: Mapping[str, str] | None = None) -> None:
        self.url = check_url(url, "approval webhook")
        if format is None:
            format = os.environ.get(FORMAT_ENV, "").strip().lower() or (
                "slack" if where(self.url).endswith("hooks.slack.com") else "json")
        if format not in FORMATS:
            raise ConfigError(f"the approval webhook format must be one of {', '.join(FORMATS)},"
                              f" got {str(format)[:40]!r}")
        self.format = format
        if public_url is None:
            public_url = os.environ.get(PUBLIC_URL_ENV, "").strip() or None
        self.public_url = None if public_url is None else check_url(public_url, "public")
        self._poster = WebhookPoster(self.url, timeout=timeout, max_pending=max_pending,
                                     headers=headers, retries=retries, backoff=backoff,
                                     max_backoff=max_backoff,
                                     name="closedloop-approval-webhook")
        self._inflight: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"WebhookNotifier({where(self.url)!r}, format={self.format!r})"

    @property
    def shown(self) -> str:
        """Where it posts, as it may be shown (no path: it may hold the secret)."""
        return f"{self.format} webhook {where(self.url)}"

    @property
    def sent(self) -> int:
        return self._poster.sent

    @property
    def failed(self) -> int:
        return self._poster.failed

    @property
    def dropped(self) -> int:
        return self._poster.dropped

    def payload(self, request: ApprovalRequest) -> dict[str, Any]:
        """The body posted for ``request``."""
        make = slack_payload if self.format == "slack" else generic_payload
        return make(request, public_url=self.public_url)

    def in_flight(self, request_id: str) -> bool:
        """A notification of ``request_id`` is queued or being tried by this notifier."""
        with self._lock:
            return request_id in self._inflight

    def notify(self, request: ApprovalRequest, *,
               store: Store | ApprovalStore | None = None) -> None:
        rid = request.request_id
        try:
            body = self.payload(request)
            target = _store_or_runtime(store)
        except Exception:  # noqa: BLE001 - never raised to the agent
            _log.exception("closedloop: cannot notify approval request %s", rid)
            return
        with self._lock:
            if rid in self._inflight:
                return
            self._inflight.add(rid)

        def done(ok: bool, attempts: int, error: str) -> None:
            with self._lock:
                self._inflight.discard(rid)
            record_outcome(rid, ok=ok, attempts=attempts, error=error, channel=self.shown,
                           store=target)

        if not self._poster.post(body, on_done=done):
            with self._lock:
                self._inflight.discard(rid)
            _log.warning("closedloop: approval notification queue full; request %s will be "
                         "notified by the next resend", rid)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued notification was sent or given up; False on timeout."""
        return self._poster.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._poster.close(timeout)


def _store_or_runtime(store: Store | ApprovalStore | None) -> Store | ApprovalStore:
    if store is not None:
        return store
    from closedloop._runtime import current_runtime

    return current_runtime().store


def _approval_port(store: Store | ApprovalStore | None) -> ApprovalStore:
    from closedloop.approvals._service import approvals_for
    from closedloop.store import Store

    if store is None or isinstance(store, Store):
        return approvals_for(store)
    return store


def record_outcome(request_id: str, *, ok: bool, attempts: int, error: str = "",
                   channel: str = "webhook", store: Store | ApprovalStore | None = None
                   ) -> None:
    """Append ``notified`` (or ``notify_failed`` with the error) to the request's history;
    a store that cannot be written is logged (the next resend tries again)."""
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
    reason = f"{channel}, {tries}" if ok else f"{channel}, {tries}: {error}"
    try:
        _approval_port(store).note(request_id, action=NOTIFIED if ok else NOTIFY_FAILED, by=BY,
                                  reason=reason)
    except ClosedLoopError as exc:
        _log.warning("closedloop: cannot record the notification of request %s: %s",
                     request_id, exc)


def notify_created(request: ApprovalRequest, *, store: Store | ApprovalStore | None = None,
                   notifier: Notifier | None = None) -> None:
    """The hook to call right after a request is created (``ApprovalStore.create``), with the
    store (or the approval port) that keeps it.

    Queues its notification with ``notifier`` (default: the process runtime's, from
    ``closedloop.configure(notify=...)`` or ``$CLOSEDLOOP_APPROVAL_WEBHOOK``; none: nothing
    happens) and returns at once. Never raises: a notification that cannot be sent is
    recorded, and sent again by :func:`resend_unsent`.
    """
    try:
        if notifier is None:
            from closedloop._runtime import current_runtime

            notifier = current_runtime().notifier
        if notifier is not None and request.status is ApprovalStatus.PENDING:
            notifier.notify(request, store=store)
    except Exception:  # noqa: BLE001 - the request is stored; notifying never breaks the agent
        _log.exception("closedloop: cannot notify approval request %s", request.request_id)


def notification_state(request: ApprovalRequest) -> dict[str, Any]:
    """How the request's notification went, from its history: ``state`` is ``sent``,
    ``failed`` (the last round failed; it is sent again later) or ``unsent`` (no attempt
    recorded yet), with the attempts' count and the last error and time."""
    rounds = [d for d in request.history if d.action in (NOTIFIED, NOTIFY_FAILED)]
    if not rounds:
        return {"state": "unsent", "rounds": 0, "last": None, "error": None}
    last = rounds[-1]
    sent = any(d.action == NOTIFIED for d in rounds)
    return {"state": "sent" if sent else "failed", "rounds": len(rounds),
            "last": iso(last.at), "error": None if sent else last.reason}


def due_for_resend(request: ApprovalRequest, *, now: float, grace_s: float) -> bool:
    """A pending request whose notification is due again: never recorded and older than
    ``grace_s`` (its process had its chance), or failed and past the round's backoff."""
    if request.status is not ApprovalStatus.PENDING:
        return False
    if request.expires_at is not None and now >= request.expires_at:
        return False
    rounds = [d for d in request.history if d.action in (NOTIFIED, NOTIFY_FAILED)]
    if any(d.action == NOTIFIED for d in rounds):
        return False
    if not rounds:
        return now - request.created_at >= grace_s
    wait = min(MAX_ROUND_BACKOFF_S, ROUND_BACKOFF_S * 2.0 ** (len(rounds) - 1))
    return now - rounds[-1].at >= wait


def resend_unsent(*, store: Store | None = None, notifier: Notifier | None = None,
                  grace_s: float = 120.0, limit: int = 1000,
                  now: float | None = None) -> list[str]:
    """Notify again every pending request that is due (:func:`due_for_resend`); the ids
    queued. ``closedloop serve`` calls it every ``--notify-interval``; a worker may too.

    Reads at most ``limit`` pending requests (newest first). A store that cannot be read is
    a :class:`~closedloop.StoreError` (nothing was sent).
    """
    from closedloop.approvals._service import approvals_for, list_requests

    if notifier is None:
        from closedloop._runtime import current_runtime

        notifier = current_runtime().notifier
    if notifier is None:
        return []
    now = time.time() if now is None else now
    approvals = approvals_for(store)
    queued: list[str] = []
    cursor: str | None = None
    seen = 0
    while seen < limit:
        page = list_requests(status=ApprovalStatus.PENDING, limit=min(200, limit - seen),
                             cursor=cursor, store=store)
        for listed in page.requests:
            in_flight = getattr(notifier, "in_flight", None)
            if callable(in_flight) and bool(in_flight(listed.request_id)):
                continue
            full = approvals.get(listed.request_id)
            if full is not None and due_for_resend(full, now=now, grace_s=grace_s):
                notifier.notify(full, store=store)
                queued.append(full.request_id)
        seen += len(page.requests)
        cursor = page.next_cursor
        if cursor is None:
            break
    return queued


def notifier_from(notify: object) -> Notifier | None:
    """What ``closedloop.configure(notify=...)`` accepts: a :class:`Notifier`, a webhook URL
    (a :class:`WebhookNotifier` in the format of ``$CLOSEDLOOP_APPROVAL_WEBHOOK_FORMAT``), or
    None."""
    if notify is None:
        return None
    if isinstance(notify, str):
        return WebhookNotifier(notify)
    if isinstance(notify, Notifier):
        return notify
    raise ConfigError("notify must be a webhook URL, a closedloop.approvals.Notifier or None, "
                      f"got {type(notify).__name__}")


def notifier_from_env() -> Notifier | None:
    """The notifier ``$CLOSEDLOOP_APPROVAL_WEBHOOK`` configures, or None."""
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    return WebhookNotifier(url) if url else None
