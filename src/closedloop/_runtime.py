"""The process runtime: one object holding the store, fault control, backpressure, telemetry
and redactor.

A :class:`Runtime` builds each of its parts on first use, from its arguments or else from the
environment (``CLOSEDLOOP_STORE``, ``CLOSEDLOOP_REDIS_URL``), so ``import closedloop`` opens
nothing. The process has one current runtime, which loops use unless given their own:
:func:`configure` replaces it whole (closing the one it replaces), :func:`reset` goes back to a
fresh one built from the environment (the one reset tests need). Everything that depends on
the store, such as the fault control's ledger, is derived from the runtime's own store, so it
cannot outlive it. ``default_store()``, ``default_fault_control()``,
``default_backpressure()``, ``default_telemetry()`` and ``default_redactor()`` are views of
the current runtime.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from closedloop._events import StepEvent
    from closedloop._pricing import Prices
    from closedloop._redact import Redactor
    from closedloop.approvals import Notifier
    from closedloop.autonomy import AutonomyLevels
    from closedloop.control import Backpressure, FaultControl
    from closedloop.learn import DriftGuard, DriftPolicy, OnlineScorer
    from closedloop.store import EventSink, Store

    Scorer = Callable[[StepEvent], float | bool | None]
    from closedloop.telemetry import Telemetry

__all__ = ["Runtime", "configure", "current_runtime", "reset"]

REDIS_ENV = "CLOSEDLOOP_REDIS_URL"
INFLUXDB_ENV = "CLOSEDLOOP_INFLUXDB_URL"


class _Unset:
    """Sentinel: "not given; from the environment" where ``None`` means "none"."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def _named_scorers(scorers: Mapping[str, Scorer] | Sequence[Scorer] | None
                   ) -> dict[str, Scorer]:
    """``scorers`` as name → scorer (a list is named by each one's ``__name__``)."""
    if scorers is None:
        return {}
    if isinstance(scorers, dict):
        named = dict(scorers)
    elif isinstance(scorers, list | tuple):
        named = {}
        for fn in scorers:
            name = getattr(fn, "__name__", None)
            if not isinstance(name, str) or not name or name == "<lambda>" or name in named:
                raise ConfigError("each scorer in a list needs a distinct __name__ (give a dict "
                                  f"name → scorer instead), got {fn!r}")
            named[name] = fn
    else:
        raise ConfigError(f"scorers must be a dict of name → scorer or a list of scorers, "
                          f"got {type(scorers).__name__}")
    for name, fn in named.items():
        if not isinstance(name, str) or not name.strip() or not callable(fn):
            raise ConfigError(f"scorer {name!r}: needs a non-empty name and a callable")
    return named


class Runtime:
    """A store, the fault control on its ledger, backpressure, telemetry and a redactor.

    ``store`` is a :class:`~closedloop.Store` or a store URL (default: ``$CLOSEDLOOP_STORE``,
    else the SQLite file in the user's data directory); a URL is opened by the runtime, which
    then closes it in :meth:`close`. ``redis_url`` (default: ``$CLOSEDLOOP_REDIS_URL``;
    ``None``: no Redis) shares pause and halt state and backpressure rates across processes.
    ``fault_control`` and ``backpressure`` replace the ones the runtime would build; the
    default fault control keeps its pauses and halts in the store's ledger
    (:func:`~closedloop.control.ledger_for_store`). ``telemetry`` is the tracing pipeline
    loops use (``None``: no tracing; :func:`closedloop.telemetry.configure` installs one).
    ``redactor`` is applied to every text closedloop stores, exports or logs (``None``: the
    built-in rules); it is the process runtime's that applies, also to loops given their own.
    ``retention`` (``"30d"``, seconds, ``None``/``"off"``: keep everything; default
    ``$CLOSEDLOOP_RETENTION``, else 90 days) is how long the store it opens from a URL keeps
    events and control history; given with a store object, it is set on it.
    ``drift`` (a :class:`~closedloop.learn.DriftPolicy` for every task type, or a dict of
    them per task type) adds a :class:`~closedloop.learn.DriftGuard` to the default guards of
    loops: drift detection and budgets as control signals (docs/drift.md).
    ``notify`` tells people of new approval requests: a webhook URL, a
    :class:`~closedloop.approvals.Notifier`, or None for none (default:
    ``$CLOSEDLOOP_APPROVAL_WEBHOOK``; see :func:`closedloop.approvals.notify_created`).
    ``scorers`` (name → scorer, or a list of scorers named by ``__name__``; a scorer takes a
    recorded :class:`~closedloop.StepEvent` and returns a number, a bool or None) starts an
    :class:`~closedloop.learn.OnlineScorer` the runtime owns: fed by the store's writer
    thread, scoring every step recorded in the runtime's store on a thread of its own
    (bounded queue, drops counted), each score recorded and fed to the drift guard; stopped
    by :meth:`close` (so by :func:`reset` and by the next :func:`configure`).
    """

    def __init__(
        self,
        *,
        store: Store | str | os.PathLike[str] = UNSET,
        redis_url: str | None = UNSET,
        fault_control: FaultControl = UNSET,
        backpressure: Backpressure = UNSET,
        telemetry: Telemetry | None = None,
        redactor: Redactor | None = None,
        retention: str | float | None = UNSET,
        prices: Prices | Any = UNSET,
        influxdb: EventSink | str | None = UNSET,
        drift: DriftPolicy | Mapping[str, DriftPolicy | None] | None = None,
        notify: Notifier | str | None = UNSET,
        scorers: Mapping[str, Scorer] | Sequence[Scorer] | None = None,
    ) -> None:
        if redis_url is not UNSET and redis_url is not None and not isinstance(redis_url, str):
            raise ConfigError(f"redis_url must be a string or None, got {redis_url!r}")
        if retention is not UNSET:
            from closedloop.store import parse_retention

            retention = parse_retention(retention)  # a bad value fails here, in configure()
        self._retention: float | None = retention
        self._store_arg = store
        self._store: Store | None = None
        self._owns_store = False
        self._redis_url = redis_url
        self._fault_control: FaultControl | None = (
            None if fault_control is UNSET else fault_control)
        self._backpressure: Backpressure | None = None if backpressure is UNSET else backpressure
        self._owns_rates = False
        self._guards: weakref.WeakKeyDictionary[Store, FaultControl] = (
            weakref.WeakKeyDictionary())
        self._levels: weakref.WeakKeyDictionary[Store, AutonomyLevels | None] = (
            weakref.WeakKeyDictionary())
        self.telemetry = telemetry
        """The tracing pipeline loops use unless given one; None: steps are not traced."""
        self._redactor = redactor
        self._prices: Prices | None = None
        if prices is not UNSET:
            from closedloop._pricing import prices_from

            self._prices = prices_from(prices)  # a bad table fails here, in configure()
        self._sinks: tuple[EventSink, ...] | None = None
        self._owned_sinks: tuple[EventSink, ...] = ()
        if influxdb is not UNSET:
            self._sinks = self._build_sinks(influxdb)  # a bad URL fails here too
        self._notify = notify
        self._lock = threading.RLock()
        self._closed = False
        if drift is not None:
            from closedloop.learn import DriftPolicy

            if not (isinstance(drift, DriftPolicy) or (isinstance(drift, dict) and all(
                    v is None or isinstance(v, DriftPolicy) for v in drift.values()))):
                raise ConfigError("drift must be a DriftPolicy or a dict of task type → "
                                  f"DriftPolicy, got {type(drift).__name__}")
        self._drift_policy = drift
        self._drift: weakref.WeakKeyDictionary[Store, DriftGuard] = weakref.WeakKeyDictionary()
        self._scorers = _named_scorers(scorers)  # a bad one fails here, in configure()
        self.online_scorer: OnlineScorer | None = None
        """The online scorer of ``scorers=``, once the store is open; None without scorers."""

    # ----- the parts, each built on first use -------------------------------------------
    @property
    def store(self) -> Store:
        """The store loops record into unless given one; opened on first use."""
        store = self._store
        if store is None:
            with self._lock:
                store = self._store
                if store is None:
                    store = self._store = self._open_store()
                    if self._scorers:
                        self._start_scorer(store)
        return store

    def _start_scorer(self, store: Store) -> None:
        from closedloop.learn import OnlineScorer

        guard = self.drift_for(store)
        self.online_scorer = OnlineScorer(store, self._scorers, guard=guard).attach()

    def _open_store(self) -> Store:
        from closedloop.store import Store, default_store_url, open_store

        arg = self._store_arg
        if isinstance(arg, Store):
            if self._retention is not UNSET:  # given with the store: the caller's wish
                arg.set_retention(self._retention)
            store = arg
        else:
            url = default_store_url() if arg is UNSET else arg
            self._owns_store = True
            # defer: an agent starts even when the file cannot be opened yet (events are held)
            store = open_store(url, defer=True, retention=self.retention)
        for sink in self.sinks:
            store.add_sink(sink)
        return store

    @property
    def prices(self) -> Prices:
        """The price table that fills steps' ``cost_usd`` (built on first use)."""
        prices = self._prices
        if prices is None:
            from closedloop._pricing import prices_from_env

            prices = self._prices = prices_from_env()
        return prices

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        """Where the runtime's store also sends every event (InfluxDB); built on first use
        from ``$CLOSEDLOOP_INFLUXDB_URL`` unless given."""
        sinks = self._sinks
        if sinks is None:
            with self._lock:
                sinks = self._sinks
                if sinks is None:
                    found = None
                    if os.environ.get(INFLUXDB_ENV, "").strip():  # else nothing is imported
                        from closedloop.telemetry import influx_from_env

                        found = influx_from_env()
                    sinks = self._sinks = (found,) if found is not None else ()
                    self._owned_sinks = sinks
        return sinks

    def _build_sinks(self, influxdb: EventSink | str | None) -> tuple[EventSink, ...]:
        if influxdb is None:
            return ()
        if isinstance(influxdb, str):
            from closedloop.telemetry import InfluxSink

            sink = InfluxSink(influxdb)
            self._owned_sinks = (sink,)
            return (sink,)
        from closedloop.store import EventSink

        if not isinstance(influxdb, EventSink):
            raise ConfigError(f"influxdb must be a URL, an EventSink or None, got "
                              f"{type(influxdb).__name__}")
        return (influxdb,)

    @property
    def retention(self) -> float | None:
        """Seconds of events (and control history) the store this runtime
        opens keeps; ``None``: everything. Given, else ``$CLOSEDLOOP_RETENTION``, else 90
        days (``off`` keeps everything); pruned by the store's writer thread."""
        if self._retention is UNSET:
            from closedloop.store import retention_from_env

            self._retention = retention_from_env()
        return self._retention

    @property
    def redis_url(self) -> str | None:
        """The Redis that shares control state and rates, or None; read from the environment
        on first use unless given."""
        if self._redis_url is UNSET:
            self._redis_url = os.environ.get(REDIS_ENV, "").strip() or None
        url: str | None = self._redis_url
        return url

    @property
    def fault_control(self) -> FaultControl:
        """The guard loops on this runtime's store use: its ledger is the store's."""
        guard = self._fault_control
        if guard is None:
            with self._lock:
                guard = self._fault_control
                if guard is None:
                    guard = self._fault_control = self._new_fault_control(self.store)
        return guard

    def fault_control_for(self, store: Store | None) -> FaultControl:
        """The guard for steps recorded into ``store``: the runtime's own for its own store,
        else one per store (shared by every loop on it, so that its window sees all their
        steps), keeping its pauses and halts in ``store``'s ledger."""
        if self.has_store(store):
            return self.fault_control
        if store is None:
            return self._new_fault_control(None)
        with self._lock:
            guard = self._guards.get(store)
            if guard is None:
                guard = self._guards[store] = self._new_fault_control(store)
        return guard

    def levels_for(self, store: Store) -> AutonomyLevels | None:
        """The stored autonomy levels of ``store``'s task types (one per store, shared by
        every loop on it, so that its cache and demotion detectors see all their steps);
        None when the store's backend keeps no levels (a plug-in's)."""
        with self._lock:
            with contextlib.suppress(TypeError):  # not weakly referenceable
                if store in self._levels:
                    return self._levels[store]
            from closedloop.autonomy import AutonomyLevels
            from closedloop.store import LevelBackend

            backend = getattr(store, "backend", None)  # a stand-in for a Store may have none
            levels = AutonomyLevels(store) if isinstance(backend, LevelBackend) else None
            with contextlib.suppress(TypeError):  # not weakly referenceable: not cached
                self._levels[store] = levels
        return levels

    def drift_for(self, store: Store) -> DriftGuard | None:
        """The drift and budget guard of ``store``'s loops (one per store, acting through the
        store's fault control and autonomy levels); None unless ``drift=`` was configured."""
        policy = self._drift_policy
        if policy is None:
            return None
        with self._lock:
            with contextlib.suppress(TypeError):
                if store in self._drift:
                    return self._drift[store]
            from closedloop.learn import DriftGuard, DriftPolicy

            # fed off the agent's thread (a queue append per step), in order
            if isinstance(policy, DriftPolicy):
                guard = DriftGuard(policy=policy, store=store,
                                   fault_control=self.fault_control_for(store),
                                   levels=self.levels_for(store), background=True)
            else:
                guard = DriftGuard(policy=None, policies=dict(policy), store=store,
                                   fault_control=self.fault_control_for(store),
                                   levels=self.levels_for(store), background=True)
            with contextlib.suppress(TypeError):
                self._drift[store] = guard
        return guard

    def _new_fault_control(self, store: Store | None) -> FaultControl:
        from closedloop.control import FaultControl, ledger_for_store

        return FaultControl(ledger=ledger_for_store(store, redis_url=self.redis_url))

    @property
    def backpressure(self) -> Backpressure:
        """The flow control handed to agents as ``attempt.backpressure``; rates are local, or
        shared through Redis when the runtime has a ``redis_url``."""
        limiter = self._backpressure
        if limiter is None:
            with self._lock:
                limiter = self._backpressure
                if limiter is None:
                    from closedloop.control import Backpressure

                    url = self.redis_url
                    if url:
                        from closedloop.control import RedisRates

                        limiter = Backpressure(backend=RedisRates(url))
                        self._owns_rates = True
                    else:
                        limiter = Backpressure()
                    self._backpressure = limiter
        return limiter

    @property
    def notifier(self) -> Notifier | None:
        """What tells people of new approval requests (built on first use from ``notify``,
        else ``$CLOSEDLOOP_APPROVAL_WEBHOOK``); None: nobody is notified."""
        if self._notify is UNSET or isinstance(self._notify, str):
            with self._lock:
                if self._notify is UNSET or isinstance(self._notify, str):
                    from closedloop.approvals import notifier_from, notifier_from_env

                    arg = self._notify
                    self._notify = None  # a bad URL fails once, not at every request
                    self._notify = (notifier_from_env() if arg is UNSET
                                    else notifier_from(arg))
        notifier: Notifier | None = self._notify
        return notifier

    @property
    def redactor(self) -> Redactor:
        """The redactor for what is stored, exported and logged (the built-in rules unless
        given one)."""
        from closedloop._redact import BUILTIN

        return self._redactor if self._redactor is not None else BUILTIN

    def set_redactor(self, redactor: Redactor | None) -> Redactor:
        """Install ``redactor`` (``None``: the built-in rules); returns the previous one."""
        with self._lock:
            previous = self.redactor
            self._redactor = redactor
        return previous

    def set_telemetry(self, telemetry: Telemetry | None) -> Telemetry | None:
        """Install (``None``: remove) the tracing pipeline; returns the previous one."""
        with self._lock:
            previous, self.telemetry = self.telemetry, telemetry
        return previous

    def has_store(self, store: object) -> bool:
        """True when ``store`` is this runtime's store; never opens it to find out."""
        return store is not None and (store is self._store or store is self._store_arg)

    # ----- life cycle ---------------------------------------------------------------------
    def flush(self, timeout: float | None = 10.0) -> bool:
        """Write what was recorded and export what was traced so far; False on timeout.

        Never opens a store that was not used."""
        ok = True
        if self._store is not None:
            ok = self._store.flush(timeout) and ok
        for sink in self._sinks or ():  # after the store: its writer feeds them
            ok = sink.flush(timeout) and ok
        if self.telemetry is not None:
            ok = self.telemetry.flush(timeout) and ok
        return ok

    def close(self, timeout: float | None = 10.0) -> None:
        """Shut the telemetry down, flush the store, and close it (and the Redis connections
        of the backpressure) if the runtime opened it.

        A store handed in as an object is its owner's to close; it is only flushed.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            telemetry, self.telemetry = self.telemetry, None
            store = self._store
            limiter = self._backpressure if self._owns_rates else None
            notifier = None if self._notify is UNSET or isinstance(self._notify, str) \
                else self._notify
            scorer, self.online_scorer = self.online_scorer, None
        if scorer is not None and store is not None:  # every step recorded so far is scored
            store.flush(timeout)
            scorer.close(timeout)
        for guard in list(self._drift.values()):  # before the store closes: states saved
            guard.close()
        if notifier is not None:  # a notification not sent by then is resent later
            notifier.close(5.0 if timeout is None else min(timeout, 5.0))
        if limiter is not None:
            close = getattr(limiter.backend, "close", None)
            if callable(close):
                close()
        if telemetry is not None:
            telemetry.shutdown(timeout)
        if store is not None:
            if self._owns_store:
                store.close(timeout)
            else:
                store.flush(timeout)
            for sink in self._sinks or ():
                store.remove_sink(sink)
        for sink in self._owned_sinks:  # after the store: its last events reach them
            sink.close(timeout)
        for sink in self._sinks or ():
            if sink not in self._owned_sinks:
                sink.flush(timeout)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        store = self._store.url if self._store is not None else (
            "from the environment, not opened" if self._store_arg is UNSET else
            "not opened")
        return f"Runtime(store={store!r})"


_current = Runtime()
_swap_lock = threading.Lock()


def current_runtime() -> Runtime:
    """The process's current runtime (loops use it unless given their own)."""
    return _current


def configure(
    *,
    store: Store | str | os.PathLike[str] = UNSET,
    redis_url: str | None = UNSET,
    fault_control: FaultControl = UNSET,
    backpressure: Backpressure = UNSET,
    telemetry: Telemetry | None = None,
    redactor: Redactor | None = None,
    retention: str | float | None = UNSET,
    prices: Prices | Any = UNSET,
    influxdb: EventSink | str | None = UNSET,
    drift: DriftPolicy | Mapping[str, DriftPolicy | None] | None = None,
    notify: Notifier | str | None = UNSET,
    scorers: Mapping[str, Scorer] | Sequence[Scorer] | None = None,
) -> Runtime:
    """Replace the process runtime with one built from these arguments; returns it.

    Arguments left out come from the environment, as at start-up (see :class:`Runtime`). A
    store URL is opened here, so a malformed one is a :class:`~closedloop.ConfigError` now.
    The runtime replaced is closed (its store flushed, and closed if it opened it; its
    telemetry shut down). Pauses and halts its fault controls raised but could not store yet
    stay in force: the new runtime's take them over. Loops built without their own
    store, guards or backpressure follow the new runtime from their next step.
    """
    new = Runtime(store=store, redis_url=redis_url, fault_control=fault_control,
                  backpressure=backpressure, telemetry=telemetry, redactor=redactor,
                  retention=retention, prices=prices, influxdb=influxdb, drift=drift,
                  notify=notify, scorers=scorers)
    if notify is not UNSET and notify is not None:
        _ = new.notifier  # a bad webhook URL fails here, in configure()
    if store is not UNSET or scorers:
        _ = new.store  # open it now: a bad URL fails here, not in the agent's first step;
        # with scorers, the online scorer starts now
    old = _install(new)
    if old._store is not None and new.has_store(old._store):  # kept: the new runtime owns it
        new._owns_store, old._owns_store = old._owns_store, False
    if old._fault_control is not None and fault_control is UNSET:
        _carry_unsaved(old._fault_control, lambda: new.fault_control)
    for guarded, guard in list(old._guards.items()):  # the guards of loops on other stores
        _carry_unsaved(guard, functools.partial(new.fault_control_for, guarded))
    old.close()
    if new._store is not None:  # a sink both runtimes were given stays on the kept store
        for sink in new.sinks:
            new._store.add_sink(sink)
    return new


def _carry_unsaved(old: FaultControl, successor: Callable[[], FaultControl]) -> None:
    """Fail closed: the stops ``old`` raised but could not store yet stay in force in its
    successor (built only if there are any), which keeps trying to store them."""
    pending = old._pending
    if pending:
        guard = successor()
        with guard._lock:
            for name, stop in pending.items():
                guard._pending.setdefault(name, stop)
        guard.flush_pending()


def reset() -> Runtime:
    """Close the process runtime and start afresh from the environment (for tests)."""
    old = _install(Runtime())
    old.close()
    return _current


def _install(new: Runtime) -> Runtime:
    global _current
    with _swap_lock:
        old, _current = _current, new
    return old


def _after_fork_in_child() -> None:
    # The child gets fresh workers from the batch queues themselves (closedloop._batching);
    # the runtime's lock may have been held by another thread at fork time.
    _current._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
