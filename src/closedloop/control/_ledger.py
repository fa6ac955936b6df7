"""Persisted pause and halt state per task type, and the history of who stopped and resumed it.

A :class:`ControlLedger` is where :class:`~closedloop.control.FaultControl` writes a halt and
where ``closedloop resume`` lifts it; it survives restarts. Three implementations:

- :class:`SQLiteLedger`, the default: two small tables in the event store's own SQLite file
  (``control_stops`` and ``control_history``), created by this module with ``CREATE TABLE IF
  NOT EXISTS``. They are kept out of the event store's migrations on purpose: control state
  is not an event, has its own life cycle, and this way works with any store schema version
  (and the store does not have to know the control layer exists).
- :class:`MemoryLedger` for tests and ``memory://`` stores.
- :class:`~closedloop.control.RedisLedger` to share the state across machines.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from closedloop._errors import StoreError


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


def who() -> str:
    """The default "by": user@host (pid)."""
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


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
    """True if ``new`` should replace ``old``."""
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
                                      "reason": reason, "by": by, "at": self.clock(),
                                      "time": _iso(self.clock())})
            return stop

    def stops(self) -> list[Stop]:
        now = self.clock()
        return sorted((s for s in self._stops.values() if s.active(now)),
                      key=lambda s: s.task_type)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(reversed(self._history[-limit:]))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS control_stops (
    task_type TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    at REAL NOT NULL,
    until REAL,
    evidence TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS control_keys (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    at REAL NOT NULL,
    snapshot TEXT NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE TABLE IF NOT EXISTS control_history (
    at REAL NOT NULL,
    event TEXT NOT NULL,
    task_type TEXT NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    evidence TEXT
);
"""


class SQLiteLedger:
    """Stops in a SQLite file (by default the event store's), shared by local processes."""

    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser()
        self.clock = clock
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._conn() as conn:
                conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open control state in {self.path}: {exc}") from None

    def _conn(self) -> closing[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        return closing(conn)

    def put(self, stop: Stop) -> None:
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT * FROM control_stops WHERE task_type = ?",
                                   (stop.task_type,)).fetchone()
                if _merge(_stop(row) if row else None, stop, self.clock()):
                    conn.execute(
                        "INSERT OR REPLACE INTO control_stops VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (stop.task_type, stop.kind.value, stop.reason, stop.by, stop.at,
                         stop.until, json.dumps(stop.evidence, default=str)))
                    conn.execute("INSERT INTO control_history VALUES (?, ?, ?, ?, ?, ?)",
                                 (stop.at, stop.kind.value, stop.task_type, stop.reason,
                                  stop.by, json.dumps(stop.evidence, default=str)))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def get(self, task_type: str) -> Stop | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM control_stops WHERE task_type = ?",
                               (task_type,)).fetchone()
        stop = _stop(row) if row else None
        return stop if stop is not None and stop.active(self.clock()) else None

    def lift(self, task_type: str, *, reason: str, by: str) -> Stop | None:
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT * FROM control_stops WHERE task_type = ?",
                                   (task_type,)).fetchone()
                if row:
                    conn.execute("DELETE FROM control_stops WHERE task_type = ?", (task_type,))
                    conn.execute("INSERT INTO control_history VALUES (?, ?, ?, ?, ?, NULL)",
                                 (self.clock(), "resumed", task_type, reason, by))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return _stop(row) if row else None

    def stops(self) -> list[Stop]:
        with self._conn() as conn:
            rows = conn.execute("SELECT * FROM control_stops ORDER BY task_type").fetchall()
        now = self.clock()
        return [s for s in map(_stop, rows) if s.active(now)]

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._conn() as conn:
            rows = conn.execute("SELECT * FROM control_history ORDER BY at DESC LIMIT ?",
                                (int(limit),)).fetchall()
        return [{"event": r[1], "task_type": r[2], "reason": r[3], "by": r[4], "at": r[0],
                 "time": _iso(r[0]), "evidence": json.loads(r[5]) if r[5] else None}
                for r in rows]

    def publish(self, source: str, keys: dict[str, dict[str, Any]]) -> None:
        """Store one process's per-key flow-control snapshot, for ``closedloop status``."""
        now = self.clock()
        with self._conn() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO control_keys VALUES (?, ?, ?, ?)",
                [(source, key, now, json.dumps(snap, default=str)) for key, snap in keys.items()])

    def published(self, max_age: float = 300.0) -> dict[str, dict[str, Any]]:
        """Recent snapshots by ``key@source`` (older than ``max_age`` seconds are left out)."""
        with self._conn() as conn:
            rows = conn.execute("SELECT source, key, at, snapshot FROM control_keys "
                                "WHERE at >= ? ORDER BY key, source",
                                (self.clock() - max_age,)).fetchall()
        return {f"{key}@{source}": {**json.loads(snap), "published": _iso(at)}
                for source, key, at, snap in rows}


def _stop(row: tuple[Any, ...]) -> Stop:
    return Stop(task_type=row[0], kind=StopKind(row[1]), reason=row[2], by=row[3], at=row[4],
                until=row[5], evidence=json.loads(row[6]))


def ledger_for_store(store: Any) -> ControlLedger:
    """The ledger that lives with an event store: its SQLite file, else in memory."""
    path = getattr(getattr(store, "backend", None), "path", None)
    if isinstance(path, Path):
        return SQLiteLedger(path)
    return MemoryLedger()
