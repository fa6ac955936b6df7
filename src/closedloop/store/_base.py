"""The store's plug points: a backend writes batches of events and reads them back, and may
keep the durable record of pauses and halts (:class:`ControlStateBackend`), the spans and
scores of its traces (:class:`SpanBackend`) and durable approval requests
(:class:`ApprovalBackend`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from closedloop._approvals import ApprovalStore
from closedloop._control_state import ControlLedger
from closedloop._errors import ConfigError
from closedloop._events import StepEvent
from closedloop._spans import SpanStore

if TYPE_CHECKING:
    from closedloop.store import Store


@dataclass(frozen=True, slots=True, kw_only=True)
class EventQuery:
    """Which events to read: a time range, an optional task type or trace, oldest first."""

    since: float | None = None
    until: float | None = None
    task_type: str | None = None
    limit: int | None = None
    trace_id: str | None = None


@runtime_checkable
class EventBackend(Protocol):
    """Where events live. ``write_batch`` is only ever called from the store's writer thread.

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
