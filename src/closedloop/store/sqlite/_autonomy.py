"""Autonomy levels in a SQLite store's file: the level-store port of the SQLite backend.

The tables (``autonomy_levels``, ``autonomy_history``, ``autonomy_feedback``,
``detector_state``) come with the store's migrations. Like the control ledger it opens a
connection per call (levels are read every few seconds per task type at most, cached by the
autonomy layer), so a store that was unreadable for a while is used again as soon as it can
be, and it fails closed: every failure to read or write is
:class:`~closedloop.ControlUnavailable`. Reads never create or migrate anything: a file
without the tables (an older store opened to read) has no levels. The evidence port counts
from the hourly evidence roll-up (:mod:`closedloop.store.sqlite._evidence`), folded first by a
writable store's level store (at most every :data:`~closedloop.store._evidence.FOLD_EVERY_S`).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Collection
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

from closedloop._autonomy_state import (
    EvidenceGroup,
    Feedback,
    LevelChange,
    LevelRecord,
    change_from_row,
    change_of,
    feedback_from_row,
    feedback_row,
    history_row,
    level_from_row,
    level_row,
    redacted_feedback,
    redacted_record,
)
from closedloop._errors import ControlUnavailable
from closedloop.store._evidence import Folds, evidence_groups
from closedloop.store.sqlite import _evidence
from closedloop.store.sqlite._backend import connect_read_only

_LEVEL = ("SELECT agent_id, task_type, action_class, level, ceiling, by, at, reason, evidence "
          "FROM autonomy_levels")
_HISTORY = ("SELECT at, agent_id, task_type, action_class, old_level, new_level, kind, by, "
            "reason, evidence FROM autonomy_history")

class SQLiteLevelStore:
    """Levels, their audit trail, feedback on suggestions and detector states in a SQLite
    store's file, shared by every process using it."""

    def __init__(self, path: str | os.PathLike[str], *, fold: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.fold = fold
        """Fold new steps into the evidence roll-up before counting (a writable store's)."""
        self._folds = Folds(self._fold)

    def __repr__(self) -> str:
        return f"SQLiteLevelStore({str(self.path)!r})"

    def _fail(self, what: str, exc: BaseException) -> ControlUnavailable:
        return ControlUnavailable(f"cannot {what} autonomy levels in {self.path}: {exc}")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            if not self.path.exists():
                return []  # no file yet: no level was ever stored here
            with closing(connect_read_only(self.path)) as conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if str(exc).startswith("no such table"):
                return []
            raise self._fail("read", exc) from exc
        except (OSError, sqlite3.Error) as exc:
            raise self._fail("read", exc) from exc

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            with closing(sqlite3.connect(self.path, timeout=30.0, isolation_level=None)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    out = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    with suppress(sqlite3.Error):  # never mask the error that brought us here
                        conn.execute("ROLLBACK")
                    raise
                return out
        except (OSError, sqlite3.Error) as exc:
            raise self._fail("write", exc) from exc

    def levels(self, task_type: str | None = None) -> list[LevelRecord]:
        """Every stored level (of ``task_type``), by task type, agent and class."""
        order = " ORDER BY task_type, agent_id, action_class"
        rows = (self._read(_LEVEL + order) if task_type is None else
                self._read(_LEVEL + " WHERE task_type = ?" + order, (task_type,)))
        return [level_from_row(r) for r in rows]

    def set_level(self, record: LevelRecord, *, kind: str = "set",
                  only_from: Collection[str | None] | None = None) -> LevelChange | None:
        """Store ``record`` and its audit entry in one transaction (see the port)."""
        record = redacted_record(record)
        key = record.key

        def work(conn: sqlite3.Connection) -> LevelChange | None:
            row = conn.execute(_LEVEL + " WHERE task_type = ? AND agent_id = ? AND "
                               "action_class = ?", (key.task_type, key.agent_id,
                                                    key.action_class or "")).fetchone()
            old = level_from_row(row) if row else None
            if only_from is not None and (None if old is None else old.level) not in only_from:
                return None
            change = change_of(old, record, kind)
            conn.execute("INSERT OR REPLACE INTO autonomy_levels (agent_id, task_type, "
                         "action_class, level, ceiling, by, at, reason, evidence) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", level_row(record))
            conn.execute("INSERT INTO autonomy_history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         history_row(change))
            return change

        change: LevelChange | None = self._write(work)
        return change

    def history(self, *, task_type: str | None = None, limit: int = 50) -> list[LevelChange]:
        """Recent level changes (of ``task_type``), newest first."""
        order = " ORDER BY at DESC, rowid DESC LIMIT ?"
        n = max(0, int(limit))
        rows = (self._read(_HISTORY + order, (n,)) if task_type is None else
                self._read(_HISTORY + " WHERE task_type = ?" + order, (task_type, n)))
        return [change_from_row(r) for r in rows]

    def put_feedback(self, feedback: Feedback) -> None:
        """Record feedback on a suggestion (the last one per step id counts)."""
        row = feedback_row(redacted_feedback(feedback))
        self._write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO autonomy_feedback (step_id, agreed, by, at, note) "
            "VALUES (?, ?, ?, ?, ?)", (row[0], int(row[1]), *row[2:])))

    def feedback(self, *, since: float | None = None) -> list[Feedback]:
        """Feedback recorded at or after ``since``, oldest first."""
        rows = self._read("SELECT step_id, agreed, by, at, note FROM autonomy_feedback "
                          "WHERE at >= ? ORDER BY at",
                          (float("-inf") if since is None else since,))
        return [feedback_from_row(r) for r in rows]

    def evidence_groups(self, task_type: str, *, since: float,
                        classes: bool) -> list[EvidenceGroup] | None:
        """``task_type``'s steps since ``since`` grouped in SQL (the evidence port,
        :class:`~closedloop.autonomy.EvidenceQueries`); a file without events: none."""
        try:
            if not self.path.exists():
                return []
            if self.fold:
                self._folds()
            with closing(connect_read_only(self.path)) as conn:
                conn.execute("BEGIN")
                return evidence_groups(
                    _evidence.evidence_rows(conn, task_type, since=since, classes=classes),
                    _evidence.feedback_rows(conn, task_type, since=since, classes=classes))
        except sqlite3.OperationalError as exc:
            if str(exc).startswith("no such"):  # an older store, read as it is
                return None
            raise self._fail("read", exc) from exc
        except (OSError, sqlite3.Error) as exc:
            raise self._fail("read", exc) from exc

    def _fold(self) -> None:
        """Fold the new steps into the evidence roll-up; a store busy or without it is
        counted as it is (the count stays exact, only slower)."""
        with suppress(sqlite3.Error), closing(sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None)) as conn:
            _evidence.refresh(conn)

    def put_detector(self, name: str, state: dict[str, Any], *, at: float) -> None:
        """Save a detector's state under ``name``."""
        text = json.dumps(state, allow_nan=False)
        self._write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO detector_state (name, at, state) VALUES (?, ?, ?)",
            (name, at, text)))

    def detector(self, name: str) -> dict[str, Any] | None:
        """The state saved under ``name``, if any."""
        rows = self._read("SELECT state FROM detector_state WHERE name = ?", (name,))
        if not rows:
            return None
        state: dict[str, Any] = json.loads(rows[0][0])
        return state
