"""Drift and degradation detection, and budgets as control signals: decision logic, written once.

:class:`DriftMonitor` turns observations into detector states and typed :class:`Firing`\\ s;
it does no I/O and reads no clock (an event's own ``ts`` is its time), so the same events give
the same firings in every process. The drivers (:class:`closedloop.learn.DriftGuard` on the
agent's path, :class:`closedloop.learn.OnlineScorer` in the background) feed it and carry out
what a firing asks for: alert, pause, demote autonomy, halt.

Signals, per task type and (``by_model``) per model of the event:

- ``verification``: a failed verification, Bernoulli CUSUM (``verified_pass_rate``: the pass
  rate in control and the one to detect, e.g. ``(0.98, 0.90)``).
- ``reask``: a step that took more than one attempt (``reask_rate``: in control, to detect).
- ``latency``: a step slower than the task type's learned 95th percentile: the first
  ``learn_steps`` steps learn the percentile, then a Bernoulli CUSUM watches the share of
  steps above it (``exceedance``: in control 5 %, detect 20 %). Non-parametric: latency is
  skewed, and an exceedance rate has the exact run length of the Bernoulli chart.
- ``cost_per_success``: the cost of the steps since the last success (the failures before it
  included), at each success, watched the same way as latency.
- ``score:NAME``: a semantic score fed by :class:`OnlineScorer` (or the user); its mean and
  standard deviation are learned from the first ``learn_steps`` values, then a one-sided
  :class:`~closedloop.learn.GaussianCusum` watches for a fall of ``score_shift`` deviations.
- ``burn_usd`` / ``burn_tokens``: USD or tokens spent by a task type over the last 60
  seconds of event time above ``budget_usd_per_min`` / ``budget_tokens_per_min``.

Every CUSUM is built by ``for_arl(..., arl0=false_alarm_steps)``: false alarms at most about
one per ``false_alarm_steps`` observations of a signal in control. After a firing the
detector starts again from zero and that signal cannot fire again for ``rearm_steps``
observations (burn: for 60 s), so one drift raises one firing, not a storm.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from closedloop._errors import ConfigError
from closedloop._events import StepEvent
from closedloop.learn._detect import BernoulliCusum, CusumState, GaussianCusum

__all__ = ["ACTIONS", "SIGNALS", "DriftMonitor", "DriftPolicy", "Firing"]

ACTIONS = ("alert", "pause", "demote", "halt")
SIGNALS = ("verification", "reask", "latency", "cost_per_success", "score", "burn_usd",
           "burn_tokens")
_REFUSED = frozenset({"paused", "halted", "control_unavailable", "budget_exceeded"})
_BURN_WINDOW = 60
_NONE: list[Any] = []


def _pair(value: Any, what: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        ok, bad = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a pair (in control, to detect), got {value!r}"
                          ) from None
    return ok, bad


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftPolicy:
    """What to watch for one task type, and what to do when it drifts.

    ``actions`` apply to every signal unless ``signal_actions`` names its own (key: a signal
    name, or ``"score"`` for every score); ``budget_actions`` to the burn-rate signals.
    ``None`` for a signal's pair turns it off.
    """

    verified_pass_rate: tuple[float, float] | None = (0.98, 0.90)
    reask_rate: tuple[float, float] | None = (0.05, 0.20)
    exceedance: tuple[float, float] | None = (0.05, 0.20)
    """Latency and cost per success: share of observations above the learned percentile
    (in control, to detect); the percentile is ``1 - exceedance[0]`` (the p95)."""
    score_shift: float = 1.0
    learn_steps: int = 500
    false_alarm_steps: float = 1_000_000.0
    actions: tuple[str, ...] = ("alert",)
    signal_actions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rearm_steps: int = 100
    pause_for: float = 300.0
    demote_to: str = "approve"
    budget_usd_per_min: float | None = None
    budget_tokens_per_min: float | None = None
    budget_actions: tuple[str, ...] = ("pause", "alert")
    by_model: bool = True

    def __post_init__(self) -> None:
        for name in ("verified_pass_rate", "reask_rate", "exceedance"):
            pair = _pair(getattr(self, name), name)
            object.__setattr__(self, name, pair)
        if self.verified_pass_rate is not None:
            ok, bad = self.verified_pass_rate
            if not 0 < bad < ok < 1:
                raise ConfigError(f"verified_pass_rate needs 0 < detect < in control < 1, "
                                  f"got {self.verified_pass_rate}")
        for name in ("reask_rate", "exceedance"):
            pair = getattr(self, name)
            if pair is not None and not 0 < pair[0] < pair[1] < 1:
                raise ConfigError(f"{name} needs 0 < in control < detect < 1, got {pair}")
        for acts in (self.actions, self.budget_actions, *self.signal_actions.values()):
            given: object = acts  # a user may pass one string where a tuple is meant
            if isinstance(given, str) or any(a not in ACTIONS for a in acts):
                raise ConfigError(f"actions must be a tuple of {', '.join(ACTIONS)}; got "
                                  f"{acts!r}")
        if not (isinstance(self.learn_steps, int) and self.learn_steps >= 20):
            raise ConfigError("learn_steps must be an integer ≥ 20")
        if not (isinstance(self.rearm_steps, int) and self.rearm_steps >= 0):
            raise ConfigError("rearm_steps must be an integer ≥ 0")
        if not (math.isfinite(self.false_alarm_steps) and self.false_alarm_steps >= 100):
            raise ConfigError("false_alarm_steps must be ≥ 100")
        if not (self.score_shift > 0 and self.pause_for > 0):
            raise ConfigError("score_shift and pause_for must be > 0")
        for name in ("budget_usd_per_min", "budget_tokens_per_min"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and v > 0):
                raise ConfigError(f"{name} must be > 0 or None, got {v!r}")

    def actions_for(self, signal: str) -> tuple[str, ...]:
        """The actions a firing of ``signal`` takes."""
        if signal.startswith("burn_"):
            return self.budget_actions
        found = self.signal_actions.get(signal)
        if found is None and signal.startswith("score:"):
            found = self.signal_actions.get("score")
        return self.actions if found is None else found

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["signal_actions"] = dict(self.signal_actions)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Firing:
    """One detection: which signal of which task type (and model) drifted, what to do, and
    the evidence (the detector, its baseline, observations, the last step)."""

    task_type: str
    model: str | None
    signal: str
    actions: tuple[str, ...]
    at: float
    statistic: float
    reason: str
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["actions"] = list(self.actions)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Firing:
        """The firing saved by :meth:`to_dict`."""
        if not isinstance(data, dict):
            raise ConfigError("not a saved firing")
        try:
            return cls(task_type=str(data["task_type"]), model=data.get("model"),
                       signal=str(data["signal"]), actions=tuple(data["actions"]),
                       at=float(data["at"]), statistic=float(data["statistic"]),
                       reason=str(data["reason"]), evidence=dict(data["evidence"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a saved firing: {exc}") from None


class _Signal:
    """One signal of one (task type, model): learning, then watching with a detector."""

    __slots__ = ("cooldown", "detector", "fired", "kind", "learn", "model", "observed",
                 "signal", "state", "task", "threshold")

    def __init__(self, kind: str, task: str, model: str, signal: str,
                 detector: Any = None) -> None:
        self.task, self.model, self.signal = task, model, signal
        self.kind = kind  # "bernoulli", "exceed" (learned threshold), "gauss" (learned mean)
        self.detector = detector
        self.state: CusumState = CusumState()
        self.learn: list[float] | None = [] if detector is None else None
        self.threshold: float | None = None
        self.cooldown = 0
        self.fired = 0
        self.observed = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "detector": None if self.detector is None
                else self.detector.to_dict(), "state": self.state.to_dict(),
                "learn": self.learn, "threshold": self.threshold, "cooldown": self.cooldown,
                "fired": self.fired, "observed": self.observed}

    @classmethod
    def from_dict(cls, data: dict[str, Any], task: str, model: str, signal: str) -> _Signal:
        det = data.get("detector")
        detector = (None if det is None else BernoulliCusum.from_dict(det)
                    if det.get("kind") == "bernoulli_cusum" else GaussianCusum.from_dict(det))
        out = cls(str(data["kind"]), task, model, signal, detector)
        out.state = CusumState.from_dict(data["state"])
        learn = data.get("learn")
        out.learn = None if learn is None else [float(v) for v in learn]
        thr = data.get("threshold")
        out.threshold = None if thr is None else float(thr)
        out.cooldown, out.fired = int(data["cooldown"]), int(data["fired"])
        out.observed = int(data["observed"])
        return out


@dataclass(slots=True, kw_only=True)
class _Slot:
    """The step signals of one (task type, model)."""

    verification: _Signal | None
    reask: _Signal | None
    latency: _Signal | None
    cost: _Signal | None
    burn: bool
    pending_cost: float = 0.0


@dataclass(slots=True)
class _Burn:
    buckets: deque[tuple[int, float, float]] = field(default_factory=deque)
    usd: float = 0.0
    tokens: float = 0.0
    quiet_until: float = 0.0


class DriftMonitor:
    """Detector states per (task type, model, signal) and the firings they raise.

    ``policy`` applies to every task type without its own in ``policies``; a task type
    whose policy is ``None`` (``policy=None`` and not in ``policies``) is not watched.
    Thread-safe (the agent's thread and a scorer's may feed it at once).
    """

    def __init__(self, policy: DriftPolicy | None = None, *,
                 policies: Mapping[str, DriftPolicy | None] | None = None) -> None:
        self.policy = policy
        self.policies = dict(policies or {})
        self._signals: dict[tuple[str, str, str], _Signal] = {}
        self._slots: dict[str, dict[str, _Slot]] = {}
        self._burn: dict[str, _Burn] = {}
        self._lock = threading.Lock()
        self.firings = 0

    def policy_for(self, task_type: str) -> DriftPolicy | None:
        """The policy of ``task_type`` (None: not watched)."""
        return self.policies.get(task_type, self.policy)

    # ----- observations -------------------------------------------------------------------
    def observe(self, event: StepEvent, *, signals: bool = True,
                burn: bool = True) -> list[Firing]:
        """One recorded step: its signals, and the firings they raise (mostly none).

        ``signals=False`` updates only the budget burn, ``burn=False`` only the detectors
        (:class:`~closedloop.learn.DriftGuard` in the background keeps budgets on the
        agent's path, so a budget still pauses at the step that overspends)."""
        # on the agent's path for every step: one slot per (task type, model) holds its
        # signals, so a step costs two dict reads and a detector update per signal
        if event.outcome in _REFUSED:
            return []
        task = event.task_type
        policy = self.policies.get(task, self.policy)
        if policy is None:
            return []
        model = (event.model or "") if policy.by_model else ""
        models = self._slots.get(task)
        slot = models.get(model) if models is not None else None
        if slot is None:
            slot = self._slot(policy, task, model)
        out: list[Firing] = []
        step = self._step
        with self._lock:
            sig = slot.verification if signals else None
            if sig is not None and event.verification_passed is not None:
                step(out, policy, sig, float(not event.verification_passed), event)
            sig = slot.reask if signals else None
            if sig is not None:
                step(out, policy, sig, float(event.attempts > 1), event)
            sig = slot.latency if signals else None
            if sig is not None:
                step(out, policy, sig, event.latency_ms, event)
                cost = event.cost_usd
                if cost is not None:
                    spent = slot.pending_cost + cost
                    if event.outcome == "succeeded":
                        slot.pending_cost = 0.0
                        assert slot.cost is not None
                        step(out, policy, slot.cost, spent, event)
                    else:
                        slot.pending_cost = spent
            if burn and slot.burn:
                self._burn_step(out, policy, event)
        if out:
            self.firings += len(out)
        return out

    def _slot(self, policy: DriftPolicy, task: str, model: str) -> _Slot:
        def get(signal: str, on: object) -> _Signal | None:
            if on is None:
                return None
            key = (task, model, signal)
            found = self._signals.get(key)
            if found is None:
                found = self._signals[key] = self._new(policy, signal, task, model)
            return found

        with self._lock:
            slot = _Slot(
                verification=get("verification", policy.verified_pass_rate),
                reask=get("reask", policy.reask_rate),
                latency=get("latency", policy.exceedance),
                cost=get("cost_per_success", policy.exceedance),
                burn=policy.budget_usd_per_min is not None
                or policy.budget_tokens_per_min is not None)
            self._slots.setdefault(task, {})[model] = slot
        return slot

    def observe_value(self, task_type: str, model: str | None, signal: str, value: float,
                      *, at: float, trace_id: str | None = None) -> list[Firing]:
        """One value of a continuous signal (``score:NAME``) at event time ``at``."""
        policy = self.policies.get(task_type, self.policy)
        if policy is None or not math.isfinite(value):
            return []
        out: list[Firing] = []
        model = (model or "") if policy.by_model else ""
        with self._lock:
            key = (task_type, model, signal)
            sig = self._signals.get(key)
            if sig is None:
                sig = self._signals[key] = self._new(policy, signal, task_type, model)
            self._step(out, policy, sig, float(value), None, at=at, trace_id=trace_id)
        self.firings += len(out)
        return out

    # ----- the detectors ------------------------------------------------------------------
    def _new(self, policy: DriftPolicy, signal: str, task: str, model: str) -> _Signal:
        arl0 = policy.false_alarm_steps
        if signal == "verification":
            ok, bad = policy.verified_pass_rate or (0.98, 0.90)
            return _Signal("bernoulli", task, model, signal, BernoulliCusum.for_arl(
                round(1 - ok, 12), round(1 - bad, 12), arl0=arl0))
        if signal == "reask":
            p0, p1 = policy.reask_rate or (0.05, 0.2)
            return _Signal("bernoulli", task, model, signal,
                           BernoulliCusum.for_arl(p0, p1, arl0=arl0))
        if signal.startswith("score"):
            return _Signal("gauss", task, model, signal)
        return _Signal("exceed", task, model, signal)

    def _step(self, out: list[Firing], policy: DriftPolicy, sig: _Signal, value: float,
              event: StepEvent | None, *, at: float = 0.0, trace_id: str | None = None) -> None:
        sig.observed += 1
        learn = sig.learn
        if learn is not None:  # learning the baseline
            if math.isfinite(value):
                learn.append(value)
            if len(learn) >= policy.learn_steps:
                self._arm(sig, policy, learn)
            return
        kind = sig.kind
        if kind == "gauss":
            found = sig.detector.update(sig.state, value)
        else:
            threshold = sig.threshold
            found = sig.detector.update(sig.state, value > threshold if threshold is not None
                                        else value >= 0.5)
        sig.state = found[0]
        if sig.cooldown:
            sig.cooldown -= 1
            if found[1]:
                state = found[0]
                sig.state = CusumState(0.0, state.steps, state.alarms - 1)
            return
        if found[1]:
            sig.fired += 1
            sig.cooldown = policy.rearm_steps
            out.append(self._firing(policy, sig, found[2], event, at=at, trace_id=trace_id))

    def _arm(self, sig: _Signal, policy: DriftPolicy, learn: list[float]) -> None:
        arl0 = policy.false_alarm_steps
        if sig.kind == "gauss":
            n = len(learn)
            mean = sum(learn) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in learn) / max(1, n - 1))
            sd = max(sd, 1e-3 * max(1.0, abs(mean)), 1e-9)
            sig.detector = GaussianCusum.for_arl(mean, sd, shift=policy.score_shift,
                                                 arl0=arl0, direction="down")
        else:
            p0, p1 = policy.exceedance or (0.05, 0.2)
            ordered = sorted(learn)
            sig.threshold = ordered[min(len(ordered) - 1, math.ceil((1 - p0) * len(ordered)))]
            sig.detector = BernoulliCusum.for_arl(p0, p1, arl0=arl0)
        sig.learn = None
        sig.state = CusumState()

    def _firing(self, policy: DriftPolicy, sig: _Signal, statistic: float,
                event: StepEvent | None, *, at: float, trace_id: str | None) -> Firing:
        task, model, signal = sig.task, sig.model, sig.signal
        det = sig.detector
        what = {
            "verification": "verification pass rate dropped",
            "reask": "re-ask rate rose",
            "latency": "latency above its learned p95 more often",
            "cost_per_success": "cost per success above its learned p95 more often",
        }.get(signal, f"{signal} fell")
        if sig.kind == "gauss":
            detail = f"baseline mean {det.mean:.4g}, sd {det.sigma:.3g}"
        elif sig.kind == "exceed":
            detail = f"learned p95 {sig.threshold:.4g}"
        else:
            detail = f"in control {det.p0:.1%} events, tuned for {det.p1:.1%}"
        where = f"{task}" + (f" ({model})" if model else "")
        evidence = {"detector": det.to_dict(), "observations": sig.state.steps,
                    "threshold": sig.threshold, "false_alarm_steps": policy.false_alarm_steps,
                    "firings": sig.fired}
        if event is not None:
            evidence.update(last_trace_id=event.trace_id, last_step_id=event.step_id)
            at = event.ts
        elif trace_id is not None:
            evidence["last_trace_id"] = trace_id
        return Firing(task_type=task, model=model or None, signal=signal,
                      actions=policy.actions_for(signal), at=at, statistic=statistic,
                      reason=f"{what} for {where} (CUSUM alarm; {detail})", evidence=evidence)

    # ----- budgets --------------------------------------------------------------------------
    def _burn_step(self, out: list[Firing], policy: DriftPolicy, event: StepEvent) -> None:
        burn = self._burn.get(event.task_type)
        if burn is None:
            burn = self._burn[event.task_type] = _Burn()
        now = event.ts
        second = int(now)
        usd = event.cost_usd or 0.0
        tokens = float(event.input_tokens + event.output_tokens)
        buckets = burn.buckets
        if buckets and buckets[-1][0] == second:
            _, u, t = buckets[-1]
            buckets[-1] = (second, u + usd, t + tokens)
        else:
            buckets.append((second, usd, tokens))
        burn.usd += usd
        burn.tokens += tokens
        while buckets and buckets[0][0] <= second - _BURN_WINDOW:
            _, u, t = buckets.popleft()
            burn.usd -= u
            burn.tokens -= t
        if now < burn.quiet_until:
            return
        for signal, spent, budget, unit in (
                ("burn_usd", burn.usd, policy.budget_usd_per_min, "USD"),
                ("burn_tokens", burn.tokens, policy.budget_tokens_per_min, "tokens")):
            if budget is not None and spent > budget:
                burn.quiet_until = now + _BURN_WINDOW
                out.append(Firing(
                    task_type=event.task_type, model=None, signal=signal,
                    actions=policy.budget_actions, at=now, statistic=spent / budget,
                    reason=(f"{event.task_type} spent {spent:.4g} {unit} in the last minute, "
                            f"over its budget of {budget:.4g} {unit}/min"),
                    evidence={"spent_last_minute": round(spent, 6), "budget_per_minute": budget,
                              "unit": unit, "last_trace_id": event.trace_id,
                              "last_step_id": event.step_id}))
                buckets.clear()
                burn.usd = burn.tokens = 0.0
                return

    # ----- state ------------------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Per (task type, model, signal): phase, statistic (0..1 of the limit), firings."""
        with self._lock:
            items = list(self._signals.items())
        out = []
        for (task, model, signal), sig in sorted(items):
            if not sig.observed:
                continue  # e.g. the cost of a task type whose steps are not priced
            limit = getattr(sig.detector, "limit", None)
            out.append({"task_type": task, "model": model or None, "signal": signal,
                        "phase": "learning" if sig.learn is not None else "watching",
                        "statistic": (sig.state.statistic / limit) if limit else 0.0,
                        "observations": sig.observed, "firings": sig.fired,
                        "rearming": sig.cooldown})
        return out

    def state_of(self, task_type: str) -> dict[str, Any]:
        """The detector states of ``task_type``, JSON-ready (for :meth:`load`)."""
        with self._lock:
            return {f"{m}\x1f{s}": sig.to_dict() for (t, m, s), sig in self._signals.items()
                    if t == task_type}

    def task_types(self) -> list[str]:
        """The task types with a detector."""
        with self._lock:
            return sorted({t for t, _, _ in self._signals})

    def load(self, task_type: str, saved: Mapping[str, Any]) -> None:
        """Continue from states saved by :meth:`state_of` (a malformed one: ConfigError)."""
        found: dict[tuple[str, str, str], _Signal] = {}
        for name, data in saved.items():
            model, _, signal = name.partition("\x1f")
            try:
                found[(task_type, model, signal)] = _Signal.from_dict(data, task_type, model,
                                                                      signal)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ConfigError(f"a saved drift state of {task_type} is malformed: "
                                  f"{exc}") from None
        with self._lock:
            for key, sig in found.items():
                self._signals.setdefault(key, sig)
            self._slots.pop(task_type, None)  # rebuilt from the loaded signals

    def feed(self, events: Iterable[StepEvent]) -> list[Firing]:
        """Every firing of ``events``, in order (for back-testing a policy on stored steps)."""
        out: list[Firing] = []
        for event in events:
            out.extend(self.observe(event))
        return out
