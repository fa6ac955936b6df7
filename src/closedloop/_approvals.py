"""The data of durable approval requests, and the port a store backend implements to keep them.

:class:`ApprovalRequest`, :class:`Decision`, :class:`Claim`, :class:`ApprovalPage` and the
:class:`ApprovalStore` port live here, apart from :mod:`closedloop.approvals` (which
re-exports them), so that the backends under :mod:`closedloop.store` can implement the port
without importing a layer above them. So do the rules every backend applies alike, written
once: how a decision changes a request (:func:`plan_decision`), what is stored of a proposal
(:func:`new_request`: redacted text, the digest of the unredacted one, and a sealed copy when
a key is configured), and the keyset cursor of a listing.

Life cycle (see docs/approvals.md)::

    pending ──approve (1 or 2 distinct people)──▶ approved ──claim (fenced lease)──▶ executing
       │  └─reject──▶ rejected                       ▲                               │
       └─expiry────▶ expired                          └──retry (a human)── crashed ◀─┤ lease ran out
                                                                        failed ◀─────┤
                                                                        executed ◀───┘
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from hashlib import sha256
from typing import Any, Protocol, TypeAlias, runtime_checkable

from closedloop._errors import ApprovalError, ConfigError
from closedloop._events import proposal_text
from closedloop._redact import clip, redact_text, redact_value

KEY_ENV = "CLOSEDLOOP_APPROVAL_KEY"
"""A Fernet key (``cryptography``): proposals that hold secrets are stored sealed with it, so
that any worker with the key can execute them byte for byte (see :func:`new_request`)."""
MAX_TEXT = 256 * 1024
"""A proposal or task input longer than this (canonical JSON) is stored cut: only a sealed
copy, or the process that asked, can execute it."""
MAX_REASON = 2000
MAX_NAME = 200


class ApprovalStatus(StrEnum):
    """Where a request is in its life cycle."""

    PENDING = "pending"
    """Waiting for a decision (or for the second approver)."""
    APPROVED = "approved"
    """Approved; not yet claimed by a process that executes it."""
    REJECTED = "rejected"
    EXPIRED = "expired"
    """Nobody decided before ``expires_at``: never executed."""
    EXECUTING = "executing"
    """Claimed by one process, under a lease it renews while the executor runs."""
    EXECUTED = "executed"
    """The executor returned (the step's outcome, after verification, is in ``result``)."""
    FAILED = "failed"
    """The executor raised, or the approved proposal could not be executed as approved."""
    CRASHED = "crashed"
    """The executing process died (its lease ran out): never re-run unless a human retries."""


PORTABLE_NO, PORTABLE_TEXT, PORTABLE_SEALED = 0, 1, 2
"""How a request's exact proposal can be had by a process other than the one that asked:
not at all (it held a secret, or was too long, and no key was configured), from the stored
text (it is exactly the proposal), or by unsealing the sealed copy with the key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """One entry of a request's append-only history: who did what, when, and why."""

    at: float
    action: str
    """``requested``, ``approved``, ``rejected``, ``expired``, ``claimed``, ``executed``,
    ``failed``, ``crashed``, ``retried`` or ``refused``."""
    by: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with an ISO time for people."""
        return {"at": self.at, "time": iso(self.at), "action": self.action, "by": self.by,
                "reason": self.reason}


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalRequest:
    """A proposal waiting for (or past) a human decision, as the store keeps it.

    ``proposal`` is the canonical JSON text (:func:`closedloop._events.proposal_text`),
    redacted and cut to :data:`MAX_TEXT`; ``proposal_digest`` is the SHA-256 of the whole
    unredacted text: what executes must have this digest. ``portable`` says whether another
    process can execute it (:data:`PORTABLE_TEXT`, :data:`PORTABLE_SEALED`) or only the one
    that asked (:data:`PORTABLE_NO`). ``risk`` is ``{"summary": str, "destructive": bool,
    "items": [...]}`` from the loop's risk rules, or None. ``history`` is filled by
    :meth:`ApprovalStore.get` (a listing leaves it empty).
    """

    request_id: str
    task_type: str
    agent_id: str
    status: ApprovalStatus
    created_at: float
    expires_at: float | None
    requested_by: str
    proposal: str
    proposal_digest: str
    step_id: str | None = None
    trace_id: str | None = None
    run_id: str | None = None
    task_input: str | None = None
    """The task input (the verifiers' intent) as canonical JSON, redacted like the proposal."""
    portable: int = PORTABLE_TEXT
    sealed: str | None = None
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    risk: dict[str, Any] | None = None
    approvals_needed: int = 1
    approvers: tuple[str, ...] = ()
    revise: bool = False
    """Rejected with a request for a revised proposal: the reason goes back to the agent."""
    result: dict[str, Any] | None = None
    lease_epoch: int = 0
    lease_until: float | None = None
    updated_at: float = 0.0
    history: tuple[Decision, ...] = ()

    @property
    def destructive(self) -> bool:
        """A risk rule marked the proposal destructive."""
        return bool(self.risk and self.risk.get("destructive"))

    @property
    def idempotency_key(self) -> str:
        """The key the executor receives: the request id (see docs/approvals.md)."""
        return self.request_id

    def body(self) -> dict[str, Any]:
        """The stored JSON body: every field that is not a column of its own."""
        return {"requested_by": self.requested_by, "proposal": self.proposal,
                "proposal_digest": self.proposal_digest, "step_id": self.step_id,
                "trace_id": self.trace_id, "run_id": self.run_id,
                "task_input": self.task_input, "sealed": self.sealed,
                "verdicts": self.verdicts, "risk": self.risk}

    def to_dict(self, *, sealed: bool = False) -> dict[str, Any]:
        """JSON-ready (for ``--json`` and the HTTP API), the sealed copy left out unless
        asked for, ISO times added."""
        out = {"request_id": self.request_id, "task_type": self.task_type,
               "agent_id": self.agent_id, "status": self.status.value,
               "created_at": self.created_at, "created": iso(self.created_at),
               "expires_at": self.expires_at,
               "expires": iso(self.expires_at) if self.expires_at is not None else None,
               "requested_by": self.requested_by, "step_id": self.step_id,
               "trace_id": self.trace_id, "run_id": self.run_id, "proposal": self.proposal,
               "proposal_digest": self.proposal_digest, "task_input": self.task_input,
               "portable": {PORTABLE_NO: "requesting process only", PORTABLE_TEXT: "stored text",
                            PORTABLE_SEALED: "sealed"}.get(self.portable, "?"),
               "verdicts": self.verdicts, "risk": self.risk, "destructive": self.destructive,
               "approvals_needed": self.approvals_needed, "approvers": list(self.approvers),
               "revise": self.revise, "result": self.result, "lease_epoch": self.lease_epoch,
               "updated_at": self.updated_at,
               "history": [d.to_dict() for d in self.history]}
        if sealed:
            out["sealed"] = self.sealed
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """The right to execute one approved request: fenced by ``token`` (a new one per claim)
    and ``epoch`` (one more per claim), valid while the lease is renewed."""

    request: ApprovalRequest
    token: str
    epoch: int
    lease_until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalPage:
    """One page of a listing, newest first; ``next_cursor`` continues it (None: the last)."""

    requests: list[ApprovalRequest]
    next_cursor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"requests": [r.to_dict() for r in self.requests],
                "next_cursor": self.next_cursor}


@runtime_checkable
class ApprovalCounts(Protocol):
    """An approval store that counts requests without reading each one (the optional part of
    the port the store backends implement): what the autonomy evidence asks."""

    def status_counts(self, *, task_type: str, since: float) -> dict[tuple[str, str], int]:
        """Requests of ``task_type`` created at or after ``since``, per ``(agent_id,
        status)``."""


@runtime_checkable
class ApprovalStore(Protocol):
    """Where approval requests live (the approval port of a store backend).

    Every change is atomic and checked against the request's current state in the store, so
    that any number of processes may act on one request: a decision on a request that is no
    longer pending, a claim of one that is not approved, a renewal or finish with a token that
    is not the current lease's, all fail (an :class:`~closedloop.ApprovalError`, or False /
    None where documented). ``now`` defaults to the wall clock (``time.time()``).
    """

    def create(self, request: ApprovalRequest) -> ApprovalRequest:
        """Store a new request (see :func:`new_request`); a request id already stored is not
        stored again: the stored request is returned (the id is the idempotency key)."""

    def get(self, request_id: str) -> ApprovalRequest | None:
        """The request with its whole history, or None."""

    def list(self, *, status: ApprovalStatus | str | None = None,
             task_type: str | None = None, limit: int = 50,
             cursor: str | None = None) -> ApprovalPage:
        """Requests newest first (by creation), optionally of one status and task type;
        pass ``next_cursor`` back, with the same filters, for the next page."""

    def decide(self, request_id: str, *, approve: bool, by: str, reason: str = "",
               revise: bool = False, now: float | None = None) -> ApprovalRequest:
        """Approve or reject a pending request (see :func:`plan_decision` for the rules)."""

    def expire(self, *, now: float | None = None) -> builtins.list[str]:
        """Mark every pending request past its ``expires_at`` expired; their ids."""

    def claim(self, request_id: str | None = None, *, by: str, lease_s: float,
              task_types: Sequence[str] | None = None, portable: Sequence[int] = (
                  PORTABLE_TEXT,), now: float | None = None) -> Claim | None:
        """Atomically move one approved request (``request_id``, else the oldest approved one
        of ``task_types`` whose ``portable`` is one of ``portable``) to executing under a new
        lease; None if there is none (or another process claimed it first)."""

    def renew(self, request_id: str, token: str, *, lease_s: float,
              now: float | None = None) -> bool:
        """Extend the lease; False if ``token`` is no longer the request's (lost)."""

    def finish(self, request_id: str, token: str, *, ok: bool, result: Mapping[str, Any],
               reason: str = "", now: float | None = None) -> bool:
        """Record the execution's end (executed, or failed) under the lease ``token``; False
        if the token is no longer the request's (then nothing is recorded)."""

    def reap(self, *, now: float | None = None) -> builtins.list[str]:
        """Mark every executing request whose lease ran out ``crashed``; their ids."""

    def retry(self, request_id: str, *, by: str, reason: str,
              now: float | None = None) -> ApprovalRequest:
        """A human sends a crashed or failed request back to approved (to execute again)."""

    def note(self, request_id: str, *, action: str, by: str, reason: str,
             now: float | None = None) -> None:
        """Append a history entry without changing the request (a refusal to execute)."""


# ---- risk -----------------------------------------------------------------------------------

RiskRule: TypeAlias = Callable[[Any], "Risk | str | Awaitable[Risk | str | None] | None"]
"""``rule(proposal) -> Risk | str | None``; may be async."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Risk:
    """Why a proposal is high-stakes: a one-line summary for people, whether it destroys
    something (``destructive``: may need two approvers), and the items (a planned delete, a
    ``DROP TABLE``) as data."""

    summary: str
    destructive: bool = True
    items: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the form stored with the request."""
        return {"summary": self.summary, "destructive": self.destructive,
                "items": [dict(i) for i in self.items], "rule": self.rule}


def as_risk(value: object, rule: str) -> Risk | None:
    """A rule's answer as a :class:`Risk` (a string is a destructive risk), or None."""
    if value is None or value is False:
        return None
    if isinstance(value, Risk):
        return value if value.rule else Risk(summary=value.summary,
                                             destructive=value.destructive,
                                             items=value.items, rule=rule)
    return Risk(summary=clip(str(value), 500), rule=rule)


def merge_risks(risks: list[Risk]) -> dict[str, Any] | None:
    """Several rules' risks as one stored risk summary, or None."""
    if not risks:
        return None
    return {"summary": "; ".join(r.summary for r in risks),
            "destructive": any(r.destructive for r in risks),
            "items": [{**i, "rule": r.rule} for r in risks for i in r.items],
            "rules": [r.rule for r in risks]}


# ---- the rules, written once ---------------------------------------------------------------


def iso(ts: float) -> str:
    """Unix seconds as ISO-8601 UTC."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return str(ts)


def check_name(value: object, what: str = "by") -> str:
    """A person's or process's name: a non-empty printable string of at most 200 characters
    (stored redacted)."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME \
            or not value.isprintable():
        raise ConfigError(f"{what} must be a non-empty printable name of at most {MAX_NAME} "
                          f"characters, got {str(value)[:80]!r}")
    return redact_text(value.strip())


def _same(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def new_request_id() -> str:
    """A request id: 32 random hex digits (the idempotency key the executor receives)."""
    return secrets.token_hex(16)


def digest(text: str) -> str:
    """SHA-256 of a canonical text's UTF-8 bytes, as :func:`~closedloop._events.proposal_fields`
    computes ``proposal_digest``."""
    return sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def proposal_digest(proposal: Any) -> str:
    """The digest an approval binds: SHA-256 of the proposal's canonical JSON text, unredacted
    (what ``ApprovalRequest.proposal_digest`` holds; equal data, equal digest)."""
    return digest(proposal_text(proposal))


def sealer(key: str | bytes | None = None) -> Any:
    """A Fernet with ``key``, else ``$CLOSEDLOOP_APPROVAL_KEY``; None when neither is set. A
    key that is not a Fernet key is a :class:`~closedloop.ConfigError`."""
    if key is None:
        key = os.environ.get(KEY_ENV, "").strip() or None
    if key is None:
        return None
    try:
        from cryptography.fernet import Fernet
    except ImportError as exc:
        raise ConfigError(f"{KEY_ENV} is set but cryptography is not installed: "
                          "pip install 'closedloop[approvals]'") from exc
    try:
        return Fernet(key)
    except (ValueError, TypeError, binascii.Error):
        raise ConfigError(f"{KEY_ENV} is not a Fernet key (32 url-safe base64-encoded bytes; "
                          "make one with `python -c 'from cryptography.fernet import Fernet; "
                          "print(Fernet.generate_key().decode())'`)") from None


def new_request(*, task_type: str, agent_id: str, proposal: Any, task_input: Any = None,
                requested_by: str, step_id: str | None = None, trace_id: str | None = None,
                run_id: str | None = None, verdicts: Iterable[Mapping[str, Any]] = (),
                risk: Mapping[str, Any] | None = None, expires_in: float | None = None,
                two_approvers: bool = False, request_id: str | None = None,
                key: str | bytes | None = None, now: float | None = None) -> ApprovalRequest:
    """A pending request for ``proposal``, as it is stored: every text redacted.

    The digest covers the whole unredacted canonical text. When redaction changed the
    proposal or the task input (it held a secret) or either is longer than :data:`MAX_TEXT`,
    the stored text is not what was proposed: with a key (``key``, else
    ``$CLOSEDLOOP_APPROVAL_KEY``) the exact texts are stored sealed (Fernet) and unsealed only
    to execute; without one, only the process that asked can execute the request.
    ``two_approvers`` asks for two distinct approvers when ``risk`` is destructive.
    """
    now = time.time() if now is None else now
    text = proposal_text(proposal)
    intent = None if task_input is None else proposal_text(task_input)
    shown = redact_text(text)
    shown_intent = None if intent is None else redact_text(intent)
    exact = shown == text and len(text) <= MAX_TEXT and shown_intent == intent and (
        intent is None or len(intent) <= MAX_TEXT)
    portable, sealed = PORTABLE_TEXT, None
    if not exact:
        fernet = sealer(key)
        if fernet is None:
            portable = PORTABLE_NO
        else:
            portable = PORTABLE_SEALED
            sealed = fernet.encrypt(json.dumps({"proposal": text, "task_input": intent})
                                    .encode("utf-8", "surrogatepass")).decode("ascii")
    risk_d = None if risk is None else redact_value(dict(risk))
    destructive = bool(risk_d and risk_d.get("destructive"))
    return ApprovalRequest(
        request_id=request_id or new_request_id(), task_type=task_type, agent_id=agent_id,
        status=ApprovalStatus.PENDING, created_at=now, updated_at=now,
        expires_at=None if expires_in is None else now + float(expires_in),
        requested_by=check_name(requested_by, "requested_by"), proposal=_cut(shown),
        proposal_digest=digest(text), step_id=step_id, trace_id=trace_id,
        run_id=None if run_id is None else redact_text(run_id),
        task_input=None if shown_intent is None else _cut(shown_intent), portable=portable,
        sealed=sealed, verdicts=[redact_value(dict(v)) for v in verdicts], risk=risk_d,
        approvals_needed=2 if (two_approvers and destructive) else 1,
        history=(Decision(at=now, action="requested", by=check_name(requested_by,
                                                                    "requested_by")),))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"…[truncated at {MAX_TEXT}]"


def exact_texts(request: ApprovalRequest, *, key: str | bytes | None = None
                ) -> tuple[str, str | None]:
    """``(proposal, task_input)`` exactly as proposed: the stored texts, or the sealed copy
    unsealed with the key. An :class:`~closedloop.ApprovalError` (``cannot_execute``) when
    this process cannot have them, or when they do not have the approved digest."""
    if request.portable == PORTABLE_TEXT:
        text, intent = request.proposal, request.task_input
    elif request.portable == PORTABLE_SEALED and request.sealed is not None:
        fernet = sealer(key)
        if fernet is None:
            raise ApprovalError(f"request {request.request_id} is sealed (its proposal holds a "
                                f"secret) and {KEY_ENV} is not set here", "cannot_execute")
        from cryptography.fernet import InvalidToken

        try:
            payload = json.loads(fernet.decrypt(request.sealed.encode("ascii")))
        except (InvalidToken, ValueError) as exc:
            raise ApprovalError(f"request {request.request_id}: the sealed proposal cannot be "
                                f"opened with this {KEY_ENV} ({type(exc).__name__})",
                                "cannot_execute") from None
        text, intent = payload["proposal"], payload["task_input"]
    else:
        raise ApprovalError(f"request {request.request_id}: its proposal holds a secret (or is "
                            f"too long) and was stored redacted; only the process that asked "
                            f"can execute it (set {KEY_ENV} to store such proposals sealed)",
                            "cannot_execute")
    if digest(text) != request.proposal_digest:
        raise ApprovalError(f"request {request.request_id}: the proposal to execute does not "
                            "have the approved digest; refused", "digest_mismatch")
    return text, intent


def load_proposal(text: str) -> Any:
    """The proposal a worker hands the executor: its canonical JSON, parsed. It must give the
    same canonical text back (so the same digest): a proposal that was no JSON data (an
    object written as its ``str()``) cannot be executed by another process."""
    value = json.loads(text)
    if proposal_text(value) != text:
        raise ApprovalError("the proposal does not survive its JSON form unchanged (it was not "
                            "JSON data); only the process that asked can execute it",
                            "cannot_execute")
    return value


@dataclass(frozen=True, slots=True)
class Change:
    """What a decision does to a request: its new status, approvers and history entries, and
    the error to raise once they are stored (an expired request is marked, then refused)."""

    status: ApprovalStatus
    approvers: tuple[str, ...]
    entries: tuple[Decision, ...]
    revise: bool = False
    error: ApprovalError | None = None


def plan_decision(request: ApprovalRequest, *, approve: bool, by: str, reason: str,
                  revise: bool, now: float) -> Change:
    """The rules of a decision, the same in every backend.

    - only a pending request is decided (``not_pending``); one past ``expires_at`` is marked
      expired and refused (``expired``);
    - nobody approves a request they (or their agent) asked for (``self_approval``);
    - a request needing two approvers stays pending after the first approval, and the same
      person cannot approve twice (``same_approver``);
    - any one rejection rejects it; ``revise`` asks for a revised proposal.
    """
    by = check_name(by)
    reason = clip(redact_text(reason or ""), MAX_REASON)
    rid = request.request_id
    if request.status is not ApprovalStatus.PENDING:
        raise ApprovalError(f"request {rid} is {request.status.value}, not pending",
                            "not_pending")
    if request.expires_at is not None and now >= request.expires_at:
        return Change(ApprovalStatus.EXPIRED, request.approvers,
                      (Decision(at=now, action="expired", by="closedloop",
                                reason="no decision before it expired"),),
                      error=ApprovalError(f"request {rid} expired at {iso(request.expires_at)}",
                                          "expired"))
    if approve and (_same(by, request.requested_by) or _same(by, request.agent_id)):
        raise ApprovalError(f"{by} asked for request {rid} and cannot approve it; another "
                            "person must", "self_approval")
    if not approve:
        return Change(ApprovalStatus.REJECTED, request.approvers,
                      (Decision(at=now, action="rejected", by=by, reason=reason),),
                      revise=bool(revise))
    if any(_same(by, a) for a in request.approvers):
        raise ApprovalError(f"{by} already approved request {rid}; it needs "
                            f"{request.approvals_needed} distinct approvers", "same_approver")
    approvers = (*request.approvers, by)
    done = len(approvers) >= request.approvals_needed
    return Change(ApprovalStatus.APPROVED if done else ApprovalStatus.PENDING, approvers,
                  (Decision(at=now, action="approved", by=by, reason=reason),))


def plan_retry(request: ApprovalRequest, *, by: str, reason: str, now: float) -> Decision:
    """A human's retry of a crashed or failed request (``not_retryable`` otherwise)."""
    if request.status not in (ApprovalStatus.CRASHED, ApprovalStatus.FAILED):
        raise ApprovalError(f"request {request.request_id} is {request.status.value}; only a "
                            "crashed or failed request can be retried", "not_retryable")
    if not (reason or "").strip():
        raise ConfigError("a retry needs a reason")
    return Decision(at=now, action="retried", by=check_name(by),
                    reason=clip(redact_text(reason), MAX_REASON))


def check_lease(lease_s: float) -> float:
    """A lease length: a positive finite number of seconds."""
    if not isinstance(lease_s, int | float) or not 0 < lease_s < 1e9:
        raise ConfigError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
    return float(lease_s)


def new_token() -> str:
    """A lease token (fencing): 32 random hex digits."""
    return secrets.token_hex(16)


def result_text(result: Mapping[str, Any]) -> str:
    """A finished request's ``result`` as stored: JSON, redacted."""
    return json.dumps(redact_value(dict(result)), default=str, separators=(",", ":"))


def clean_reason(reason: str) -> str:
    """A reason as stored: redacted and cut."""
    return clip(redact_text(reason or ""), MAX_REASON)


# ---- rows, shared by the SQL backends ------------------------------------------------------

COLUMNS = ("request_id", "task_type", "agent_id", "status", "created_at", "expires_at",
           "updated_at", "portable", "approvals_needed", "approvers", "revise", "lease_epoch",
           "lease_until", "body", "result")
"""The columns of the ``approvals`` table a request is read from, in :func:`from_row` order
(``lease_token`` is never read back: it is the fence)."""


def to_row(r: ApprovalRequest) -> tuple[Any, ...]:
    """The request as a row of ``approvals`` in :data:`COLUMNS` order (JSON as text)."""
    return (r.request_id, r.task_type, r.agent_id, r.status.value, r.created_at, r.expires_at,
            r.updated_at, r.portable, r.approvals_needed, json.dumps(list(r.approvers)),
            bool(r.revise), r.lease_epoch, r.lease_until,
            json.dumps(r.body(), default=str, separators=(",", ":")),
            None if r.result is None else result_text(r.result))


def from_row(row: Sequence[Any], history: Sequence[Decision] = ()) -> ApprovalRequest:
    """A request from a row in :data:`COLUMNS` order."""
    body = json.loads(row[13]) if isinstance(row[13], str) else dict(row[13])
    return ApprovalRequest(
        request_id=row[0], task_type=row[1], agent_id=row[2], status=ApprovalStatus(row[3]),
        created_at=row[4], expires_at=row[5], updated_at=row[6], portable=int(row[7]),
        approvals_needed=int(row[8]), approvers=tuple(json.loads(row[9])),
        revise=bool(row[10]), lease_epoch=int(row[11]), lease_until=row[12],
        requested_by=body["requested_by"], proposal=body["proposal"],
        proposal_digest=body["proposal_digest"], step_id=body.get("step_id"),
        trace_id=body.get("trace_id"), run_id=body.get("run_id"),
        task_input=body.get("task_input"), sealed=body.get("sealed"),
        verdicts=body.get("verdicts") or [], risk=body.get("risk"),
        result=None if row[14] is None else json.loads(row[14]), history=tuple(history))


def decision_from_row(row: Sequence[Any]) -> Decision:
    """A history entry from ``(at, action, by, reason)``."""
    return Decision(at=row[0], action=row[1], by=row[2], reason=row[3] or "")


def with_history(request: ApprovalRequest, history: Sequence[Decision]) -> ApprovalRequest:
    """``request`` with its history."""
    return replace(request, history=tuple(history))


def check_limit(limit: int) -> int:
    """A page size: 1 to 1000."""
    if not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise ConfigError(f"limit must be an integer from 1 to 1000, got {limit!r}")
    return limit


def check_status(status: ApprovalStatus | str | None) -> ApprovalStatus | None:
    """A status filter, or None; a bad one is a :class:`~closedloop.ConfigError`."""
    if status is None:
        return None
    try:
        return ApprovalStatus(status)
    except ValueError:
        allowed = ", ".join(s.value for s in ApprovalStatus)
        raise ConfigError(f"unknown approval status {status!r}; use one of: {allowed}") from None


def encode_cursor(request: ApprovalRequest) -> str:
    """The opaque cursor that continues a listing after ``request``."""
    raw = f"{request.created_at!r}:{request.request_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """``(created_at, request_id)`` of a cursor; anything else is a ConfigError."""
    text = cursor.strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        at, sep, rid = raw.partition(":")
        if not sep or not rid:
            raise ValueError(raw)
        return float(at), rid
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ConfigError(f"cursor {cursor!r} is not one an approval listing gave") from None


def page(found: Sequence[ApprovalRequest], limit: int) -> ApprovalPage:
    """A page from up to ``limit + 1`` requests read newest first."""
    if len(found) > limit:
        kept = list(found[:limit])
        return ApprovalPage(requests=kept, next_cursor=encode_cursor(kept[-1]))
    return ApprovalPage(requests=list(found))
