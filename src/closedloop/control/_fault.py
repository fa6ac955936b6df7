"""Fault control of task types, as a loop guard: pause on validation spikes, halt on bad outcomes.

:class:`FaultControl` watches every recorded step (``observe``) and refuses steps
(``admit``) of a task type that is paused or halted:

- **Pause on a validation-failure spike.** Over a sliding ``window`` of steps' wall-clock
  time, when the share of steps whose validation failed reaches ``spike_factor`` times the
  task type's baseline (and at least ``min_spike_rate``, with at least ``min_samples``
  steps), the task type is paused for ``pause_for`` seconds and an alert is raised. The
  baseline is learned from the steps that leave the window (an exponential average), with
  ``baseline`` as the prior until ``min_samples`` have been seen. Steps that are admitted
  again after the pause start a fresh window.
- **Halt on repeated verification failure.** ``halt_after`` consecutive failed
  verifications (or a failure share of ``halt_rate`` over the window, with at least
  ``min_samples`` verified steps) halt the task type. The halt is written to the
  :class:`~closedloop.control.ControlLedger` (by default the event store's SQLite file), so
  it survives restarts and is seen by every process sharing the ledger, and it is lifted
  only by :meth:`resume` or ``closedloop resume TASK_TYPE --reason ...``.

It fails closed (docs/control.md): a stop this process raised stays in force here even if
it cannot be stored, and is retried in the background until it is; a stop once read stays
in force while the ledger cannot be read; and a task type with no known stop whose state
cannot be read is refused (``admit`` raises :class:`~closedloop.ControlUnavailable`, the
loop records ``control_unavailable``), unless its loop opted into ``fail_open``.

A 429 from a provider is not a validation failure and never pauses a task type: that is
flow control's job (:class:`~closedloop.control.Backpressure`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from closedloop._errors import ConfigError, ControlUnavailable
from closedloop._events import (
    OUTCOME,
    TASK_TYPE,
    VALIDATION_PASSED,
    VERIFICATION_PASSED,
    StepEvent,
)
from closedloop._redact import redact_text
from closedloop.control._alerts import Alert, AlertSink, LogSink
from closedloop.control._ledger import (
    ControlLedger,
    Stop,
    StopKind,
    ledger_for_store,
    redacted,
    stronger,
    who,
)
from closedloop.loop import Admission

_log = logging.getLogger("closedloop.control")
_REFUSED = frozenset({StopKind.PAUSED.value, StopKind.HALTED.value, "control_unavailable"})
_MAX_RETRY_S = 30.0


@dataclass(slots=True)
class _Window:
    """Steps and failures over a sliding window, in one-second buckets.

    O(1) per step and at most ``window`` buckets of memory whatever the step rate (the loop
    calls ``observe`` on every step, so a per-step scan of the window would be quadratic).
    The current second's counts are two integers (``open_steps``, ``open_failures``): a step
    adds to them, and its track closes them into a bucket when a new second starts. A bucket
    leaves the window once all of its second is older than the window.
    """

    buckets: deque[tuple[int, int, int]] = field(default_factory=deque)
    """Closed seconds, oldest first: (second, steps, failures)."""
    closed_steps: int = 0
    closed_failures: int = 0
    open_steps: int = 0
    open_failures: int = 0

    @property
    def steps(self) -> int:
        return self.closed_steps + self.open_steps

    @property
    def failures(self) -> int:
        return self.closed_failures + self.open_failures

    def close(self, second: int) -> None:
        """The open counts, of ``second``, become a bucket."""
        if self.open_steps:
            self.buckets.append((second, self.open_steps, self.open_failures))
            self.closed_steps += self.open_steps
            self.closed_failures += self.open_failures
            self.open_steps = self.open_failures = 0

    def expire(self, edge: float) -> list[tuple[int, int]]:
        """Drop the buckets wholly older than ``edge``; return their (steps, failures)."""
        gone: list[tuple[int, int]] = []
        buckets = self.buckets
        while buckets and buckets[0][0] + 1 <= edge:
            _, steps, failures = buckets.popleft()
            self.closed_steps -= steps
            self.closed_failures -= failures
            gone.append((steps, failures))
        return gone

    @property
    def rate(self) -> float | None:
        steps = self.steps
        return self.failures / steps if steps else None


@dataclass(slots=True)
class _Track:
    """One task type's recent steps."""

    validation: _Window = field(default_factory=_Window)
    verification: _Window = field(default_factory=_Window)
    baseline: float | None = None
    baseline_samples: int = 0
    consecutive_verify_failures: int = 0
    second: int | None = None
    """The second the windows' open counts are of (None: no step yet)."""


class FaultControl:
    """A :class:`~closedloop.loop.StepGuard`: pauses and halts task types, with alerts.

    ``ledger`` (default: :func:`~closedloop.control.ledger_for_store` of the runtime's store)
    holds the stops; it is re-read every ``recheck`` seconds per task type. A stop that
    cannot be stored is retried after ``retry_every`` seconds, doubling up to 30 s.
    """

    def __init__(
        self,
        *,
        ledger: ControlLedger | None = None,
        sinks: Iterable[AlertSink] | None = None,
        window: float = 300.0,
        min_samples: int = 20,
        baseline: float = 0.05,
        spike_factor: float = 3.0,
        min_spike_rate: float = 0.2,
        pause_for: float = 300.0,
        halt_after: int = 5,
        halt_rate: float = 0.5,
        baseline_alpha: float = 0.02,
        recheck: float = 1.0,
        retry_every: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window <= 0 or min_samples < 1 or spike_factor <= 1 or pause_for <= 0 or (
            halt_after < 1 or not 0 < halt_rate <= 1 or not 0 <= baseline < 1
        ):
            raise ConfigError("invalid FaultControl settings: need window > 0, min_samples ≥ 1, "
                              "spike_factor > 1, pause_for > 0, halt_after ≥ 1, "
                              "0 < halt_rate ≤ 1, 0 ≤ baseline < 1")
        if ledger is None:
            from closedloop._runtime import current_runtime

            rt = current_runtime()
            ledger = ledger_for_store(rt.store, redis_url=rt.redis_url)
        self.ledger = ledger
        self.sinks = list(sinks) if sinks is not None else [LogSink()]
        self.window = window
        self.min_samples = min_samples
        self.prior = baseline
        self.spike_factor = spike_factor
        self.min_spike_rate = min_spike_rate
        self.pause_for = pause_for
        self.halt_after = halt_after
        self.halt_rate = halt_rate
        self.alpha = baseline_alpha
        self.recheck = recheck
        self.retry_every = retry_every
        self.clock = clock
        self._tracks: dict[str, _Track] = {}
        self._cache: dict[str, tuple[float, Stop | ControlUnavailable | None]] = {}
        self._known: dict[str, Stop] = {}  # the last stop read or raised, per task type
        self._pending: dict[str, Stop] = {}  # stops raised here and not stored yet
        self._retrier: threading.Thread | None = None
        self._lock = threading.Lock()
        self.refused_unreadable = 0
        """Admissions this guard could not decide (the ledger unreadable, no known stop)."""
        self.unsaved = 0
        """Attempts to store a stop that failed (each is retried until stored)."""

    # ----- the guard ----------------------------------------------------------------------
    def admit(self, task_type: str) -> Admission | None:
        """Refuse a paused or halted task type (the ledger is re-read every ``recheck`` s).

        Raises :class:`~closedloop.ControlUnavailable` when the ledger cannot be read and no
        stop is known for ``task_type``: the loop then refuses the step (fail closed).
        """
        stop = self._stop(task_type)
        if stop is None:
            return None
        if stop.kind is StopKind.HALTED:
            return Admission.halted(
                f"{task_type} halted by {stop.by}: {stop.reason}; lift with "
                f"`closedloop resume {task_type} --reason ...`")
        left = (stop.until or 0.0) - self.clock()
        return Admission.paused(f"{task_type} paused for another {left:.0f}s: {stop.reason}")

    def admits_now(self, task_type: str) -> bool:
        """True when :meth:`admit` would admit ``task_type`` from memory alone: the ledger,
        read less than ``recheck`` s ago, held no stop for it and none was raised here
        since. The loop then admits the step without asking (no action yielded, no I/O);
        False: it asks :meth:`admit`, which re-reads the ledger and refuses when it must."""
        if self._pending:
            return False
        cached = self._cache.get(task_type)
        return (cached is not None and cached[1] is None
                and self.clock() - cached[0] < self.recheck)

    def _stop(self, task_type: str) -> Stop | None:
        now = self.clock()
        if self._pending:  # raised here, not stored yet: in force whatever the ledger says
            pending = self._pending.get(task_type)
            if pending is not None and pending.active(now):
                return pending
        cached = self._cache.get(task_type)
        if cached is not None and now - cached[0] < self.recheck:
            found = cached[1]
        else:
            found = self._read(task_type, now)
        if isinstance(found, ControlUnavailable):
            known = self._known.get(task_type)
            if known is not None and known.active(now):
                return known  # a stop once seen stays in force while the ledger is unreadable
            self.refused_unreadable += 1
            raise ControlUnavailable(str(found))
        return found if found is not None and found.active(now) else None

    def _read(self, task_type: str, now: float) -> Stop | ControlUnavailable | None:
        found: Stop | ControlUnavailable | None
        try:
            found = self.ledger.get(task_type)
        except Exception as exc:  # noqa: BLE001 - any failure to read is "cannot decide"
            found = exc if isinstance(exc, ControlUnavailable) else ControlUnavailable(
                f"cannot read the pause/halt state of {task_type}: {type(exc).__name__}: {exc}")
        else:
            if found is None:
                self._known.pop(task_type, None)
            else:
                self._known[task_type] = found
        self._cache[task_type] = (now, found)
        return found

    def observe(self, event: StepEvent) -> None:
        """Learn from one step; pause or halt its task type when a threshold is crossed."""
        # Runs on the agent's path for every step: a success adds one to a count or two.
        # Failure shares only rise on a failure, so thresholds are checked then, and the
        # windows move on (and expire) once per second.
        if event[OUTCOME] in _REFUSED:  # by position: a field's name is a slower lookup
            return
        now = self.clock()
        task_type = event[TASK_TYPE]
        lock = self._lock
        lock.acquire()  # not `with`: its two bound methods cost as much as the rest
        try:
            track = self._tracks.get(task_type)
            if track is None:
                track = self._tracks[task_type] = _Track()
            if int(now) != track.second:
                self._roll(track, now)
            stop: Stop | None = None
            passed = event[VALIDATION_PASSED]
            if passed is not None:
                window = track.validation
                window.open_steps += 1
                if not passed:
                    window.open_failures += 1
                    stop = self._check_spike(task_type, track, now)
            passed = event[VERIFICATION_PASSED]
            if passed is not None and stop is None:
                window = track.verification
                window.open_steps += 1
                if passed:
                    track.consecutive_verify_failures = 0
                else:
                    window.open_failures += 1
                    track.consecutive_verify_failures += 1
                    stop = self._check_halt(task_type, track, now, event)
            if stop is not None:
                self._tracks[task_type] = _Track(baseline=track.baseline,
                                                 baseline_samples=track.baseline_samples)
        finally:
            lock.release()
        if stop is not None:
            self._trip(stop)

    # ----- decisions ----------------------------------------------------------------------
    def _roll(self, track: _Track, now: float) -> None:
        """Close the windows' counts of a second that is over, and expire what has left the
        window, learning the baseline from the validation buckets that leave it."""
        second = int(now)
        if second != track.second:
            if track.second is not None:
                track.validation.close(track.second)
                track.verification.close(track.second)
            track.second = second
        edge = now - self.window
        for steps, failures in track.validation.expire(edge):
            # the exponential average over a bucket's steps, as if fed one step at a time
            share = failures / steps
            if track.baseline is None:
                track.baseline = share
            else:
                weight = 1.0 - (1.0 - self.alpha) ** steps
                track.baseline += weight * (share - track.baseline)
            track.baseline_samples += steps
        track.verification.expire(edge)

    def baseline_of(self, task_type: str) -> float:
        """The validation-failure share considered normal for ``task_type``."""
        track = self._tracks.get(task_type)
        if track is None or track.baseline is None or track.baseline_samples < self.min_samples:
            return self.prior
        return track.baseline

    def _check_spike(self, task_type: str, track: _Track, now: float) -> Stop | None:
        samples = track.validation.steps
        if samples < self.min_samples:
            return None
        failures = track.validation.failures
        rate = failures / samples
        base = self.baseline_of(task_type)
        threshold = max(self.min_spike_rate, self.spike_factor * base)
        if rate < threshold:
            return None
        return Stop(
            task_type=task_type, kind=StopKind.PAUSED, at=now, until=now + self.pause_for,
            by=f"FaultControl validation-spike on {who()}",
            reason=(f"validation failures at {rate:.0%} over the last {self.window:.0f}s "
                    f"(baseline {base:.0%}, threshold {threshold:.0%})"),
            evidence={"failure_rate": round(rate, 4), "failures": failures, "samples": samples,
                      "window_s": self.window, "baseline": round(base, 4),
                      "threshold": round(threshold, 4), "pause_s": self.pause_for},
        )

    def _check_halt(self, task_type: str, track: _Track, now: float,
                    event: StepEvent) -> Stop | None:
        samples = track.verification.steps
        failures = track.verification.failures
        rate = failures / samples if samples else 0.0
        streak = track.consecutive_verify_failures
        if streak < self.halt_after and (samples < self.min_samples or rate < self.halt_rate):
            return None
        why = (f"{streak} verifications failed in a row" if streak >= self.halt_after else
               f"verification failed in {rate:.0%} of {samples} steps over {self.window:.0f}s")
        return Stop(
            task_type=task_type, kind=StopKind.HALTED, at=now, until=None,
            by=f"FaultControl verification on {who()}",
            reason=f"{why}; last: {event.error_message or 'no message'}",
            evidence={"consecutive_failures": streak, "failure_rate": round(rate, 4),
                      "failures": failures, "samples": samples, "window_s": self.window,
                      "halt_after": self.halt_after, "halt_rate": self.halt_rate,
                      "last_trace_id": event.trace_id},
        )

    def _trip(self, stop: Stop) -> None:
        try:
            stop = redacted(stop)
        except Exception as exc:  # noqa: BLE001 - the stop must hold; its text must not leak
            stop = replace(stop, evidence={}, reason=(
                f"reason withheld: the redactor could not run ({type(exc).__name__})"))
        with self._lock:
            self._pending[stop.task_type] = stronger(
                self._pending.get(stop.task_type), stop, stop.at) or stop
            self._known[stop.task_type] = stop
            self._cache[stop.task_type] = (self.clock(), stop)
        self.flush_pending()
        if stop.kind is StopKind.HALTED:
            action = (f"investigate the failing outcomes (closedloop report, trace "
                      f"{stop.evidence.get('last_trace_id')}), then run `closedloop resume "
                      f"{stop.task_type} --reason ...`")
        else:
            action = (f"check recent validation failures of {stop.task_type} (closedloop "
                      f"report); it resumes by itself after "
                      f"{(stop.until or stop.at) - stop.at:.0f}s")
        self._alert(Alert(kind=stop.kind.value, subject=stop.task_type, summary=stop.reason,
                          action=action, evidence=stop.evidence, at=stop.at,
                          severity="critical" if stop.kind is StopKind.HALTED else "warning"))

    def stop(self, task_type: str, kind: str, *, reason: str, by: str,
             evidence: dict[str, Any] | None = None, pause_for: float | None = None) -> Stop:
        """Pause (for ``pause_for`` s, default this guard's) or halt ``task_type`` now, as if
        one of this guard's own thresholds had tripped: stored in the ledger (in force here
        until it is), alerted. Other detectors (drift, budgets) act through this."""
        stop_kind = StopKind(kind)
        if stop_kind not in (StopKind.PAUSED, StopKind.HALTED):
            raise ConfigError(f"kind must be 'paused' or 'halted', got {kind!r}")
        now = self.clock()
        found = Stop(task_type=task_type, kind=stop_kind, at=now,
                     until=None if stop_kind is StopKind.HALTED else now + (
                         pause_for if pause_for is not None else self.pause_for),
                     by=f"{by} on {who()}", reason=reason, evidence=dict(evidence or {}))
        with self._lock:
            track = self._tracks.get(task_type)
            if track is not None:
                self._tracks[task_type] = _Track(baseline=track.baseline,
                                                 baseline_samples=track.baseline_samples)
        self._trip(found)
        return found

    # ----- stops that could not be stored -------------------------------------------------
    def flush_pending(self) -> bool:
        """Try to store every stop raised here and not stored yet; True when none is left.

        A stop that still cannot be stored stays in force in this process, and a background
        thread keeps retrying (every ``retry_every`` s, doubling up to 30 s) until it is.
        """
        left = self._store_pending(log=True)
        with self._lock:
            if left and (self._retrier is None or not self._retrier.is_alive()):
                self._retrier = threading.Thread(target=self._retry, daemon=True,
                                                 name="closedloop-fault-retry")
                self._retrier.start()
        return not left

    def _store_pending(self, *, log: bool) -> bool:
        """One attempt per pending stop (expired pauses are dropped); True if any is left."""
        with self._lock:
            pending = list(self._pending.values())
        for stop in pending:
            if stop.active(self.clock()):
                try:
                    self.ledger.put(stop)
                except Exception as exc:  # noqa: BLE001 - kept in force here and retried
                    self.unsaved += 1
                    if log:
                        _log.error("closedloop: could not store the %s of %s (%s); it stays "
                                   "in force in this process and is retried until stored",
                                   stop.kind.value, stop.task_type, exc)
                    continue
            with self._lock:
                if self._pending.get(stop.task_type) is stop:
                    del self._pending[stop.task_type]
        with self._lock:
            return bool(self._pending)

    def _retry(self) -> None:
        delay = self.retry_every
        while True:
            time.sleep(delay)
            if not self._store_pending(log=False):
                _log.warning("closedloop: the stops that could not be stored are stored now")
                with self._lock:
                    if not self._pending:
                        self._retrier = None
                        return
            delay = min(_MAX_RETRY_S, delay * 2)

    def _alert(self, alert: Alert) -> None:
        for sink in self.sinks:
            try:
                sink.send(alert)
            except Exception:  # noqa: BLE001 - an alert sink must never break a step
                _log.exception("closedloop: alert sink %r failed", sink)

    # ----- the human side -----------------------------------------------------------------
    def resume(self, task_type: str, *, reason: str, by: str | None = None) -> Stop | None:
        """Lift a halt or pause (the API twin of ``closedloop resume``); returns what it was."""
        stop = resume(self.ledger, task_type, reason=reason, by=by)
        with self._lock:
            unsaved = self._pending.pop(task_type, None)
            self._known.pop(task_type, None)
            self._cache.pop(task_type, None)
            self._tracks.pop(task_type, None)
        stop = stop or unsaved
        if stop is not None:
            self._alert(Alert(kind="resumed", subject=task_type, summary=reason,
                              action="none; steps run again", at=self.clock(),
                              evidence={"was": stop.kind.value, "by": by or who()}))
        return stop

    def status(self) -> dict[str, Any]:
        """Stops in force, stops not stored yet, and per task type the window's shares.

        ``ledger`` says where stops live; ``stops`` is what it holds (``ledger_error`` says
        why it could not be read, ``degraded`` that its Redis cache is unreachable);
        ``unsaved`` the stops in force here that are still being retried; ``refused_unreadable``
        and ``unsaved_attempts`` count admissions refused for an unreadable ledger and
        failed attempts to store a stop.
        """
        now = self.clock()
        out: dict[str, Any] = {"ledger": repr(self.ledger), "stops": [], "unsaved": [],
                               "task_types": {}, "refused_unreadable": self.refused_unreadable,
                               "unsaved_attempts": self.unsaved}
        if getattr(self.ledger, "degraded_since", None) is not None:
            out["degraded"] = "Redis unreachable: the store and stops already seen are in force"
        try:
            out["stops"] = [s.to_dict() for s in self.ledger.stops()]
        except Exception as exc:  # noqa: BLE001 - status must show the failure, not raise it
            out["ledger_error"] = str(exc)
        with self._lock:
            out["unsaved"] = [s.to_dict() for s in self._pending.values() if s.active(now)]
            for name, track in sorted(self._tracks.items()):
                self._roll(track, now)
                out["task_types"][name] = {
                    "validation_failure_rate": track.validation.rate,
                    "validation_samples": track.validation.steps,
                    "baseline": self.baseline_of(name),
                    "verification_failure_rate": track.verification.rate,
                    "verification_samples": track.verification.steps,
                    "consecutive_verification_failures": track.consecutive_verify_failures,
                }
        return out


def resume(ledger: ControlLedger, task_type: str, *, reason: str,
           by: str | None = None) -> Stop | None:
    """Lift ``task_type``'s halt or pause in ``ledger``; a reason is required."""
    if not reason or not reason.strip():
        raise ConfigError("a reason is required to resume a task type (--reason TEXT)")
    return ledger.lift(task_type, reason=redact_text(reason.strip()), by=by or who())


def default_fault_control() -> FaultControl:
    """The current runtime's guard (see :mod:`closedloop._runtime`): its ledger is the
    runtime's store's (:func:`~closedloop.control.ledger_for_store`), alerts go to the log."""
    from closedloop._runtime import current_runtime

    return current_runtime().fault_control


def reset_default_fault_control() -> None:
    """Close the process runtime and start afresh: the same as :func:`closedloop.reset`."""
    from closedloop._runtime import reset

    reset()
