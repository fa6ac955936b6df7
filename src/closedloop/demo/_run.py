"""The demo's driver: the design's provisioning story, end to end, through :class:`Loop`."""

from __future__ import annotations

import math
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError
from closedloop._events import ErrorType, Outcome
from closedloop.demo._model import FaultLedger, FaultRates, SimulatedModel, generate_requests
from closedloop.loop import Loop, StepResult
from closedloop.store import Store, open_store

if TYPE_CHECKING:
    from closedloop.demo._ec2 import Action
    from closedloop.demo._model import LedgerEntry
    from closedloop.telemetry import Telemetry

TASK_TYPE = "ec2.provision"
AGENT_ID = "provisioning-agent"
INSTALL_HINT = "pip install 'closedloop[demo]'"
SCORE_NAME = "plan_correct"
"""The score the demo gives every step: 1 when the model's final plan was right, else 0."""

Progress = Callable[[int, int, str], object]
"""``progress(done, total, outcome)``: called after every step with its outcome's value."""
AUTONOMY_LEVELS = ("suggest", "approve", "autonomous")


@dataclass(frozen=True, slots=True, kw_only=True)
class Waiting:
    """One request the approve demo left waiting for a person."""

    request_id: str
    plan: str
    """What it would do, in a few words (``launch t3.micro in web, ssh``)."""
    destructive: bool
    """A risk rule marked it destructive (terminate, delete): a person must decide it."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"request_id": self.request_id, "plan": self.plan,
                "destructive": self.destructive}


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSummary:
    """What one demo run did, from the loop's results, next to the model's ground truth."""

    requests: int
    seed: int
    succeeded: int
    reasked_fixed: int
    """Steps whose validation failed at first and passed after a re-ask."""
    failed_validation: int
    blocked: int
    caught_by_verification: int
    unverified: int
    """Steps whose outcome could not be read back (verification unknown)."""
    errors: int
    """Steps where the agent, the executor or a check raised (recorded, then counted here)."""
    first_error: str | None
    """The first such exception, ``Type: message``, to start debugging from."""
    input_tokens: int
    output_tokens: int
    latency_p50_ms: float
    latency_p95_ms: float
    production_instances: int
    production_running: int
    store_url: str
    events_written: int
    """Events the store wrote during this run."""
    events_lost: int
    """Events the store dropped or could not write (dead-lettered ones included)."""
    duration_s: float
    max_attempts: int
    traced: bool = False
    """Whether the steps' spans (with their redacted proposals) and scores went to the store."""
    scores_written: int = 0
    autonomy: str = "autonomous"
    """The level the agent ran at: ``suggest``, ``approve`` or ``autonomous``."""
    suggested: int = 0
    """Steps that ended with a suggestion (``suggest``: nothing executed)."""
    waiting: tuple[Waiting, ...] = ()
    """Requests waiting for a person (``approve``; destructive plans at any level)."""
    ec2_state: str | None = None
    """The file keeping the demo's EC2 for the worker (``approve``), if any."""
    ledger: FaultLedger = field(repr=False)

    def next_steps(self) -> list[str]:
        """The commands that show this run's steps, to paste into a shell (empty in memory)."""
        if self.store_url.startswith("memory://"):
            return []
        store = f"--store {shlex.quote(self.store_url)}"
        steps = []
        if self.waiting:
            launch = next((w for w in self.waiting if not w.destructive), None)
            risky = next((w for w in self.waiting if w.destructive), None)
            steps.append(f"closedloop approvals list --status pending {store}")
            if launch is not None:
                steps += [f"closedloop approvals show {launch.request_id} {store}",
                          f"closedloop approvals approve {launch.request_id} --by YOU {store}"]
            if risky is not None:
                steps.append(f"closedloop approvals reject {risky.request_id} --by YOU "
                             f"--reason 'never terminate production' {store}")
            if self.ec2_state is not None:
                steps.append(f"closedloop worker --app closedloop.demo:worker --once {store}")
            steps.append(f"closedloop autonomy status --task-type {TASK_TYPE} {store}")
        steps.append(f"closedloop report {store}")
        if self.traced:
            steps += [
                f"closedloop traces list --task-type {TASK_TYPE} {store}",
                f"closedloop replay --task-type {TASK_TYPE} "
                f"--validator closedloop.demo:required_tags {store}",
                f"closedloop scores list --name {SCORE_NAME} {store}",
                f"closedloop serve --metrics --from-start {store}",
            ]
        return steps

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form: every count, and the ledger's injected faults per kind."""
        return {
            "requests": self.requests,
            "seed": self.seed,
            "succeeded": self.succeeded,
            "reasked_fixed": self.reasked_fixed,
            "failed_validation": self.failed_validation,
            "blocked": self.blocked,
            "caught_by_verification": self.caught_by_verification,
            "unverified": self.unverified,
            "errors": self.errors,
            "first_error": self.first_error,
            "tokens": {"input": self.input_tokens, "output": self.output_tokens},
            "latency_ms": {"p50": round(self.latency_p50_ms, 3),
                           "p95": round(self.latency_p95_ms, 3)},
            "production_instances": {"total": self.production_instances,
                                     "running": self.production_running},
            "injected": self.ledger.counts(),
            "expected": self.ledger.expected_outcomes(self.max_attempts),
            "store": {"url": self.store_url, "events_written": self.events_written,
                      "events_lost": self.events_lost},
            "traces": {"recorded": self.traced, "scores_written": self.scores_written},
            "autonomy": self.autonomy,
            "suggested": self.suggested,
            "waiting": [w.to_dict() for w in self.waiting],
            "ec2_state": self.ec2_state,
            "duration_s": round(self.duration_s, 3),
            "next_steps": self.next_steps(),
        }


def require_demo_extras(*, traces: bool = False) -> None:
    """Raise a :class:`ConfigError` naming the install command if an extra is missing.

    boto3, moto and pydantic always; opentelemetry too when the run records ``traces``.
    """
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
        import pydantic  # noqa: F401

        if traces:
            import opentelemetry.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the demo needs boto3, moto, pydantic and opentelemetry "
            f"({exc.name or exc} is missing): {INSTALL_HINT}") from None


def run_demo(
    requests: int = 200,
    seed: int = 7,
    store: Store | str | None = None,
    progress: Progress | None = None,
    *,
    rates: FaultRates | None = None,
    max_attempts: int = 3,
    traces: bool = True,
    autonomy: str = "autonomous",
    ec2_state: str | os.PathLike[str] | None = None,
) -> DemoSummary:
    """Run the provisioning story: ``requests`` seeded requests through a closed loop.

    ``store`` is a :class:`~closedloop.Store` (left open, flushed) or a URL (opened, then
    closed at the end); None means the process-wide default store. Starts a local EC2 API
    (moto) on 127.0.0.1 and stops it before returning. Bad arguments and a missing extra
    raise :class:`~closedloop.ConfigError`.

    With ``traces`` (the default) every step is also traced into the same store: its spans,
    with the request, proposals and result captured redacted, so ``closedloop traces``,
    ``replay`` and ``serve --metrics`` show the run; and every step gets a ``plan_correct``
    score from the simulated model's ground truth, for ``closedloop scores`` and ``report``.
    ``traces=False`` leaves tracing to the process default (``telemetry.configure()``).

    ``autonomy`` is the agent's level: ``autonomous`` (the default) executes what passes
    validation and blocks destructive plans; ``suggest`` executes nothing; ``approve``
    stores every plan as a durable approval request in the store, destructive ones marked
    high-stakes by the :func:`~closedloop.demo.destructive_plan` risk rule, and executes
    none: a person decides them (``closedloop approvals``) and a worker executes the approved
    ones (``closedloop worker --app closedloop.demo:worker``), against the demo's EC2 kept in
    the file ``ec2_state`` (written at the end of the run; see
    :func:`~closedloop.demo.state_path_for`).
    """
    if autonomy not in AUTONOMY_LEVELS:
        raise ConfigError(f"unknown autonomy level {autonomy!r}; use one of: "
                          f"{', '.join(AUTONOMY_LEVELS)}")
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise ConfigError(f"the number of requests must be a positive integer, got {requests!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"the seed must be an integer, got {seed!r}")
    require_demo_extras(traces=traces)
    from closedloop.demo._ec2 import (
        MAX_LAUNCHES,
        Ec2Executor,
        InstanceMatchesRequest,
        LocalEc2,
        count_running,
        provision_environment,
    )

    # The simulated model's plans launch one instance, and a step acts once: a request
    # launches at most one instance, and the subnet has an address for each.
    if requests > MAX_LAUNCHES:
        raise ConfigError(f"the demo runs at most {MAX_LAUNCHES} requests (one instance each "
                          f"in one subnet), got {requests}")
    from closedloop.demo._plan import destructive_plan, no_destructive_actions, plan_schema
    from closedloop.loop import ApprovalPolicy

    if autonomy == "approve":  # destructive plans queue, marked, for a person to decide
        checks: dict[str, Any] = {"validators": [plan_schema], "risk_rules": [destructive_plan],
                                  "approval": ApprovalPolicy(wait=False, two_approvers=True)}
    else:
        checks = {"validators": [plan_schema, no_destructive_actions]}

    owned = isinstance(store, str)
    if isinstance(store, str):
        target = open_store(store)
    elif store is None:
        from closedloop.store import default_store

        target = default_store()
    else:
        target = store
    if autonomy == "approve":
        _store_level(target, autonomy)
    started = time.perf_counter()
    before = target.stats()
    pipeline = _tracing(target) if traces else None
    traced: dict[str, Any] = {} if pipeline is None else {"telemetry": pipeline}
    scores = 0
    try:
        with LocalEc2() as ec2:
            env = provision_environment(ec2.client, launches=requests)
            model = SimulatedModel(seed, inventory=env.production_instance_ids, rates=rates)
            loop = Loop(
                model,
                task_type=TASK_TYPE,
                agent_id=AGENT_ID,
                executor=Ec2Executor(ec2.client, env),
                verifiers=[InstanceMatchesRequest(ec2.client, env)],
                autonomy=autonomy,
                **checks,
                max_attempts=max_attempts,
                store=target,
                **traced,
            )
            results: list[StepResult[str, Action]] = []
            raised: list[str] = []  # every step that ended in an error, in order
            for done, request in enumerate(generate_requests(requests, seed), 1):
                try:
                    result = loop.run(request)
                except Exception as exc:  # noqa: BLE001 - recorded by the loop; the demo goes on
                    raised.append(f"{type(exc).__name__}: {exc}")
                    outcome = Outcome.ERROR.value
                else:
                    results.append(result)
                    outcome = result.outcome.value
                    if result.outcome is Outcome.ERROR:
                        raised.append(result.error_message or "error")
                if progress is not None:
                    progress(done, requests, outcome)
            production_running = count_running(ec2.client, env.production_instance_ids)
            if ec2_state is not None:
                from closedloop.demo._state import Ec2State

                state = Ec2State(ec2_state)
                with state.locked():
                    state.save(env)
        waiting = _waiting(target, results)
        if pipeline is not None:
            scores = _score(target, model.ledger)
    finally:
        if pipeline is not None:
            pipeline.shutdown()  # writes the last spans before the store is closed
        target.flush()
        final = target.close() if owned else target.stats()
    return _summarise(
        results, raised, requests=requests, seed=seed, max_attempts=max_attempts,
        ledger=model.ledger, production=(len(env.production_instance_ids), production_running),
        store_url=target.url, events_written=final.written - before.written,
        events_lost=final.not_written - before.not_written,
        duration_s=time.perf_counter() - started, traced=pipeline is not None,
        scores_written=scores, autonomy=autonomy, waiting=waiting,
        ec2_state=None if ec2_state is None else os.fspath(ec2_state),
    )


def _waiting(store: Store, results: list[StepResult[str, Action]]) -> tuple[Waiting, ...]:
    """The requests the run left waiting, as stored (with the risk rules' verdict)."""
    ids = [r.approval_id for r in results
           if r.outcome is Outcome.AWAITING_APPROVAL and r.approval_id is not None]
    if not ids:
        return ()
    from closedloop.store import approval_store_for

    approvals = approval_store_for(store)
    found = []
    for rid in ids:
        request = approvals.get(rid)
        if request is not None:
            found.append(Waiting(request_id=rid, plan=_plan_words(request.proposal),
                                 destructive=request.destructive))
    return tuple(found)


def _plan_words(proposal: str) -> str:
    """A stored proposal (the plan's JSON text, as a JSON string) in a few words."""
    import json

    try:
        text = json.loads(proposal)
        plan = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return "a plan that is not JSON"
    if not isinstance(plan, dict):
        return "a plan that is not an object"
    action = plan.get("action")
    if action == "run_instances":
        groups = plan.get("security_groups")
        where = ", ".join(map(str, groups)) if isinstance(groups, list) else "?"
        return f"launch {plan.get('instance_type')} in {where}"
    if action == "terminate_instances":
        return f"terminate {plan.get('instance_ids')}"
    if action == "delete_security_group":
        return f"delete security group {plan.get('group')!r}"
    return f"{action}"


def _store_level(store: Store, level: str) -> None:
    """Record the level the demo's agent runs at as its task type's stored level (once), so
    ``closedloop autonomy status`` counts the evidence from here on and says what it takes
    to move up. The demo's loop is pinned to ``level`` either way."""
    from closedloop.autonomy import AutonomyLevels, LevelKey

    levels = AutonomyLevels(store)
    key = LevelKey(task_type=TASK_TYPE)
    if any(r.key == key and r.level == level for r in levels.levels.levels(TASK_TYPE)):
        return
    levels.set(TASK_TYPE, level, by="closedloop demo",
               reason=f"closedloop demo --autonomy {level}")


def _tracing(store: Store) -> Telemetry | None:
    """A pipeline of the demo's own that writes its steps' spans into ``store``.

    None for a store that cannot hold spans (a custom backend): the demo then records events
    only, as it did before it recorded traces.
    """
    from closedloop.telemetry import StoreExporter, Telemetry, span_store_for

    try:
        span_store_for(store)
    except ConfigError:
        return None
    return Telemetry([StoreExporter(store)])


def _verdict_of(entries: list[LedgerEntry]) -> tuple[float, str]:
    last = entries[-1]
    if last.kind is None:
        return 1.0, "the simulated model's final plan was correct"
    where = ", ".join(last.locations)
    return 0.0, f"the simulated model injected {last.kind.value} ({where}) in its final plan"


def _score(store: Store, ledger: FaultLedger) -> int:
    """Score every step from the model's ground truth; returns how many scores were stored."""
    from closedloop.telemetry import record_score

    written = 0
    for trace_id, entries in ledger.by_trace().items():
        value, why = _verdict_of(entries)
        record_score(trace_id, SCORE_NAME, value, comment=why, source="rule", store=store)
        written += 1
    return written


def _summarise(
    results: list[StepResult[str, Action]],
    raised: list[str],
    *,
    requests: int,
    seed: int,
    max_attempts: int,
    ledger: FaultLedger,
    production: tuple[int, int],
    store_url: str,
    events_written: int,
    events_lost: int,
    duration_s: float,
    traced: bool,
    scores_written: int,
    autonomy: str,
    waiting: tuple[Waiting, ...],
    ec2_state: str | None,
) -> DemoSummary:
    events = [r.event for r in results if r.event is not None]
    latencies = sorted(e.latency_ms for e in events)
    return DemoSummary(
        requests=requests,
        seed=seed,
        succeeded=sum(r.outcome is Outcome.SUCCEEDED for r in results),
        reasked_fixed=sum(r.attempts > 1 and bool(r.event and r.event.validation_passed)
                          for r in results),
        failed_validation=sum(r.error_type is ErrorType.VALIDATION for r in results),
        blocked=sum(r.outcome is Outcome.BLOCKED for r in results),
        caught_by_verification=sum(r.error_type is ErrorType.VERIFICATION for r in results),
        unverified=sum(r.error_type is ErrorType.VERIFICATION_UNKNOWN for r in results),
        errors=len(raised),
        first_error=raised[0] if raised else None,
        input_tokens=sum(e.input_tokens for e in events),
        output_tokens=sum(e.output_tokens for e in events),
        latency_p50_ms=_nearest_rank(latencies, 50),
        latency_p95_ms=_nearest_rank(latencies, 95),
        production_instances=production[0],
        production_running=production[1],
        store_url=store_url,
        events_written=events_written,
        events_lost=events_lost,
        duration_s=duration_s,
        max_attempts=max_attempts,
        traced=traced,
        scores_written=scores_written,
        autonomy=autonomy,
        suggested=sum(r.outcome is Outcome.SUGGESTED for r in results),
        waiting=waiting,
        ec2_state=ec2_state,
        ledger=ledger,
    )


def _nearest_rank(ordered: list[float], pct: float) -> float:
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]
