"""Tracing a loop step by observing its state machine, without touching its decisions.

:func:`traced_step` wraps :func:`closedloop.loop._machine.step_machine`: every ``(callable,
args)`` the machine yields passes through, and the callable tells which stage runs — the agent
(inside its attempt), a validator, the approver (the gate), the executor (the action) or a
verifier. Around each user-hook call the stage's span is the current OpenTelemetry span, so
the user's own spans nest under it; the step's root span carries the outcome, attempts and
token totals. Both drivers (sync and async) run the wrapped generator unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from closedloop._verdict import Verdict, as_verdict

if TYPE_CHECKING:
    from closedloop.loop._machine import StepGen, StepSpec
    from closedloop.telemetry._pipeline import StepTrace, Telemetry

_AGENT, _VALIDATE, _APPROVE, _ACT, _VERIFY = range(5)
Stages = dict[int, tuple[int, str, dict[str, Any]]]


def stage_map(spec: StepSpec) -> Stages:
    """``id(hook) -> (stage, span name, base attributes)``, built once per loop."""
    task = {"closedloop.task_type": spec.task_type}
    stages: Stages = {}
    for name, check in spec.verifiers:
        stages[id(check)] = (_VERIFY, "closedloop.verify", {**task, "closedloop.check": name})
    for name, check in spec.validators:
        stages[id(check)] = (_VALIDATE, "closedloop.validate",
                             {**task, "closedloop.check": name})
    if spec.approver is not None:
        stages[id(spec.approver)] = (_APPROVE, "closedloop.gate",
                                     {**task, "closedloop.autonomy": spec.autonomy.value})
    if spec.executor is not None:
        stages[id(spec.executor)] = (_ACT, "closedloop.act", dict(task))
    stages[id(spec.agent)] = (_AGENT, f"invoke_agent {spec.agent_id}",
                              {"gen_ai.operation.name": "invoke_agent",
                               "gen_ai.agent.name": spec.agent_id})
    return stages


class LoopTracer:
    """One loop's tracing: the pipeline plus the loop's hooks mapped to their stages."""

    __slots__ = ("root", "spec", "stages", "telemetry")

    def __init__(self, telemetry: Telemetry, spec: StepSpec) -> None:
        self.telemetry = telemetry
        self.spec = spec
        self.stages = stage_map(spec)
        self.root = {"closedloop.task_type": spec.task_type,
                     "closedloop.agent_id": spec.agent_id,
                     "closedloop.autonomy": spec.autonomy.value}

    def step(self, machine: Any, task_input: Any, trace_id: str) -> StepGen:
        """``machine(spec, task_input, trace_id)``, traced."""
        return traced_step(self, machine, task_input, trace_id)


def _verdict_attrs(attrs: dict[str, Any], value: object, check: str) -> None:
    # the common returns are read directly; the machine normalises them itself
    if value is None or value is True:
        attrs["closedloop.verdict.passed"] = True
        return
    verdict = value if isinstance(value, Verdict) else as_verdict(value, check)
    attrs["closedloop.verdict.passed"] = verdict.passed
    if verdict.unknown is not None:
        attrs["closedloop.verdict.unknown"] = True
    if verdict.issues:
        attrs["closedloop.verdict.issues"] = [i.code for i in verdict.issues]


def traced_step(tracer: LoopTracer, machine: Any, task_input: Any, trace_id: str) -> StepGen:
    """Run ``machine(spec, task_input, trace_id)`` with a span for each stage of the step."""
    spec = tracer.spec
    tr: StepTrace = tracer.telemetry.step(trace_id, "closedloop.step", tracer.root.copy())
    stages = tracer.stages
    inner: StepGen = machine(spec, task_input, tr.trace_id)
    in_attempt = False
    acted = False
    try:
        call = next(inner)
        while True:
            fn, args = call
            stage = stages.get(id(fn))
            rec = None
            kind = -1
            if stage is not None:
                kind, name, base = stage
                if kind == _AGENT and not acted:
                    if in_attempt:
                        tr.close()
                    attempt = args[1]
                    tr.open("closedloop.attempt", {"closedloop.task_type": spec.task_type,
                                                   "closedloop.attempt": attempt.number})
                    in_attempt = True
                    tokens = (attempt.input_tokens, attempt.output_tokens)
                    rec = tr.enter(name, base.copy())
                    rec.content = {"closedloop.input": task_input}
                    if attempt.feedback is not None:
                        rec.content["closedloop.feedback"] = attempt.feedback
                elif kind == _VALIDATE and not acted:
                    rec = tr.enter(name, base.copy())
                elif kind in (_APPROVE, _ACT) or (kind == _VERIFY and acted):
                    if in_attempt:
                        tr.close()
                        in_attempt = False
                    acted = acted or kind == _ACT
                    rec = tr.enter(name, base.copy())
            try:
                value = yield call
            except Exception as exc:  # noqa: BLE001 - recorded, then handed to the machine
                if rec is not None:
                    rec.attributes["error.type"] = type(exc).__qualname__
                    rec.fail(f"{type(exc).__name__}: {exc}"[:500])
                    tr.close()
                call = inner.throw(exc)
                continue
            if rec is not None:
                if kind == _AGENT:
                    attempt = args[1]
                    rec.attributes["gen_ai.usage.input_tokens"] = attempt.input_tokens - tokens[0]
                    rec.attributes["gen_ai.usage.output_tokens"] = (attempt.output_tokens
                                                                    - tokens[1])
                    rec.content["closedloop.proposal"] = value  # type: ignore[index]
                elif kind in (_VALIDATE, _VERIFY):
                    _verdict_attrs(rec.attributes, value, base["closedloop.check"])
                elif kind == _APPROVE:
                    rec.attributes["closedloop.gate"] = "approved" if value else "rejected"
                else:
                    rec.content = {"closedloop.result": value}
                tr.close()
            call = inner.send(value)
    except StopIteration as stop:
        result = stop.value
        event = result.event
        outcome = result.outcome  # StrEnum values are plain strings for every exporter
        attrs: dict[str, Any] = {"closedloop.outcome": outcome,
                                 "closedloop.attempts": result.attempts}
        if result.error_type is not None:
            attrs["closedloop.error_type"] = result.error_type
        if event is not None:
            attrs["closedloop.usage.input_tokens"] = event.input_tokens
            attrs["closedloop.usage.output_tokens"] = event.output_tokens
        tr.end(attrs, result.error_message if outcome == "error" else None)
        return result  # type: ignore[no-any-return]
    except GeneratorExit:  # the driver abandoned the step (an async hook under run())
        tr.end({"closedloop.outcome": "error", "error.type": "abandoned"}, "step abandoned")
        inner.close()
        raise
    except BaseException as exc:
        tr.end({"closedloop.outcome": "error", "error.type": type(exc).__qualname__},
               f"{type(exc).__name__}: {exc}"[:500])
        raise
