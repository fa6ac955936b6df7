"""Verdicts: what a validator or verifier says about a proposal or an outcome.

A verdict is data, not an exception. User checks may return a :class:`Verdict`, or anything
:func:`as_verdict` understands (``None``/``True`` for pass, ``False``, a message, an
:class:`Issue` or a list of them), so that a plain function is a check without ceremony.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeAlias


class Severity(IntEnum):
    """How much an issue matters to the loop.

    ``WARNING`` is recorded and never blocks. ``ERROR`` blocks and is sent back to the agent
    for a corrected retry. ``CRITICAL`` blocks immediately, without re-ask: a model that
    proposed deleting production should not be asked to simply try again.
    """

    WARNING = 10
    ERROR = 20
    CRITICAL = 30

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class Issue:
    """One problem found by a check: a stable code, a message, where, and how severe."""

    message: str
    code: str = "invalid"
    location: str | None = None
    severity: Severity = Severity.ERROR

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, used by the store and ``--json`` outputs."""
        return {
            "code": self.code,
            "message": self.message,
            "location": self.location,
            "severity": str(self.severity),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Issue:
        """Inverse of :meth:`to_dict`."""
        return cls(
            message=str(data["message"]),
            code=str(data.get("code", "invalid")),
            location=data.get("location"),
            severity=Severity[str(data.get("severity", "error")).upper()],
        )

    def render(self) -> str:
        """One line a model (or a person) can act on."""
        where = f" at {self.location}" if self.location else ""
        return f"[{self.severity}] {self.code}{where}: {self.message}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The outcome of one check: its issues, or why it could not tell (``unknown``).

    A verdict passes when it is not unknown and has no issue of severity ``ERROR`` or above.
    """

    issues: tuple[Issue, ...] = ()
    unknown: str | None = None
    check: str = ""
    _blocking: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        blocking = any(i.severity >= Severity.ERROR for i in self.issues)
        object.__setattr__(self, "_blocking", blocking)

    @property
    def passed(self) -> bool:
        """True when the check found nothing blocking and could tell."""
        return self.unknown is None and not self._blocking

    @property
    def critical(self) -> bool:
        """True when an issue is critical: the step stops without re-ask."""
        return any(i.severity >= Severity.CRITICAL for i in self.issues)

    @property
    def blocking_issues(self) -> tuple[Issue, ...]:
        """The issues that make this verdict fail (severity ``ERROR`` and above)."""
        return tuple(i for i in self.issues if i.severity >= Severity.ERROR)

    @classmethod
    def ok(cls, *warnings: Issue, check: str = "") -> Verdict:
        """A passing verdict, optionally carrying non-blocking warnings."""
        return cls(issues=warnings, check=check)

    @classmethod
    def fail(cls, *issues: Issue | str, check: str = "") -> Verdict:
        """A failing verdict; plain strings become ``ERROR`` issues."""
        return cls(issues=tuple(_as_issue(i) for i in issues), check=check)

    @classmethod
    def cannot_tell(cls, reason: str, *, check: str = "") -> Verdict:
        """The check could not reach or read its target: never treated as a pass."""
        return cls(unknown=reason, check=check)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, used by the store and ``--json`` outputs."""
        out: dict[str, Any] = {"check": self.check, "passed": self.passed}
        if self.issues:
            out["issues"] = [i.to_dict() for i in self.issues]
        if self.unknown is not None:
            out["unknown"] = self.unknown
        return out


VerdictLike: TypeAlias = "Verdict | Issue | str | bool | Iterable[Issue | str] | None"


def _as_issue(item: Issue | str) -> Issue:
    if isinstance(item, Issue):
        return item
    if isinstance(item, str):
        return Issue(message=item)
    raise TypeError(f"expected an Issue or a message string, got {type(item).__name__}")


def as_verdict(value: object, check: str = "") -> Verdict:
    """Normalise what a user's check returned into a :class:`Verdict`.

    ``None`` and ``True`` pass; ``False`` fails with a generic issue; a string is one
    ``ERROR`` issue; an :class:`Issue` or an iterable of issues/strings is taken as is
    (empty means pass). Anything else is a programming error in the check (``TypeError``).
    """
    if isinstance(value, Verdict):
        if value.check or not check:
            return value
        return Verdict(issues=value.issues, unknown=value.unknown, check=check)
    if value is None or value is True:
        return Verdict(check=check)
    if value is False:
        issue = Issue(message=f"check {check or '?'} returned False", code="failed")
        return Verdict(issues=(issue,), check=check)
    if isinstance(value, str | Issue):
        return Verdict(issues=(_as_issue(value),), check=check)
    if isinstance(value, Iterable) and not isinstance(value, bytes | dict):
        return Verdict(issues=tuple(_as_issue(i) for i in value), check=check)
    raise TypeError(
        f"check {check or '?'} returned {type(value).__name__}; return a Verdict, an Issue, "
        "a message, a list of issues, a bool or None"
    )


def render_feedback(verdicts: Iterable[Verdict]) -> str:
    """Render failing verdicts as feedback a model can act on in a re-ask."""
    lines = ["Your previous proposal was rejected by validation. Fix every issue below:"]
    for v in verdicts:
        if v.passed:
            continue
        name = v.check or "check"
        if v.unknown is not None:
            lines.append(f"- {name}: could not check the proposal: {v.unknown}")
        for issue in v.blocking_issues:
            lines.append(f"- {name}: {issue.render()}")
    lines.append("Return a complete, corrected proposal.")
    return "\n".join(lines)
