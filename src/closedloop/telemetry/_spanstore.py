"""Where spans and scores live: the store's own span/score port.

The records (:class:`StoredSpan`, :class:`Score`, :class:`TraceSummary`…) and the
:class:`SpanStore` port are defined in :mod:`closedloop._spans`; every store backend keeps
them next to its events (:class:`~closedloop.store.SpanBackend`): the store's SQLite file, its
PostgreSQL schema, or the memory of a ``memory://`` store. So one store answers "what
happened" (events), "why" (spans) and "how good was it" (scores).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from closedloop._errors import ConfigError
from closedloop._spans import (
    Score,
    ScoreStat,
    SpanStore,
    StoredSpan,
    TracePage,
    TraceSummary,
)

if TYPE_CHECKING:
    from closedloop.store import Store

__all__ = ["Score", "ScoreStat", "SpanStore", "StoredSpan", "TracePage",
           "TraceSummary", "iter_children", "span_store_for"]


def span_store_for(store: Store) -> SpanStore:
    """The spans and scores that live next to ``store``'s events (its backend's span store).

    A backend that keeps none (a plug-in's) is a :class:`~closedloop.ConfigError`.
    """
    from closedloop.store import SpanBackend

    backend = store.backend
    if isinstance(backend, SpanBackend):
        return backend.span_store()
    raise ConfigError(f"store {store.url} cannot hold spans: its backend keeps no span store "
                      "(use a sqlite:///, postgresql:// or memory:// store)")


def iter_children(spans: Sequence[StoredSpan]) -> Iterator[tuple[int, StoredSpan]]:
    """``(depth, span)`` in tree order: roots (no parent in the set) first, children by start."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[StoredSpan]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in ids else None
        children.setdefault(parent, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: s.start_ns)

    def walk(parent: str | None, depth: int) -> Iterator[tuple[int, StoredSpan]]:
        for s in children.get(parent, []):
            yield depth, s
            yield from walk(s.span_id, depth + 1)

    yield from walk(None, 0)
