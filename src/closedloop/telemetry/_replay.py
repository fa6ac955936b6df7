"""Replay: run today's validators and verifiers on the proposals and results recorded in traces.

"This new validator would have caught 41 of the 57 verification failures of the last week,
and blocked 2 proposals that succeeded." The store's spans keep each step's input, final
proposal and action result as captured content (redacted and capped); a step whose content was
not captured, was truncated, or does not parse is counted as not replayable, never guessed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from closedloop._verdict import as_verdict
from closedloop.telemetry._spanstore import StoredSpan, span_store_for

if TYPE_CHECKING:
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
    for event in store.events(since=since, until=until, task_type=task_type):
        report.steps += 1
        failed_verification = event.verification_passed is False
        succeeded = event.outcome == "succeeded"
        report.verification_failures += failed_verification
        report.successes += succeeded
        spans = spans_store.trace(event.trace_id)
        agent = _last(spans, "invoke_agent")
        act = _last(spans, "closedloop.act")
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
