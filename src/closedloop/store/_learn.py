"""The learning layer's questions, answered where the events are (the query port, continued).

Three aggregations back ``closedloop trends``, ``failures`` and ``factors``
(:mod:`closedloop.learn`); SQLite and PostgreSQL compute them in SQL, the memory backend (and
any backend without them) in one Python pass over the events, and all give the same cells
for the same events (floating-point sums may differ in their last digits):

- :class:`SeriesCell`: per value of one :class:`Dimension` (task type, model, agent or prompt
  version, a label) and per time period (:data:`WINDOWS`: hour, day or ISO week from Monday,
  UTC), the step counts, validation and verification passes, re-asks, successes and
  failures, tokens, cost, and a latency histogram (:func:`latency_bucket`, nine buckets per
  decade);
- :class:`FactorCell`: steps and failures per combination of the factors a failure may
  depend on: model, agent version, prompt version, labels, UTC hour of day and input size
  (:func:`size_bucket` of ``input_tokens``, a 1-2-5 series);
- :class:`FailureCell`: failed steps per ``(error_type, error_group, task_type, model,
  period)`` with their first and last time, for clustering; :meth:`LearnQueries.
  failure_examples` gives the newest trace ids of a few groups.

A *failure* is a step whose outcome is in :data:`FAILURE_OUTCOMES` (failed, error,
blocked); steps refused by control (:data:`REFUSAL_OUTCOMES`: paused, halted, control
unavailable) are not attempts of the agent and are left out of factors and clusters (they
count as steps in trends).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from closedloop._errors import ConfigError
from closedloop._events import StepEvent
from closedloop._figures import message_group
from closedloop.store._query import StepFilter

WINDOWS: Mapping[str, float] = {"hour": 3600.0, "day": 86400.0, "week": 604800.0}
"""The period lengths, in seconds."""
WINDOW_OFFSETS: Mapping[str, float] = {"hour": 0.0, "day": 0.0, "week": 4 * 86400.0}
"""Where periods start: weeks on Mondays (1970-01-05 was one), UTC."""
FAILURE_OUTCOMES = ("failed", "error", "blocked")
REFUSAL_OUTCOMES = ("paused", "halted", "control_unavailable")
MAX_PERIODS = 10_000
"""A series covers at most this many periods (an hour window over a year is 8,760)."""
DIMENSION_COLUMNS = ("task_type", "model", "agent_version", "prompt_version")
LATENCY_TOP = 190
"""The latency bucket of 10^15 ms and above (and of anything SQL cannot count in µs)."""


@dataclass(frozen=True, slots=True)
class Dimension:
    """What a series is split by: an event column, or one label (``column`` "label")."""

    column: str
    label: str | None = None

    def __str__(self) -> str:
        return f"label:{self.label}" if self.column == "label" else self.column

    def value(self, e: StepEvent) -> str | None:
        """The event's value of this dimension (None: not recorded)."""
        if self.column == "label":
            return (e.labels or {}).get(self.label or "")
        found: str | None = getattr(e, self.column)
        return found


def parse_dimension(text: str) -> Dimension:
    """``task_type``, ``model``, ``agent_version``, ``prompt_version`` or ``label:KEY``."""
    from closedloop._events import _LABEL_KEY, MAX_LABEL_KEY

    if text in DIMENSION_COLUMNS:
        return Dimension(text)
    if text.startswith("label:"):
        key = text[len("label:"):]
        if len(key) <= MAX_LABEL_KEY and _LABEL_KEY.fullmatch(key):
            return Dimension("label", key)
    raise ConfigError(f"cannot split by {text[:80]!r}: use one of "
                      f"{', '.join(DIMENSION_COLUMNS)} or label:KEY")


def check_window(window: str) -> tuple[float, float]:
    """``(length, offset)`` in seconds of a window name; else a :class:`ConfigError`."""
    if window not in WINDOWS:
        raise ConfigError(f"window must be one of {', '.join(WINDOWS)}, got {window[:40]!r}")
    return WINDOWS[window], WINDOW_OFFSETS[window]


def period_of(ts: float, length: float, offset: float) -> int:
    """The index of the period holding ``ts``: it starts at ``index * length + offset``.

    Truncated toward zero like SQL's integer cast: exact for times after the offset."""
    return int((ts - offset) / length)


def latency_bucket(latency_ms: float) -> int:
    """A latency's histogram bucket, as SQL computes it (:func:`latency_bucket_sql`):
    ``10 * d + f`` where the latency in whole microseconds has ``d`` digits and leading digit
    ``f`` (nine buckets per decade); 0 below 1 µs, :data:`LATENCY_TOP` from 10^18 µs (and for
    NaN, which PostgreSQL sorts above every number)."""
    micros = latency_ms * 1000
    if micros != micros or micros >= 1e18:  # noqa: PLR0124 - NaN
        return LATENCY_TOP
    if not micros >= 1:
        return 0
    digits = str(int(micros))
    return len(digits) * 10 + int(digits[0])


def latency_bucket_sql(column: str = "latency_ms") -> str:
    """:func:`latency_bucket` in SQL, the same on SQLite and PostgreSQL: a balanced tree of
    comparisons of the latency in µs with each bucket's lower bound (an integer, so
    ``x >= bound`` exactly when ``int(x) >= bound``), eight comparisons a row, cheaper than
    counting the digits of a number written out as text."""
    micros = f"{column} * 1000"
    bounds = [(first * 10 ** (digits - 1), digits * 10 + first)
              for digits in range(1, 19) for first in range(1, 10)]

    def tree(low: int, high: int, below: int) -> str:
        # the bucket of a latency known to be >= bounds[low] (bucket ``below`` if low < 0)
        # and < bounds[high] (or unbounded)
        if high - low <= 1:
            return str(below)
        middle = (low + high) // 2
        bound, bucket = bounds[middle]
        return (f"CASE WHEN {micros} < {bound} THEN {tree(low, middle, below)} "
                f"ELSE {tree(middle, high, bucket)} END")

    return (f"(CASE WHEN NOT {micros} >= 1 THEN 0 WHEN {micros} >= 1e18 THEN {LATENCY_TOP} "
            f"ELSE {tree(-1, len(bounds), 0)} END)")


def latency_bounds(bucket: int) -> tuple[float, float]:
    """The latencies (ms) of a bucket: ``low <= latency < high``."""
    if bucket <= 0:
        return 0.0, 0.001
    if bucket >= LATENCY_TOP:
        return 1e15, 1e15
    digits, first = divmod(bucket, 10)
    unit = 10.0 ** (digits - 1) / 1000.0
    return first * unit, (first + 1) * unit


def size_code(tokens: int) -> int:
    """The input-size class of ``tokens`` as SQL computes it: ``10 * d + c`` where ``tokens``
    has ``d`` digits and ``c`` is 1, 2 or 5 (its leading digit's class); 0 for none."""
    if tokens <= 0:
        return 0
    digits = str(tokens)
    return len(digits) * 10 + (1 if digits[0] < "2" else 2 if digits[0] < "5" else 5)


def size_bucket(code: int) -> int:
    """The smallest input size of a :func:`size_code`: one of 1, 2, 5, 10, 20, 50, …"""
    digits, first = divmod(code, 10)
    return first * 10 ** (digits - 1) if code > 0 else 0


def hour_of_day(ts: float) -> int:
    """The UTC hour of ``ts`` (0 to 23), truncated as SQL's integer cast does."""
    return int(ts / 3600.0) % 24


@dataclass(slots=True, kw_only=True)
class SeriesCell:
    """One value of the dimension in one period. ``latency`` maps :func:`latency_bucket` to
    steps; ``tokens`` are input plus output; ``*_sq`` are sums of squares (per step) and
    ``succeeded_*`` sums over succeeded steps (for confidence intervals)."""

    value: str | None
    period: int
    steps: int = 0
    validated: int = 0
    validation_passed: int = 0
    reasked: int = 0
    verified: int = 0
    verification_passed: int = 0
    succeeded: int = 0
    failed: int = 0
    tokens: int = 0
    tokens_sq: float = 0.0
    succeeded_tokens: int = 0
    priced: int = 0
    cost_usd: float = 0.0
    cost_sq: float = 0.0
    succeeded_cost: float = 0.0
    latency_sum: float = 0.0
    latency: dict[int, int] = field(default_factory=dict)

    def add(self, e: StepEvent) -> None:
        """Count one step."""
        self.steps += 1
        if e.validation_passed is not None:
            self.validated += 1
            self.validation_passed += bool(e.validation_passed)
            self.reasked += e.attempts > 1
        if e.verification_passed is not None:
            self.verified += 1
            self.verification_passed += bool(e.verification_passed)
        won = e.outcome == "succeeded"
        self.succeeded += won
        self.failed += e.outcome in FAILURE_OUTCOMES
        tokens = e.input_tokens + e.output_tokens
        self.tokens += tokens
        self.tokens_sq += float(tokens) * tokens
        self.succeeded_tokens += tokens if won else 0
        if e.cost_usd is not None:
            self.priced += 1
            self.cost_usd += e.cost_usd
            self.cost_sq += e.cost_usd * e.cost_usd
            self.succeeded_cost += e.cost_usd if won else 0.0
        self.latency_sum += e.latency_ms
        bucket = latency_bucket(e.latency_ms)
        self.latency[bucket] = self.latency.get(bucket, 0) + 1

    def fold(self, row: Sequence[Any]) -> None:
        """Add one SQL row (see :data:`SERIES_SUMS`), after its value, period and bucket."""
        (steps, validated, vpass, reasked, verified, verpass, won, failed, tokens, tokens_sq,
         won_tokens, priced, cost, cost_sq, won_cost, latency) = row[3:]
        steps = int(steps)
        self.steps += steps
        self.validated += int(validated)
        self.validation_passed += int(vpass or 0)
        self.reasked += int(reasked or 0)
        self.verified += int(verified)
        self.verification_passed += int(verpass or 0)
        self.succeeded += int(won or 0)
        self.failed += int(failed or 0)
        self.tokens += int(tokens or 0)
        self.tokens_sq += float(tokens_sq or 0.0)
        self.succeeded_tokens += int(won_tokens or 0)
        self.priced += int(priced)
        self.cost_usd += float(cost or 0.0)
        self.cost_sq += float(cost_sq or 0.0)
        self.succeeded_cost += float(won_cost or 0.0)
        self.latency_sum += float(latency or 0.0)
        bucket = int(row[2])
        self.latency[bucket] = self.latency.get(bucket, 0) + steps

    def key(self) -> tuple[bool, str, int]:
        return (self.value is not None, self.value or "", self.period)


def series_sums(succeeded: str, failed: str, reasked: str) -> str:
    """The SQL aggregates a :class:`SeriesCell` folds, in order; the arguments are the SQL
    of "the step succeeded", "the step failed" and "the step was re-asked" (booleans)."""
    tokens = "(input_tokens + output_tokens)"
    return (f"count(*), count(validation_passed), sum(CASE WHEN validation_passed THEN 1 "
            f"END), sum(CASE WHEN {reasked} THEN 1 END), count(verification_passed), "
            f"sum(CASE WHEN verification_passed THEN 1 END), sum(CASE WHEN {succeeded} THEN "
            f"1 END), sum(CASE WHEN {failed} THEN 1 END), sum({tokens}), "
            f"sum(CAST({tokens} AS DOUBLE PRECISION) * {tokens}), "
            f"sum(CASE WHEN {succeeded} THEN {tokens} END), count(cost_usd), sum(cost_usd), "
            f"sum(cost_usd * cost_usd), sum(CASE WHEN {succeeded} THEN cost_usd END), "
            f"sum(latency_ms)")


def cells_from_rows(rows: Iterable[Sequence[Any]]) -> list[SeriesCell]:
    """Series cells from SQL rows ``(value, period, latency bucket, *sums)``, ordered by
    value (None first) then period."""
    cells: dict[tuple[Any, int], SeriesCell] = {}
    for row in rows:
        key = (row[0], int(row[1]))
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = SeriesCell(value=row[0], period=key[1])
        cell.fold(row)
    return sorted(cells.values(), key=SeriesCell.key)


def series_events(events: Iterable[StepEvent], by: Dimension, window: str
                  ) -> list[SeriesCell]:
    """The series in one pass over ``events`` (any iterable, read once)."""
    length, offset = check_window(window)
    cells: dict[tuple[str | None, int], SeriesCell] = {}
    for e in events:
        key = (by.value(e), period_of(e.ts, length, offset))
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = SeriesCell(value=key[0], period=key[1])
        cell.add(e)
    return sorted(cells.values(), key=SeriesCell.key)


@dataclass(frozen=True, slots=True, kw_only=True)
class FactorCell:
    """Steps (refusals left out) and failures of one combination of factor values."""

    model: str | None
    agent_version: str | None
    prompt_version: str | None
    labels: Mapping[str, str]
    hour: int
    size: int
    steps: int
    failures: int


def _labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    found = json.loads(value) if isinstance(value, str) else value
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def factor_cells_from_rows(rows: Iterable[Sequence[Any]]) -> list[FactorCell]:
    """Cells from SQL rows ``(model, agent_version, prompt_version, labels JSON, hour,
    size code, steps, failures)``; rows whose labels differ only in their JSON spelling
    are merged."""
    merged: dict[tuple[Any, ...], list[int]] = {}
    for model, agent, prompt, labels, hour, size, steps, failures in rows:
        key = (model, agent, prompt, tuple(sorted(_labels(labels).items())), int(hour),
               size_bucket(int(size)))
        counts = merged.setdefault(key, [0, 0])
        counts[0] += int(steps)
        counts[1] += int(failures or 0)
    return sorted((FactorCell(model=k[0], agent_version=k[1], prompt_version=k[2],
                              labels=dict(k[3]), hour=k[4], size=k[5], steps=n, failures=f)
                   for k, (n, f) in merged.items()), key=_factor_key)


def _factor_key(c: FactorCell) -> tuple[Any, ...]:
    return (c.model or "", c.model is None, c.agent_version or "", c.agent_version is None,
            c.prompt_version or "", c.prompt_version is None, sorted(c.labels.items()),
            c.hour, c.size)


def factor_events(events: Iterable[StepEvent]) -> list[FactorCell]:
    """The factor cells in one pass over ``events`` (refusals are skipped here)."""
    counts: dict[tuple[Any, ...], list[int]] = {}
    for e in events:
        if e.outcome in REFUSAL_OUTCOMES:
            continue
        key = (e.model, e.agent_version, e.prompt_version,
               json.dumps(e.labels, sort_keys=True) if e.labels else None,
               hour_of_day(e.ts), size_code(e.input_tokens))
        found = counts.setdefault(key, [0, 0])
        found[0] += 1
        found[1] += e.outcome in FAILURE_OUTCOMES
    return factor_cells_from_rows((*k, n, f) for k, (n, f) in counts.items())


FACTOR_DIMENSIONS = ("model", "agent_version", "prompt_version")
"""The factors that are event columns (then each label, hour of day and input size)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FactorMargins:
    """Steps and failures (refusals left out) per value of each factor taken alone: what
    :func:`closedloop.learn.factors` ranks. ``tables`` maps a factor's name (``model``,
    ``agent_version``, ``prompt_version``, ``label:KEY``, ``hour_of_day`` as ``"07"``,
    ``input_tokens`` as ``"≥200"`` or ``"0"``) to ``{value: (steps, failures)}``; ``None``:
    not recorded. Integers only, so every way of counting gives equal margins."""

    steps: int
    failures: int
    tables: Mapping[str, Mapping[str | None, tuple[int, int]]]


def size_label(size: int) -> str:
    """How a factor's input-size value reads: ``"≥200"`` (a :func:`size_bucket`), ``"0"``."""
    return f"≥{size}" if size else "0"


class _Margins:
    """Adds counts up into :class:`FactorMargins`."""

    def __init__(self) -> None:
        self.steps = self.failures = 0
        self.tables: dict[str, dict[str | None, list[int]]] = {}
        self.labelled: dict[str, list[int]] = {}

    def add(self, name: str, value: str | None, steps: int, failures: int) -> None:
        found = self.tables.setdefault(name, {}).setdefault(value, [0, 0])
        found[0] += steps
        found[1] += failures

    def label(self, key: str, value: str, steps: int, failures: int) -> None:
        self.add(f"label:{key}", value, steps, failures)
        found = self.labelled.setdefault(key, [0, 0])
        found[0] += steps
        found[1] += failures

    def done(self) -> FactorMargins:
        for key, (steps, failures) in self.labelled.items():
            if steps < self.steps:  # the steps without the label
                self.add(f"label:{key}", None, self.steps - steps, self.failures - failures)
        return FactorMargins(steps=self.steps, failures=self.failures, tables={
            name: {v: (n, f) for v, (n, f) in table.items()}
            for name, table in self.tables.items()})


def margins_of_cells(cells: Iterable[FactorCell]) -> FactorMargins:
    """The margins of joint :class:`FactorCell` counts."""
    out = _Margins()
    for c in cells:
        out.steps += c.steps
        out.failures += c.failures
        for name in FACTOR_DIMENSIONS:
            out.add(name, getattr(c, name), c.steps, c.failures)
        for key, value in c.labels.items():
            out.label(key, value, c.steps, c.failures)
        out.add("hour_of_day", f"{c.hour:02d}", c.steps, c.failures)
        out.add("input_tokens", size_label(c.size), c.steps, c.failures)
    return out.done()


def margins_from_rows(rows: Iterable[Sequence[Any]]) -> FactorMargins:
    """The margins of SQL rows ``(dim, key, value, hour, steps, failures)``: ``dim`` ""
    counts every step of UTC hour of day ``hour``; ``model``, ``agent_version`` and
    ``prompt_version`` those of ``value``; ``size`` those of :func:`size_code` ``value``;
    ``labels`` those whose labels are the JSON ``value`` (see :func:`factor_rows_sql`)."""
    out = _Margins()
    for dim, _key, value, hour, n, f in rows:
        steps, failures = int(n), int(f or 0)
        if dim == "":
            out.steps += steps
            out.failures += failures
            out.add("hour_of_day", f"{int(hour):02d}", steps, failures)
        elif dim == "size":
            out.add("input_tokens", size_label(size_bucket(int(value))), steps, failures)
        elif dim == "labels":
            for k, v in _labels(value).items():
                out.label(k, v, steps, failures)
        else:
            out.add(dim, value, steps, failures)
    return out.done()


def factor_rows_sql(inner: str, *, head: Sequence[str] = ()) -> str:
    """The SQL of the rows :func:`margins_from_rows` reads, each after the ``head`` columns
    (grouped by them too), from ``inner``: a SELECT of the steps to count (refusals left
    out) with the columns ``head``, ``failed`` (1 or 0), ``hod`` (UTC hour of day),
    ``model``, ``agent_version``, ``prompt_version``, ``size`` (:func:`size_code`) and
    ``labels`` (JSON text: its pairs are read in Python, as the scan reads them; SQLite's
    JSON functions cut a string at an escaped NUL). One pass over ``inner`` (a CTE used
    more than once is materialized by SQLite and PostgreSQL)."""
    lead = "".join(f"{h}, " for h in head)
    count = "count(*), sum(failed)"
    parts = [f"SELECT {lead}'', '', NULL, hod, {count} FROM e GROUP BY {lead}hod"]
    parts += [f"SELECT {lead}'{dim}', '', {dim}, 0, {count} FROM e GROUP BY {lead}{dim}"
              for dim in FACTOR_DIMENSIONS]
    parts.append(f"SELECT {lead}'size', '', CAST(size AS TEXT), 0, {count} FROM e "
                 f"GROUP BY {lead}size")
    parts.append(f"SELECT {lead}'labels', '', labels, 0, {count} FROM e WHERE labels IS NOT "
                 f"NULL GROUP BY {lead}labels")
    return f"WITH e AS ({inner}) " + " UNION ALL ".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureCell:
    """Failed steps of one ``(error_type, group, task_type, model, period)``; ``group`` is
    the message's :func:`~closedloop._figures.message_group` ("" when there is none)."""

    error_type: str
    group: str
    task_type: str
    model: str | None
    period: int
    count: int
    first_ts: float
    last_ts: float


def failure_cells_from_rows(rows: Iterable[Sequence[Any]]) -> list[FailureCell]:
    """Cells from rows ``(error_type, group, task_type, model, period, count, first, last)``;
    rows naming the same cell (a NULL and an empty error type) are merged."""
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for error_type, group, task, model, period, n, first, last in rows:
        key = (error_type or "", group or "", task, model, int(period))
        found = merged.get(key)
        if found is None:
            merged[key] = [int(n), float(first), float(last)]
        else:
            found[0] += int(n)
            found[1] = min(found[1], float(first))
            found[2] = max(found[2], float(last))
    return sorted((FailureCell(error_type=k[0], group=k[1], task_type=k[2], model=k[3],
                               period=k[4], count=v[0], first_ts=v[1], last_ts=v[2])
                   for k, v in merged.items()), key=_failure_key)


def _failure_key(c: FailureCell) -> tuple[Any, ...]:
    return (c.error_type, c.group, c.task_type, c.model or "", c.model is None, c.period)


def failure_events(events: Iterable[StepEvent], window: str) -> list[FailureCell]:
    """The failure cells in one pass over ``events``."""
    length, offset = check_window(window)
    rows: dict[tuple[Any, ...], list[Any]] = {}
    for e in events:
        if e.outcome not in FAILURE_OUTCOMES:
            continue
        key = (e.error_type or "", message_group(e.error_message) if e.error_message else "",
               e.task_type, e.model, period_of(e.ts, length, offset))
        found = rows.get(key)
        if found is None:
            rows[key] = [1, e.ts, e.ts]
        else:
            found[0] += 1
            found[1] = min(found[1], e.ts)
            found[2] = max(found[2], e.ts)
    return failure_cells_from_rows((*k, *v) for k, v in rows.items())


ExampleKey = tuple[str, str, str]
"""``(task_type, error_type or "", group)`` of failed steps."""


def failure_example_events(events: Iterable[StepEvent], keys: Sequence[ExampleKey],
                           per_key: int) -> dict[ExampleKey, list[tuple[float, str]]]:
    """The newest ``per_key`` ``(ts, trace_id)`` of each key's failed steps, newest first."""
    wanted = set(keys)
    found: dict[ExampleKey, list[tuple[float, str]]] = {k: [] for k in keys}
    for e in events:
        if e.outcome not in FAILURE_OUTCOMES:
            continue
        key = (e.task_type, e.error_type or "",
               message_group(e.error_message) if e.error_message else "")
        if key in wanted:
            found[key].append((e.ts, e.trace_id))
    return {k: sorted(v, reverse=True)[:per_key] for k, v in found.items()}


def period_steps_events(events: Iterable[StepEvent], window: str) -> dict[int, int]:
    """Steps per period."""
    length, offset = check_window(window)
    out: dict[int, int] = {}
    for e in events:
        p = period_of(e.ts, length, offset)
        out[p] = out.get(p, 0) + 1
    return out


@runtime_checkable
class LearnQueries(Protocol):
    """A backend that computes the learning layer's aggregations itself (SQL).

    Each method reads one snapshot and raises :class:`~closedloop.StoreError` (one line)
    when the store cannot be read; ``None``: this store's schema predates the queries (the
    caller then makes the Python pass).
    """

    def series(self, where: StepFilter, *, by: Dimension, window: str
               ) -> list[SeriesCell] | None:
        """The series of ``where``'s steps split by ``by`` over ``window`` periods."""

    def factor_counts(self, where: StepFilter) -> list[FactorCell] | None:
        """Steps and failures per combination of factor values."""

    def failure_counts(self, where: StepFilter, *, window: str) -> list[FailureCell] | None:
        """Failed steps per group, task type, model and period."""

    def failure_examples(self, where: StepFilter, keys: Sequence[ExampleKey], *,
                         per_key: int) -> dict[ExampleKey, list[tuple[float, str]]] | None:
        """The newest ``per_key`` ``(ts, trace_id)`` of each key's failed steps."""

    def period_steps(self, where: StepFilter, *, window: str) -> dict[int, int] | None:
        """Steps per period."""


@runtime_checkable
class MarginQueries(Protocol):
    """A backend that counts the factors' margins itself (from a roll-up); without it, or
    when it answers None, they are added up from :meth:`LearnQueries.factor_counts`."""

    def factor_margins(self, where: StepFilter) -> FactorMargins | None:
        """Steps and failures per value of each factor alone (see :class:`FactorMargins`)."""


def whole_hours(since: float | None, until: float | None, floor: int) -> tuple[int, int] | None:
    """The whole UTC hours ``[low, high)`` (hour ``h`` is ``h * 3600 <= ts < h * 3600 +
    3600``, exactly) inside ``[since, until)`` from hour ``floor`` on: what an hourly
    roll-up can answer (None: none)."""
    low = floor
    if since is not None:
        h = math.ceil(since / 3600.0)
        while (h - 1) * 3600.0 >= since:
            h -= 1
        while h * 3600.0 < since:
            h += 1
        low = max(low, h)
    high = 1 << 40
    if until is not None:
        h = math.floor(until / 3600.0)
        while h * 3600.0 > until:
            h -= 1
        while (h + 1) * 3600.0 <= until:
            h += 1
        high = h
    return (low, high) if low < high else None


def check_span(cells: Iterable[int]) -> None:
    """A :class:`ConfigError` when the periods span more than :data:`MAX_PERIODS`."""
    periods = list(cells)
    if periods and max(periods) - min(periods) >= MAX_PERIODS:
        raise ConfigError(f"the steps span more than {MAX_PERIODS:,} periods: choose a longer "
                          "window or a shorter time range (--since)")
