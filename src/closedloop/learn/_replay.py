"""Replay: run today's validators and verifiers on the proposals and results recorded in traces.

"This new validator would have caught 41 of the 57 verification failures of the last week,
and blocked 2 proposals that succeeded." The store's spans keep each step's input, final
proposal and action result as captured content (redacted and capped); a step whose content was
not captured, was truncated, or does not parse is counted as not replayable, never guessed.

Content is stored as text, so JSON text comes back as data: a check replayed on a step whose
proposal was a JSON string receives the decoded value (write checks that accept both).

Several steps may share one trace (a user's span around them): each step event is matched
with its own ``closedloop.step`` span (same task type and agent, the n-th event of the trace
with the n-th step span, outcome and attempts agreeing), and replayed with that step's own
proposal and result; an event that cannot be matched that way is not replayable.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from closedloop._spans import StoredSpan
from closedloop._verdict import as_verdict
from closedloop.store import span_store_for

if TYPE_CHECKING:
    from closedloop._events import StepEvent
    from closedloop.store import Store

_TRUNCATED = "…[truncated "


@dataclass(slots=True, kw_only=True)
class CheckReplay:
    """What one check would have said about the recorded steps."""

    name: str
    kind: str  # "validator" or "verifier"
    replayed: int = 0
    flagged: int = 0
    caught_verification_failures: int = 0
    blocked_successes: int = 0
    crashed: int = 0
    flagged_traces: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"name": self.name, "kind": self.kind, "replayed": self.replayed,
                "flagged": self.flagged,
                "caught_verification_failures": self.caught_verification_failures,
                "blocked_successes": self.blocked_successes, "crashed": self.crashed,
                "flagged_traces": self.flagged_traces}


@dataclass(slots=True, kw_only=True)
class ReplayReport:
    """The replay of a task type's recorded steps."""

    task_type: str
    steps: int = 0
    verification_failures: int = 0
    successes: int = 0
    not_replayable: int = 0
    checks: list[CheckReplay] = field(default_factory=list)

    def sentences(self) -> list[str]:
        """One plain sentence per check."""
        out = []
        for c in self.checks:
            what = "new validator" if c.kind == "validator" else "verifier"
            out.append(
                f"{what} {c.name} would have caught {c.caught_verification_failures} of the "
                f"{self.verification_failures} verification failures, and blocked "
                f"{c.blocked_successes} proposals that succeeded ({c.replayed} steps "
                f"replayed, {c.crashed} crashed)")
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"task_type": self.task_type, "steps": self.steps,
                "verification_failures": self.verification_failures,
                "successes": self.successes, "not_replayable": self.not_replayable,
                "checks": [c.to_dict() for c in self.checks]}


def _value(text: str | None) -> tuple[bool, Any]:
    """``(ok, value)``: recorded content back as data; not ok when missing or truncated."""
    if text is None or _TRUNCATED in text:
        return False, None
    try:
        return True, json.loads(text)
    except ValueError:
        return True, text


def _run(check: Callable[..., Any], *args: Any) -> Any:
    value = check(*args)
    if inspect.isawaitable(value):
        async def wait() -> Any:
            return await value

        value = asyncio.run(wait())
    return value


def _last(spans: Sequence[StoredSpan], prefix: str) -> StoredSpan | None:
    found = [s for s in spans if s.name.startswith(prefix)]
    return max(found, key=lambda s: s.start_ns) if found else None


def _step_key(span: StoredSpan) -> tuple[Any, Any] | None:
    """``(task type, agent id)`` of a loop step's root span; None for any other span."""
    if span.name != "closedloop.step":
        return None
    attrs = span.attributes
    return attrs.get("closedloop.task_type"), attrs.get("closedloop.agent_id")


def _agrees(event: StepEvent, span: StoredSpan) -> bool:
    attrs = span.attributes
    return (attrs.get("closedloop.outcome") == event.outcome
            and attrs.get("closedloop.attempts", event.attempts) == event.attempts)


class _Trace:
    """One trace's spans, indexed: step roots per (task type, agent), children per parent."""

    def __init__(self, spans: Sequence[StoredSpan]) -> None:
        self.roots: dict[tuple[Any, Any], list[StoredSpan]] = {}
        self.children: dict[str | None, list[StoredSpan]] = {}
        for span in spans:
            self.children.setdefault(span.parent_id, []).append(span)
            key = _step_key(span)
            if key is not None:
                self.roots.setdefault(key, []).append(span)
        for roots in self.roots.values():
            roots.sort(key=lambda s: s.start_ns)


class _Steps:
    """Each event's own step span, and the agent and action spans of that step."""

    def __init__(self, events: Sequence[StepEvent], spans_of: Callable[[str], list[StoredSpan]]
                 ) -> None:
        self._spans_of = spans_of
        # per trace and (task type, agent): the events oldest first, the order steps started in
        self._rank: dict[int, int] = {}
        self._count: dict[tuple[str, str, str], int] = {}
        for event in events:
            key = (event.trace_id, event.task_type, event.agent_id)
            self._rank[id(event)] = self._count.get(key, 0)
            self._count[key] = self._rank[id(event)] + 1
        self._trace: tuple[str, _Trace] | None = None

    def _indexed(self, trace_id: str) -> _Trace:
        if self._trace is None or self._trace[0] != trace_id:
            self._trace = (trace_id, _Trace(self._spans_of(trace_id)))
        return self._trace[1]

    def stages(self, event: StepEvent) -> tuple[StoredSpan | None, StoredSpan | None]:
        """``(final agent span, action span)`` of ``event``'s step; Nones when unmatched."""
        trace = self._indexed(event.trace_id)
        roots = trace.roots.get((event.task_type, event.agent_id), [])
        if len(roots) != self._count[(event.trace_id, event.task_type, event.agent_id)]:
            return None, None  # a step's spans were lost, or it is outside the time window
        root = roots[self._rank[id(event)]]
        if not _agrees(event, root):
            return None, None
        below = trace.children.get(root.span_id, [])
        proposals = [s for attempt in below if attempt.name == "closedloop.attempt"
                     for s in trace.children.get(attempt.span_id, [])]
        return _last(proposals, "invoke_agent"), _last(below, "closedloop.act")


def replay(
    store: Store,
    task_type: str,
    *,
    validators: Sequence[tuple[str, Callable[..., Any]]] = (),
    verifiers: Sequence[tuple[str, Callable[..., Any]]] = (),
    since: float | None = None,
    until: float | None = None,
) -> ReplayReport:
    """Run ``validators`` on each recorded final proposal and ``verifiers`` on each recorded
    (input, result) of ``task_type``'s steps, and count what they would have flagged."""
    spans_store = span_store_for(store)
    report = ReplayReport(task_type=task_type)
    report.checks = ([CheckReplay(name=n, kind="validator") for n, _ in validators]
                     + [CheckReplay(name=n, kind="verifier") for n, _ in verifiers])
    checks = list(validators) + list(verifiers)
    events = list(store.events(since=since, until=until, task_type=task_type))
    steps = _Steps(events, spans_store.trace)
    for event in events:
        report.steps += 1
        failed_verification = event.verification_passed is False
        succeeded = event.outcome == "succeeded"
        report.verification_failures += failed_verification
        report.successes += succeeded
        agent, act = steps.stages(event)
        ok_p, proposal = _value(agent.content.get("closedloop.proposal") if agent else None)
        ok_i, intent = _value(agent.content.get("closedloop.input") if agent else None)
        ok_r, result = _value(act.content.get("closedloop.result") if act else None)
        if not ok_p:
            report.not_replayable += 1
            continue
        for tally, (name, check) in zip(report.checks, checks, strict=True):
            if tally.kind == "verifier" and not (ok_i and ok_r):
                continue
            tally.replayed += 1
            args = (proposal,) if tally.kind == "validator" else (intent, result)
            try:
                verdict = as_verdict(_run(check, *args), name)
            except Exception:  # noqa: BLE001 - a crash is counted, the replay goes on
                tally.crashed += 1
                continue
            if verdict.passed:
                continue
            tally.flagged += 1
            tally.flagged_traces.append(event.trace_id)
            tally.caught_verification_failures += failed_verification
            tally.blocked_successes += succeeded
    return report
