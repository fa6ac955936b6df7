"""Keeping the learning roll-ups current from the process that writes the events.

The learning queries (trends, failure clusters, factors, the dashboard's overview and its
model/label filters) read hourly roll-ups and add the rows written since from the events
(:mod:`closedloop.store.sqlite._rollup`, :mod:`closedloop.store.postgres._rollup`). A query
through a writable handle folds new rows in first; a read-only reader (``closedloop trends``,
``report``, a dashboard without an API token) cannot, so without a writer's help it would
read more and more rows past the roll-up. The :class:`~closedloop.store.Store` that writes
the events therefore runs a :class:`RollupKeeper`: a daemon thread that, every ``every``
seconds, asks the backend to fold (``fold_rollups()``: each roll-up when at least
``REFRESH_ROWS`` rows wait; on PostgreSQL one process at a time, under an advisory lock).
The evidence roll-up of the autonomy levels (``store/*/_evidence.py``) is folded by the same
call.

- Never on the agent's path, never in the writer's thread: a fold is its own short
  transactions on a connection of its own.
- A failure is logged (once per distinct reason) and tried again at the next tick; it never
  reaches the agent, and the queries stay exact without it (they read what is not rolled up).
- Stopped by :meth:`Store.close`; not carried over a ``fork`` (the child's store starts
  none until it is opened there).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from closedloop._errors import ConfigError
from closedloop._redact import clip

__all__ = ["ROLLUP_EVERY_S", "RollupKeeper", "check_every"]

_log = logging.getLogger("closedloop.store")

ROLLUP_EVERY_S = 60.0
"""How often a writing store folds new rows into the roll-ups by default."""
_REASONS = 100
"""Distinct failure reasons logged at most (each once), so that the set stays small."""


def check_every(every: object) -> None:
    """A :class:`~closedloop.ConfigError` unless ``every`` is a finite positive number of
    seconds (``rollup_every`` of :func:`~closedloop.store.open_store`)."""
    if isinstance(every, bool) or not isinstance(every, int | float) or not 0 < every < math.inf:
        raise ConfigError(f"rollup_every must be a positive number of seconds or None, "
                          f"got {every!r}")


class RollupKeeper:
    """Calls ``fold`` every ``every`` seconds from a daemon thread until :meth:`close`."""

    def __init__(self, fold: Callable[[], object], *, every: float = ROLLUP_EVERY_S,
                 name: str = "store") -> None:
        check_every(every)
        self.fold = fold
        self.every = float(every)
        self.folds = 0
        """Ticks whose fold returned without an error."""
        self.failures = 0
        self._said: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"closedloop-rollup {name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.tick()

    def tick(self) -> None:
        """One fold now (what the thread does every ``every`` seconds)."""
        try:
            self.fold()
        except Exception as exc:  # noqa: BLE001 - a fold is retried; queries stay exact
            self.failures += 1
            lines = str(exc).splitlines()
            reason = clip(lines[0], 300) if lines else type(exc).__name__  # redacted, then cut
            if reason not in self._said and len(self._said) < _REASONS:
                self._said.add(reason)
                _log.warning("closedloop: could not update the learning roll-ups (tried "
                             "again every %.0f s): %s", self.every, reason)
        else:
            self.folds += 1

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread (a fold under way finishes first, up to ``timeout``)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
