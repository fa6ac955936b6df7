"""Stored autonomy levels: resolution for the loop (cached, failing closed), the human and
automatic changes with their audit trail, feedback, promotion and automatic demotion.

Resolution of a step's level, for a loop whose autonomy is not pinned: the stored level of
``(agent, task type, action class)``, else of ``(any agent, task type, class)``, else of
``(agent, task type)``, else of ``(any agent, task type)``, else the default; capped by the
policy's ``ceilings`` for the class. Reads are cached per process for ``cache_s`` seconds.

**Failing closed.** When the store cannot be read, a key's level is the last one this process
read (however old); a key never read here gets ``min(default, approve)``: never more
autonomous than the last known or configured level, and with nothing known, never without a
human. A demotion raised in this process that could not be stored stays in force here and is
retried at each refresh until it is.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from closedloop._autonomy_state import (
    LEVELS,
    EvidenceQueries,
    Feedback,
    LevelChange,
    LevelKey,
    LevelRecord,
    LevelStore,
    check_level,
    rank,
)
from closedloop._errors import ConfigError
from closedloop._events import (
    AGENT_ID,
    AUTONOMY,
    DETAIL,
    TASK_TYPE,
    VERIFICATION_PASSED,
    StepEvent,
)
from closedloop.autonomy import Autonomy
from closedloop.autonomy._evidence import (
    Assessment,
    AutonomyPolicy,
    DecisionSource,
    Evidence,
    assess,
    count_events,
    count_groups,
    step_class,
)

if TYPE_CHECKING:
    from closedloop.control import AlertSink
    from closedloop.store import Store

_log = logging.getLogger("closedloop.autonomy")
_KEEP: Any = object()
_AUTONOMOUS = Autonomy.AUTONOMOUS  # an enum member read from its class costs ~20 local reads
SAVE_EVERY_S = 30.0
"""A demotion detector's state is saved at most this often (and on an alarm): a store write
per step would cost more than the rest of the step."""


def _approval_decisions(store: Store) -> DecisionSource | None:
    """The store's approval records as the decision source; None for a store keeping none."""
    from closedloop.autonomy._decisions import ApprovalDecisions

    try:
        return ApprovalDecisions(store)
    except ConfigError:
        return None


def who() -> str:
    """The default "by": user@host (pid)."""
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


class Resolved(NamedTuple):
    """A step's level: where it came from (``stored``, ``default``, ``last known`` while the
    store is unreadable, ``unreadable`` when nothing was known), the stored record that
    decided it (None for the default) and the step's action class."""

    level: Autonomy
    source: str
    record: LevelRecord | None
    action_class: str | None


def _lower(a: str, b: str) -> str:
    return a if rank(a) <= rank(b) else b


class AutonomyLevels:
    """The autonomy levels of one store's task types, and the rules that move them.

    ``store`` holds the events the evidence is counted from; ``levels`` the levels (default:
    the store's level store, :func:`~closedloop.store.level_store_for`). ``default`` is the
    level of a key with no stored level (``autonomous``, as loops without stored levels
    behave). ``policy`` applies to every task type unless ``policies`` has its own.
    ``decisions`` counts the decisions on durable approval requests (default: the store's
    approval records, :class:`~closedloop.autonomy.ApprovalDecisions`, when the store keeps
    them; else they are counted from the events).
    ``sinks`` receive the demotion alerts (default: the log).
    """

    def __init__(self, store: Store | None = None, *, levels: LevelStore | None = None,
                 default: Autonomy | str = Autonomy.AUTONOMOUS,
                 policy: AutonomyPolicy | None = None,
                 policies: dict[str, AutonomyPolicy] | None = None,
                 decisions: DecisionSource | None = None,
                 sinks: Iterable[AlertSink] | None = None,
                 cache_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self._counts_where_stored = levels is None
        """The level store is the store's own: it may count the evidence where the steps are
        (:class:`~closedloop.autonomy.EvidenceQueries`)."""
        if levels is None:
            if store is None:
                raise ConfigError("AutonomyLevels needs a store or a level store")
            from closedloop.store import level_store_for

            levels = level_store_for(store)
        self.store = store
        self.levels = levels
        self.default = Autonomy.parse(default)
        self.policy = policy or AutonomyPolicy()
        self.policies = dict(policies or {})
        if decisions is None and store is not None:
            decisions = _approval_decisions(store)
        self.decisions = decisions
        if sinks is None:
            from closedloop.control import LogSink

            sinks = [LogSink()]
        self.sinks = list(sinks)
        self.cache_s = cache_s
        self.clock = clock
        self._cache: dict[str, tuple[float, list[LevelRecord]]] = {}
        self._memo: dict[str, dict[tuple[str, str | None], tuple[float, Resolved]]] = {}
        self._pending: dict[LevelKey, LevelRecord] = {}  # demotions not stored yet
        self._detectors: dict[LevelKey, _Watch] = {}  # each key's demotion detector
        self._watched: dict[tuple[str, str, str | None], tuple[Resolved, _Watch]] = {}
        """The detector of each (task type, agent, class), by the resolution it was found by."""
        self._task_keys: dict[str, LevelKey] = {}
        self._lock = threading.Lock()
        self._monitor = LevelMonitor(self)
        self._reviewed: dict[str, float] = {}
        self._warned = 0.0
        self.unreadable = 0
        """Resolutions made while the store could not be read (failing closed)."""

    def policy_for(self, task_type: str) -> AutonomyPolicy:
        """The policy of ``task_type``."""
        return self.policies.get(task_type, self.policy)

    # ----- resolution ---------------------------------------------------------------------
    def _records(self, task_type: str) -> tuple[list[LevelRecord] | None, bool]:
        """The task type's stored levels (cached), and whether they were read just now or
        within ``cache_s`` (False: the last ones read, the store being unreadable; None when
        never read)."""
        now = self.clock()
        cached = self._cache.get(task_type)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1], True
        if self._pending:
            self._flush_pending()
        try:
            records = self.levels.levels(task_type)
        except Exception as exc:  # noqa: BLE001 - unreadable: fail closed below
            self.unreadable += 1
            if time.monotonic() - self._warned > 10.0:
                self._warned = time.monotonic()
                _log.warning("closedloop: cannot read the autonomy levels of %s (%s); using "
                             "the last level known here, else at most 'approve' (this "
                             "warning repeats at most every 10 s)", task_type, exc)
            return (cached[1] if cached is not None else None), False
        self._cache[task_type] = (now, records)
        self._memo.pop(task_type, None)
        return records, True

    def resolve(self, task_type: str, *, agent_id: str = "*",
                action_class: str | None = None) -> Resolved:
        """The level a step of ``(agent_id, task_type, action_class)`` runs at now."""
        # on the agent's path for every step: the answer is kept as long as the levels it
        # was made from are fresh
        memo = self._memo.get(task_type)
        if memo is not None and not self._pending:
            hit = memo.get((agent_id, action_class))
            if hit is not None and self.clock() - hit[0] < self.cache_s:
                return hit[1]
        records, fresh = self._records(task_type)
        found = self._resolve(task_type, agent_id, action_class, records, fresh)
        if fresh and not self._pending:
            cached = self._cache.get(task_type)
            if cached is not None:
                self._memo.setdefault(task_type, {})[(agent_id, action_class)] = (
                    cached[0], found)
        return found

    def _resolve(self, task_type: str, agent_id: str, action_class: str | None,
                 records: list[LevelRecord] | None, fresh: bool) -> Resolved:
        policy = self.policy_for(task_type)
        record: LevelRecord | None = None
        if records is None:
            level, source = _lower(self.default.value, "approve"), "unreadable"
        else:
            record = _find(records, agent_id, action_class)
            level = record.level if record is not None else self.default.value
            source = "last known" if not fresh else "stored" if record is not None else "default"
        if self._pending:
            for key, demoted in list(self._pending.items()):
                if key.task_type == task_type and key.agent_id in ("*", agent_id) \
                        and key.action_class in (None, action_class):
                    level = _lower(level, demoted.level)
        if action_class is not None:
            cap = policy.ceilings.get(action_class)
            if cap is not None:
                level = _lower(level, cap)
        return Resolved(Autonomy(level), source, record, action_class)

    def cached_level(self, agent_id: str, task_type: str) -> Callable[[], Autonomy | None]:
        """The loop's quick gate lookup, for a loop with no classifier: ``() -> level`` when
        :meth:`resolver`'s answer is memoised from levels read less than ``cache_s`` ago and
        no demotion waits to be stored (its answer then, whose detail is None); None: ask
        the resolver (the loop yields a :class:`~closedloop.loop.Level` action, which may
        read the store)."""
        key = (agent_id, None)
        memos = self._memo

        def cached() -> Autonomy | None:
            if self._pending:
                return None
            memo = memos.get(task_type)
            hit = memo.get(key) if memo is not None else None
            if hit is None or self.clock() - hit[0] >= self.cache_s:
                return None
            return hit[1][0]  # its level

        return cached

    def resolver(self, agent_id: str, task_type: str,
                 classify: Callable[[Any], str | None] | None = None
                 ) -> Callable[[Any], tuple[Autonomy, dict[str, Any] | None]]:
        """The loop's gate lookup: ``proposal -> (level, event detail or None)``.

        Never raises: a classifier that raises or returns something that is not a string
        gives the class ``"unclassified"`` (logged), which has no level of its own unless
        one is stored for it."""

        def level_of(proposal: Any) -> tuple[Autonomy, dict[str, Any] | None]:
            cls: str | None = None
            if classify is not None:
                try:
                    found = classify(proposal)
                    cls = found if found is None or (isinstance(found, str) and found) \
                        else "unclassified"
                except Exception:  # noqa: BLE001 - a broken classifier must not run the action
                    _log.exception("closedloop: the action classifier of %s failed", task_type)
                    cls = "unclassified"
            try:
                found_level = self.resolve(task_type, agent_id=agent_id, action_class=cls)
            except Exception:  # noqa: BLE001 - fail closed
                _log.exception("closedloop: resolving the autonomy of %s failed", task_type)
                level = Autonomy(_lower(self.default.value, "approve"))
                return level, {"class": cls, "source": "unreadable"}
            detail: dict[str, Any] | None = None
            if cls is not None or found_level.source in ("unreadable", "last known"):
                detail = {"class": cls, "source": found_level.source}
            return found_level.level, detail

        return level_of

    # ----- changes --------------------------------------------------------------------------
    def set(self, task_type: str, level: Autonomy | str, *, by: str | None = None,
            reason: str, agent_id: str = "*", action_class: str | None = None,
            ceiling: str | None = _KEEP, kind: str = "set",
            evidence: dict[str, Any] | None = None) -> LevelChange:
        """Store a level (a person's or code's decision), with who, why and evidence.

        ``ceiling`` (``None``: none; default: keep the stored one) caps later promotions."""
        value = Autonomy.parse(level).value
        key = LevelKey(task_type=task_type, agent_id=agent_id, action_class=action_class)
        if ceiling is _KEEP:
            old = next((r for r in self.levels.levels(task_type) if r.key == key), None)
            ceiling = old.ceiling if old is not None else None
        elif ceiling is not None:
            ceiling = check_level(ceiling, "ceiling")
        record = LevelRecord(key=key, level=value, by=by or who(), at=self.clock(),
                             reason=reason.strip() if isinstance(reason, str) else reason,
                             ceiling=ceiling, evidence=evidence or {})
        change = self.levels.set_level(record, kind=kind)
        assert change is not None
        self._forget(task_type)
        return change

    def _forget(self, task_type: str) -> None:
        self._cache.pop(task_type, None)
        self._memo.pop(task_type, None)

    def record_feedback(self, step_id: str, agreed: bool, *, by: str | None = None,
                        note: str | None = None) -> Feedback:
        """Record what a human did about a suggestion: ``agreed`` when they did the same."""
        feedback = Feedback(step_id=step_id.strip().lower() if isinstance(step_id, str)
                            else step_id, agreed=agreed, by=by or who(), at=self.clock(),
                            note=note)
        self.levels.put_feedback(feedback)
        return feedback

    # ----- evidence and promotion ---------------------------------------------------------
    def keys(self, task_type: str | None = None) -> list[tuple[LevelKey, LevelRecord | None]]:
        """Every stored key, and a task-level key for each task type with events but no
        stored level (of ``task_type``)."""
        records = self.levels.levels(task_type)
        out: list[tuple[LevelKey, LevelRecord | None]] = [(r.key, r) for r in records]
        stored = {r.key.task_type for r in records if r.key.action_class is None}
        seen: set[str] = set()
        if self.store is not None:  # an index probe per task type, not a summary
            if task_type is None:
                seen = set(self.store.task_types())
            elif self.store.steps(task_type=task_type, limit=1).steps:
                seen = {task_type}
        for name in sorted(seen - stored):
            out.append((LevelKey(task_type=name), None))
        return sorted(out, key=lambda kr: (kr[0].task_type, kr[0].agent_id,
                                           kr[0].action_class or ""))

    def evidence(self, key: LevelKey, record: LevelRecord | None = None) -> Evidence:
        """The evidence for ``key`` at its current level, since it entered it."""
        return self._evidence(key, record, self.levels.levels(key.task_type))

    def _evidence(self, key: LevelKey, record: LevelRecord | None,
                  stored: list[LevelRecord]) -> Evidence:
        """:meth:`evidence`, ``stored`` the levels of ``key``'s task type (read once)."""
        if self.store is None:
            raise ConfigError("evidence needs the store the steps are recorded in")
        now = self.clock()
        policy = self.policy_for(key.task_type)
        if record is None:
            record = next((r for r in stored if r.key == key), None)
        level = record.level if record is not None else self.default.value
        since = record.at if record is not None else now - policy.window
        own = frozenset(r.key.action_class for r in stored if r.key.action_class is not None)
        self.store.flush(5.0)  # this process's own recent steps count too
        decisions = (self.decisions.decisions(key, since=since, own_classes=own)
                     if self.decisions is not None else None)
        if self._counts_where_stored and isinstance(self.levels, EvidenceQueries):
            groups = self.levels.evidence_groups(
                key.task_type, since=since, classes=key.action_class is not None or bool(own))
            if groups is not None:
                return count_groups(key, groups, level=level, since=since, own_classes=own,
                                    decisions=decisions)
        feedback = {f.step_id: f for f in self.levels.feedback(since=since)}
        events = self.store.events(task_type=key.task_type, since=since)
        return count_events(key, events, feedback, level=level, since=since, own_classes=own,
                            decisions=decisions)

    def assess(self, key: LevelKey, record: LevelRecord | None = None) -> Assessment:
        """Whether ``key`` has earned the next level up, and what it still takes."""
        stored = self.levels.levels(key.task_type)
        if record is None:
            record = next((r for r in stored if r.key == key), None)
        demoted = next((c.at for c in self.levels.history(task_type=key.task_type, limit=200)
                        if c.key == key and c.kind == "demoted"), None)
        return assess(self._evidence(key, record, stored), self.policy_for(key.task_type),
                      ceiling=record.ceiling if record is not None else None,
                      demoted_at=demoted, now=self.clock(),
                      source="stored" if record is not None else "default")

    def recommend(self, task_type: str | None = None, *, apply: bool = False,
                  by: str | None = None) -> list[Assessment]:
        """The assessment of every key (of ``task_type``); with ``apply``, the ready ones are
        promoted (one level), each with its evidence in the audit trail."""
        out = []
        for key, record in self.keys(task_type):
            found = self.assess(key, record)
            out.append(found)
            if apply and found.ready and found.target is not None:
                self.promote(found, by=by)
        return out

    def promote(self, found: Assessment, *, by: str | None = None) -> LevelChange | None:
        """Apply a ready assessment: the key moves up one level, from the level assessed."""
        if not found.ready or found.target is None:
            raise ConfigError(f"{found.key} has not earned a promotion: {'; '.join(found.needs)}")
        ev = found.evidence
        reason = (f"promoted {found.level} → {found.target}: "
                  + (f"agreement {ev.agreement.lower:.1%} lower bound over "
                     f"{ev.agreement.trials} suggestions" if found.level == "suggest" else
                     f"approval {ev.approval.lower:.1%} lower bound over {ev.approval.trials} "
                     f"decisions, verification {ev.verification.lower:.1%} over "
                     f"{ev.verification.trials}"))
        record = LevelRecord(key=found.key, level=found.target, by=by or who(),
                             at=self.clock(), reason=reason, evidence=ev.to_dict(),
                             ceiling=next((r.ceiling for r in self.levels.levels(
                                 found.key.task_type) if r.key == found.key), None))
        only = {found.level} | ({None} if found.source == "default" else set())
        change = self.levels.set_level(record, kind="promoted", only_from=only)
        self._forget(found.key.task_type)
        return change

    # ----- automatic demotion ---------------------------------------------------------------
    def review(self, task_type: str) -> list[LevelChange]:
        """Promote the keys of ``task_type`` that earned it, if its policy opted into
        ``auto_promote`` (else nothing); returns the changes made."""
        if not self.policy_for(task_type).auto_promote:
            return []
        made = []
        for found in self.recommend(task_type):
            if found.ready and found.target is not None:
                change = self.promote(found, by=f"closedloop auto-promotion on {who()}")
                if change is not None:
                    made.append(change)
        return made

    def _maybe_review(self, task_type: str) -> None:
        """Start a background review of ``task_type`` every ``review_every`` seconds."""
        policy = self.policy_for(task_type)
        now = self.clock()
        with self._lock:
            if now - self._reviewed.get(task_type, float("-inf")) < policy.review_every:
                return
            self._reviewed[task_type] = now

        def run() -> None:
            try:
                self.review(task_type)
            except Exception:  # noqa: BLE001 - a failed review is tried again later
                _log.exception("closedloop: the autonomy review of %s failed", task_type)

        threading.Thread(target=run, name="closedloop-autonomy-review", daemon=True).start()

    def observe(self, event: StepEvent) -> None:
        """Learn from one step: an autonomous step's verification feeds its key's demotion
        detector; an alarm demotes the key and alerts. Quick, on the agent's path (an opted-in
        promotion review runs on a thread of its own)."""
        # on the agent's path for every step: the event's fields read by position (a
        # field's name is a slower lookup), the members compared with module constants
        task_type = event[TASK_TYPE]
        if event[AUTONOMY] != "autonomous":
            if (self.policy.auto_promote or self.policies) \
                    and self.policy_for(task_type).auto_promote:
                self._maybe_review(task_type)
            return
        passed = event[VERIFICATION_PASSED]
        if passed is None:
            return
        cls = step_class(event) if event[DETAIL] else None
        agent_id = event[AGENT_ID]
        # the level the step itself was resolved at (memoised); else look it up
        memo = self._memo.get(task_type)
        hit = memo.get((agent_id, cls)) if memo is not None else None
        resolved = hit[1] if hit is not None and not self._pending else self.resolve(
            task_type, agent_id=agent_id, action_class=cls)
        if resolved[0] is not _AUTONOMOUS:  # its level
            return  # already demoted (or capped) here: nothing to detect
        # the detector of the key that decided this resolution, found by the resolution
        # itself (a memoised one is the same object until the levels are read again)
        watched = self._watched.get((task_type, agent_id, cls))
        if watched is not None and watched[0] is resolved:
            watch = watched[1]
        else:
            watch = self._watch(resolved, task_type)
            self._watched[(task_type, agent_id, cls)] = (resolved, watch)
        # no lock: two threads updating one key at the same instant may lose one
        # observation, which a statistical detector can afford
        detector = watch.detector
        step = detector.update(watch.state, not passed)  # a Detection: (state, alarm, score)
        watch.state = state = step[0]
        alarm = step[1]
        if alarm or self.clock() - watch.saved_at >= SAVE_EVERY_S:
            self._save(watch)
        if alarm:
            self._demote(watch.key, resolved.record, detector, state.steps, event)

    def _watch(self, resolved: Resolved, task_type: str) -> _Watch:
        """The demotion detector of the key that decided ``resolved`` (made, with the state
        saved in the level store, the first time)."""
        record = resolved.record
        key: LevelKey | None = record.key if record is not None else self._task_keys.get(
            task_type)  # one key object per task type
        if key is None:
            key = self._task_keys[task_type] = LevelKey(task_type=task_type)
        watch = self._detectors.get(key)
        if watch is None:
            detector = self.policy_for(key.task_type).detector()
            state = detector.initial()
            try:
                saved = self.levels.detector(_detector_name(key))
                if saved is not None:
                    state = type(state).from_dict(saved)
            except Exception as exc:  # noqa: BLE001 - start afresh; the halt still guards
                _log.warning("closedloop: could not read the demotion detector of %s: %s",
                             key, exc)
            watch = self._detectors[key] = _Watch(key, detector, state, self.clock())
        return watch

    def _save(self, watch: _Watch) -> None:
        """Save a detector's state (at most every :data:`SAVE_EVERY_S`, and on an alarm)."""
        watch.saved_at = now = self.clock()  # tried now: the next try comes that much later
        try:
            self.levels.put_detector(_detector_name(watch.key), watch.state.to_dict(), at=now)
        except Exception as exc:  # noqa: BLE001 - saved again later
            _log.warning("closedloop: could not save the demotion detector of %s: %s",
                         watch.key, exc)

    def _demote(self, key: LevelKey, record: LevelRecord | None, detector: Any, steps: int,
                event: StepEvent) -> None:
        policy = self.policy_for(key.task_type)
        evidence = {"detector": detector.to_dict(), "observations": steps,
                    "baseline_pass_rate": policy.baseline_pass_rate,
                    "alarm_pass_rate": policy.alarm_pass_rate,
                    "false_alarm_steps": policy.false_alarm_steps,
                    "last_trace_id": event.trace_id, "last_step_id": event.step_id}
        reason = (f"verification pass rate dropped (CUSUM alarm: in control at "
                  f"{policy.baseline_pass_rate:.0%}, alarm for {policy.alarm_pass_rate:.0%}); "
                  f"last: {event.error_message or 'verification failed'}")
        demoted = LevelRecord(key=key, level=policy.demote_to, by=f"closedloop demotion on "
                              f"{who()}", at=self.clock(), reason=reason, evidence=evidence,
                              ceiling=record.ceiling if record is not None else None)
        with self._lock:
            self._pending[key] = demoted
        self._forget(key.task_type)
        self._flush_pending()
        from closedloop.control import Alert

        alert = Alert(kind="demoted", subject=str(key), summary=reason, severity="warning",
                      action=(f"review the failing steps (closedloop report --task-type "
                              f"{key.task_type}; trace {event.trace_id}); it is promoted again "
                              "only on fresh evidence (closedloop autonomy status)"),
                      evidence={"to": policy.demote_to, "observations": steps,
                                "last_trace_id": event.trace_id}, at=self.clock())
        for sink in self.sinks:
            try:
                sink.send(alert)
            except Exception:  # noqa: BLE001 - an alert sink must never break a step
                _log.exception("closedloop: alert sink %r failed", sink)

    def _flush_pending(self) -> None:
        """Store the demotions raised here; one that cannot be stored stays in force here."""
        with self._lock:
            pending = list(self._pending.items())
        for key, demoted in pending:
            try:
                self.levels.set_level(demoted, kind="demoted",
                                      only_from={"autonomous", None})
            except Exception as exc:  # noqa: BLE001 - kept in force here, retried
                _log.error("closedloop: could not store the demotion of %s (%s); it stays in "
                           "force in this process and is retried", key, exc)
                continue
            with self._lock:
                if self._pending.get(key) is demoted:
                    del self._pending[key]
            self._forget(key.task_type)

    def monitor(self) -> LevelMonitor:
        """This object as a loop guard (admits every step, observes every event)."""
        return self._monitor


class _Watch:
    """One key's demotion detector, its state (updated in place) and when it was saved."""

    __slots__ = ("detector", "key", "saved_at", "state")

    def __init__(self, key: LevelKey, detector: Any, state: Any, saved_at: float) -> None:
        self.key = key
        self.detector = detector
        self.state = state
        self.saved_at = saved_at


def _detector_name(key: LevelKey) -> str:
    return f"autonomy.demote:{key.task_type}:{key.agent_id}:{key.action_class or ''}"


def _find(records: list[LevelRecord], agent_id: str, cls: str | None) -> LevelRecord | None:
    by_key = {(r.key.agent_id, r.key.action_class): r for r in records}
    order = ([(agent_id, cls), ("*", cls)] if cls is not None else []) + [
        (agent_id, None), ("*", None)]
    for k in order:
        found = by_key.get(k)
        if found is not None:
            return found
    return None


class LevelMonitor:
    """A :class:`~closedloop.loop.StepGuard` for :meth:`AutonomyLevels.observe`: it never
    refuses a step (fault control does), it watches autonomous steps' verifications."""

    observe_only = True
    """The loop never asks it to admit a step (:class:`~closedloop.loop.StepGuard`)."""

    def __init__(self, levels: AutonomyLevels) -> None:
        self.levels = levels
        self.observe = levels.observe  # type: ignore[method-assign]  # one call, not two

    def admit(self, task_type: str) -> None:
        """Admit: refusing is fault control's job."""
        return

    def observe(self, event: StepEvent) -> None:
        """Feed the demotion detector."""
        self.levels.observe(event)

    def __repr__(self) -> str:
        return f"LevelMonitor({self.levels.levels!r})"


__all__ = ["LEVELS", "AutonomyLevels", "LevelMonitor", "Resolved", "who"]
