"""Evidence for a level, and what it takes to move up: measured, never assumed.

- In ``suggest`` mode, a human's feedback on each suggestion (did they do the same?) gives
  the **agreement rate**.
- In ``approve`` mode, the **approval rate** (approved vs. rejected: the human decisions in
  the store's approval records, :class:`ApprovalDecisions`, when it keeps them, else the
  step events; any :class:`DecisionSource` can replace them) and the **verification pass
  rate** of the executed actions.

Promotion needs at least ``min_decisions`` decisions and a Wilson 95 % lower bound above the
policy's thresholds, counted since the level was entered (so a demoted task type earns its
way back with fresh decisions), and not within ``cooldown`` of a demotion.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from closedloop._autonomy_state import (
    EXECUTED_ERRORS,
    LEVELS,
    EvidenceGroup,
    Feedback,
    LevelKey,
    check_level,
    rank,
)
from closedloop._errors import ConfigError
from closedloop._events import StepEvent

Z95 = 1.959963984540054
"""The two-sided 95 % normal quantile of the Wilson interval."""

_EXECUTED_ERRORS = frozenset(EXECUTED_ERRORS)
"""Error types of steps whose executor ran (or was called): the gate let them through."""


def wilson_lower(successes: int, trials: int, z: float = Z95) -> float:
    """The Wilson score interval's lower bound (0 when there are no trials)."""
    if trials <= 0:
        return 0.0
    p = successes / trials
    z2 = z * z
    centre = p + z2 / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, (centre - spread) / (1 + z2 / trials))


@dataclass(frozen=True, slots=True)
class Proportion:
    """``successes`` of ``trials``, with the rate and its Wilson 95 % lower bound."""

    successes: int
    trials: int

    @property
    def rate(self) -> float | None:
        """The observed rate (None without trials)."""
        return self.successes / self.trials if self.trials else None

    @property
    def lower(self) -> float:
        """The Wilson 95 % lower bound."""
        return wilson_lower(self.successes, self.trials)

    def more_needed(self, threshold: float, *, cap: int = 1_000_000) -> int | None:
        """How many more successes in a row lift the lower bound to ``threshold`` (None:
        not within ``cap``)."""
        if self.lower >= threshold:
            return 0
        lo, hi = 1, 1
        while wilson_lower(self.successes + hi, self.trials + hi) < threshold:
            lo, hi = hi + 1, hi * 2
            if hi > cap:
                return None
        while lo < hi:
            mid = (lo + hi) // 2
            if wilson_lower(self.successes + mid, self.trials + mid) >= threshold:
                hi = mid
            else:
                lo = mid + 1
        return hi

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the rate and the lower bound."""
        return {"successes": self.successes, "trials": self.trials,
                "rate": None if self.rate is None else round(self.rate, 4),
                "lower_bound": round(self.lower, 6)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Decisions:
    """Human decisions on approval requests: executed after approval, rejected, expired."""

    approved: int = 0
    rejected: int = 0
    expired: int = 0


@runtime_checkable
class DecisionSource(Protocol):
    """Where the decisions on durable approval requests are counted: by default the store's
    own approval records (:class:`ApprovalDecisions`) when it keeps them, else the step events
    (:func:`count_events`). Inline ``approver=`` decisions always come from the events."""

    def decisions(self, key: LevelKey, *, since: float,
                  own_classes: frozenset[str]) -> Decisions:
        """The decisions on ``key``'s steps since ``since``; for a key without an action
        class, steps of the classes in ``own_classes`` (which have levels of their own) do
        not count."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """What the record says about one key since ``since``."""

    key: LevelKey
    level: str
    since: float
    agreement: Proportion = Proportion(0, 0)
    """Suggestions a human agreed with, of those with feedback."""
    suggestions: int = 0
    """Suggestions made (with or without feedback)."""
    approval: Proportion = Proportion(0, 0)
    """Approve-mode requests executed after approval, of those approved or rejected."""
    expired: int = 0
    verification: Proportion = Proportion(0, 0)
    """Executed actions (approve or autonomous) whose verification passed, of those
    verified."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"key": self.key.to_dict(), "level": self.level, "since": self.since,
                "suggestions": self.suggestions, "agreement": self.agreement.to_dict(),
                "approval": self.approval.to_dict(), "expired": self.expired,
                "verification": self.verification.to_dict()}


def step_class(event: StepEvent) -> str | None:
    """The action class the loop's classifier gave a step (``detail["autonomy"]["class"]``)."""
    detail = event.detail
    if not detail:
        return None
    info = detail.get("autonomy")
    return info.get("class") if isinstance(info, dict) else None


def _belongs(key: LevelKey, agent_id: str, cls: Any, own_classes: frozenset[str]) -> bool:
    """Whether a step of ``key``'s task type by ``agent_id`` of class ``cls`` is ``key``'s."""
    if key.agent_id not in ("*", agent_id):
        return False
    if key.action_class is not None:
        return bool(cls == key.action_class)
    return cls is None or cls not in own_classes


def matches(key: LevelKey, event: StepEvent, own_classes: frozenset[str]) -> bool:
    """Whether ``event`` is one of ``key``'s steps."""
    return event.task_type == key.task_type and _belongs(key, event.agent_id,
                                                         step_class(event), own_classes)


def _durable(event: StepEvent) -> bool:
    """Whether the step went through a durable approval request (its event names it)."""
    detail = event.detail
    return detail is not None and isinstance(detail.get("approval"), dict)


_Row = tuple[str, str, bool, "bool | None", bool, "bool | None", int]
"""Steps alike: mode, outcome, executed error, verification verdict, durable request,
feedback (None: none), and how many."""


def _tally(key: LevelKey, rows: Iterable[_Row], *, level: str, since: float,
           decisions: Decisions | None) -> Evidence:
    """The evidence of ``key``'s steps ``rows`` (what :func:`count_events` and
    :func:`count_groups` count, the one way)."""
    agreed = with_feedback = suggestions = 0
    counts = [0, 0, 0]  # approved, rejected, expired
    inline = [0, 0, 0]  # of those, without a durable request
    passed = verified = 0
    for mode, outcome, executed_error, verdict, durable, feedback, n in rows:
        if mode == "suggest" and outcome == "suggested":
            suggestions += n
            if feedback is not None:
                with_feedback += n
                agreed += n * feedback
            continue
        executed = outcome == "succeeded" or (outcome in ("failed", "error")
                                              and executed_error)
        if mode == "approve":
            which = 0 if executed else {"rejected": 1, "expired": 2}.get(outcome)
            if which is not None:
                counts[which] += n
                if not durable:
                    inline[which] += n
        if executed and mode in ("approve", "autonomous") and verdict is not None:
            verified += n
            passed += n * verdict
    approved, rejected, expired = counts
    if decisions is not None:
        approved = decisions.approved + inline[0]
        rejected = decisions.rejected + inline[1]
        expired = decisions.expired + inline[2]
    return Evidence(key=key, level=level, since=since,
                    agreement=Proportion(agreed, with_feedback), suggestions=suggestions,
                    approval=Proportion(approved, approved + rejected), expired=expired,
                    verification=Proportion(passed, verified))


def count_events(key: LevelKey, events: Iterable[StepEvent], feedback: Mapping[str, Feedback],
                 *, level: str, since: float, own_classes: frozenset[str] = frozenset(),
                 decisions: Decisions | None = None) -> Evidence:
    """The evidence for ``key`` in one pass over its task type's ``events`` since ``since``.

    A step counts as approved when it ran in ``approve`` mode and reached the executor (its
    outcome ``succeeded``, or ``failed``/``error`` at execution or verification); as rejected
    when its outcome is ``rejected``; as expired when ``expired``. ``decisions`` (from a
    :class:`DecisionSource`, e.g. the store's approval records) replaces the counts of the
    steps that went through a durable approval request (their event names it,
    ``detail["approval"]``); decisions made inline by an ``approver=`` callback leave no
    request and are always counted from the events.
    """
    def rows() -> Iterable[_Row]:
        for e in events:
            if e.ts >= since and matches(key, e, own_classes):
                fb = feedback.get(e.step_id or "")
                yield (e.autonomy, e.outcome, e.error_type in _EXECUTED_ERRORS,
                       e.verification_passed, _durable(e), None if fb is None else fb.agreed, 1)

    return _tally(key, rows(), level=level, since=since, decisions=decisions)


def count_groups(key: LevelKey, groups: Iterable[EvidenceGroup], *, level: str, since: float,
                 own_classes: frozenset[str] = frozenset(),
                 decisions: Decisions | None = None) -> Evidence:
    """:func:`count_events` from the steps grouped where they are stored
    (:meth:`~closedloop.autonomy.EvidenceQueries.evidence_groups`, since ``since``): the same
    evidence, counted the same way, without reading each step."""
    rows = ((g.mode, g.outcome, g.executed_error, g.verification_passed, g.durable, g.agreed,
             g.steps) for g in groups if _belongs(key, g.agent_id, g.action_class, own_classes))
    return _tally(key, rows, level=level, since=since, decisions=decisions)


# ----- the policy ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class AutonomyPolicy:
    """When a level is earned, and when it is lost.

    Promotion (recommended; applied by closedloop itself only with ``auto_promote=True``, by
    a review every ``review_every`` seconds per task type, off the agent's path):
    ``suggest → approve`` needs ``min_decisions`` suggestions with feedback and an agreement
    lower bound ≥ ``min_agreement``; ``approve → autonomous`` needs ``min_decisions``
    approve/reject decisions with an approval lower bound ≥ ``min_approval`` and
    ``min_decisions`` verified executions with a pass-rate lower bound ≥
    ``min_verification``. Evidence counts from when the key entered its level (the last
    ``window`` seconds for a key with no stored level), and no promotion comes within
    ``cooldown`` seconds of a demotion (hysteresis).

    Demotion (automatic): a Bernoulli CUSUM on the verification failures of autonomous
    steps, in control at ``baseline_pass_rate``, tuned to detect ``alarm_pass_rate``, with
    an in-control average run length of ``false_alarm_steps`` (about one false alarm per
    that many steps), demotes the key to ``demote_to`` and alerts.

    ``ceilings`` caps the level of action classes whatever is stored
    (``{"delete_database": "approve"}``: always approved by a human).
    """

    min_decisions: int = 50
    min_agreement: float = 0.90
    min_approval: float = 0.90
    min_verification: float = 0.95
    cooldown: float = 3 * 86400.0
    window: float = 30 * 86400.0
    auto_promote: bool = False
    review_every: float = 600.0
    baseline_pass_rate: float = 0.98
    alarm_pass_rate: float = 0.90
    false_alarm_steps: float = 1_000_000.0
    demote_to: str = "approve"
    ceilings: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.min_decisions, int) or self.min_decisions < 1:
            raise ConfigError("min_decisions must be an integer ≥ 1")
        for name in ("min_agreement", "min_approval", "min_verification"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be between 0 and 1")
        if not (self.cooldown >= 0 and self.window > 0 and self.review_every > 0):
            raise ConfigError("cooldown must be ≥ 0, window and review_every > 0 seconds")
        if not 0.0 < self.alarm_pass_rate < self.baseline_pass_rate < 1.0:
            raise ConfigError("need 0 < alarm_pass_rate < baseline_pass_rate < 1")
        check_level(self.demote_to, "demote_to")
        if self.demote_to == "autonomous":
            raise ConfigError("demote_to must be suggest or approve")
        for cls, level in self.ceilings.items():
            check_level(level, f"ceiling of {cls!r}")

    def detector(self) -> Any:
        """The demotion detector (a :class:`~closedloop.learn.BernoulliCusum` on failures)."""
        from closedloop.learn import BernoulliCusum

        return BernoulliCusum.for_arl(round(1.0 - self.baseline_pass_rate, 12),
                                      round(1.0 - self.alarm_pass_rate, 12),
                                      arl0=self.false_alarm_steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["ceilings"] = dict(self.ceilings)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Assessment:
    """Whether ``key`` may move up from ``level`` to ``target``, and what it still takes."""

    key: LevelKey
    level: str
    target: str | None
    """The next level up (None: at the top, or at its ceiling)."""
    ready: bool
    needs: tuple[str, ...]
    """What is missing, for people (empty when ready)."""
    evidence: Evidence
    source: str = "stored"
    """Where the level comes from: ``stored`` or ``default``."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"key": self.key.to_dict(), "level": self.level, "target": self.target,
                "ready": self.ready, "needs": list(self.needs), "source": self.source,
                "evidence": self.evidence.to_dict()}


def _rate_needs(what: str, rate_name: str, p: Proportion, threshold: float,
                minimum: int) -> list[str]:
    needs = []
    if p.trials < minimum:
        needs.append(f"{minimum - p.trials} more {what} ({p.trials} of {minimum})")
    if p.lower < threshold:
        more = p.more_needed(threshold)
        rate = "" if p.rate is None else f" (rate {p.rate:.1%})"
        needs.append(f"{rate_name} lower bound {p.lower:.1%}{rate} < {threshold:.0%}"
                     + (f": ~{more} more in a row" if more else ""))
    return needs


def assess(evidence: Evidence, policy: AutonomyPolicy, *, ceiling: str | None = None,
           demoted_at: float | None = None, now: float, source: str = "stored") -> Assessment:
    """Whether the evidence earns the next level up under ``policy``."""
    level = evidence.level
    caps = [c for c in (ceiling, policy.ceilings.get(evidence.key.action_class or "")) if c]
    top = min((rank(c) for c in caps), default=len(LEVELS) - 1)
    target = LEVELS[rank(level) + 1] if rank(level) < top else None
    if target is None:
        why = "at the top" if rank(level) == len(LEVELS) - 1 else f"at its ceiling ({level})"
        return Assessment(key=evidence.key, level=level, target=None, ready=False,
                          needs=(why,), evidence=evidence, source=source)
    needs: list[str] = []
    if level == "suggest":
        needs += _rate_needs("suggestions with feedback", "agreement", evidence.agreement,
                             policy.min_agreement, policy.min_decisions)
    else:
        needs += _rate_needs("approval decisions", "approval", evidence.approval,
                             policy.min_approval, policy.min_decisions)
        needs += _rate_needs("verified executions", "verification", evidence.verification,
                             policy.min_verification, policy.min_decisions)
    if demoted_at is not None and now < demoted_at + policy.cooldown:
        hours = (demoted_at + policy.cooldown - now) / 3600
        needs.append(f"cooling down after a demotion: {hours:.1f} h left")
    return Assessment(key=evidence.key, level=level, target=target, ready=not needs,
                      needs=tuple(needs), evidence=evidence, source=source)
