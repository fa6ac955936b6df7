"""The record of a run (:class:`closedloop.Run`), and the port a store backend implements to
keep it.

A run groups the steps of one agent task. Its steps are events like any other (each carries
the run's id); what the events cannot say — the run's own outcome (budget spent, halted,
aborted), its budgets, the model usage spent outside any step, when it ended — is one
:class:`RunRecord`, written when the run starts (outcome ``running``) and again when it ends.
The store keeps it (:class:`RunStore`, ``backend.run_store()``): a row per run, read newest
first through an index, so that ``closedloop runs list`` never groups the events table.

A halt of a run from outside its process (``closedloop runs halt``, :func:`closedloop.runs.
halt_run`) is a :class:`RunHalt` kept through the same backends' :class:`RunHaltStore` (table
``run_halts``: one row per run, the first halt wins), which the running process polls.

Lives apart from :mod:`closedloop.runs` (which re-exports it) so that the backends under
:mod:`closedloop.store` implement the port without importing the layer that uses it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from closedloop._errors import ConfigError
from closedloop._redact import clip, redact_text

RUNNING = "running"
"""The outcome of a run that has not ended (or whose process died before it could say)."""
MAX_RUNS_PAGE = 1000
RUN_COLUMNS = ("run_id", "name", "started", "ended", "outcome", "error_type", "message",
               "steps", "refused", "failed", "compensated", "input_tokens", "output_tokens",
               "cost_usd", "budgets", "parent_run_id", "labels")
"""The columns of the ``runs`` table, in :meth:`RunRecord.to_row` order."""
_JSON = (RUN_COLUMNS.index("budgets"), RUN_COLUMNS.index("labels"))
_MAX_MESSAGE = 2000


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """One run: when, how it ended, and what its steps used.

    ``steps`` counts the steps the run admitted, ``refused`` those it refused (budget, halt),
    ``failed`` the admitted steps that did not succeed, ``compensated`` the rollbacks run.
    Tokens and cost add up the steps' and the model calls made in the run outside any step.
    ``budgets`` is what the run was allowed (``max_steps``, ``max_tokens``, ``max_cost_usd``,
    ``max_seconds``), ``message`` why it ended as it did.
    """

    run_id: str
    name: str | None
    started: float
    ended: float | None = None
    outcome: str = RUNNING
    error_type: str | None = None
    message: str | None = None
    steps: int = 0
    refused: int = 0
    failed: int = 0
    compensated: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    budgets: dict[str, float] = field(default_factory=dict)
    parent_run_id: str | None = None
    labels: dict[str, str] | None = None

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end (None while running)."""
        return None if self.ended is None else self.ended - self.started

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``duration_s``)."""
        out = asdict(self)
        out["duration_s"] = self.duration_s
        return out

    def to_row(self) -> tuple[Any, ...]:
        """The row of the ``runs`` table (``budgets`` and ``labels`` as JSON text)."""
        row = [getattr(self, name) for name in RUN_COLUMNS]
        for i in _JSON:
            row[i] = json.dumps(row[i], separators=(",", ":")) if row[i] is not None else None
        return tuple(row)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RunRecord:
        """The record of a row as :meth:`to_row` makes it (JSON columns as text or data)."""
        values = dict(zip(RUN_COLUMNS, row, strict=True))
        for i in _JSON:
            name = RUN_COLUMNS[i]
            if isinstance(values[name], str):
                values[name] = json.loads(values[name])
        values["budgets"] = values["budgets"] or {}
        return cls(**values)

    def redacted(self) -> RunRecord:
        """The record with every text redacted (what the store keeps)."""
        labels = ({k: redact_text(v) for k, v in self.labels.items()}
                  if self.labels else self.labels)
        return replace(
            self, name=redact_text(self.name) if self.name else self.name,
            message=clip(self.message, _MAX_MESSAGE) if self.message else self.message,
            labels=labels)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunPage:
    """One page of runs, newest first; ``next_cursor`` continues it (None: the last page)."""

    runs: list[RunRecord]
    next_cursor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"runs": [r.to_dict() for r in self.runs], "next_cursor": self.next_cursor}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunsSummary:
    """The runs started in a window: how many, how they ended, what they used."""

    runs: int
    outcomes: Mapping[str, int]
    steps: int
    refused: int
    compensated: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    mean_duration_s: float | None
    """Over the runs that ended."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["outcomes"] = dict(self.outcomes)
        return out


def summarize_runs(records: Iterable[RunRecord]) -> RunsSummary:
    """The :class:`RunsSummary` of ``records`` in one pass (backends without SQL use it)."""
    runs = steps = refused = compensated = tokens_in = tokens_out = ended = 0
    cost: float | None = None
    duration = 0.0
    outcomes: dict[str, int] = {}
    for r in records:
        runs += 1
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
        steps += r.steps
        refused += r.refused
        compensated += r.compensated
        tokens_in += r.input_tokens
        tokens_out += r.output_tokens
        if r.cost_usd is not None:
            cost = r.cost_usd if cost is None else cost + r.cost_usd
        if r.ended is not None:
            ended += 1
            duration += r.ended - r.started
    return RunsSummary(runs=runs, outcomes=outcomes, steps=steps, refused=refused,
                       compensated=compensated, input_tokens=tokens_in,
                       output_tokens=tokens_out, cost_usd=cost,
                       mean_duration_s=duration / ended if ended else None)


def summary_from_rows(rows: Sequence[Sequence[Any]]) -> RunsSummary:
    """A :class:`RunsSummary` from the SQL backends' rows grouped by outcome: outcome, count,
    sums of steps, refused, compensated, input and output tokens, cost and duration, and the
    count of ended runs."""
    outcomes = {str(r[0]): int(r[1]) for r in rows}
    costs = [float(r[7]) for r in rows if r[7] is not None]
    ended = sum(int(r[9]) for r in rows)
    duration = sum(float(r[8] or 0.0) for r in rows)
    return RunsSummary(
        runs=sum(outcomes.values()), outcomes=outcomes,
        steps=sum(int(r[2] or 0) for r in rows), refused=sum(int(r[3] or 0) for r in rows),
        compensated=sum(int(r[4] or 0) for r in rows),
        input_tokens=sum(int(r[5] or 0) for r in rows),
        output_tokens=sum(int(r[6] or 0) for r in rows),
        cost_usd=sum(costs) if costs else None,
        mean_duration_s=duration / ended if ended else None)


def check_runs_limit(limit: int) -> None:
    """A page size in ``1..MAX_RUNS_PAGE``, else a :class:`~closedloop.ConfigError`."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_RUNS_PAGE:
        raise ConfigError(f"limit must be an integer from 1 to {MAX_RUNS_PAGE}, got {limit!r}")


def encode_run_cursor(record: RunRecord) -> str:
    """The opaque cursor after ``record`` in a newest-first listing."""
    raw = json.dumps([record.started, record.run_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_run_cursor(cursor: str) -> tuple[float, str]:
    """``(started, run_id)`` of a cursor; a :class:`~closedloop.ConfigError` if malformed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        started, run_id = json.loads(raw)
        if not isinstance(run_id, str) or isinstance(started, bool):
            raise TypeError
        return float(started), run_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise ConfigError(f"invalid cursor {cursor[:40]!r}: pass back a next_cursor "
                          "exactly as it was given") from None


def page_of(records: list[RunRecord], limit: int) -> RunPage:
    """A page of the first ``limit`` of ``records`` (fetched ``limit + 1``, newest first)."""
    more = len(records) > limit
    records = records[:limit]
    return RunPage(runs=records,
                   next_cursor=encode_run_cursor(records[-1]) if more and records else None)


@runtime_checkable
class RunStore(Protocol):
    """Where run records live (one per run id, the last write wins)."""

    def put_runs(self, records: Sequence[RunRecord]) -> None:
        """Insert or replace these records (already redacted), all or nothing."""

    def get_run(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""

    def list_runs(self, *, since: float | None = None, outcome: str | None = None,
                  limit: int = 50, cursor: str | None = None) -> RunPage:
        """Runs started at or after ``since`` (with that outcome), newest first."""

    def summarize_runs(self, *, since: float | None = None,
                       until: float | None = None) -> RunsSummary:
        """The :class:`RunsSummary` of the runs started in ``[since, until)``."""

    def prune_runs(self, before: float) -> int:
        """Delete the records of runs started before ``before``; how many went."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunHalt:
    """A halt of one run, recorded in the store: who, when (Unix seconds), why.

    The running process sees it at its next poll (:class:`closedloop.Run`'s ``halt_poll``)
    and refuses every later step; the run ends ``halted``.
    """

    run_id: str
    reason: str
    by: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def redacted(self) -> RunHalt:
        """The halt with its texts redacted and clipped (what the store keeps)."""
        return replace(self, reason=clip(redact_text(self.reason), _MAX_MESSAGE),
                       by=clip(redact_text(self.by), 200))


MAX_HALT_IDS = 500
"""Run ids asked about in one :meth:`RunHaltStore.run_halts` call at most."""


@runtime_checkable
class RunHaltStore(Protocol):
    """Where halts of runs live (one per run id, the first wins): written by whoever halts a
    run, read by the processes that run them."""

    def halt_run(self, halt: RunHalt) -> RunHalt:
        """Record ``halt`` (already redacted) unless the run has one; the halt in force."""

    def run_halts(self, run_ids: Sequence[str]) -> dict[str, RunHalt]:
        """The halts of those of ``run_ids`` (at most :data:`MAX_HALT_IDS`) that have one;
        raises (a :class:`~closedloop.StoreError`) when they cannot be read."""
