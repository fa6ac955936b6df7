"""Failure clusters: failed steps grouped by what went wrong.

:func:`failure_clusters` asks the store for failed steps (failed, error, blocked) counted per
error type, message group (:func:`~closedloop._figures.message_group`), task type, model and
period (:meth:`~closedloop.store.Store.failure_counts`, in SQL on SQLite and PostgreSQL),
then clusters the distinct message groups, which are few:

- a failed **check** (error type validation, verification, verification_unknown, blocked)
  records its failing issues as ``check: [severity] code at location: text`` (several joined
  by "; "): its cluster is the set of ``(check, code, template of the text)`` of its issues,
  the text's template mined by drain3 (a well-kept log-template miner: the words that vary
  between similar texts, such as tag names and values, become ``<*>``); the locations are
  counted inside the cluster;
- any other failure (an exception in the agent, executor or a check; a message that does
  not parse as issues) is clustered by the drain3 template of its message;
- a failure without a message is clustered by its error type alone.

Each cluster has its count and share of the failures, first and last time, its count per
period, the change of its share of all steps from the previous period to the last one
(with a Newcombe interval: a change that is noise is not reported as a change), the task
types and models it hits, its most frequent locations and the newest trace ids.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError
from closedloop.learn._stats import Change, rate_change, wilson, z_of
from closedloop.store import FailureCell, check_window

if TYPE_CHECKING:
    from closedloop.store import Store

CHECK_ERRORS = frozenset({"validation", "verification", "verification_unknown", "blocked"})
INSTALL_HINT = "pip install 'closedloop[learn]'"
_SEGMENT = re.compile(
    r"(?:^|; )(?P<check>[^\s:;\[\]][^:;\[\]]*): (?:\[(?P<severity>[a-z]+)\] "
    r"(?P<code>[^\s:]+)(?: at (?P<location>[^\s:]+))?|(?P<unknown>unknown)): ")

Key = tuple[Any, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Issue:
    """One failing issue parsed from a check's message (or ``code`` "unknown")."""

    check: str
    code: str
    location: str | None
    text: str


def parse_issues(message: str) -> list[Issue] | None:
    """The issues of a failed check's message (``check: [severity] code at location:
    text; …``); None when it is not made of them."""
    found = list(_SEGMENT.finditer(message))
    if not found or found[0].start() != 0:
        return None
    issues = []
    for i, m in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(message)
        issues.append(Issue(check=m["check"], code=m["code"] or "unknown",
                            location=m["location"], text=message[m.end():end]))
    return issues


class _Miner:
    """drain3's template miner over distinct texts, fed in a fixed order so that equal
    inputs give equal clusters on every backend."""

    def __init__(self) -> None:
        try:
            from drain3 import TemplateMiner
            from drain3.template_miner_config import TemplateMinerConfig
        except ImportError:
            raise ConfigError(f"failure clusters need drain3 ({INSTALL_HINT})") from None
        config = TemplateMinerConfig()
        config.profiling_enabled = False
        self.miner = TemplateMiner(config=config)
        self.ids: dict[str, int] = {}

    def add(self, texts: Iterable[str]) -> None:
        for text in sorted(set(texts) - self.ids.keys()):
            self.ids[text] = int(self.miner.add_log_message(text)["cluster_id"])

    def template(self, text: str) -> str:
        cluster = self.miner.drain.id_to_cluster[self.ids[text]]
        return str(cluster.get_template())


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureCluster:
    """Failed steps that went wrong the same way (see the module's docstring)."""

    id: str
    """A short, stable name of the cluster's key (equal across runs and backends)."""
    error_type: str
    title: str
    """What went wrong, for people: the checks and codes with the texts' template, or the
    message's template."""
    count: int
    share: float
    """Of every failure in the window."""
    first_ts: float
    last_ts: float
    periods: tuple[tuple[float, int], ...]
    """``(period start, failures)`` of each period with some, oldest first."""
    change: Change | None
    """Its share of all steps, previous period to last period (None: nothing to compare)."""
    task_types: tuple[tuple[str, int], ...]
    models: tuple[tuple[str | None, int], ...]
    locations: tuple[tuple[str, int], ...]
    groups: tuple[tuple[str, int], ...]
    """Its most frequent message groups."""
    examples: tuple[str, ...] = ()
    """Trace ids of its newest failures, newest first."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready cluster (see ``closedloop failures --help``)."""
        return {
            "id": self.id, "error_type": self.error_type, "title": self.title,
            "count": self.count, "share": self.share, "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "periods": [{"start": s, "count": n} for s, n in self.periods],
            "change": None if self.change is None else self.change.to_dict(),
            "task_types": [{"task_type": t, "count": n} for t, n in self.task_types],
            "models": [{"model": m, "count": n} for m, n in self.models],
            "locations": [{"location": loc, "count": n} for loc, n in self.locations],
            "groups": [{"group": g, "count": n} for g, n in self.groups],
            "examples": list(self.examples),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureClusters:
    """The clusters of a window's failures, largest first; :meth:`cluster_of` names the
    cluster of any ``(error_type, group)`` seen."""

    window: str
    task_type: str | None
    since: float | None
    until: float | None
    failures: int
    steps: int
    clusters: tuple[FailureCluster, ...]
    members: Mapping[tuple[str, str], str] = field(repr=False)

    @property
    def empty(self) -> bool:
        """True when no step failed in the window."""
        return self.failures == 0

    def cluster_of(self, error_type: str | None, group: str) -> str | None:
        """The id of the cluster of a failure's error type and message group."""
        return self.members.get((error_type or "", group))

    def to_dict(self) -> dict[str, Any]:
        """``{"window", "task_type", "since", "until", "failures", "steps",
        "clusters": [CLUSTER, ...]}``."""
        return {"window": self.window, "task_type": self.task_type, "since": self.since,
                "until": self.until, "failures": self.failures, "steps": self.steps,
                "clusters": [c.to_dict() for c in self.clusters]}


def _keys(cells: list[FailureCell]) -> dict[tuple[str, str], tuple[Key, str, tuple[str, ...]]]:
    """Per ``(error_type, group)``: its cluster key, title and issue locations."""
    pairs = sorted({(c.error_type, c.group) for c in cells})
    parsed = {p: parse_issues(p[1]) if p[0] in CHECK_ERRORS and p[1] else None
              for p in pairs}
    texts, messages = _Miner(), _Miner()
    texts.add(i.text for issues in parsed.values() if issues for i in issues)
    messages.add(g for (_, g), issues in parsed.items() if g and issues is None)
    out: dict[tuple[str, str], tuple[Key, str, tuple[str, ...]]] = {}
    for (error_type, group), issues in parsed.items():
        if not group:
            out[error_type, group] = (("none", error_type), "(no message)", ())
        elif issues is None:
            template = messages.template(group)
            out[error_type, group] = (("message", error_type, template), template, ())
        else:
            parts = sorted({(i.check, i.code, texts.template(i.text)) for i in issues})
            title = "; ".join(f"{check}: {code} — {template}"
                              for check, code, template in parts)
            out[error_type, group] = (("check", error_type, *parts), title,
                                      tuple(i.location for i in issues if i.location))
    return out


def _id(key: Key) -> str:
    return hashlib.blake2b(repr(key).encode(), digest_size=4).hexdigest()


@dataclass(slots=True)
class _Tally:
    error_type: str
    title: str
    count: int = 0
    first: float = float("inf")
    last: float = float("-inf")
    periods: Counter[int] = field(default_factory=Counter)
    tasks: Counter[str] = field(default_factory=Counter)
    models: Counter[str | None] = field(default_factory=Counter)
    locations: Counter[str] = field(default_factory=Counter)
    groups: Counter[str] = field(default_factory=Counter)
    members: Counter[tuple[str, str, str]] = field(default_factory=Counter)


def _top(counter: Counter[Any], n: int) -> tuple[tuple[Any, int], ...]:
    return tuple(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0] is None,
                                                         str(kv[0])))[:n])


def clusters_from_cells(cells: Iterable[FailureCell], period_steps: Mapping[int, int], *,
                        window: str = "day", task_type: str | None = None,
                        since: float | None = None, until: float | None = None,
                        confidence: float = 0.95) -> FailureClusters:
    """Clusters from a store's failure cells and steps per period (no examples)."""
    return _cluster(cells, period_steps, window=window, task_type=task_type, since=since,
                    until=until, confidence=confidence)[0]


def _cluster(cells: Iterable[FailureCell], period_steps: Mapping[int, int], *, window: str,
             task_type: str | None, since: float | None, until: float | None,
             confidence: float) -> tuple[FailureClusters, dict[Key, _Tally], Any]:
    length, offset = check_window(window)
    found = list(cells)
    keys = _keys(found)
    tallies: dict[Key, _Tally] = {}
    for c in found:
        key, title, locations = keys[c.error_type, c.group]
        t = tallies.get(key)
        if t is None:
            t = tallies[key] = _Tally(error_type=c.error_type, title=title)
        t.count += c.count
        t.first = min(t.first, c.first_ts)
        t.last = max(t.last, c.last_ts)
        t.periods[c.period] += c.count
        t.tasks[c.task_type] += c.count
        t.models[c.model] += c.count
        t.groups[c.group] += c.count
        t.members[c.task_type, c.error_type, c.group] += c.count
        for loc in locations:
            t.locations[loc] += c.count
    failures = sum(t.count for t in tallies.values())
    z = z_of(confidence)
    last = max(period_steps, default=None)
    out = []
    for key, t in tallies.items():
        change = None
        if last is not None and last - 1 in period_steps:
            before = wilson(t.periods.get(last - 1, 0), period_steps[last - 1], z)
            after = wilson(t.periods.get(last, 0), period_steps[last], z)
            if before is not None and after is not None:
                change = rate_change(before, after)
        out.append(FailureCluster(
            id=_id(key), error_type=t.error_type, title=t.title, count=t.count,
            share=t.count / failures, first_ts=t.first, last_ts=t.last,
            periods=tuple((p * length + offset, n) for p, n in sorted(t.periods.items())),
            change=change, task_types=_top(t.tasks, 10), models=_top(t.models, 10),
            locations=_top(t.locations, 10), groups=_top(t.groups, 5)))
    out.sort(key=lambda c: (-c.count, c.title, c.id))
    members = {pair: _id(k) for pair, (k, _, _) in keys.items()}
    return FailureClusters(window=window, task_type=task_type, since=since, until=until,
                           failures=failures, steps=sum(period_steps.values()),
                           clusters=tuple(out), members=members), tallies, keys


def failure_clusters(store: Store, *, window: str = "day", since: float | None = None,
                     until: float | None = None, task_type: str | None = None,
                     top: int = 20, examples: int = 3,
                     confidence: float = 0.95) -> FailureClusters:
    """The clusters of ``store``'s failed steps (see the module's docstring), the ``top``
    largest with up to ``examples`` trace ids each. Only events already written are seen."""
    if top < 1 or examples < 0:
        raise ConfigError(f"top must be ≥ 1 and examples ≥ 0, got {top!r}, {examples!r}")
    cells = store.failure_counts(window=window, since=since, until=until, task_type=task_type)
    steps = store.period_steps(window=window, since=since, until=until, task_type=task_type)
    result, tallies, _ = _cluster(
        cells, steps, window=window, task_type=task_type, since=since, until=until,
        confidence=confidence)
    shown = result.clusters[:top]
    if examples and shown:
        by_id = {_id(k): t for k, t in tallies.items()}
        wanted = {c.id: [m for m, _ in _top(by_id[c.id].members, 3)] for c in shown}
        found = store.failure_examples(sorted({m for ms in wanted.values() for m in ms}),
                                       per_key=examples, since=since, until=until,
                                       task_type=task_type)
        shown = tuple(_with_examples(c, wanted[c.id], found, examples) for c in shown)
    return FailureClusters(window=result.window, task_type=task_type, since=since,
                           until=until, failures=result.failures, steps=result.steps,
                           clusters=tuple(shown), members=result.members)


def _with_examples(c: FailureCluster, keys: list[tuple[str, str, str]],
                   found: Mapping[tuple[str, str, str], list[tuple[float, str]]],
                   n: int) -> FailureCluster:
    newest = sorted((e for k in keys for e in found.get(k, [])), reverse=True)[:n]
    return replace(c, examples=tuple(trace for _, trace in newest))


@dataclass(frozen=True, slots=True, kw_only=True)
class Purity:
    """How well clusters match known kinds of failure (a ground truth, such as the demo's
    fault ledger): ``purity``, the share of failures whose cluster's most common kind is
    their own; ``inverse_purity``, the share whose kind's most common cluster is their own
    (1 when no kind is split over clusters); ``table``: failures per cluster and kind."""

    purity: float
    inverse_purity: float
    failures: int
    clusters: int
    kinds: int
    table: Mapping[str | None, Mapping[str | None, int]]


def cluster_purity(result: FailureClusters,
                   failures: Iterable[tuple[str | None, str | None, str | None]]) -> Purity:
    """The purity of ``result``'s clusters against ``(error_type, error_message, kind)`` of
    each failed step (its message grouped as the store groups it)."""
    from closedloop._figures import message_group

    table: dict[str | None, Counter[str | None]] = {}
    kinds: dict[str | None, Counter[str | None]] = {}
    for error_type, message, kind in failures:
        cluster = result.cluster_of(error_type, message_group(message) if message else "")
        table.setdefault(cluster, Counter())[kind] += 1
        kinds.setdefault(kind, Counter())[cluster] += 1
    n = sum(sum(c.values()) for c in table.values())
    if n == 0:
        return Purity(purity=1.0, inverse_purity=1.0, failures=0, clusters=0, kinds=0,
                      table={})
    return Purity(purity=sum(max(c.values()) for c in table.values()) / n,
                  inverse_purity=sum(max(c.values()) for c in kinds.values()) / n,
                  failures=n, clusters=len(table), kinds=len(kinds),
                  table={k: dict(v) for k, v in table.items()})
