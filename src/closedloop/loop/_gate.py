"""The loop's side of durable approval: the I/O its gate actions call (the machine decides).

:class:`ApprovalPolicy` is what a user sets (``Loop(approval=ApprovalPolicy(...))``);
:class:`ApprovalGate` is built from it for one loop and does the store calls the machine's
:class:`~closedloop.loop.Gate` actions name: store a request, read its decision, claim it
under a fenced lease (renewed by a heartbeat thread while the executor runs), record its end.
Every store failure propagates to the machine, which fails closed: nothing executes.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from closedloop._approvals import (
    PORTABLE_NO,
    PORTABLE_SEALED,
    PORTABLE_TEXT,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStore,
    Claim,
    digest,
    exact_texts,
    load_proposal,
    new_request,
    sealer,
)
from closedloop._errors import ApprovalError, ConfigError
from closedloop._events import proposal_text

_log = logging.getLogger("closedloop")

_current_key: ContextVar[str | None] = ContextVar("closedloop_idempotency_key", default=None)


def current_idempotency_key() -> str | None:
    """The idempotency key of the execution running in this context: the approval request's
    id while an approved request's executor runs (in the process that asked or in a worker),
    else None. Hand it to the external system so that it deduplicates too (the EC2 demo
    passes it as ``ClientToken``): if a crashed execution is retried by a human, the system
    sees the same key and refuses a second effect. Stable across retries of one request."""
    return _current_key.get()


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalPolicy:
    """How a loop's durable approvals behave.

    - ``wait``: the step waits for the decision and executes an approved request itself
      (``run`` blocks, ``arun`` awaits); False (the default): it returns at once with
      outcome ``awaiting_approval`` and ``result.approval_id``, and a worker executes the
      request once approved.
    - ``timeout``: seconds to wait at most (None: until the request expires); then the step
      returns ``awaiting_approval`` and the request stays open for a worker.
    - ``expires_in``: seconds a request waits for a decision before it expires (None: never).
    - ``two_approvers``: a destructive request (a risk rule said so) needs two distinct
      approvers.
    - ``poll``: seconds between reads of the decision while waiting; ``lease``: seconds an
      execution's lease lasts without renewal (renewed every third of it): a process that
      dies while executing is reported ``crashed`` this long after.
    - ``requested_by``: who asks (default ``AGENT_ID@HOSTNAME``); nobody of that name, or the
      agent's, can approve.
    """

    wait: bool = False
    timeout: float | None = None
    expires_in: float | None = 86_400.0
    two_approvers: bool = False
    poll: float = 1.0
    lease: float = 30.0
    requested_by: str | None = None

    def __post_init__(self) -> None:
        for name in ("timeout", "expires_in"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value >= 0
                                          and math.isfinite(value)):
                raise ConfigError(f"{name} must be None or seconds ≥ 0, got {value!r}")
        for name in ("poll", "lease"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < 1e9):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")


class Lease:
    """A claim being executed: renewed by a daemon thread until :meth:`stop`."""

    def __init__(self, approvals: ApprovalStore, claim: Claim, lease_s: float) -> None:
        self.approvals = approvals
        self.claim = claim
        self.request = claim.request
        self.lease_s = lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name=f"closedloop-lease-{claim.request.request_id[:8]}")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.approvals.renew(self.request.request_id, self.claim.token,
                                            lease_s=self.lease_s):
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease may run out
                _log.warning("closedloop: could not renew the lease of approval request %s",
                             self.request.request_id, exc_info=True)

    def stop(self) -> None:
        """Stop renewing."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


class ApprovalGate:
    """One loop's durable approval I/O, on the approval port of its store."""

    def __init__(self, store: Callable[[], ApprovalStore | None], policy: ApprovalPolicy,
                 agent_id: str) -> None:
        self._store = store
        self.policy = policy
        self.requested_by = policy.requested_by or f"{agent_id}@{socket.gethostname()}"

    def approvals(self) -> ApprovalStore:
        """The approval port of the loop's store; a loop without a store cannot ask."""
        found = self._store()
        if found is None:
            raise ApprovalError("this loop has no store to keep approval requests in "
                                "(store=None): nothing executes without one", "unavailable")
        return found

    # ----- the process that asks ------------------------------------------------------------
    def request(self, task_type: str, agent_id: str, proposal: Any, task_input: Any,  # noqa: PLR0917 - called with a gate action's positional args
                step_id: str, trace_id: str, run_id: str | None,
                verdicts: Sequence[Mapping[str, Any]],
                risk: Mapping[str, Any] | None) -> ApprovalRequest:
        """Store a pending request for this proposal (positional: a gate action's args)."""
        from closedloop.approvals import notify_created  # approvals imports the loop

        policy = self.policy
        approvals = self.approvals()
        created = approvals.create(new_request(
            task_type=task_type, agent_id=agent_id, proposal=proposal, task_input=task_input,
            requested_by=self.requested_by, step_id=step_id, trace_id=trace_id,
            run_id=run_id, verdicts=verdicts, risk=risk, expires_in=policy.expires_in,
            two_approvers=policy.two_approvers))
        notify_created(created, store=approvals)  # queued: never raises, never waits
        return created

    def decision(self, request_id: str) -> ApprovalRequest:
        """The request as it stands (marked expired first if it is past its expiry)."""
        approvals = self.approvals()
        found = approvals.get(request_id)
        if found is None:
            raise ApprovalError(f"approval request {request_id} is gone from the store",
                                "not_found")
        if found.status is ApprovalStatus.PENDING and found.expires_at is not None \
                and time.time() >= found.expires_at:
            approvals.expire()
            found = approvals.get(request_id) or found
        return found

    def claim_own(self, request_id: str, proposal: Any) -> Lease | None:
        """Claim our own approved request to execute it from memory; None if another process
        claimed it first. The proposal in memory must still have the approved digest."""
        approvals = self.approvals()
        claim = approvals.claim(request_id, by=self.requested_by, lease_s=self.policy.lease,
                                portable=(PORTABLE_NO, PORTABLE_TEXT, PORTABLE_SEALED))
        if claim is None:
            return None
        lease = Lease(approvals, claim, self.policy.lease)
        if digest(proposal_text(proposal)) != claim.request.proposal_digest:
            self.finish(lease, ok=False, result={"outcome": "error"},
                        reason="the proposal changed in memory after it was approved; refused")
            raise ApprovalError(f"request {request_id}: the proposal changed after it was "
                                "approved; refused", "digest_mismatch")
        return lease

    # ----- a worker -------------------------------------------------------------------------
    def claim_next(self, request_id: str | None, task_type: str, by: str
                   ) -> tuple[Lease, Any, Any] | None:
        """Claim an approved request of ``task_type`` (``request_id``, else the oldest one this
        process can execute); ``(lease, proposal, task_input)``, or None when there is none.

        Only requests whose exact proposal this process can have are claimed: stored exactly,
        or sealed when a key is configured here. Asked for one it cannot execute, it records
        the refusal and raises (``cannot_execute``), leaving the request approved for the
        process that asked."""
        approvals = self.approvals()
        portable = (PORTABLE_TEXT, PORTABLE_SEALED) if sealer() is not None else (PORTABLE_TEXT,)
        if request_id is not None:
            found = approvals.get(request_id)
            if found is None:
                raise ApprovalError(f"no approval request {request_id!r}", "not_found")
            if found.task_type != task_type:
                raise ConfigError(f"request {request_id} is of task type {found.task_type!r}, "
                                  f"not {task_type!r}")
            if found.status is ApprovalStatus.APPROVED and found.portable not in portable:
                try:
                    exact_texts(found)
                except ApprovalError as exc:
                    approvals.note(request_id, action="refused", by=by, reason=str(exc))
                    raise
        claim = approvals.claim(request_id, by=by, lease_s=self.policy.lease,
                                task_types=[task_type], portable=portable)
        if claim is None:
            return None
        lease = Lease(approvals, claim, self.policy.lease)
        try:
            text, intent = exact_texts(claim.request)
            proposal = load_proposal(text)
            task_input = None if intent is None else load_proposal(intent)
        except (ApprovalError, ValueError) as exc:
            self.finish(lease, ok=False, result={"outcome": "error"},
                        reason=f"not executed: {exc}")
            raise ApprovalError(str(exc), getattr(exc, "code", "cannot_execute")) from None
        return lease, proposal, task_input

    # ----- both -----------------------------------------------------------------------------
    @staticmethod
    def finish(lease: Lease, ok: bool, result: Mapping[str, Any], reason: str = "") -> bool:
        """Stop renewing and record the execution's end; False if the lease was lost."""
        lease.stop()
        done = lease.approvals.finish(lease.request.request_id, lease.claim.token, ok=ok,
                                      result=result, reason=reason)
        if not done:
            _log.error("closedloop: approval request %s ended (%s) after its lease was lost; "
                       "it is recorded as crashed", lease.request.request_id,
                       result.get("outcome"))
        return done
