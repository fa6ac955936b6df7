"""The data of pause and halt state, shared by ``control/`` and the store backends.

:class:`Stop`, :class:`StopKind`, the :class:`ControlLedger` port and :class:`MemoryLedger`
(the in-process one) live here, apart from :mod:`closedloop.control`, so that a store backend
can implement the port (its durable record of stops) without importing the control layer;
:mod:`closedloop.control` re-exports them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from closedloop._redact import redact_text, redact_value


class StopKind(StrEnum):
    """A pause lifts itself when it expires; a halt only when a human resumes it."""

    PAUSED = "paused"
    HALTED = "halted"


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    """A task type refused: what, why, the evidence, who/what decided and when."""

    task_type: str
    kind: StopKind
    reason: str
    by: str
    at: float
    until: float | None = None
    """Wall-clock time a pause ends; ``None`` for a halt."""
    evidence: dict[str, Any] = field(default_factory=dict)

    def active(self, now: float) -> bool:
        """Still in force at ``now``."""
        return self.until is None or now < self.until

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ISO times for people."""
        out = asdict(self)
        out["kind"] = self.kind.value
        out["time"] = _iso(self.at)
        if self.until is not None:
            out["until_time"] = _iso(self.until)
        return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def stop_from_row(row: Sequence[Any]) -> Stop:
    """A stop from a ``control_stops`` row (task_type, kind, reason, by, at, until, evidence
    as JSON text), as the store backends keep it."""
    return Stop(task_type=row[0], kind=StopKind(row[1]), reason=row[2], by=row[3], at=row[4],
                until=row[5], evidence=json.loads(row[6]))


def history_entry(row: Sequence[Any]) -> dict[str, Any]:
    """A history entry from a ``control_history`` row (at, event, task_type, reason, by,
    evidence as JSON text or NULL)."""
    return {"event": row[1], "task_type": row[2], "reason": row[3], "by": row[4], "at": row[0],
            "time": _iso(row[0]), "evidence": json.loads(row[5]) if row[5] else None}


def redacted(stop: Stop) -> Stop:
    """``stop`` with its reason and evidence passed through the redactor."""
    return replace(stop, reason=redact_text(stop.reason),
                   evidence=redact_value(stop.evidence))


def stronger(a: Stop | None, b: Stop | None, now: float) -> Stop | None:
    """The stop in force of two: a halt beats a pause, a later pause end beats an earlier."""
    a = a if a is not None and a.active(now) else None
    b = b if b is not None and b.active(now) else None
    if a is None or b is None:
        return a or b
    if a.kind is not b.kind:
        return a if a.kind is StopKind.HALTED else b
    if a.kind is StopKind.HALTED:
        return a if a.at <= b.at else b  # the first halt is the one to investigate
    return a if (a.until or 0.0) >= (b.until or 0.0) else b


@runtime_checkable
class ControlLedger(Protocol):
    """Where stops live. ``put`` never replaces a halt with a pause."""

    def put(self, stop: Stop) -> None:
        """Record a pause or halt (a halt is never downgraded to a pause)."""

    def get(self, task_type: str) -> Stop | None:
        """The stop in force for ``task_type``, if any (expired pauses are none)."""

    def lift(self, task_type: str, *, reason: str, by: str) -> Stop | None:
        """Remove the stop and log who lifted it and why; returns what was lifted."""

    def stops(self) -> list[Stop]:
        """Every stop in force."""

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """Recent stops and resumes, newest first."""


def _merge(old: Stop | None, new: Stop, now: float) -> bool:
    """True if ``new`` should replace ``old`` (a pause never replaces a halt in force)."""
    return not (old is not None and old.active(now) and old.kind is StopKind.HALTED
                and new.kind is StopKind.PAUSED)


class MemoryLedger:
    """Stops in this process only (tests, ``memory://`` stores)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._stops: dict[str, Stop] = {}
        self._history: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def put(self, stop: Stop) -> None:
        stop = redacted(stop)
        with self._lock:
            if _merge(self._stops.get(stop.task_type), stop, self.clock()):
                self._stops[stop.task_type] = stop
                self._history.append({"event": stop.kind.value, **stop.to_dict()})

    def get(self, task_type: str) -> Stop | None:
        stop = self._stops.get(task_type)
        return stop if stop is not None and stop.active(self.clock()) else None

    def lift(self, task_type: str, *, reason: str, by: str) -> Stop | None:
        with self._lock:
            stop = self._stops.pop(task_type, None)
            if stop is not None:
                self._history.append({"event": "resumed", "task_type": task_type,
                                      "reason": redact_text(reason), "by": by, "at": self.clock(),
                                      "time": _iso(self.clock())})
            return stop

    def stops(self) -> list[Stop]:
        now = self.clock()
        return sorted((s for s in self._stops.values() if s.active(now)),
                      key=lambda s: s.task_type)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(reversed(self._history[-limit:]))
