"""Persisted pause and halt state per task type, and the history of who stopped and resumed it.

A :class:`ControlLedger` is where :class:`~closedloop.control.FaultControl` writes a halt and
where ``closedloop resume`` lifts it; it survives restarts. :func:`ledger_for_store` is the
one place that picks it, for agents, ``closedloop status``/``resume``, ``serve`` and the API
alike (docs/control.md states the design):

- The store's own durable record, which its backend offers through the control-state port
  (:class:`~closedloop.store.ControlStateBackend`): :class:`~closedloop.store.SQLiteLedger`
  (tables in the SQLite store's file), ``PostgresLedger`` (the same tables in a PostgreSQL
  store's schema, shared by every machine), the backend's own :class:`MemoryLedger` for
  ``memory://``. This module never opens a database itself.
- :class:`MemoryLedger` for tests and for backends that keep no control state.
- :class:`CachedLedger` when Redis is configured (``CLOSEDLOOP_REDIS_URL``): the store's
  ledger stays the durable record, written first; :class:`~closedloop.control.RedisLedger`
  caches it and carries stops and lifts to other machines. A Redis restarted empty is
  refilled from the store; a Redis that is down leaves the store (plus every stop already
  seen) in force.

Every ledger raises :class:`~closedloop.ControlUnavailable` when its state cannot be read or
written; the guard then fails closed. Reasons and evidence are redacted before they are
stored.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from closedloop._control_state import (
    ControlLedger,
    MemoryLedger,
    Stop,
    StopKind,
    redacted,
    stronger,
)
from closedloop._errors import ControlUnavailable
from closedloop._redact import shown_url
from closedloop._runtime import REDIS_ENV

# Stop, StopKind, ControlLedger and MemoryLedger live in closedloop._control_state (the store
# backends implement the port too); they are re-exported from here as before.
__all__ = [
    "REDIS_ENV",
    "CachedLedger",
    "ControlLedger",
    "MemoryLedger",
    "SharedCache",
    "Stop",
    "StopKind",
    "ledger_for_store",
    "redacted",
    "shown_url",
    "stronger",
    "who",
]

_log = logging.getLogger("closedloop.control")


def who() -> str:
    """The default "by": user@host (pid)."""
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


class SharedCache(ControlLedger, Protocol):
    """A ledger that caches the durable one for other machines (:class:`RedisLedger`)."""

    url: str

    def read(self, task_type: str) -> tuple[Stop | None, dict[str, Any] | None, bool]:
        """The cached stop, the last lift recorded there, and whether the cache is filled."""

    def fill(self, stops: list[Stop]) -> None:
        """Put the durable stops back (after a restart that lost them) and mark it filled."""


class CachedLedger:
    """The store's ledger as the durable record, with a shared cache in front (Redis).

    Writes go to the durable ledger first, then to the cache, which carries them to every
    machine; a halt that cannot be stored durably still goes to the cache, then raises
    (:class:`~closedloop.control.FaultControl` keeps it in force and retries). A read
    merges both, the stronger stop wins.
    A lift recorded in the cache (``closedloop resume`` on another machine) is applied to
    the durable record when it is older than the lift. If the cache loses its content (a
    Redis restart without persistence) it is refilled from the durable record; while it is
    unreachable, the durable record and every stop already read from the cache stay in
    force, and a warning says where control state went. Only when the durable record cannot
    be read does :meth:`get` raise :class:`~closedloop.ControlUnavailable`.
    """

    def __init__(self, durable: ControlLedger, cache: SharedCache, *,
                 clock: Callable[[], float] = time.time, retry_every: float = 1.0) -> None:
        self.durable = durable
        self.cache = cache
        self.clock = clock
        self.retry_every = retry_every
        self.degraded_since: float | None = None
        self._seen: dict[str, Stop] = {}
        self._refill = True
        self._next_try = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CachedLedger({self.durable!r}, cache={shown_url(self.cache.url)!r})"

    # ----- the cache's health -------------------------------------------------------------
    def _cache_down(self, exc: Exception) -> None:
        with self._lock:
            self._next_try = time.monotonic() + self.retry_every
            self._refill = True
            if self.degraded_since is None:
                self.degraded_since = time.time()
                _log.warning(
                    "closedloop: Redis at %s unreachable (%s); pauses and halts are read from "
                    "and written to %r only, stops already seen stay in force, and other "
                    "machines see new ones when Redis answers", shown_url(self.cache.url), exc,
                    self.durable)

    def _cache_up(self) -> bool:
        """Try the cache now? (Not more than every ``retry_every`` s while it is down.)"""
        return self.degraded_since is None or time.monotonic() >= self._next_try

    def _cache_back(self) -> None:
        if self.degraded_since is not None:
            with self._lock:
                if self.degraded_since is not None:
                    _log.warning("closedloop: Redis at %s answers again after %.1fs",
                                 shown_url(self.cache.url), time.time() - self.degraded_since)
                    self.degraded_since = None

    def _fill(self) -> None:
        """Give the cache every durable stop it may have lost (restart, missed writes)."""
        try:
            stops = self.durable.stops()
        except ControlUnavailable:
            return  # the durable record is unreadable for now: fill on a later read
        self.cache.fill(stops)
        self._refill = False

    # ----- the ledger -----------------------------------------------------------------------
    def put(self, stop: Stop) -> None:
        stop = redacted(stop)
        unstored: ControlUnavailable | None = None
        try:
            self.durable.put(stop)
        except ControlUnavailable as exc:
            unstored = exc  # still tell the other machines, then raise: the caller retries
        if self._cache_up():
            try:
                self.cache.put(stop)
            except ControlUnavailable as exc:
                self._cache_down(exc)
            else:
                self._cache_back()
        if unstored is not None:
            raise unstored

    def get(self, task_type: str) -> Stop | None:
        durable = self.durable.get(task_type)
        now = self.clock()
        shared: Stop | None = None
        if self._cache_up():
            try:
                shared, lifted, filled = self.cache.read(task_type)
                if not filled or self._refill:
                    self._fill()
                    shared, lifted, filled = self.cache.read(task_type)
            except ControlUnavailable as exc:
                self._cache_down(exc)
            else:
                self._cache_back()
                if shared is None:
                    self._seen.pop(task_type, None)
                else:
                    self._seen[task_type] = shared
                if (durable is not None and shared is None and lifted is not None
                        and float(lifted.get("at", 0.0)) >= durable.at):
                    # resumed on another machine after this stop began: follow it here
                    self.durable.lift(task_type, by=str(lifted.get("by", "?")),
                                      reason=f"(via Redis) {lifted.get('reason', '')}")
                    durable = None
                if shared is not None and stronger(durable, shared, now) is shared:
                    # raised on another machine: keep a durable copy here too, so that it
                    # holds in this machine's processes while Redis is down or restarting
                    try:
                        self.durable.put(shared)
                    except ControlUnavailable as exc:
                        _log.warning("closedloop: could not copy the %s of %s into %r: %s",
                                     shared.kind.value, task_type, self.durable, exc)
                return stronger(durable, shared, now)
        return stronger(durable, self._seen.get(task_type), now)

    def lift(self, task_type: str, *, reason: str, by: str) -> Stop | None:
        # the cache first: if it is unreachable nothing is lifted anywhere (the halt stays,
        # and the command says so); a lift recorded there reaches the durable record of
        # every machine, this one's included, even if the write below fails
        shared = self.cache.lift(task_type, reason=reason, by=by)
        self._cache_back()
        self._seen.pop(task_type, None)
        durable = self.durable.lift(task_type, reason=reason, by=by)
        return durable or shared

    def stops(self) -> list[Stop]:
        now = self.clock()
        merged = {s.task_type: s for s in self.durable.stops()}
        try:
            shared = self.cache.stops() if self._cache_up() else list(self._seen.values())
        except ControlUnavailable as exc:
            self._cache_down(exc)
            shared = list(self._seen.values())
        for stop in shared:
            merged[stop.task_type] = stronger(merged.get(stop.task_type), stop, now) or stop
        return sorted((s for s in merged.values() if s.active(now)), key=lambda s: s.task_type)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.durable.history(limit)
        try:
            rows += self.cache.history(limit) if self._cache_up() else []
        except ControlUnavailable as exc:
            self._cache_down(exc)
        out: list[dict[str, Any]] = []
        for row in sorted(rows, key=lambda r: -float(r.get("at", 0.0))):
            # the same stop or resume, written to both (each with its own clock reading)
            if not any(row.get("event") == o.get("event") and row.get("by") == o.get("by")
                       and row.get("task_type") == o.get("task_type")
                       and abs(float(row.get("at", 0.0)) - float(o.get("at", 0.0))) < 2.0
                       for o in out):
                out.append(row)
        return out[:limit]

    def publish(self, source: str, keys: dict[str, dict[str, Any]]) -> None:
        """Per-key snapshots go to the durable ledger (see
        :meth:`~closedloop.store.SQLiteLedger.publish`)."""
        publish = getattr(self.durable, "publish", None)
        if publish is not None:
            publish(source, keys)

    def published(self, max_age: float = 300.0) -> dict[str, dict[str, Any]]:
        """The durable ledger's published snapshots, if it keeps any."""
        published = getattr(self.durable, "published", None)
        return published(max_age) if published is not None else {}


_FROM_ENV: Any = object()


def ledger_for_store(store: Any, *, redis_url: str | None = _FROM_ENV,
                     prefix: str = "closedloop") -> ControlLedger:
    """The one source of pause and halt state for ``store``: agents, CLI and API use this.

    The durable record is the store's: its SQLite file, its PostgreSQL schema, whatever a
    backend implementing :class:`~closedloop.store.ControlStateBackend` keeps; in memory for
    ``memory://`` and for backends that keep none. With
    Redis configured (``redis_url``, by default ``$CLOSEDLOOP_REDIS_URL``) it is wrapped in a
    :class:`CachedLedger` with a :class:`~closedloop.control.RedisLedger` under ``prefix``.
    """
    durable = _durable(getattr(store, "backend", None))
    url = os.environ.get(REDIS_ENV, "") if redis_url is _FROM_ENV else (redis_url or "")
    if not url.strip():
        return durable
    from closedloop.control._redis import RedisLedger

    return CachedLedger(durable, RedisLedger(url.strip(), prefix=prefix))


def _durable(backend: Any) -> ControlLedger:
    """The backend's own durable ledger (the control-state port), else one in memory."""
    from closedloop.store import ControlStateBackend

    if isinstance(backend, ControlStateBackend):
        return backend.control_ledger()
    return MemoryLedger()
