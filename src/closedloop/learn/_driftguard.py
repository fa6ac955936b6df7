"""The drivers of drift detection: a loop guard on the agent's path, and online scoring.

:class:`DriftGuard` is a :class:`~closedloop.loop.StepGuard`: its ``observe`` feeds each
recorded step to a :class:`~closedloop.learn.DriftMonitor` (in-memory arithmetic; nothing is
read or written unless a signal fires) and carries out each :class:`~closedloop.learn.Firing`:

- ``alert``: an :class:`~closedloop.control.Alert` (kind ``drift``, or ``budget``) to the sinks;
- ``pause`` / ``halt``: a stop in fault control's ledger
  (:meth:`~closedloop.control.FaultControl.stop`), so the same guard that refuses validation
  spikes refuses the task type, and ``closedloop resume`` lifts it;
- ``demote``: the task type's autonomy is set to the policy's ``demote_to`` through
  :meth:`~closedloop.autonomy.AutonomyLevels.set` (kind ``demoted``, with the evidence);

and records it with its evidence in the store (the level store's detector-state record
``drift.firings``: the last :data:`KEEP_FIRINGS`), where ``closedloop status`` shows it.

With ``background=True`` (what ``closedloop.configure(drift=...)`` builds) the agent's thread
only queues the event (a bounded deque: a length check and an append); a thread of the
guard's own feeds the detectors every ``feed_every`` seconds, in the order the steps were
recorded, so they reach the same decisions, at most ``feed_every`` (plus the time to
process what is queued) later. Budgets (burn rates) stay on the agent's path, for the task
types that have one, so a budget still pauses at the step that overspends.
Detector states are saved there too, by a background thread every ``save_every`` seconds,
and read back when a task type is first seen, so a restart continues where it stopped.

:class:`OnlineScorer` runs user scorers on recorded steps on a thread of its own, records
their scores (:func:`~closedloop.telemetry.record_score`) and feeds them to the monitor.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from closedloop._batching import BatchQueue
from closedloop._events import StepEvent
from closedloop._redact import clip, redact_value
from closedloop.learn._drift import DriftMonitor, DriftPolicy, Firing

if TYPE_CHECKING:
    from closedloop._autonomy_state import LevelStore
    from closedloop.store import SinkStats, Store

__all__ = ["FIRINGS_KEY", "KEEP_FIRINGS", "DriftGuard", "OnlineScorer", "recorded_firings"]

_log = logging.getLogger("closedloop.learn")
FIRINGS_KEY = "drift.firings"
KEEP_FIRINGS = 200
_STATE_KEY = "drift.state:"
_UNSCORED = frozenset({"awaiting_approval", "paused", "halted", "control_unavailable",
                       "budget_exceeded"})


def recorded_firings(levels: LevelStore) -> list[Firing]:
    """The firings recorded in a level store, newest first."""
    saved = levels.detector(FIRINGS_KEY)
    if not saved:
        return []
    out = []
    for item in saved.get("firings", []):
        try:
            out.append(Firing.from_dict(item))
        except Exception as exc:  # noqa: BLE001 - one bad record must not hide the rest
            _log.warning("closedloop: skipping a malformed drift firing record: %s", exc)
    return sorted(out, key=lambda f: f.at, reverse=True)


class DriftGuard:
    """A loop guard that detects drift and budget burn, and acts on it (see the module).

    ``monitor`` (or ``policy``/``policies`` to build one: with ``policies`` alone, only the
    task types they name are watched; with neither, every one by the defaults) decides;
    ``fault_control`` carries out pauses and halts (a guard of the same loop, so the
    refusal is immediate);
    ``levels`` (an :class:`~closedloop.autonomy.AutonomyLevels`) demotions; ``log`` (default:
    ``store``'s level store) records firings and detector states; ``sinks`` get the alerts
    (default: the log). ``metrics`` (a :class:`~closedloop.telemetry.Metrics`) counts
    firings and exposes the detectors' states.

    ``background``: ``observe`` only queues the event (at most ``max_queue``; more are
    dropped and counted in ``dropped``) and a thread feeds the monitor every ``feed_every``
    seconds; :meth:`flush` feeds what is queued now, :meth:`close` stops the thread.
    """

    def __init__(self, monitor: DriftMonitor | None = None, *,
                 policy: DriftPolicy | None = None,
                 policies: Mapping[str, DriftPolicy | None] | None = None,
                 store: Store | None = None, fault_control: Any = None, levels: Any = None,
                 log: LevelStore | None = None, sinks: Iterable[Any] | None = None,
                 metrics: Any = None, save_every: float = 30.0, background: bool = False,
                 feed_every: float = 0.02, max_queue: int = 100_000) -> None:
        if monitor is None:  # with only ``policies``, only the task types they name
            monitor = DriftMonitor(policy if policy is not None or policies else DriftPolicy(),
                                   policies=policies)
        self.monitor = monitor
        if log is None and store is not None:
            from closedloop.store import LevelBackend, level_store_for

            if isinstance(getattr(store, "backend", None), LevelBackend):
                log = level_store_for(store)
        self.log = log
        self.fault_control = fault_control
        self.levels = levels
        if sinks is None:
            from closedloop.control import LogSink

            sinks = [LogSink()]
        self.sinks = list(sinks)
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_drift(self.monitor)
        self.save_every = save_every
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self._saver: threading.Thread | None = None
        self._stop = threading.Event()
        self.failed_actions = 0
        """Actions (alert, pause, demote, halt, record) that raised: logged, counted."""
        self.fired: list[Firing] = []
        """The firings of this process (the last :data:`KEEP_FIRINGS`)."""
        self.feed_every = feed_every
        self.max_queue = max_queue
        self.dropped = 0
        """Steps not fed to the monitor because the background queue was full."""
        self._queue: deque[StepEvent] | None = deque() if background else None
        self._budgeted: dict[str, bool] = {}
        self._any_budget = any(
            p is not None and (p.budget_usd_per_min is not None
                               or p.budget_tokens_per_min is not None)
            for p in (monitor.policy, *monitor.policies.values()))
        self._feed_lock = threading.Lock()
        self._feeder: threading.Thread | None = None
        if background:
            self._start_feeder()
            _BACKGROUND.add(self)

    # ----- the guard --------------------------------------------------------------------------
    def admit(self, task_type: str) -> None:
        """Admit: pauses and halts are refused by fault control, from its ledger."""
        return

    def observe(self, event: StepEvent) -> None:
        """Feed one recorded step; act on what fires. Quick: arithmetic unless a signal fires
        (in the background: a queue append)."""
        queue = self._queue
        if queue is None:
            self._observe_now(event)
            return
        if len(queue) < self.max_queue:
            queue.append(event)
        else:
            self.dropped += 1
        if not self._any_budget:
            return
        budgeted = self._budgeted.get(event.task_type)
        if budgeted is None:
            budgeted = self._budgeted[event.task_type] = self._has_budget(event.task_type)
        if budgeted:  # a budget pauses at the step that overspends, not a feed later
            firings = self.monitor.observe(event, signals=False)
            if firings:
                self.act(firings)

    def _has_budget(self, task_type: str) -> bool:
        monitor = self.monitor
        policy = monitor.policies.get(task_type, monitor.policy)
        return policy is not None and (policy.budget_usd_per_min is not None
                                       or policy.budget_tokens_per_min is not None)

    def _observe_now(self, event: StepEvent) -> None:
        if event.task_type not in self._loaded:
            self._load(event.task_type)
        firings = self.monitor.observe(event, burn=self._queue is None)
        if firings:
            self.act(firings)

    # ----- the background feed ------------------------------------------------------------
    def _start_feeder(self) -> None:
        self._feeder = threading.Thread(target=self._feed_loop, daemon=True,
                                        name="closedloop-drift-feed")
        self._feeder.start()

    def _feed_loop(self) -> None:
        while not self._stop.wait(self.feed_every):
            self.flush()

    def flush(self) -> int:
        """Feed the monitor every step queued so far (in the background mode), in order, and
        act on what fires; how many were fed."""
        queue = self._queue
        if queue is None:
            return 0
        fed = 0
        with self._feed_lock:  # one feeder at a time: the steps keep their order
            while queue:
                event = queue.popleft()
                fed += 1
                try:
                    self._observe_now(event)
                except Exception:  # noqa: BLE001 - one bad step must not stop the feed
                    self.failed_actions += 1
                    _log.exception("closedloop: drift detection failed on step %s",
                                   event.step_id)
        return fed

    def _load(self, task_type: str) -> None:
        with self._lock:
            if task_type in self._loaded:
                return
            self._loaded.add(task_type)
        if self.log is not None:
            try:
                saved = self.log.detector(_STATE_KEY + task_type)
                if saved:
                    self.monitor.load(task_type, saved)
            except Exception as exc:  # noqa: BLE001 - start afresh, the halt still guards
                _log.warning("closedloop: could not read the drift state of %s: %s",
                             task_type, exc)
        if self.log is not None and self._saver is None and self.save_every > 0:
            with self._lock:
                if self._saver is None:
                    self._saver = threading.Thread(target=self._save_loop, daemon=True,
                                                   name="closedloop-drift-save")
                    self._saver.start()

    # ----- the actions ------------------------------------------------------------------------
    def act(self, firings: Iterable[Firing]) -> None:
        """Carry out firings: each action is tried on its own, a failure logged and counted."""
        for firing in firings:
            self.fired = [*self.fired[-(KEEP_FIRINGS - 1):], firing]
            for action in firing.actions:
                try:
                    getattr(self, "_" + action)(firing)
                except Exception:  # noqa: BLE001 - one action failing must not stop the others
                    self.failed_actions += 1
                    _log.exception("closedloop: the drift action %s for %s failed", action,
                                   firing.task_type)
            try:
                self._record(firing)
            except Exception as exc:  # noqa: BLE001 - the actions stand; the record is lost
                self.failed_actions += 1
                _log.error("closedloop: could not record the drift firing of %s: %s",
                           firing.task_type, exc)
            if self.metrics is not None:
                self.metrics.drift_fired(firing.task_type, firing.signal)

    def _alert(self, firing: Firing) -> None:
        from closedloop.control import Alert

        kind = "budget" if firing.signal.startswith("burn_") else "drift"
        alert = Alert(kind=kind, subject=firing.task_type, summary=firing.reason,
                      severity="critical" if "halt" in firing.actions else "warning",
                      action=(f"look at the recent steps of {firing.task_type} (closedloop "
                              f"trends/failures --task-type {firing.task_type}; trace "
                              f"{firing.evidence.get('last_trace_id')}); doing: "
                              f"{', '.join(firing.actions)}"),
                      evidence={"signal": firing.signal, "model": firing.model,
                                "statistic": round(firing.statistic, 3),
                                "observations": firing.evidence.get("observations"),
                                "last_trace_id": firing.evidence.get("last_trace_id")},
                      at=firing.at)
        for sink in self.sinks:
            try:
                sink.send(alert)
            except Exception:  # noqa: BLE001 - an alert sink must never break a step
                _log.exception("closedloop: alert sink %r failed", sink)

    def _stop_with(self, firing: Firing, kind: str) -> None:
        if self.fault_control is None:
            raise RuntimeError(f"a drift {kind} needs the guard's fault_control")
        policy = self.monitor.policy_for(firing.task_type) or DriftPolicy()
        self.fault_control.stop(firing.task_type, kind, reason=firing.reason,
                                evidence={"signal": firing.signal, "model": firing.model,
                                          **firing.evidence},
                                pause_for=policy.pause_for, by="closedloop drift detection")

    def _pause(self, firing: Firing) -> None:
        self._stop_with(firing, "paused")

    def _halt(self, firing: Firing) -> None:
        self._stop_with(firing, "halted")

    def _demote(self, firing: Firing) -> None:
        if self.levels is None:
            raise RuntimeError("a drift demotion needs the guard's levels (AutonomyLevels)")
        policy = self.monitor.policy_for(firing.task_type) or DriftPolicy()
        self.levels.set(firing.task_type, policy.demote_to, reason=firing.reason,
                        by="closedloop drift detection", kind="demoted",
                        evidence={"signal": firing.signal, **firing.evidence})

    def _record(self, firing: Firing) -> None:
        if self.log is None:
            return
        with self._lock:  # read-modify-write of one record (within this process)
            saved = self.log.detector(FIRINGS_KEY) or {}
            kept = list(saved.get("firings", []))[-(KEEP_FIRINGS - 1):]
            kept.append(redact_value(firing.to_dict()))
            self.log.put_detector(FIRINGS_KEY, {"firings": kept}, at=firing.at)

    # ----- detector states ----------------------------------------------------------------
    def save(self) -> None:
        """Save every task type's detector states now (the background thread does it every
        ``save_every`` seconds)."""
        if self.log is None:
            return
        for task_type in self.monitor.task_types():
            self.log.put_detector(_STATE_KEY + task_type, self.monitor.state_of(task_type),
                                  at=time.time())

    def _save_loop(self) -> None:
        while not self._stop.wait(self.save_every):
            try:
                self.save()
            except Exception as exc:  # noqa: BLE001 - saved again later
                _log.warning("closedloop: could not save the drift detectors: %s", exc)

    def close(self) -> None:
        """Feed what is queued, save the states and stop the background threads."""
        self._stop.set()
        self.flush()
        try:
            self.save()
        except Exception as exc:  # noqa: BLE001 - closing must not raise
            _log.warning("closedloop: could not save the drift detectors: %s", exc)

    def status(self) -> dict[str, Any]:
        """The detectors' states and the firings of this process (what is queued fed
        first)."""
        self.flush()
        return {"detectors": self.monitor.snapshot(),
                "firings": [f.to_dict() for f in reversed(self.fired)],
                "failed_actions": self.failed_actions}


_BACKGROUND: weakref.WeakSet[DriftGuard] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for guard in list(_BACKGROUND):  # the parent's feeder threads did not come along
        guard._feed_lock = threading.Lock()
        if not guard._stop.is_set():
            guard._start_feeder()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


Scorer = Callable[[StepEvent], "float | bool | None"]


class OnlineScorer:
    """Runs ``scorers`` (name → callable of a :class:`~closedloop.StepEvent` returning a
    number, a bool or None for "no score") on the steps recorded in ``store``, on a thread of
    its own: each score is recorded (``source``: ``"rule"``, or ``"model"`` for an LLM judge)
    and fed to ``guard`` (signal ``score:NAME``), whose drift detection acts on it like on the
    rest. Never blocks the agent, never raises into it.

    Two ways to feed it: :meth:`attach` makes it one of the store's event sinks (what
    ``closedloop.configure(scorers=...)`` does): the store's writer thread hands it every
    step it records (redacted), into a bounded queue (``max_queue``; what does not fit is
    dropped and counted); or :meth:`start` / :meth:`run_once` read the steps recorded since
    it was made (``since``) from the store every ``poll`` seconds (any process's steps). A
    step is scored once. A scorer that raises is counted in ``failed`` (per scorer in
    ``failures``), logged, and recorded as a score of that name with label
    ``scorer_failed`` and the error as its comment (``closedloop scores list``).
    """

    name = "online_scorer"

    def __init__(self, store: Store, scorers: Mapping[str, Scorer], *,
                 guard: DriftGuard | None = None, source: str = "rule",
                 task_types: Iterable[str] | None = None, poll: float = 1.0,
                 since: float | None = None, page: int = 200, max_queue: int = 10_000) -> None:
        self.store = store
        self.scorers = dict(scorers)
        self.guard = guard
        self.source = source
        self.task_types = set(task_types) if task_types is not None else None
        self.poll = poll
        self.page = page
        self.max_queue = max_queue
        self._since = time.time() if since is None else since
        self._seen_at_edge: set[str] = set()
        self.scored = self.failed = self.steps = 0
        self.failures: dict[str, int] = {}
        """Failures per scorer name."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: BatchQueue[StepEvent] | None = None

    def _score(self, event: StepEvent) -> None:
        """Run every scorer on one step; record and feed what they return."""
        from closedloop.telemetry import record_score

        if self.task_types is not None and event.task_type not in self.task_types:
            return
        if event.outcome in _UNSCORED or event.agent_id == "closedloop.compensate":
            return
        self.steps += 1
        for name, scorer in self.scorers.items():
            try:
                value = scorer(event)
                if value is None:
                    continue
                number = float(value)
                record_score(event.trace_id, name, number, source=self.source,
                             store=self.store)
            except Exception as exc:  # noqa: BLE001 - a user's scorer failing is recorded
                self._failed(name, event, exc)
                continue
            self.scored += 1
            if self.guard is not None:
                firings = self.guard.monitor.observe_value(
                    event.task_type, event.model, f"score:{name}", number, at=event.ts,
                    trace_id=event.trace_id)
                if firings:
                    self.guard.act(firings)

    def _failed(self, name: str, event: StepEvent, exc: Exception) -> None:
        from closedloop.telemetry import record_score

        self.failed += 1
        n = self.failures[name] = self.failures.get(name, 0) + 1
        if n == 1 or n % 1000 == 0:  # the first, then every thousandth: each is recorded
            _log.warning("closedloop: scorer %s failed on step %s (%d failures so far): "
                         "%s: %s", name, event.step_id, n, type(exc).__name__, exc)
        try:
            record_score(event.trace_id, name, label="scorer_failed", source=self.source,
                         comment=clip(f"{type(exc).__name__}: {exc}", 1000), store=self.store)
        except Exception as again:  # noqa: BLE001 - counted above; the record is lost
            _log.warning("closedloop: could not record the failure of scorer %s: %s", name,
                         again)

    def run_once(self) -> int:
        """Score the steps recorded since the last call; returns how many were read."""
        self.store.flush(5.0)
        found: list[StepEvent] = []
        cursor: str | None = None
        while True:  # newest first, down to the last step already read
            page = self.store.steps(since=self._since, limit=self.page, cursor=cursor)
            found.extend(page.steps)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        found.sort(key=lambda e: e.ts)
        edge = self._since
        new = [e for e in found if not (e.ts == edge and (e.step_id or e.trace_id)
                                        in self._seen_at_edge)]
        for event in new:
            if event.ts > edge:
                edge, self._seen_at_edge = event.ts, set()
            self._seen_at_edge.add(event.step_id or event.trace_id)
            self._score(event)
        self._since = edge
        return len(new)

    # ----- fed by the store's writer (an EventSink) ---------------------------------------
    def attach(self) -> OnlineScorer:
        """Score every step ``store`` records from now on, handed over by its writer thread
        (this scorer becomes one of its event sinks); :meth:`close` detaches it."""
        if self._queue is None:
            self._queue = BatchQueue(self._score_batch, name="online-scorer",
                                     max_queue=self.max_queue, batch_size=256,
                                     flush_interval=0.1)
            self.store.add_sink(self)
        return self

    def _score_batch(self, events: list[StepEvent]) -> None:
        for event in events:
            try:
                self._score(event)
            except Exception:  # noqa: BLE001 - the next steps are still scored
                self.failed += 1
                _log.exception("closedloop: online scoring failed on step %s", event.step_id)

    def submit_many(self, events: Sequence[StepEvent]) -> bool:
        """Queue recorded steps for scoring (the store's writer calls it); False (and counted
        in ``stats().dropped``) when the queue is full."""
        queue = self._queue
        return queue.submit_many(events) if queue is not None else False

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every step handed over so far is scored; False on timeout."""
        queue = self._queue
        return queue.flush(timeout) if queue is not None else True

    def stats(self) -> SinkStats:
        """Steps scored (``written``), waiting, dropped; ``failures``: scorer failures."""
        from closedloop.store import SinkStats

        queue = self._queue
        return SinkStats(written=self.steps, queued=queue.queued if queue is not None else 0,
                         held=0, dropped=queue.dropped if queue is not None else 0,
                         rejected=0, failures=self.failed)

    def close(self, timeout: float | None = 10.0) -> None:
        """Detach from the store, score what was handed over (within ``timeout``), stop."""
        queue = self._queue
        if queue is not None:
            self.store.remove_sink(self)
            queue.flush(timeout, final=True)
            queue.close(timeout)
        self.stop(10.0 if timeout is None else timeout)

    def start(self) -> OnlineScorer:
        """Score in the background until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="closedloop-online-scorer")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - tried again at the next poll
                self.failed += 1
                _log.exception("closedloop: online scoring could not read the store")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (after the pass under way)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
