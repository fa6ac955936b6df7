"""Trends: how each task type (model, agent or prompt version, label value) does period after
period, and which period-over-period changes are more than noise.

:func:`trends` asks the store for one series (:meth:`~closedloop.store.Store.series`,
computed in SQL on SQLite and PostgreSQL) and turns each cell into figures with confidence
intervals (:mod:`closedloop.learn._stats`):

- ``validation_pass_rate``, ``reask_rate`` (steps with more than one attempt, among steps
  where validation ran), ``verification_pass_rate``, ``failure_rate`` (failed, error or
  blocked among all steps): Wilson intervals;
- ``latency_p50_ms``, ``latency_p95_ms``: estimated from a histogram of nine buckets per
  decade (a value within its bucket, so within about ±5-50 % of the exact percentile that
  ``closedloop report`` gives), with a distribution-free interval;
- ``tokens_per_step`` (input plus output), ``cost_per_step`` (over the steps that have a
  cost): normal intervals; ``tokens_per_success``, ``cost_per_success`` (every step's
  tokens or cost over the succeeded steps): delta-method intervals.

Each series compares its last period with the one before (:class:`Change`): a change whose
interval includes 0 is reported as no significant change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError
from closedloop.learn._stats import (
    Change,
    Estimate,
    histogram_percentile,
    interval_change,
    mean,
    normal_change,
    rate_change,
    ratio,
    wilson,
    z_of,
)
from closedloop.store import (
    SeriesCell,
    check_window,
    latency_bounds,
    parse_dimension,
    period_of,
)

if TYPE_CHECKING:
    from closedloop.store import Store

DEFAULT_PERIODS: Mapping[str, int] = {"hour": 48, "day": 30, "week": 26}
"""How many periods a trend covers unless told (up to the newest step)."""
RATES = ("validation_pass_rate", "reask_rate", "verification_pass_rate", "failure_rate")
PERCENTILES = ("latency_p50_ms", "latency_p95_ms")
MEANS = ("tokens_per_step", "cost_per_step", "tokens_per_success", "cost_per_success")
METRICS = (*RATES, *PERCENTILES, *MEANS)
"""Every figure of a trend point, in display order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TrendPoint:
    """One period of one series: its start (Unix seconds), steps, and each figure that has
    something to count (a figure with nothing to count is absent)."""

    start: float
    steps: int
    figures: Mapping[str, Estimate]

    def to_dict(self) -> dict[str, Any]:
        """``{"start", "steps", "figures": {NAME: {"value", "low", "high"}}}``."""
        return {"start": self.start, "steps": self.steps,
                "figures": {k: v.to_dict() for k, v in self.figures.items()}}


@dataclass(frozen=True, slots=True, kw_only=True)
class TrendSeries:
    """The periods of one value of the dimension (``value`` None: steps that did not record
    it), oldest first, and the changes from the previous period to the last one."""

    value: str | None
    points: tuple[TrendPoint, ...]
    changes: Mapping[str, Change]

    @property
    def steps(self) -> int:
        """Steps over every period."""
        return sum(p.steps for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        """``{"value", "steps", "points": [POINT, ...], "changes": {NAME: CHANGE}}``."""
        return {"value": self.value, "steps": self.steps,
                "points": [p.to_dict() for p in self.points],
                "changes": {k: c.to_dict() for k, c in self.changes.items()}}


@dataclass(frozen=True, slots=True, kw_only=True)
class Trends:
    """Series per value of ``by`` over ``periods`` (the start of each period, oldest first);
    ``last`` and ``previous`` are the starts of the compared periods."""

    by: str
    window: str
    task_type: str | None
    since: float | None
    until: float | None
    confidence: float
    periods: tuple[float, ...]
    series: tuple[TrendSeries, ...]

    @property
    def empty(self) -> bool:
        """True when no step fell in the window."""
        return not self.series

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready trends (see ``closedloop trends --help``)."""
        return {"by": self.by, "window": self.window, "task_type": self.task_type,
                "since": self.since, "until": self.until, "confidence": self.confidence,
                "periods": list(self.periods),
                "series": [s.to_dict() for s in self.series]}


def figures(cell: SeriesCell, z: float) -> dict[str, Estimate]:
    """The figures of one cell (those with something to count)."""
    found: dict[str, Estimate | None] = {
        "validation_pass_rate": wilson(cell.validation_passed, cell.validated, z),
        "reask_rate": wilson(cell.reasked, cell.validated, z),
        "verification_pass_rate": wilson(cell.verification_passed, cell.verified, z),
        "failure_rate": wilson(cell.failed, cell.steps, z),
        "latency_p50_ms": histogram_percentile(cell.latency, 50, z, latency_bounds),
        "latency_p95_ms": histogram_percentile(cell.latency, 95, z, latency_bounds),
        "tokens_per_step": mean(cell.steps, cell.tokens, cell.tokens_sq, z),
        "cost_per_step": mean(cell.priced, cell.cost_usd, cell.cost_sq, z),
        "tokens_per_success": ratio(cell.tokens, cell.tokens_sq, cell.succeeded_tokens,
                                    cell.succeeded, z),
        "cost_per_success": (ratio(cell.cost_usd, cell.cost_sq, cell.succeeded_cost,
                                   cell.succeeded, z) if cell.priced else None),
    }
    return {k: v for k, v in found.items() if v is not None}


def change(name: str, before: Estimate, after: Estimate, z: float) -> Change:
    """The change of figure ``name`` from one period to the next."""
    if name in RATES:
        return rate_change(before, after)
    if name in PERCENTILES:
        return interval_change(before, after)
    return normal_change(before, after, z)


def trends_from_cells(cells: list[SeriesCell], *, by: str, window: str, first: int,
                      last: int, confidence: float = 0.95, task_type: str | None = None,
                      since: float | None = None, until: float | None = None) -> Trends:
    """Trends from a store's series cells, over periods ``first..last`` (indexes)."""
    length, offset = check_window(window)
    z = z_of(confidence)
    per_value: dict[str | None, dict[int, SeriesCell]] = {}
    for cell in cells:
        if first <= cell.period <= last:
            per_value.setdefault(cell.value, {})[cell.period] = cell
    series = []
    for value in sorted(per_value, key=lambda v: (v is not None, v or "")):
        by_period = per_value[value]
        points = {p: TrendPoint(start=p * length + offset, steps=c.steps,
                                figures=figures(c, z)) for p, c in sorted(by_period.items())}
        changes: dict[str, Change] = {}
        if last in points and last - 1 in points:
            before, after = points[last - 1].figures, points[last].figures
            changes = {name: change(name, before[name], after[name], z)
                       for name in METRICS if name in before and name in after}
        series.append(TrendSeries(value=value, points=tuple(points.values()),
                                  changes=changes))
    return Trends(by=by, window=window, task_type=task_type, since=since, until=until,
                  confidence=confidence,
                  periods=tuple(p * length + offset for p in range(first, last + 1)),
                  series=tuple(series))


def trends(store: Store, *, by: str = "task_type", window: str = "day",
           periods: int | None = None, since: float | None = None, until: float | None = None,
           task_type: str | None = None, confidence: float = 0.95,
           clock: Callable[[], float] = time.time) -> Trends:
    """The trends of ``store``'s steps split by ``by`` (``task_type``, ``model``,
    ``agent_version``, ``prompt_version`` or ``label:KEY``) over ``window`` periods (hour,
    day, week; UTC, weeks from Monday).

    Without ``since`` the trend covers the last ``periods`` periods
    (:data:`DEFAULT_PERIODS`) up to the newest step (of ``task_type``), so a store whose
    steps stopped a while ago still shows its last month. Only events already written are
    seen: call ``store.flush()`` first to include your own.
    """
    dimension = parse_dimension(by)
    length, offset = check_window(window)
    if not 0.5 <= confidence < 1.0:
        raise ConfigError(f"confidence must be in [0.5, 1), got {confidence!r}")
    if periods is not None and (isinstance(periods, bool) or not isinstance(periods, int)
                                or periods < 2):
        raise ConfigError(f"periods must be an integer ≥ 2, got {periods!r}")
    count = periods or DEFAULT_PERIODS[window]
    if since is None:
        newest = store.steps(limit=1, task_type=task_type, until=until).steps
        end = newest[0].ts if newest else (until if until is not None else clock())
        since = (period_of(end, length, offset) - count + 1) * length + offset
    cells = store.series(by=dimension, window=window, since=since, until=until,
                         task_type=task_type)
    first = period_of(since, length, offset)
    if periods is None and cells:  # the default span: from the first period with steps
        first = max(first, min(c.period for c in cells))
    last = max((c.period for c in cells), default=first)
    return trends_from_cells(cells, by=str(dimension), window=window, first=first, last=last,
                             confidence=confidence, task_type=task_type, since=since,
                             until=until)

