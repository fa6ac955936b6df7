"""The demo's driver: the design's provisioning story, end to end, through :class:`Loop`."""

from __future__ import annotations

import math
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

TASK_TYPE = "ec2.provision"
AGENT_ID = "provisioning-agent"
INSTALL_HINT = "pip install 'closedloop[demo]'"

Progress = Callable[[int, int, str], object]
"""``progress(done, total, outcome)``: called after every step with its outcome's value."""


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
    ledger: FaultLedger = field(repr=False)

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
            "duration_s": round(self.duration_s, 3),
        }


def require_demo_extras() -> None:
    """Raise a :class:`ConfigError` naming the install command if boto3/moto are missing."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the demo needs boto3, moto and pydantic ({exc.name or exc} is missing): "
            f"{INSTALL_HINT}") from None


def run_demo(
    requests: int = 200,
    seed: int = 7,
    store: Store | str | None = None,
    progress: Progress | None = None,
    *,
    rates: FaultRates | None = None,
    max_attempts: int = 3,
) -> DemoSummary:
    """Run the provisioning story: ``requests`` seeded requests through a closed loop.

    ``store`` is a :class:`~closedloop.Store` (left open, flushed) or a URL (opened, then
    closed at the end); None means the process-wide default store. Starts a local EC2 API
    (moto) on 127.0.0.1 and stops it before returning. Bad arguments and a missing extra
    raise :class:`~closedloop.ConfigError`.
    """
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise ConfigError(f"the number of requests must be a positive integer, got {requests!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"the seed must be an integer, got {seed!r}")
    require_demo_extras()
    from closedloop.demo._ec2 import (
        Ec2Executor,
        InstanceMatchesRequest,
        LocalEc2,
        count_running,
        provision_environment,
    )
    from closedloop.demo._plan import no_destructive_actions, plan_schema

    owned = isinstance(store, str)
    if isinstance(store, str):
        target = open_store(store)
    elif store is None:
        from closedloop.store import default_store

        target = default_store()
    else:
        target = store
    started = time.perf_counter()
    before = target.stats()
    try:
        with LocalEc2() as ec2:
            env = provision_environment(ec2.client)
            model = SimulatedModel(seed, inventory=env.production_instance_ids, rates=rates)
            loop = Loop(
                model,
                task_type=TASK_TYPE,
                agent_id=AGENT_ID,
                validators=[plan_schema, no_destructive_actions],
                executor=Ec2Executor(ec2.client, env),
                verifiers=[InstanceMatchesRequest(ec2.client, env)],
                autonomy="autonomous",
                max_attempts=max_attempts,
                store=target,
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
    finally:
        target.flush()
        final = target.close() if owned else target.stats()
    return _summarise(
        results, raised, requests=requests, seed=seed, max_attempts=max_attempts,
        ledger=model.ledger, production=(len(env.production_instance_ids), production_running),
        store_url=target.url, events_written=final.written - before.written,
        events_lost=final.not_written - before.not_written,
        duration_s=time.perf_counter() - started,
    )


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
        ledger=ledger,
    )


def _nearest_rank(ordered: list[float], pct: float) -> float:
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]
