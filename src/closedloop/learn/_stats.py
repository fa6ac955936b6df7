"""Small, dependency-free statistics behind trends and factors: estimates with confidence
intervals, and whether a change between two of them is more than noise.

- rates: Wilson score intervals; the difference of two rates: Newcombe's hybrid score
  interval (method 10), which stays inside [-1, 1] and behaves at 0 % and 100 %;
- means (tokens or cost per step): the normal approximation, from a count, a sum and a sum
  of squares; ratios (cost per success): the delta method; their differences: normal;
- percentiles from a latency histogram: the value at the nearest rank, interpolated within
  its bucket, and a distribution-free interval from the binomial ranks around it, widened
  to the bounds of their buckets; a change
  in a percentile counts only when the two intervals do not overlap (conservative);
- the G-test of independence and the chi-square survival function (regularized incomplete
  gamma), for factors.

A change is *significant* when its interval excludes 0; at 95 % one in twenty comparisons
of unchanged figures still comes out significant by chance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from closedloop._figures import nearest_rank


def z_of(confidence: float) -> float:
    """The two-sided normal quantile of a confidence level in (0, 1)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A figure and its confidence interval; ``se`` is its standard error when the interval
    is a normal one (None otherwise)."""

    value: float
    low: float
    high: float
    se: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"value", "low", "high"}``."""
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True, slots=True)
class Change:
    """``after - before`` and its confidence interval; ``significant`` when the interval
    excludes 0."""

    before: float
    after: float
    delta: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0: a change, not noise."""
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, Any]:
        """``{"before", "after", "delta", "low", "high", "significant"}``."""
        return {"before": self.before, "after": self.after, "delta": self.delta,
                "low": self.low, "high": self.high, "significant": self.significant}


def wilson(k: int, n: int, z: float) -> Estimate | None:
    """The rate ``k / n`` with its Wilson score interval; None when ``n`` is 0."""
    if n <= 0:
        return None
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if k <= 0 else max(0.0, centre - half)
    high = 1.0 if k >= n else min(1.0, centre + half)
    return Estimate(p, low, high)


def rate_change(before: Estimate, after: Estimate) -> Change:
    """Newcombe's interval for the difference of two Wilson-estimated rates."""
    d = after.value - before.value
    low = d - math.sqrt((after.value - after.low) ** 2 + (before.high - before.value) ** 2)
    high = d + math.sqrt((after.high - after.value) ** 2 + (before.value - before.low) ** 2)
    return Change(before.value, after.value, d, low, high)


def mean(n: int, total: float, squares: float, z: float) -> Estimate | None:
    """The mean of ``n`` values from their sum and sum of squares, normal interval; None
    for fewer than two values."""
    if n < 2:
        return None
    m = total / n
    variance = max(0.0, (squares - total * total / n) / (n - 1))
    se = math.sqrt(variance / n)
    return Estimate(m, m - z * se, m + z * se, se)


def ratio(total: float, squares: float, on_success: float, successes: int,
          z: float) -> Estimate | None:
    """``total / successes`` (cost or tokens per success) with a delta-method interval:
    per step, a value ``c`` and a success ``s`` in {0, 1}; ``squares`` is the sum of
    ``c²``, ``on_success`` the sum of ``c`` over successes. None without two successes."""
    if successes < 2:
        return None
    r = total / successes
    variance = max(0.0, squares - 2 * r * on_success + r * r * successes) / successes ** 2
    se = math.sqrt(variance)
    return Estimate(r, r - z * se, r + z * se, se)


def normal_change(before: Estimate, after: Estimate, z: float) -> Change:
    """The difference of two normal estimates, normal interval."""
    d = after.value - before.value
    se = math.hypot(before.se or 0.0, after.se or 0.0)
    return Change(before.value, after.value, d, d - z * se, d + z * se)


def interval_change(before: Estimate, after: Estimate) -> Change:
    """A change judged by overlap: the interval of the difference runs from the lowest to
    the highest difference the two intervals allow."""
    return Change(before.value, after.value, after.value - before.value,
                  after.low - before.high, after.high - before.low)


def histogram_percentile(counts: Mapping[int, int], p: float, z: float,
                         bounds: Any) -> Estimate | None:
    """The ``p``-th percentile of a histogram (``bucket -> count``; ``bounds(bucket)`` gives
    its ``(low, high)``): the nearest rank, placed within its bucket as if the bucket's
    values were spread evenly; the interval: from the lower bound of the bucket holding rank
    ``n·q - z·sqrt(n·q·(1-q))`` to the upper bound of the one holding ``n·q + z·sqrt(…)``
    (distribution-free, whatever the values within a bucket). None for an empty
    histogram."""
    order = sorted((b, c) for b, c in counts.items() if c > 0)
    n = sum(c for _, c in order)
    if n == 0:
        return None
    q = p / 100.0
    spread = z * math.sqrt(n * q * (1 - q))

    def at(rank: int, end: int | None = None) -> float:
        # the value at ``rank``, spread evenly within its bucket; with ``end`` 0 or 1 the
        # bucket's lower or upper bound instead (an interval must hold whatever the values
        # inside a bucket are)
        rank = min(max(rank, 1), n)
        seen = 0
        for bucket, c in order:
            if seen + c >= rank:
                low, high = bounds(bucket)
                if end is not None:
                    return float(high if end else low)
                return float(low + (high - low) * (rank - seen - 0.5) / c)
            seen += c
        raise AssertionError("rank beyond the histogram")

    return Estimate(at(nearest_rank(p, n)), at(math.floor(n * q - spread), 0),
                    at(math.ceil(n * q + spread) + 1, 1))


def g_test(table: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """``(G, information)`` of a table of ``(steps, failures)`` per value: the G statistic
    of independence of value and failure, and the information (bits) the value gives about
    failure (G = 2·N·ln 2·information)."""
    n = sum(s for s, _ in table)
    f = sum(x for _, x in table)
    if n == 0 or f in (0, n):
        return 0.0, 0.0
    g = 0.0
    for steps, failures in table:
        for observed, expected in ((failures, steps * f / n),
                                   (steps - failures, steps * (n - f) / n)):
            if observed > 0:
                g += 2.0 * observed * math.log(observed / expected)
    return g, g / (2.0 * n * math.log(2))


def entropy_bits(k: int, n: int) -> float:
    """The entropy (bits) of a yes/no outcome that is yes ``k`` times in ``n``."""
    if n == 0 or k in (0, n):
        return 0.0
    p = k / n
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def chi2_sf(x: float, dof: int) -> float:
    """P(X ≥ x) for a chi-square variable with ``dof`` degrees of freedom."""
    if dof <= 0:
        return 1.0
    if x <= 0:
        return 1.0
    return _gamma_q(dof / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) (series or continued
    fraction, as in Numerical Recipes)."""
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)
