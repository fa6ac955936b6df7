"""The structured event recorded for every step: the unit of the long-term learning layer.

``StepEvent`` is a ``NamedTuple`` on purpose: it is built on the agent's hot path and written
to the store as-is, so it must be cheap to create and already shaped like a table row.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from json.encoder import c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring as encode_string
from typing import Any, Final, NamedTuple

from closedloop._errors import ConfigError

try:  # CPython's own SHA-256: a fifth cheaper than OpenSSL's for a proposal-sized text
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - a build without it (3.12 names it _sha2)
    from hashlib import sha256


class Outcome(StrEnum):
    """How a step ended."""

    SUCCEEDED = "succeeded"
    """Executed and every verifier passed."""
    SUGGESTED = "suggested"
    """Suggest-only autonomy: the validated proposal was recorded, never executed."""
    AWAITING_APPROVAL = "awaiting_approval"
    """A durable approval request was stored (``StepResult.approval_id``) and the step did
    not wait for its decision (or stopped waiting): not executed yet; a worker executes it
    once approved, recording a second event under the same step id."""
    REJECTED = "rejected"
    """The approver (inline, or a person deciding the request) said no."""
    EXPIRED = "expired"
    """Nobody decided the approval request before it expired: never executed."""
    FAILED = "failed"
    """Validation (after the last re-ask) or verification failed; see ``error_type``."""
    BLOCKED = "blocked"
    """A critical validation issue stopped the step without re-ask."""
    ERROR = "error"
    """An exception in the agent, the executor, or a check; see ``error_type``."""
    PAUSED = "paused"
    """A guard refused the step for now (for example a validation-failure spike)."""
    HALTED = "halted"
    """A guard refused the step until a human lifts the halt."""
    CONTROL_UNAVAILABLE = "control_unavailable"
    """Admission could not be decided (control state unreadable): refused, fail closed."""
    BUDGET_EXCEEDED = "budget_exceeded"
    """A budget of the step's run (steps, tokens, cost, wall time) was spent: the step was
    refused before it acted; the run ends with this outcome too."""
    ABORTED = "aborted"
    """Of a run only (:class:`closedloop.Run`): ``run.abort()`` ended it; its compensations
    ran."""
    COMPENSATED = "compensated"
    """A compensation step: an earlier action was rolled back (and the rollback verified,
    when it has a check); ``parent_step_id`` is the step it undid."""
    COMPENSATION_FAILED = "compensation_failed"
    """A compensation step whose rollback raised or whose check found the state not
    restored: a human must look (``error_message`` says what is left)."""


class ErrorType(StrEnum):
    """Why a step did not succeed; stable values, safe as metric labels."""

    VALIDATION = "validation"
    VERIFICATION = "verification"
    VERIFICATION_UNKNOWN = "verification_unknown"
    BLOCKED = "blocked"
    AGENT = "agent"
    EXECUTOR = "executor"
    VALIDATOR_ERROR = "validator_error"
    VERIFIER_ERROR = "verifier_error"
    PAUSED = "paused"
    HALTED = "halted"
    CONTROL_UNAVAILABLE = "control_unavailable"
    BUDGET_EXCEEDED = "budget_exceeded"
    """A run budget refused the step (outcome ``budget_exceeded``)."""
    RUN_HALTED = "run_halted"
    """The step's run was halted or aborted: the step was refused (outcome ``halted``)."""
    COMPENSATION = "compensation"
    """A rollback raised, or its check found the state not restored."""
    APPROVAL = "approval"
    """The approval request could not be stored or read, or the approved proposal could not
    be executed as approved: nothing was executed (fail closed)."""


class StepEvent(NamedTuple):
    """One step of one agent, as recorded in the store (one row).

    The first ten fields after the timestamp are the design's event; then closedloop's: the
    trace id, attempts, autonomy, outcome, per-stage timings, and a JSON ``detail`` with the
    issues and exception of a step that did not succeed. Schema v3 appends, each with a
    default (``None``: events of older stores, and events built without it):

    - ``step_id``: unique per step across processes and machines (:func:`new_step_id`);
      ``parent_step_id``: the step whose agent, executor or check ran this one (nested
      :meth:`~closedloop.Loop.run`); ``run_id``: the run (a multi-step agent's task) the step
      belongs to, given per call or inherited from the parent step.
    - ``model``, ``provider``: of the step's last model call (the SDK integrations report
      them, :meth:`~closedloop.Attempt.record_usage` too); ``agent_version``,
      ``prompt_version``: the loop's; ``labels``: a few low-cardinality dimensions
      (:func:`check_labels`).
    - ``cached_input_tokens`` (part of ``input_tokens`` served from a prompt cache) and
      ``cost_usd`` (None until priced).
    - ``proposal``: the last proposal as canonical JSON text (:func:`proposal_text`),
      redacted and cut to :data:`PROPOSAL_MAX_CHARS` when stored; ``proposal_digest``: the
      SHA-256 of the whole proposal, unredacted (:func:`proposal_text` says why).

    Every text is redacted before it is stored (the store's writer does it, off the agent's
    path), so the event a step returns may hold text its stored copy shows redacted.
    """

    ts: float
    trace_id: str
    agent_id: str
    task_type: str
    autonomy: str
    outcome: str
    attempts: int
    input_tokens: int
    output_tokens: int
    latency_ms: float
    validation_passed: bool | None
    verification_passed: bool | None
    error_type: str | None
    error_message: str | None
    propose_ms: float
    validate_ms: float
    act_ms: float
    verify_ms: float
    detail: dict[str, Any] | None
    # ---- schema v3 ----
    step_id: str | None = None
    parent_step_id: str | None = None
    run_id: str | None = None
    model: str | None = None
    provider: str | None = None
    agent_version: str | None = None
    prompt_version: str | None = None
    labels: dict[str, str] | None = None
    cached_input_tokens: int | None = None
    cost_usd: float | None = None
    proposal: str | None = None
    proposal_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, with an ISO-8601 timestamp added for people."""
        out = self._asdict()
        out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.ts)) + "Z"
        return out

    def to_row(self) -> tuple[Any, ...]:
        """The row stored in SQL backends, a plain tuple with ``detail`` and ``labels`` as
        JSON text."""
        row = list(self)
        for i in JSON_COLUMNS:
            if row[i] is not None:
                row[i] = dumps(row[i])
        return tuple(row)


EVENT_FIELDS: tuple[str, ...] = StepEvent._fields
V2_FIELDS: tuple[str, ...] = EVENT_FIELDS[:EVENT_FIELDS.index("detail") + 1]
"""The fields of schema v2, every one required; the rest have defaults."""
JSON_COLUMNS: tuple[int, ...] = (EVENT_FIELDS.index("detail"), EVENT_FIELDS.index("labels"))
"""Positions of the fields stored as JSON (text in SQLite, jsonb in PostgreSQL)."""

# ---- an event built by field name ----------------------------------------------------------
# Each field's position, by name. The loop fills a row field by field, each one named where it
# is set (``row[TRACE_ID] = trace_id``), from a template holding the loop's constant fields,
# and makes the event from it (``tuple.__new__(StepEvent, row)``): built by name at the
# cost of a positional tuple. ``StepEvent(ts=..., ...)`` with 31 keywords costs four times as much
# (CPython passes a class's keywords through a dict and matches each one by name).
# Final literals: a type checker knows the type of ``event[TASK_TYPE]`` (a ``str``).
TS: Final = 0
TRACE_ID: Final = 1
AGENT_ID: Final = 2
TASK_TYPE: Final = 3
AUTONOMY: Final = 4
OUTCOME: Final = 5
ATTEMPTS: Final = 6
INPUT_TOKENS: Final = 7
OUTPUT_TOKENS: Final = 8
LATENCY_MS: Final = 9
VALIDATION_PASSED: Final = 10
VERIFICATION_PASSED: Final = 11
ERROR_TYPE: Final = 12
ERROR_MESSAGE: Final = 13
PROPOSE_MS: Final = 14
VALIDATE_MS: Final = 15
ACT_MS: Final = 16
VERIFY_MS: Final = 17
DETAIL: Final = 18
STEP_ID: Final = 19
PARENT_STEP_ID: Final = 20
RUN_ID: Final = 21
MODEL: Final = 22
PROVIDER: Final = 23
AGENT_VERSION: Final = 24
PROMPT_VERSION: Final = 25
LABELS: Final = 26
CACHED_INPUT_TOKENS: Final = 27
COST_USD: Final = 28
PROPOSAL: Final = 29
PROPOSAL_DIGEST: Final = 30
_where = globals()
if [_where.get(name.upper()) for name in EVENT_FIELDS] != list(range(len(EVENT_FIELDS))):
    raise RuntimeError("closedloop: a StepEvent field has no position constant of its name")
del _where


def event_row(**fields: Any) -> list[Any]:
    """A row to fill by field name: ``fields`` set, every other field ``None`` (a template:
    copy it with ``row.copy()`` per event)."""
    row: list[Any] = [None] * len(EVENT_FIELDS)
    for name, value in fields.items():
        row[EVENT_FIELDS.index(name)] = value
    return row



def dumps(value: Any) -> str:
    """JSON text as the stores keep it: compact, anything JSON cannot hold as its ``str()``."""
    return json.dumps(value, default=str, separators=(",", ":"))


# ---- the proposal: canonical text and digest ------------------------------------------------

PROPOSAL_MAX_CHARS = 16_384
"""A stored proposal's text is cut to this many characters (after redaction), with
:data:`PROPOSAL_CUT` appended: a cut proposal is no longer valid JSON, its
``proposal_digest`` still covers the whole of it. 16 KiB keeps a plan-sized proposal whole
while bounding the row (a million events with capped proposals: at most ~16 GB)."""
PROPOSAL_CUT = f"…[truncated at {PROPOSAL_MAX_CHARS} chars]"
_HELD_CHARS = PROPOSAL_MAX_CHARS + 4_096
"""How much of the text an event holds until the store's writer redacts it: more than is
stored, so that a secret (a token, a JWT; a private key block cut short is redacted whole)
cut here lies past the stored cut. It bounds what a queued event holds: a store's queue of
``max_queue`` events (100,000 by default) holds at most ~2 GB of proposal text, if every
step proposed more than 20 KiB while the writer could not keep up."""


def _jsonable(value: Any) -> Any:
    """What the canonical JSON writes for a value JSON has no type for."""
    dump = getattr(value, "model_dump", None)  # a pydantic model
    if callable(dump):
        return dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            default=_jsonable)
_encode: Callable[[Any], str] = _encoder.encode
if c_make_encoder is not None:  # CPython's C encoder, made once instead of per call
    # without a markers dict (one per call would be needed to share it between threads): a
    # cycle then raises RecursionError instead of ValueError, caught alike below
    _c_encode = c_make_encoder(None, _jsonable, encode_string, None, ":", ",", True, False,
                               True)

    def _encode(value: Any) -> str:  # the C encoder's form of _encoder.encode
        return "".join(_c_encode(value, 0))


def proposal_text(proposal: Any) -> str:
    """The canonical JSON text of a proposal, the form it is stored and digested in.

    Canonical: ``json.dumps(proposal, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)``, with pydantic models as their ``model_dump(mode="json")``,
    dataclasses as ``asdict``, sets as lists sorted by ``repr`` and any other object as its
    ``str()``; a value that still cannot be written (a dict with keys of mixed types, a
    cycle) is written as the JSON string of its ``repr()``. Equal data gives equal text
    whichever order its dicts were built in.

    ``proposal_digest`` is the SHA-256 of this text's UTF-8 bytes, unredacted and uncut: an
    approval bound to a digest then authorises exactly the proposal the executor receives.
    Over the redacted text, two proposals differing only in a secret (another password,
    another account number) would share a digest, and the digest would change whenever the
    redaction rules do. The price: someone who can read the store and guess a short secret
    can check the guess against the digest; keep such secrets out of proposals.
    """
    kind = type(proposal)
    if kind is int:
        return str(proposal)
    if kind is str:
        return encode_string(proposal)
    try:
        return _encode(proposal)
    except (TypeError, ValueError, RecursionError):
        return encode_string(repr(proposal))


def proposal_fields(proposal: Any) -> tuple[str | None, str | None]:
    """``(proposal, proposal_digest)`` of a step event: the canonical text (held up to a
    bound, cut and redacted when stored) and its SHA-256 in hex. ``(None, None)`` for none."""
    if proposal is None:
        return None, None
    text = proposal_text(proposal)
    digest = sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return (text if len(text) <= _HELD_CHARS else text[:_HELD_CHARS]), digest


def clip_proposal(text: str) -> str:
    """A redacted proposal text cut to :data:`PROPOSAL_MAX_CHARS`, marked when cut."""
    if len(text) <= PROPOSAL_MAX_CHARS:
        return text
    return text[:PROPOSAL_MAX_CHARS] + PROPOSAL_CUT


# ---- labels --------------------------------------------------------------------------------

MAX_LABELS = 16
"""At most this many labels per step (the loop's and the call's together)."""
MAX_LABEL_KEY = 64
MAX_LABEL_VALUE = 128
_LABEL_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def check_labels(labels: Mapping[str, str] | None, base: Mapping[str, str] | None = None,
                 ) -> dict[str, str] | None:
    """``base`` updated with ``labels``, checked: a :class:`~closedloop.ConfigError` (one
    line) for more than :data:`MAX_LABELS` keys, a key that is not a name (letters, digits,
    ``_ . -``, at most :data:`MAX_LABEL_KEY`) or a value that is not a string of at most
    :data:`MAX_LABEL_VALUE` characters. None when there are none.

    Labels are dimensions to group steps by (``customer_tier``, ``region``, ``experiment``):
    keep their values few. They are redacted when stored, like every text.
    """
    if labels is None:
        return dict(base) if base else None
    if not isinstance(labels, Mapping):
        raise ConfigError(f"labels must be a mapping of names to strings, got "
                          f"{type(labels).__name__}")
    merged = {**base, **labels} if base else dict(labels)
    if len(merged) > MAX_LABELS:
        raise ConfigError(f"at most {MAX_LABELS} labels per step, got {len(merged)}")
    for key, value in merged.items():
        if not isinstance(key, str) or len(key) > MAX_LABEL_KEY \
                or not _LABEL_KEY.fullmatch(key):
            raise ConfigError(f"label name {str(key)[:80]!r} must be a name of letters, digits, "
                              f"'_', '.', '-' (at most {MAX_LABEL_KEY} characters)")
        if not isinstance(value, str):
            raise ConfigError(f"label {key!r} must be a string, got {type(value).__name__}")
        if len(value) > MAX_LABEL_VALUE:
            raise ConfigError(f"label {key!r} is {len(value)} characters long, at most "
                              f"{MAX_LABEL_VALUE}")
    return merged or None
