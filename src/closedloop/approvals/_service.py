"""The small service API over a store's approval requests: what the CLI, the HTTP API and the
user's own code call to list, show and decide requests.

Every function takes the store (a :class:`~closedloop.Store`; default: the process runtime's)
and returns the request as stored after the change, or raises
:class:`~closedloop.ApprovalError` with a ``code`` saying why (``not_found``,
``not_pending``, ``expired``, ``self_approval``, ``same_approver``, ``not_retryable``) or
:class:`~closedloop.StoreError` when the store cannot be read or written (then nothing
changed). They never execute anything: an approved request is executed by the process that
asked (if it waits) or by a worker (:class:`~closedloop.approvals.Worker`, ``closedloop
worker``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from closedloop._approvals import ApprovalPage, ApprovalRequest, ApprovalStatus, ApprovalStore
from closedloop._errors import ApprovalError, ConfigError

if TYPE_CHECKING:
    from closedloop.store import Store


def approvals_for(store: Store | None = None) -> ApprovalStore:
    """The approval requests kept by ``store`` (default: the process runtime's store)."""
    from closedloop.store import approval_store_for

    if store is None:
        from closedloop._runtime import current_runtime

        store = current_runtime().store
    return approval_store_for(store)


def list_requests(*, status: ApprovalStatus | str | None = None, task_type: str | None = None,
                  limit: int = 50, cursor: str | None = None,
                  store: Store | None = None) -> ApprovalPage:
    """Requests newest first, optionally of one status and task type (``pending``: those
    waiting for a decision); pass ``next_cursor`` back for the next page. Pending requests
    past their expiry are marked expired first, and executing ones whose lease ran out
    crashed, so the listing says what is true now."""
    approvals = approvals_for(store)
    _settle_quietly(approvals)
    return approvals.list(status=status, task_type=task_type, limit=limit, cursor=cursor)


def _settle_quietly(approvals: ApprovalStore) -> None:
    from contextlib import suppress

    from closedloop._errors import StoreError

    with suppress(StoreError):  # a read-only store: show it as it is
        approvals.expire()
        approvals.reap()


def get_request(request_id: str, *, store: Store | None = None) -> ApprovalRequest:
    """One request with its whole history; ``not_found`` if there is none."""
    found = approvals_for(store).get(_request_id(request_id))
    if found is None:
        raise ApprovalError(f"no approval request {request_id!r}", "not_found")
    return found


def approve(request_id: str, *, by: str, reason: str = "",
            store: Store | None = None) -> ApprovalRequest:
    """Approve a pending request as ``by`` (a person's name; never the requester's). A request
    needing two approvers stays pending until a second, different person approves."""
    return approvals_for(store).decide(_request_id(request_id), approve=True, by=by,
                                       reason=reason)


def reject(request_id: str, *, by: str, reason: str, revise: bool = False,
           store: Store | None = None) -> ApprovalRequest:
    """Reject a pending request as ``by``, saying why. ``revise``: the reason goes back to the
    agent, which is asked for a revised proposal (when the requesting process still waits)."""
    if not (reason or "").strip():
        raise ConfigError("a rejection needs a reason")
    return approvals_for(store).decide(_request_id(request_id), approve=False, by=by,
                                       reason=reason, revise=revise)


def retry(request_id: str, *, by: str, reason: str,
          store: Store | None = None) -> ApprovalRequest:
    """Send a crashed (or failed) request back to approved, so a worker executes it again.
    Check first that the first execution did not take effect: the executor receives the same
    idempotency key, which lets a deduplicating system refuse a second run."""
    return approvals_for(store).retry(_request_id(request_id), by=by, reason=reason)


def expire_due(*, store: Store | None = None) -> list[str]:
    """Mark every pending request past its expiry expired; their ids."""
    return approvals_for(store).expire()


def _request_id(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise ConfigError(f"not a request id: {str(value)[:80]!r}")
    return value.strip()
