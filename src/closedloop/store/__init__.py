"""The event store: where every step's event lands, chosen by URL.

``sqlite:///PATH`` (the default; a relative PATH is relative to the working directory,
``sqlite:////abs/path`` is absolute), ``memory://``, ``postgresql://USER@HOST/DB?schema=NAME``
(the ``postgres`` extra) or a plug-in's scheme (:mod:`closedloop.store._registry`). A plain
file path is read as a SQLite
file. ``CLOSEDLOOP_STORE`` sets the default; without it the default is
``$XDG_DATA_HOME/closedloop/closedloop.db`` (``~/.local/share/...``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from closedloop._errors import ConfigError, StoreError
from closedloop._events import StepEvent
from closedloop.store._base import EventBackend, EventQuery
from closedloop.store._memory import MemoryBackend
from closedloop.store._registry import open_backend, register_scheme, sqlite_path
from closedloop.store._sqlite import SCHEMA_VERSION, SQLiteBackend
from closedloop.store._writer import BatchWriter, WriterStats

__all__ = [
    "SCHEMA_VERSION",
    "EventBackend",
    "EventQuery",
    "MemoryBackend",
    "SQLiteBackend",
    "Store",
    "WriterStats",
    "default_store",
    "default_store_url",
    "is_default_store",
    "open_backend",
    "open_store",
    "register_scheme",
    "reset_default_store",
]

ENV_VAR = "CLOSEDLOOP_STORE"


class Store:
    """A backend plus the batched writer in front of it; ``record`` never blocks."""

    def __init__(
        self,
        backend: EventBackend,
        *,
        max_queue: int = 100_000,
        batch_size: int = 4096,
        flush_interval: float = 0.25,
        dead_letter: Path | None = None,
    ) -> None:
        self.backend = backend
        self.url = backend.url
        self._writer = BatchWriter(backend, max_queue=max_queue, batch_size=batch_size,
                                   flush_interval=flush_interval, dead_letter=dead_letter)
        self.record = self._writer.submit
        """``record(event) -> bool``: queue an event; False (and counted) if it was dropped."""

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until everything recorded so far is written; False on timeout."""
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = 10.0) -> WriterStats:
        """Flush and stop writing; returns the final counts."""
        return self._writer.close(timeout)

    def stats(self) -> WriterStats:
        """Written, queued, dropped, dead-lettered and lost counts."""
        return self._writer.stats()

    def events(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        task_type: str | None = None,
        limit: int | None = None,
    ) -> Iterator[StepEvent]:
        """Read stored events, oldest first (call :meth:`flush` first to see your own)."""
        query = EventQuery(since=since, until=until, task_type=task_type, limit=limit)
        return self.backend.iter_events(query)

    def count(self) -> int:
        """How many events the backend holds (not counting queued ones)."""
        return self.backend.count()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"


def open_store(
    url: str | os.PathLike[str],
    *,
    max_queue: int = 100_000,
    batch_size: int = 4096,
    flush_interval: float = 0.25,
    create: bool = True,
) -> Store:
    """Open (creating and migrating if needed) the store at ``url``.

    With ``create=False`` (readers such as ``closedloop report``) a SQLite file that does not
    exist is a :class:`~closedloop.StoreError` instead of a new empty store. A malformed URL
    is a :class:`~closedloop.ConfigError`; a path that cannot be opened is a
    :class:`~closedloop.StoreError`, each with a one-line reason.
    """
    text = os.fspath(url).strip()
    if not text:
        raise ConfigError("store URL is empty; use sqlite:///PATH or memory://")
    if text == "memory://":
        return Store(MemoryBackend(), max_queue=max_queue, batch_size=batch_size,
                     flush_interval=flush_interval)
    if text.startswith("sqlite:///"):
        path = sqlite_path(text)
    elif "://" in text or text.startswith("sqlite:"):
        # every other scheme (PostgreSQL, plug-ins) comes from the registry
        return Store(open_backend(text, create=create), max_queue=max_queue,
                     batch_size=batch_size, flush_interval=flush_interval)
    else:
        path = Path(text).expanduser()
    if not create and not path.exists():
        raise StoreError(f"no store at {path}; run `closedloop demo` or point --store at one")
    if not create and not path.is_file():
        raise StoreError(f"cannot read store {path}: not a file")
    backend = SQLiteBackend(path)
    dead_letter = path.with_name(path.name + ".deadletter.jsonl")
    return Store(backend, dead_letter=dead_letter, max_queue=max_queue, batch_size=batch_size,
                 flush_interval=flush_interval)


def default_store_url() -> str:
    """``$CLOSEDLOOP_STORE``, else the SQLite file in the user's data directory."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return f"sqlite:///{Path(base).expanduser() / 'closedloop' / 'closedloop.db'}"


_default: Store | None = None
_default_lock = threading.Lock()


def default_store() -> Store:
    """The process-wide store loops record into unless given one; opened on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = open_store(default_store_url())
        return _default


def is_default_store(store: object) -> bool:
    """True when ``store`` is the process-wide default store; never opens it to find out."""
    return store is not None and store is _default


def reset_default_store() -> None:
    """Close the process-wide store; the next :func:`default_store` opens it anew."""
    global _default
    with _default_lock:
        store, _default = _default, None
    if store is not None:
        store.close()
