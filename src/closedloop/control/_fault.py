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

A 429 from a provider is not a validation failure and never pauses a task type: that is
flow control's job (:class:`~closedloop.control.Backpressure`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from closedloop._errors import ConfigError
from closedloop._events import StepEvent
from closedloop.control._alerts import Alert, AlertSink, LogSink
from closedloop.control._ledger import ControlLedger, Stop, StopKind, ledger_for_store, who
from closedloop.loop._guard import Admission

_log = logging.getLogger("closedloop.control")
_REFUSED = frozenset({StopKind.PAUSED.value, StopKind.HALTED.value})


@dataclass(slots=True)
class _Window:
    """Steps and failures over a sliding window, in one-second buckets.

    O(1) per step and at most ``window`` buckets of memory whatever the step rate (the loop
    calls ``observe`` on every step, so a per-step scan of the window would be quadratic).
    A bucket leaves the window once all of its second is older than the window.
    """

    buckets: deque[list[int]] = field(default_factory=deque)  # [second, steps, failures]
    steps: int = 0
    failures: int = 0

    def add(self, now: float, failed: bool) -> None:
        second = int(now)
        buckets = self.buckets
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
            bucket[1] += 1
            bucket[2] += failed
        else:
            buckets.append([second, 1, int(failed)])
        self.steps += 1
        self.failures += failed

    def expire(self, edge: float) -> list[tuple[int, int]]:
        """Drop the buckets wholly older than ``edge``; return their (steps, failures)."""
        gone: list[tuple[int, int]] = []
        buckets = self.buckets
        while buckets and buckets[0][0] + 1 <= edge:
            _, steps, failures = buckets.popleft()
            self.steps -= steps
            self.failures -= failures
            gone.append((steps, failures))
        return gone

    @property
    def rate(self) -> float | None:
        return self.failures / self.steps if self.steps else None


@dataclass(slots=True)
class _Track:
    """One task type's recent steps."""

    validation: _Window = field(default_factory=_Window)
    verification: _Window = field(default_factory=_Window)
    baseline: float | None = None
    baseline_samples: int = 0
    consecutive_verify_failures: int = 0
    expired_at: float = float("-inf")


class FaultControl:
    """A :class:`~closedloop.loop.StepGuard`: pauses and halts task types, with alerts."""

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
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window <= 0 or min_samples < 1 or spike_factor <= 1 or pause_for <= 0 or (
            halt_after < 1 or not 0 < halt_rate <= 1 or not 0 <= baseline < 1
        ):
            raise ConfigError("invalid FaultControl settings: need window > 0, min_samples ≥ 1, "
                              "spike_factor > 1, pause_for > 0, halt_after ≥ 1, "
                              "0 < halt_rate ≤ 1, 0 ≤ baseline < 1")
        if ledger is None:
            from closedloop.store import default_store

            ledger = ledger_for_store(default_store())
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
        self.clock = clock
        self._tracks: dict[str, _Track] = {}
        self._cache: dict[str, tuple[float, Stop | None]] = {}
        self._lock = threading.Lock()

    # ----- the guard ----------------------------------------------------------------------
    def admit(self, task_type: str) -> Admission | None:
        """Refuse a paused or halted task type (the ledger is re-read every ``recheck`` s)."""
        stop = self._stop(task_type)
        if stop is None:
            return None
        if stop.kind is StopKind.HALTED:
            return Admission.halted(
                f"{task_type} halted by {stop.by}: {stop.reason}; lift with "
                f"`closedloop resume {task_type} --reason ...`")
        left = (stop.until or 0.0) - self.clock()
        return Admission.paused(f"{task_type} paused for another {left:.0f}s: {stop.reason}")

    def _stop(self, task_type: str) -> Stop | None:
        now = self.clock()
        cached = self._cache.get(task_type)
        if cached is not None and now - cached[0] < self.recheck:
            stop = cached[1]
        else:
            stop = self.ledger.get(task_type)
            self._cache[task_type] = (now, stop)
        return stop if stop is not None and stop.active(now) else None

    def observe(self, event: StepEvent) -> None:
        """Learn from one step; pause or halt its task type when a threshold is crossed."""
        # Runs on the agent's path for every step: the success path is kept to a few
        # attribute updates. Failure shares only rise on a failure, so thresholds are checked
        # then, and the window is expired at most once per second.
        if event.outcome in _REFUSED:
            return
        now = self.clock()
        with self._lock:
            track = self._tracks.get(event.task_type)
            if track is None:
                track = self._tracks[event.task_type] = _Track()
            if now - track.expired_at >= 1.0:
                track.expired_at = now
                self._expire(track, now)
            stop: Stop | None = None
            if event.validation_passed is not None:
                failed = not event.validation_passed
                track.validation.add(now, failed)
                if failed:
                    stop = self._check_spike(event.task_type, track, now)
            if event.verification_passed is not None and stop is None:
                failed = not event.verification_passed
                track.verification.add(now, failed)
                if failed:
                    track.consecutive_verify_failures += 1
                    stop = self._check_halt(event.task_type, track, now, event)
                else:
                    track.consecutive_verify_failures = 0
            if stop is not None:
                self._tracks[event.task_type] = _Track(baseline=track.baseline,
                                                       baseline_samples=track.baseline_samples)
        if stop is not None:
            self._trip(stop)

    # ----- decisions ----------------------------------------------------------------------
    def _expire(self, track: _Track, now: float) -> None:
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
            self.ledger.put(stop)
        except Exception:  # noqa: BLE001 - still refuse locally and alert, even if unsaved
            _log.exception("closedloop: could not persist %s of %s", stop.kind, stop.task_type)
        self._cache[stop.task_type] = (self.clock(), stop)
        if stop.kind is StopKind.HALTED:
            action = (f"investigate the failing outcomes (closedloop report, trace "
                      f"{stop.evidence.get('last_trace_id')}), then run `closedloop resume "
                      f"{stop.task_type} --reason ...`")
        else:
            action = (f"check recent validation failures of {stop.task_type} (closedloop "
                      f"report); it resumes by itself after {self.pause_for:.0f}s")
        self._alert(Alert(kind=stop.kind.value, subject=stop.task_type, summary=stop.reason,
                          action=action, evidence=stop.evidence, at=stop.at,
                          severity="critical" if stop.kind is StopKind.HALTED else "warning"))

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
        self._cache.pop(task_type, None)
        with self._lock:
            self._tracks.pop(task_type, None)
        if stop is not None:
            self._alert(Alert(kind="resumed", subject=task_type, summary=reason,
                              action="none; steps run again", at=self.clock(),
                              evidence={"was": stop.kind.value, "by": by or who()}))
        return stop

    def status(self) -> dict[str, Any]:
        """Stops in force and, per watched task type, the current window's shares."""
        now = self.clock()
        out: dict[str, Any] = {"stops": [s.to_dict() for s in self.ledger.stops()],
                               "task_types": {}}
        with self._lock:
            for name, track in sorted(self._tracks.items()):
                self._expire(track, now)
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
    return ledger.lift(task_type, reason=reason.strip(), by=by or who())


_default: FaultControl | None = None
_default_lock = threading.Lock()


def default_fault_control() -> FaultControl:
    """The process-wide guard (ledger in the default store's file, alerts to the log)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = FaultControl()
        return _default


def reset_default_fault_control() -> None:
    """Forget the process-wide guard; the next :func:`default_fault_control` builds it anew."""
    global _default
    with _default_lock:
        _default = None
