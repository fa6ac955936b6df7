"""Which backend serves a store URL: a registry from URL scheme to backend factory.

Built in: ``sqlite`` (``sqlite:///PATH``), ``memory`` (``memory://``) and ``postgresql`` /
``postgres`` (``postgresql://USER@HOST/DB?schema=NAME``, the ``postgres`` extra). A third
party adds a scheme with :func:`register_scheme`, or without any import through an entry
point in the ``closedloop.stores`` group, named for the scheme and pointing at a factory::

    [project.entry-points."closedloop.stores"]
    clickhouse = "closedloop_clickhouse:open_backend"

A factory is called as ``factory(url, create=...)`` and returns an
:class:`~closedloop.store.EventBackend`. Built-in factories are named by import path, so a
backend's driver (psycopg) is imported only when its URL is opened; entry points are read
only when a URL's scheme is not known yet, so start-up never scans installed packages.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from closedloop._control_state import ControlLedger, MemoryLedger, Stop
from closedloop._errors import ConfigError, ControlUnavailable, StoreError
from closedloop._events import StepEvent
from closedloop._redact import shown_url
from closedloop._spans import (
    SPANS_PAGE,
    Pruned,
    Score,
    SpanStore,
    StoredSpan,
    TaskScores,
    TracePage,
)
from closedloop.store._base import ControlStateBackend, EventBackend, EventQuery, SpanBackend

ENTRY_POINT_GROUP = "closedloop.stores"


class BackendFactory(Protocol):
    """Opens the backend for ``url``; ``create=False`` must not create a store that is absent."""

    def __call__(self, url: str, *, create: bool) -> EventBackend: ...


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///PATH`` URL (``sqlite:////abs`` is absolute)."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"unsupported store URL {url!r}; use sqlite:///PATH "
                          "(sqlite:////PATH for an absolute path)")
    rest = url[len("sqlite:///"):]
    if not rest:
        raise ConfigError(f"store URL {url!r} has no path; use sqlite:///PATH")
    return Path(rest).expanduser()


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for messages and logs (the one
    masker, :func:`closedloop._redact.shown_url`)."""
    return shown_url(url)


def _open_sqlite(url: str, *, create: bool) -> EventBackend:
    from closedloop.store.sqlite import SQLiteBackend

    path = sqlite_path(url)
    if not create and not path.is_file():
        raise StoreError(f"no store at {path}; run `closedloop demo` or point --store at one")
    return SQLiteBackend(path)


def _open_memory(url: str, *, create: bool) -> EventBackend:
    from closedloop.store.memory import MemoryBackend

    if url.strip() != "memory://":
        raise ConfigError(f"store URL {url!r}: a memory store takes no path; use memory://")
    return MemoryBackend()


# scheme -> a factory, or "module:attribute" naming one (imported on first use)
_factories: dict[str, BackendFactory | str] = {
    "sqlite": _open_sqlite,
    "memory": _open_memory,
    "postgresql": "closedloop.store.postgres:open_backend",
    "postgres": "closedloop.store.postgres:open_backend",
}
_lock = threading.Lock()
_entry_points_loaded = False


def url_scheme(url: str) -> str:
    """The scheme of a store URL, lower-case (``postgresql`` for ``postgresql://...``)."""
    return url.split(":", 1)[0].strip().lower() if ":" in url else ""


def register_scheme(scheme: str, factory: BackendFactory | str) -> None:
    """Serve URLs of ``scheme`` with ``factory`` (or ``"module:attribute"`` naming one).

    Registering a scheme again replaces its factory.
    """
    scheme = scheme.strip().lower()
    if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"invalid store URL scheme {scheme!r}")
    with _lock:
        _factories[scheme] = factory


def known_schemes() -> list[str]:
    """Schemes served so far, sorted (entry points count once they have been read)."""
    with _lock:
        return sorted(_factories)


def _load_entry_points() -> None:
    global _entry_points_loaded
    from importlib.metadata import entry_points  # only when a scheme is not known yet

    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _factories.setdefault(ep.name.strip().lower(), ep.value)


def _resolve(scheme: str, factory: BackendFactory | str) -> BackendFactory:
    if not isinstance(factory, str):
        return factory
    module_name, _, attr = factory.partition(":")
    try:
        target: object = importlib.import_module(module_name.strip())
        for part in attr.strip().split(".") if attr.strip() else []:
            target = getattr(target, part)
    except ImportError as exc:
        raise ConfigError(
            f"store scheme {scheme!r}: cannot import its backend {factory!r} ({exc})"
        ) from None
    except AttributeError:
        raise ConfigError(f"store scheme {scheme!r}: no backend factory {factory!r}") from None
    if not callable(target):
        raise ConfigError(f"store scheme {scheme!r}: {factory!r} is not callable")
    resolved: BackendFactory = target
    with _lock:
        _factories[scheme] = resolved
    return resolved


def backend_factory(url: str) -> BackendFactory:
    """The factory serving ``url``; an unknown scheme is a :class:`~closedloop.ConfigError`."""
    scheme = url_scheme(url)
    with _lock:
        factory = _factories.get(scheme)
    if factory is None:
        _load_entry_points()
        with _lock:
            factory = _factories.get(scheme)
    if factory is None:
        raise ConfigError(
            f"unsupported store URL {redact_url(url)!r} (scheme {scheme!r}); known schemes: "
            f"{', '.join(known_schemes())} (postgresql needs pip install "
            f"'closedloop[postgres]'; a package adds a scheme through the "
            f"{ENTRY_POINT_GROUP!r} entry point group)"
        )
    return _resolve(scheme, factory)


def open_backend(url: str, *, create: bool = True, defer: bool = False,
                 read_only: bool = False) -> EventBackend:
    """Open the backend serving ``url`` (see the module docstring for the schemes).

    With ``defer=True`` a store that cannot be opened yet (server down, no such database) is
    not an error: a :class:`DeferredBackend` is returned that opens it on first use. With
    ``read_only=True`` nothing is created or migrated: the factory is called with
    ``read_only=True`` when it takes that keyword (the built-in ones do), else with
    ``create=False``.
    """
    factory = backend_factory(url)
    if read_only:
        create = False
        if _takes_read_only(factory):
            factory = functools.partial(cast(Any, factory), read_only=True)
    try:
        return factory(url, create=create)
    except StoreError as exc:
        if not defer:
            raise
        return DeferredBackend(url, factory, create=create, error=exc)


def _takes_read_only(factory: BackendFactory) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "read_only" or p.kind is p.VAR_KEYWORD for p in params)


class DeferredBackend:
    """A backend whose store could not be opened yet; every call tries to open it again.

    While it cannot, ``write_batch`` raises (the store's writer holds the events, then
    dead-letters them) and :attr:`open_error` says why (the writer logs it once, with the fix).
    """

    def __init__(self, url: str, factory: BackendFactory, *, create: bool,
                 error: StoreError) -> None:
        self.url = redact_url(url)
        self._url = url
        self._factory = factory
        self._create = create
        self._backend: EventBackend | None = None
        self._lock = threading.Lock()
        self.open_error: StoreError | None = error

    def backend(self) -> EventBackend:
        """The opened backend; raises :class:`~closedloop.StoreError` while it cannot open."""
        with self._lock:
            if self._backend is None:
                try:
                    self._backend = self._factory(self._url, create=self._create)
                except StoreError as exc:
                    self.open_error = exc
                    raise
                self.open_error = None
            return self._backend

    def write_batch(self, events: Sequence[StepEvent]) -> None:
        """Open the store if needed, then write."""
        self.backend().write_batch(events)

    def iter_events(self, query: EventQuery) -> Iterator[StepEvent]:
        """Open the store if needed, then read."""
        return self.backend().iter_events(query)

    def count(self) -> int:
        """Open the store if needed, then count."""
        return self.backend().count()

    def close(self) -> None:
        """Close the backend, if it was opened."""
        with self._lock:
            backend = self._backend
        if backend is not None:
            backend.close()

    def control_ledger(self) -> ControlLedger:
        """The opened backend's ledger; until the store opens, every call fails closed."""
        return _DeferredLedger(self)

    def span_store(self) -> SpanStore:
        """The opened backend's spans and scores; until the store opens, every call raises
        :class:`~closedloop.StoreError` (the span pipeline drops and counts the batch)."""
        return _DeferredSpans(self)


class _DeferredLedger:
    """The control ledger of a store that may not be open yet.

    Each call opens the store if needed and asks its backend; while the store cannot be
    opened the call raises :class:`~closedloop.ControlUnavailable` (the guard refuses). A
    backend that keeps no control state gets an in-process ledger, as an open one would.
    """

    def __init__(self, deferred: DeferredBackend) -> None:
        self._deferred = deferred
        self._ledger: ControlLedger | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ledger of {self._deferred.url}"

    def _target(self) -> ControlLedger:
        with self._lock:
            if self._ledger is None:
                try:
                    backend = self._deferred.backend()
                except StoreError as exc:
                    raise ControlUnavailable(f"control state unavailable: {exc}") from None
                if isinstance(backend, ControlStateBackend):
                    self._ledger = backend.control_ledger()
                else:
                    self._ledger = MemoryLedger()
            return self._ledger

    def put(self, stop: Stop) -> None:
        self._target().put(stop)

    def get(self, task_type: str) -> Stop | None:
        return self._target().get(task_type)

    def lift(self, task_type: str, *, reason: str, by: str) -> Stop | None:
        return self._target().lift(task_type, reason=reason, by=by)

    def stops(self) -> list[Stop]:
        return self._target().stops()

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._target().history(limit)

    def publish(self, source: str, keys: dict[str, dict[str, Any]]) -> None:
        """Per-key snapshots go to the opened backend's ledger, if it keeps any."""
        publish = getattr(self._target(), "publish", None)
        if publish is not None:
            publish(source, keys)

    def published(self, max_age: float = 300.0) -> dict[str, dict[str, Any]]:
        """The opened backend's published snapshots, if it keeps any."""
        published = getattr(self._target(), "published", None)
        return published(max_age) if published is not None else {}



class _DeferredSpans:
    """The span store of a store that may not be open yet: each call opens the store if
    needed and asks its backend; a backend that keeps no spans is a
    :class:`~closedloop.ConfigError`."""

    def __init__(self, deferred: DeferredBackend) -> None:
        self._deferred = deferred

    def __repr__(self) -> str:
        return f"spans of {self._deferred.url}"

    def _target(self) -> SpanStore:
        backend = self._deferred.backend()
        if not isinstance(backend, SpanBackend):
            raise ConfigError(f"store {self._deferred.url} cannot hold spans")
        return backend.span_store()

    def write_spans(self, spans: Sequence[StoredSpan]) -> None:
        self._target().write_spans(spans)

    def trace(self, trace_id: str) -> list[StoredSpan]:
        return self._target().trace(trace_id)

    def traces(self, *, limit: int = 20, task_type: str | None = None,
               since_ns: int | None = None, cursor: str | None = None) -> TracePage:
        return self._target().traces(limit=limit, task_type=task_type, since_ns=since_ns,
                                     cursor=cursor)

    def add_score(self, score: Score) -> None:
        self._target().add_score(score)

    def scores(self, *, trace_id: str | None = None, name: str | None = None,
               since: float | None = None) -> list[Score]:
        return self._target().scores(trace_id=trace_id, name=name, since=since)

    def score_summary(self, *, since: float | None = None,
                      until: float | None = None) -> list[TaskScores]:
        return self._target().score_summary(since=since, until=until)

    def spans_since(self, cursor: int, *, limit: int = SPANS_PAGE
                    ) -> tuple[list[StoredSpan], int]:
        return self._target().spans_since(cursor, limit=limit)

    def span_cursor(self) -> int:
        return self._target().span_cursor()

    def prune(self, before: float) -> Pruned:
        return self._target().prune(before)
