"""The store's plug points: a backend writes batches of events and reads them back, and may
keep the durable record of pauses and halts (:class:`ControlStateBackend`), the spans and
scores of its traces (:class:`SpanBackend`), the autonomy levels of its task types
(:class:`LevelBackend`) and durable approval requests (:class:`ApprovalBackend`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from closedloop._approvals import ApprovalStore
from closedloop._autonomy_state import LevelStore
from closedloop._control_state import ControlLedger
from closedloop._errors import ConfigError
from closedloop._events import StepEvent
from closedloop._runstate import RunStore
from closedloop._spans import SpanStore

if TYPE_CHECKING:
    from closedloop.store import Store


EXPIRE_DUE = "status = 'pending' AND expires_at IS NOT NULL AND expires_at <= %s"
"""The approval requests that ``expire(now)`` marks expired (``%s``: now), in SQL."""
REAP_DUE = "status = 'executing' AND lease_until < %s"
"""The approval requests that ``reap(now)`` marks crashed (``%s``: now), in SQL."""

@dataclass(frozen=True, slots=True, kw_only=True)
class EventQuery:
    """Which events to read: a time range, an optional task type or trace, oldest first."""

    since: float | None = None
    until: float | None = None
    task_type: str | None = None
    limit: int | None = None
    trace_id: str | None = None
    run_id: str | None = None


@runtime_checkable
class EventBackend(Protocol):
    """Where events live. ``write_batch`` is only ever called from the store's writer thread
    (and, for a backend with ``concurrent_batches = 2``, from the writer's second thread too:
    two batches at once, each on its own connection, each all or nothing).

    ``write_batch`` must be atomic (all or nothing) so that a failed batch can be retried
    without duplicates. ``open`` is called once in each process before the first write.
    """

    url: str

    def write_batch(self, events: Sequence[StepEvent]) -> None:
        """Persist a batch of events, all or nothing."""

    def iter_events(self, query: EventQuery) -> Iterator[StepEvent]:
        """Read events matching ``query``, oldest first."""

    def count(self) -> int:
        """How many events the backend holds."""

    def close(self) -> None:
        """Release connections; the backend may be reopened by the next call."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkStats:
    """What an event sink did with the events its store handed it.

    ``queued`` and ``held`` (waiting for the destination to accept writes again) are not
    lost yet; ``dropped`` ones were refused because the sink's queue or its held buffer was
    full (or the process ended while they were held), ``rejected`` ones were refused by
    the destination itself (a malformed point, no such database): neither is retried.
    ``failures`` counts requests that failed and were retried later.
    """

    written: int
    queued: int
    held: int
    dropped: int
    rejected: int
    failures: int

    @property
    def not_written(self) -> int:
        """Events that will never reach the destination."""
        return self.dropped + self.rejected


@runtime_checkable
class EventSink(Protocol):
    """Somewhere else every stored event also goes (InfluxDB: a time-series database).

    A store's writer thread hands each batch to its sinks right after redacting it, before
    writing it to the backend (so a sink sees events while the store is down too): the
    agent's thread never waits for a sink. ``submit_many`` must return at once (queue and
    count what does not fit, never block, never raise); the sink writes from a thread of
    its own. Attach one with :meth:`~closedloop.store.Store.add_sink`;
    ``closedloop.configure(influxdb=...)`` does it for the runtime's store.
    """

    name: str

    def submit_many(self, events: Sequence[StepEvent]) -> bool:
        """Queue redacted events; False when they were refused (and counted)."""

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until what was submitted is written; False on timeout or while held."""

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush and stop; later submits are dropped."""

    def stats(self) -> SinkStats:
        """The sink's counts."""


@runtime_checkable
class ControlStateBackend(Protocol):
    """A backend that keeps control state (pauses, halts, their history) next to its events.

    :func:`~closedloop.control.ledger_for_store` asks the store's backend for its ledger, so
    that agents, ``closedloop status``/``resume`` and the API share one durable record. The
    ledger raises :class:`~closedloop.ControlUnavailable` whenever it cannot read or write,
    and its reads never create anything.
    """

    def control_ledger(self) -> ControlLedger:
        """The durable ledger of this backend's store."""


@runtime_checkable
class SpanBackend(Protocol):
    """A backend that keeps spans and scores next to its events (the span/score port).

    :func:`span_store_for` asks the store's backend for it, so that
    the span pipeline, ``closedloop traces``/``scores``/``replay`` and ``serve`` read and
    write one record. One span store for the backend's whole life.
    """

    def span_store(self) -> SpanStore:
        """The spans and scores of this backend's store."""


@runtime_checkable
class RunBackend(Protocol):
    """A backend that keeps run records next to its events (the run port): one
    :class:`~closedloop.runs.RunRecord` per :class:`closedloop.Run`."""

    def run_store(self) -> RunStore:
        """The run records of this backend's store."""


def run_store_for(store: Store) -> RunStore | None:
    """The run records that live next to ``store``'s events, or None for a backend that
    keeps none (a plug-in's): runs still run, their record is not kept."""
    backend = store.backend
    if isinstance(backend, RunBackend):
        return backend.run_store()
    return None


def span_store_for(store: Store) -> SpanStore:
    """The spans and scores that live next to ``store``'s events (its backend's span store).

    A backend that keeps none (a plug-in's) is a :class:`~closedloop.ConfigError`.
    """
    backend = store.backend
    if isinstance(backend, SpanBackend):
        return backend.span_store()
    raise ConfigError(f"store {store.url} cannot hold spans: its backend keeps no span store "
                      "(use a sqlite:///, postgresql:// or memory:// store)")


@runtime_checkable
class LevelBackend(Protocol):
    """A backend that keeps autonomy levels next to its events (the level-store port): the
    level per task type (and agent, and action class), its audit trail, humans' feedback on
    suggestions and the saved state of change detectors. It fails closed: every failure is
    :class:`~closedloop.ControlUnavailable`."""

    def level_store(self) -> LevelStore:
        """The autonomy levels of this backend's store."""


def level_store_for(store: Store) -> LevelStore:
    """The autonomy levels that live next to ``store``'s events (its backend's level store).

    A backend that keeps none (a plug-in's) is a :class:`~closedloop.ConfigError`.
    """
    backend = store.backend
    if isinstance(backend, LevelBackend):
        return backend.level_store()
    raise ConfigError(f"store {store.url} cannot hold autonomy levels: its backend keeps no "
                      "level store (use a sqlite:///, postgresql:// or memory:// store)")


@runtime_checkable
class ApprovalBackend(Protocol):
    """A backend that keeps approval requests next to its events (the approval port).

    :func:`approval_store_for` asks the store's backend for it, so that loops, workers,
    ``closedloop approvals`` and the HTTP API share one durable record.
    """

    def approval_store(self) -> ApprovalStore:
        """The approval requests of this backend's store."""


def approval_store_for(store: Store) -> ApprovalStore:
    """The approval requests that live next to ``store``'s events.

    A backend that keeps none (a plug-in's) is a :class:`~closedloop.ConfigError`.
    """
    backend = store.backend
    if isinstance(backend, ApprovalBackend):
        return backend.approval_store()
    raise ConfigError(f"store {store.url} cannot hold approval requests: its backend keeps "
                      "none (use a sqlite:///, postgresql:// or memory:// store)")
