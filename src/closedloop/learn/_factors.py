"""Factors: which dimension of a step goes with its failure, and how much it explains.

:func:`factors` asks the store for steps and failures per combination of model, agent
version, prompt version, labels, UTC hour of day and input size
(:meth:`~closedloop.store.Store.factor_margins`: each dimension's values alone, read from
the hourly roll-up on SQLite and PostgreSQL), then per dimension:

- per value, the failure rate (failed, error or blocked among the steps; refusals by control
  left out) with its Wilson interval; steps that did not record the dimension are the value
  None (shown "(none)");
- how much the dimension *explains*: the share of the uncertainty about failure that knowing
  its value removes (information gain over the failure entropy, the uncertainty coefficient,
  0 to 1), with the G-test of independence (p-value from the chi-square distribution);
  ``significant`` when p is below ``alpha`` divided by the number of dimensions tested
  (Bonferroni). Dimensions are ranked by what they explain. A dimension with many values
  (hour of day has 24) explains a little by chance alone: the p-value accounts for that,
  the share does not.
- ``spread``: the highest minus the lowest failure rate among values with at least
  ``min_steps`` steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError
from closedloop.learn._stats import Estimate, chi2_sf, entropy_bits, g_test, wilson, z_of
from closedloop.store import FactorCell, FactorMargins, margins_of_cells

if TYPE_CHECKING:
    from closedloop.store import Store

DEFAULT_MIN_STEPS = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class FactorValue:
    """One value of a dimension: its steps, failures and failure rate (with interval)."""

    value: str | None
    steps: int
    failures: int
    rate: Estimate

    def to_dict(self) -> dict[str, Any]:
        """``{"value", "steps", "failures", "rate": {"value", "low", "high"}}``."""
        return {"value": self.value, "steps": self.steps, "failures": self.failures,
                "rate": self.rate.to_dict()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Factor:
    """One dimension: its values (highest failure rate first) and what it explains."""

    dimension: str
    values: tuple[FactorValue, ...]
    explained: float
    """Share of the failure's uncertainty the value removes (0 to 1)."""
    information_bits: float
    g: float
    dof: int
    p_value: float
    significant: bool
    spread: float | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready factor (see ``closedloop factors --help``)."""
        return {"dimension": self.dimension, "explained": self.explained,
                "information_bits": self.information_bits, "g": self.g, "dof": self.dof,
                "p_value": self.p_value, "significant": self.significant,
                "spread": self.spread, "values": [v.to_dict() for v in self.values]}


@dataclass(frozen=True, slots=True, kw_only=True)
class Factors:
    """Every dimension with at least two values, most explaining first."""

    task_type: str | None
    since: float | None
    until: float | None
    steps: int
    failures: int
    confidence: float
    factors: tuple[Factor, ...]

    @property
    def empty(self) -> bool:
        """True when no step fell in the window."""
        return self.steps == 0

    def to_dict(self) -> dict[str, Any]:
        """``{"task_type", "since", "until", "steps", "failures", "failure_rate",
        "confidence", "factors": [FACTOR, ...]}``."""
        return {"task_type": self.task_type, "since": self.since, "until": self.until,
                "steps": self.steps, "failures": self.failures,
                "failure_rate": self.failures / self.steps if self.steps else None,
                "confidence": self.confidence,
                "factors": [f.to_dict() for f in self.factors]}


def factors_from_cells(cells: Iterable[FactorCell], *, task_type: str | None = None,
                       since: float | None = None, until: float | None = None,
                       confidence: float = 0.95, alpha: float = 0.05,
                       min_steps: int = DEFAULT_MIN_STEPS) -> Factors:
    """The factors of a store's factor cells (see the module's docstring)."""
    return factors_from_margins(margins_of_cells(cells), task_type=task_type, since=since,
                                until=until, confidence=confidence, alpha=alpha,
                                min_steps=min_steps)


def factors_from_margins(margins: FactorMargins, *, task_type: str | None = None,
                         since: float | None = None, until: float | None = None,
                         confidence: float = 0.95, alpha: float = 0.05,
                         min_steps: int = DEFAULT_MIN_STEPS) -> Factors:
    """The factors of a store's factor margins (see the module's docstring); the values
    are taken in one fixed order, so equal margins give equal factors to the last bit."""
    z = z_of(confidence)
    base = entropy_bits(margins.failures, margins.steps)
    tables = {name: sorted(table.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))
              for name, table in margins.tables.items() if len(table) >= 2}
    out = []
    for name, table in tables.items():
        g, bits = g_test([counts for _, counts in table])
        dof = len(table) - 1
        p = chi2_sf(g, dof)
        values = []
        for value, (s, f) in table:
            rate = wilson(f, s, z)
            assert rate is not None
            values.append(FactorValue(value=value, steps=s, failures=f, rate=rate))
        values.sort(key=lambda v: (-v.rate.value, -v.steps, v.value is None, v.value or ""))
        rates = [v.rate.value for v in values if v.steps >= min_steps]
        out.append(Factor(dimension=name, values=tuple(values),
                          explained=bits / base if base else 0.0, information_bits=bits,
                          g=g, dof=dof, p_value=p, significant=p < alpha / len(tables),
                          spread=max(rates) - min(rates) if len(rates) >= 2 else None))
    out.sort(key=lambda f: (-f.information_bits, f.dimension))
    return Factors(task_type=task_type, since=since, until=until, steps=margins.steps,
                   failures=margins.failures, confidence=confidence, factors=tuple(out))


def factors(store: Store, *, task_type: str | None = None, since: float | None = None,
            until: float | None = None, confidence: float = 0.95, alpha: float = 0.05,
            min_steps: int = DEFAULT_MIN_STEPS) -> Factors:
    """What goes with failure among ``store``'s steps (of ``task_type``), computed from the
    store's counts. Only events already written are seen."""
    if not 0.5 <= confidence < 1.0:
        raise ConfigError(f"confidence must be in [0.5, 1), got {confidence!r}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    margins = store.factor_margins(since=since, until=until, task_type=task_type)
    return factors_from_margins(margins, task_type=task_type, since=since, until=until,
                              confidence=confidence, alpha=alpha, min_steps=min_steps)
