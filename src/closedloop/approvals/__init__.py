"""Durable, exactly-once human approval (see docs/approvals.md).

A step whose gate says "approve" (the ``approve`` autonomy level without an inline
``approver=``, or any proposal a risk rule marks high-stakes, at any level) is stored as an
:class:`ApprovalRequest` in the loop's store: the proposal redacted, the digest of the exact
one, its verdicts and risk, who asked, an expiry. People decide it from ``closedloop
approvals``, the HTTP API or this module's functions; it then executes exactly once, in the
process that asked (if it waits) or in a worker, bound to the approved digest.

- Service API (CLI and HTTP alike): :func:`list_requests`, :func:`get_request`,
  :func:`approve`, :func:`reject`, :func:`retry`, :func:`expire_due`, :func:`approvals_for`.
- Risk rules (high-stakes proposals always gate): :class:`Risk`, :data:`RiskRule`,
  :func:`destructive_terraform`, :func:`destructive_sql`.
- Executing approved requests: :meth:`closedloop.Loop.run_approved`, :class:`Worker`
  (``closedloop worker``); the executor's idempotency key:
  :func:`closedloop.current_idempotency_key`; :class:`~closedloop.loop.ApprovalPolicy`.
- Notifications (:mod:`closedloop.approvals._notify`): :class:`Notifier`,
  :class:`WebhookNotifier` (generic JSON or Slack), the hook :func:`notify_created` that
  whoever creates a request calls, :func:`resend_unsent` and :func:`notification_state`;
  configured by ``closedloop.configure(notify=...)`` or ``$CLOSEDLOOP_APPROVAL_WEBHOOK``.
- The store port: :class:`ApprovalStore` (memory, SQLite, PostgreSQL), with
  :class:`ApprovalRequest`, :class:`ApprovalStatus`, :class:`Decision`, :class:`Claim`,
  :class:`ApprovalPage`.
"""

from closedloop._approvals import (
    KEY_ENV,
    ApprovalCounts,
    ApprovalPage,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStore,
    Claim,
    Decision,
    Risk,
    RiskRule,
    proposal_digest,
)
from closedloop._errors import ApprovalError
from closedloop.approvals._notify import (
    FORMAT_ENV,
    PUBLIC_URL_ENV,
    WEBHOOK_ENV,
    Notifier,
    WebhookNotifier,
    notification_state,
    notifier_from,
    notifier_from_env,
    notify_created,
    resend_unsent,
)
from closedloop.approvals._risk import destructive_sql, destructive_terraform
from closedloop.approvals._service import (
    approvals_for,
    approve,
    expire_due,
    get_request,
    list_requests,
    reject,
    retry,
)
from closedloop.approvals._worker import Worker, loops_of

__all__ = [
    "FORMAT_ENV",
    "KEY_ENV",
    "PUBLIC_URL_ENV",
    "WEBHOOK_ENV",
    "ApprovalCounts",
    "ApprovalError",
    "ApprovalPage",
    "ApprovalRequest",
    "ApprovalStatus",
    "ApprovalStore",
    "Claim",
    "Decision",
    "Notifier",
    "Risk",
    "RiskRule",
    "WebhookNotifier",
    "Worker",
    "approvals_for",
    "approve",
    "destructive_sql",
    "destructive_terraform",
    "expire_due",
    "get_request",
    "list_requests",
    "loops_of",
    "notification_state",
    "notifier_from",
    "notifier_from_env",
    "notify_created",
    "proposal_digest",
    "reject",
    "resend_unsent",
    "retry",
]
