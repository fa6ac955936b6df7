"""Sequential change detectors: pure decision logic, written once for every signal.

A detector is a frozen record of its parameters; its state is another frozen record.
``detector.update(state, observation)`` returns a :class:`Detection` — the new state,
whether it alarms, and the statistic — and does no I/O, reads no clock and draws no random
number: the same observations give the same alarms in every process, and a state saved with
``state.to_dict()`` (JSON-ready) and read back with ``State.from_dict(...)`` continues where
it stopped. Both progressive autonomy (demotion when the verification pass rate of an
autonomous task type drops) and the learning layer's drift detection use these.

- :class:`BernoulliCusum`: a rise in the rate of an event (a failed verification, a re-ask)
  from ``p0`` to ``p1``. The log-likelihood-ratio CUSUM of Page (1954) for Bernoulli data,
  with its two weights rounded to integers so that the statistic lives on a lattice and its
  average run length is computed **exactly** from the Markov chain of the statistic
  (:meth:`BernoulliCusum.arl`). :meth:`BernoulliCusum.for_arl` picks the smallest control
  limit whose in-control average run length (steps between false alarms) is at least the
  target: the false-alarm rate is bounded by construction, not by tuning.
- :class:`GaussianCusum`: a shift of a continuous value (latency p95, cost per success, a
  score) from a known mean and standard deviation, one-sided up or down; its limit is chosen
  from a target in-control run length with Siegmund's approximation.
- :class:`PageHinkley`: the Page-Hinkley test against the running mean, for a continuous
  value with no known baseline; its threshold is the user's.

After an alarm a detector's statistic starts again from zero.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Generic, Literal, NamedTuple, TypeVar, cast

from closedloop._errors import ConfigError

__all__ = [
    "BernoulliCusum",
    "CusumState",
    "Detection",
    "GaussianCusum",
    "PageHinkley",
    "PageHinkleyState",
]

S = TypeVar("S")
Direction = Literal["up", "down"]

_new: Any = tuple.__new__  # a named tuple from its values, without its Python-level __new__
_LATTICE = 48
"""The event weight of a Bernoulli CUSUM is about this many lattice units (fine enough that
rounding the likelihood ratio's weights changes them by about 1 %, coarse enough that the
exact run length is a quick computation)."""


class Detection(NamedTuple, Generic[S]):
    """What one observation did: the detector's new ``state``, whether it ``alarm``\\ s, and
    the ``statistic`` it compared with its limit (before a reset on alarm)."""

    state: S
    alarm: bool
    statistic: float


def _from_dict(cls: type[Any], data: Any) -> Any:
    """A state record from its ``to_dict`` form; a malformed one is a one-line ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
    names = set(cls._fields) if hasattr(cls, "_fields") else {f.name for f in fields(cls)}
    if set(data) != names:
        raise ConfigError(f"{cls.__name__}: expected the keys {sorted(names)}, got "
                          f"{sorted(map(str, data))[:10]}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


# ----- Bernoulli CUSUM ----------------------------------------------------------------------

class CusumState(NamedTuple):
    """A CUSUM's state: the statistic, observations seen, alarms raised. (A named tuple: the
    demotion monitor makes one per autonomous step, on the agent's path.)"""

    statistic: float = 0.0
    steps: int = 0
    alarms: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self._asdict())

    @classmethod
    def from_dict(cls, data: Any) -> CusumState:
        """The state saved by :meth:`to_dict`; a malformed one is a ConfigError."""
        state: CusumState = _from_dict(cls, data)
        if not (isinstance(state.steps, int) and isinstance(state.alarms, int)
                and state.steps >= 0 and state.alarms >= 0):
            raise ConfigError("CusumState: steps and alarms must be integers ≥ 0")
        if not (isinstance(state.statistic, int | float) and math.isfinite(state.statistic)
                and state.statistic >= 0):
            raise ConfigError("CusumState: statistic must be a finite number ≥ 0")
        return state


@dataclass(frozen=True, slots=True, kw_only=True)
class BernoulliCusum:
    """Detects a rise of an event's probability from ``p0`` (in control) to ``p1``.

    Each observation adds ``up`` lattice units when the event happened and subtracts
    ``down`` when it did not (the log-likelihood ratios ``ln(p1/p0)`` and
    ``ln((1-p1)/(1-p0))`` in the same proportion); the statistic never goes below zero and
    alarms when it reaches ``limit``. Build one with :meth:`for_arl`.
    """

    p0: float
    p1: float
    up: int
    down: int
    limit: int

    def __post_init__(self) -> None:
        if not (0.0 < self.p0 < self.p1 < 1.0):
            raise ConfigError(f"BernoulliCusum needs 0 < p0 < p1 < 1, got p0={self.p0!r}, "
                              f"p1={self.p1!r}")
        if not all(isinstance(v, int) and v >= 1 for v in (self.up, self.down, self.limit)):
            raise ConfigError("BernoulliCusum weights and limit must be integers ≥ 1")

    @classmethod
    def for_arl(cls, p0: float, p1: float, *, arl0: float = 1_000_000.0) -> BernoulliCusum:
        """The chart for ``p0 → p1`` whose in-control average run length is at least
        ``arl0`` steps (expected false alarms: at most about ``steps / arl0``), with the
        smallest limit that achieves it (the fastest detection)."""
        if not (isinstance(arl0, int | float) and math.isfinite(arl0) and arl0 >= 2):
            raise ConfigError(f"arl0 must be a finite number ≥ 2, got {arl0!r}")
        cls(p0=p0, p1=p1, up=1, down=1, limit=1)  # checks p0, p1
        return _for_arl(float(p0), float(p1), float(arl0))

    def initial(self) -> CusumState:
        """The state before any observation."""
        return CusumState()

    def update(self, state: CusumState, event: bool) -> Detection[CusumState]:
        """Add one observation (``event``: the monitored event happened, e.g. a failure)."""
        # on the agent's path once per autonomous step: the tuples are built directly
        statistic, steps, alarms = state
        limit = self.limit
        if event:
            s = statistic + self.up
            if s >= limit:
                return cast("Detection[CusumState]", _new(
                    Detection, (_new(CusumState, (0.0, steps + 1, alarms + 1)), True, s / limit)))
        else:
            s = statistic - self.down
            s = max(s, 0.0)
        return cast("Detection[CusumState]",
                    _new(Detection, (_new(CusumState, (s, steps + 1, alarms)), False, s / limit)))

    def arl(self, p: float) -> float:
        """The average run length from zero to an alarm when the event's probability is
        ``p``: exact for this chart (the Markov chain of its integer statistic). At ``p0``
        it is the mean number of steps between false alarms; at ``p1``, the mean delay."""
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"p must be a probability, got {p!r}")
        return _arl(self.up, self.down, self.limit, p)

    def to_dict(self) -> dict[str, Any]:
        """The detector's parameters, JSON-ready."""
        return {"kind": "bernoulli_cusum", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> BernoulliCusum:
        """The detector saved by :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("kind") != "bernoulli_cusum":
            raise ConfigError("not a saved BernoulliCusum")
        detector: BernoulliCusum = _from_dict(cls, {k: v for k, v in data.items()
                                                    if k != "kind"})
        return detector


def _arl(up: int, down: int, limit: int, p: float) -> float:
    """Mean steps from statistic 0 to ``≥ limit`` (Gaussian elimination on the band of the
    Markov chain's ``I - Q``: a non-singular M-matrix, so no pivoting is needed)."""
    n, q = limit, 1.0 - p
    if p == 0.0:
        return math.inf
    width = down + up + 1  # row i holds columns i-down .. i+up at index j - i + down
    rows = [[0.0] * width for _ in range(n)]
    rhs = [1.0] * n
    for i in range(n):
        row = rows[i]
        row[down] = 1.0
        if i + up < n:
            row[up + down] -= p
        row[max(0, i - down) - i + down] -= q
    for k in range(n):
        pivot_row = rows[k]
        pivot = pivot_row[down]
        span = min(up, n - 1 - k)
        for i in range(k + 1, min(n, k + down + 1)):
            row = rows[i]
            off = k - i + down
            factor = row[off] / pivot
            if factor:
                for c in range(span + 1):
                    row[off + c] -= factor * pivot_row[down + c]
                rhs[i] -= factor * rhs[k]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        row = rows[i]
        s = rhs[i]
        for c in range(1, min(up, n - 1 - i) + 1):
            s -= row[down + c] * x[i + c]
        x[i] = s / row[down]
    return x[0]


@functools.lru_cache(maxsize=64)
def _for_arl(p0: float, p1: float, arl0: float) -> BernoulliCusum:
    gain = math.log(p1 / p0)
    loss = -math.log((1.0 - p1) / (1.0 - p0))
    ratio = gain / loss
    down = max(1, round(_LATTICE / ratio))
    up = max(1, round(ratio * down))
    lo, hi = 1, max(2, up)
    while _arl(up, down, hi, p0) < arl0:  # the run length grows about exponentially
        lo, hi = hi, hi * 2
        if hi > 1 << 22:
            raise ConfigError(f"no Bernoulli CUSUM limit reaches arl0={arl0:g}")
    while lo < hi:  # the smallest limit that reaches arl0
        mid = (lo + hi) // 2
        if _arl(up, down, mid, p0) >= arl0:
            hi = mid
        else:
            lo = mid + 1
    return BernoulliCusum(p0=p0, p1=p1, up=up, down=down, limit=hi)


# ----- Gaussian CUSUM -----------------------------------------------------------------------

_SIEGMUND = 1.166  # the overshoot correction of Siegmund's approximation (2 * 0.583)


def _siegmund_arl(delta: float, k: float, h: float) -> float:
    """Siegmund's approximation of a standardised one-sided CUSUM's run length when the mean
    is ``delta`` standard deviations away from the baseline, in the monitored direction."""
    d = delta - k
    b = h + _SIEGMUND
    if abs(d) < 1e-12:
        return b * b
    x = 2.0 * d * b
    if -x > 700:  # exp overflows: the run length is astronomically long
        return math.inf
    return (math.exp(-x) + x - 1.0) / (2.0 * d * d)


@dataclass(frozen=True, slots=True, kw_only=True)
class GaussianCusum:
    """Detects a shift of a continuous value by ``shift`` standard deviations from ``mean``
    (``direction`` ``"up"``: a rise, as of latency or cost; ``"down"``: a fall, as of a
    score). ``S = max(0, S + z - shift/2)`` over standardised observations ``z``; alarms at
    ``limit``. Build one with :meth:`for_arl`."""

    mean: float
    sigma: float
    shift: float
    limit: float
    direction: Direction = "up"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and self.sigma > 0 and math.isfinite(self.sigma)
                and self.shift > 0 and math.isfinite(self.shift) and self.limit > 0
                and math.isfinite(self.limit)):
            raise ConfigError("GaussianCusum needs a finite mean, sigma > 0, shift > 0 "
                              "and limit > 0")
        if self.direction not in ("up", "down"):
            raise ConfigError(f"direction must be 'up' or 'down', got {self.direction!r}")

    @classmethod
    def for_arl(cls, mean: float, sigma: float, *, shift: float = 1.0,
                arl0: float = 1_000_000.0, direction: Direction = "up") -> GaussianCusum:
        """The chart whose in-control run length is ``arl0`` (Siegmund's approximation)."""
        if not (math.isfinite(arl0) and arl0 >= 2):
            raise ConfigError(f"arl0 must be a finite number ≥ 2, got {arl0!r}")
        if not (shift > 0 and math.isfinite(shift)):
            raise ConfigError(f"shift must be > 0, got {shift!r}")
        k = shift / 2.0
        lo, hi = 0.0, 1.0
        while _siegmund_arl(0.0, k, hi) < arl0:
            lo, hi = hi, hi * 2.0
        for _ in range(100):
            mid = (lo + hi) / 2.0
            if _siegmund_arl(0.0, k, mid) >= arl0:
                hi = mid
            else:
                lo = mid
        return cls(mean=mean, sigma=sigma, shift=shift, limit=hi, direction=direction)

    def initial(self) -> CusumState:
        """The state before any observation."""
        return CusumState()

    def update(self, state: CusumState, value: float) -> Detection[CusumState]:
        """Add one observation; a value that is not finite is ignored (no step)."""
        if not math.isfinite(value):
            return Detection(state, False, state.statistic / self.limit)
        z = (value - self.mean) / self.sigma
        if self.direction == "down":
            z = -z
        s = max(0.0, state.statistic + z - self.shift / 2.0)
        if s >= self.limit:
            return Detection(CusumState(statistic=0.0, steps=state.steps + 1,
                                        alarms=state.alarms + 1), True, s / self.limit)
        return Detection(CusumState(statistic=s, steps=state.steps + 1, alarms=state.alarms),
                         False, s / self.limit)

    def arl(self, shift: float = 0.0) -> float:
        """The approximate average run length when the mean has moved by ``shift`` standard
        deviations in the monitored direction (0: between false alarms)."""
        return _siegmund_arl(shift, self.shift / 2.0, self.limit)

    def to_dict(self) -> dict[str, Any]:
        """The detector's parameters, JSON-ready."""
        return {"kind": "gaussian_cusum", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> GaussianCusum:
        """The detector saved by :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("kind") != "gaussian_cusum":
            raise ConfigError("not a saved GaussianCusum")
        detector: GaussianCusum = _from_dict(cls, {k: v for k, v in data.items()
                                                   if k != "kind"})
        return detector


# ----- Page-Hinkley -------------------------------------------------------------------------

class PageHinkleyState(NamedTuple):
    """The Page-Hinkley test's state: observations, their running mean, the cumulative
    deviation and its extreme so far, alarms raised."""

    steps: int = 0
    mean: float = 0.0
    cumulative: float = 0.0
    extreme: float = 0.0
    alarms: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self._asdict())

    @classmethod
    def from_dict(cls, data: Any) -> PageHinkleyState:
        """The state saved by :meth:`to_dict`; a malformed one is a ConfigError."""
        state: PageHinkleyState = _from_dict(cls, data)
        if not (isinstance(state.steps, int) and state.steps >= 0
                and isinstance(state.alarms, int) and state.alarms >= 0):
            raise ConfigError("PageHinkleyState: steps and alarms must be integers ≥ 0")
        if not all(isinstance(v, int | float) and math.isfinite(v)
                   for v in (state.mean, state.cumulative, state.extreme)):
            raise ConfigError("PageHinkleyState: mean, cumulative and extreme must be finite")
        return state


@dataclass(frozen=True, slots=True, kw_only=True)
class PageHinkley:
    """The Page-Hinkley test: alarms when the cumulative deviation from the running mean,
    less ``delta`` per step, rises ``threshold`` above its lowest point (``direction``
    ``"down"``: falls below its highest). ``min_steps`` observations pass before any alarm.
    After an alarm it learns the new mean from scratch."""

    delta: float
    threshold: float
    direction: Direction = "up"
    min_steps: int = 30

    def __post_init__(self) -> None:
        if not (self.delta >= 0 and math.isfinite(self.delta) and self.threshold > 0
                and math.isfinite(self.threshold)):
            raise ConfigError("PageHinkley needs delta ≥ 0 and threshold > 0")
        if self.direction not in ("up", "down"):
            raise ConfigError(f"direction must be 'up' or 'down', got {self.direction!r}")
        if not isinstance(self.min_steps, int) or self.min_steps < 1:
            raise ConfigError("min_steps must be an integer ≥ 1")

    def initial(self) -> PageHinkleyState:
        """The state before any observation."""
        return PageHinkleyState()

    def update(self, state: PageHinkleyState, value: float) -> Detection[PageHinkleyState]:
        """Add one observation; a value that is not finite is ignored (no step)."""
        if not math.isfinite(value):
            return Detection(state, False, 0.0)
        x = value if self.direction == "up" else -value
        steps = state.steps + 1
        mean = state.mean + (x - state.mean) / steps
        cumulative = state.cumulative + x - mean - self.delta
        extreme = min(state.extreme, cumulative)
        statistic = cumulative - extreme
        if steps >= self.min_steps and statistic >= self.threshold:
            return Detection(PageHinkleyState(alarms=state.alarms + 1), True,
                             statistic / self.threshold)
        return Detection(PageHinkleyState(steps=steps, mean=mean, cumulative=cumulative,
                                          extreme=extreme, alarms=state.alarms),
                         False, statistic / self.threshold)

    def to_dict(self) -> dict[str, Any]:
        """The detector's parameters, JSON-ready."""
        return {"kind": "page_hinkley", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> PageHinkley:
        """The detector saved by :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("kind") != "page_hinkley":
            raise ConfigError("not a saved PageHinkley")
        detector: PageHinkley = _from_dict(cls, {k: v for k, v in data.items()
                                                 if k != "kind"})
        return detector
