"""Tracing a loop step by observing its state machine, without touching its decisions.

:func:`traced_step` wraps :func:`closedloop.loop._machine.step_machine`: every action the
machine yields passes through, and its type tells which stage runs — :class:`Propose` (the
agent, inside its attempt), :class:`Validate`, :class:`Approve` (the gate), :class:`Act` or
:class:`Verify`; :class:`Admit` (a guard) is no stage of its own. Around each user-hook call
the stage's span is the current OpenTelemetry span, so the user's own spans nest under it;
the step's root span carries the outcome, attempts and token totals. Both drivers (sync and
async) run the wrapped generator unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from closedloop._verdict import Verdict, as_verdict
from closedloop.loop import Admit, Approve, Assess, Gate, Propose, Validate, Verify, Wait
from closedloop.telemetry._span import (
    LiveSpan,
    SpanRecord,
    _time_ns,
    activate,
    current_parent,
    deactivate,
    new_span_id,
)

_UNTRACED = frozenset({Admit, Assess, Gate, Wait})
"""Actions that are no stage of their own: guards, risk rules, the durable gate's store I/O
and its waits (a step waiting an hour for a person must not make a span per poll)."""

if TYPE_CHECKING:
    from closedloop._events import StepEvent
    from closedloop.loop import Action, StepGen, StepSpec
    from closedloop.telemetry._pipeline import Telemetry


class LoopTracer:
    """One loop's tracing: the pipeline plus the span names and attributes built once."""

    __slots__ = ("act", "agent", "agent_span", "gate", "root", "spec", "telemetry")

    def __init__(self, telemetry: Telemetry, spec: StepSpec) -> None:
        self.telemetry = telemetry
        self.spec = spec
        task = {"closedloop.task_type": spec.task_type}
        self.root = {**task, "closedloop.agent_id": spec.agent_id,
                     "closedloop.autonomy": spec.autonomy.value}
        self.agent_span = f"invoke_agent {spec.agent_id}"
        self.agent = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": spec.agent_id}
        self.gate = {**task, "closedloop.autonomy": spec.autonomy.value}
        self.act = task

    def step(self, machine: Any, task_input: Any, trace_id: str) -> StepGen:
        """``machine(spec, task_input, trace_id)``, traced."""
        return traced_step(self, machine, task_input, trace_id)


_MAX_MESSAGES = 20
"""At most this many issue messages per verdict span (the issue codes are all kept)."""


def _verdict_attrs(attrs: dict[str, Any], value: object, check: str) -> None:
    # the common returns are read directly; the machine normalises them itself
    if value is None or value is True:
        attrs["closedloop.verdict.passed"] = True
        return
    verdict = value if isinstance(value, Verdict) else as_verdict(value, check)
    attrs["closedloop.verdict.passed"] = verdict.passed
    messages = [f"unknown: {verdict.unknown}"] if verdict.unknown is not None else []
    if verdict.unknown is not None:
        attrs["closedloop.verdict.unknown"] = True
    if verdict.issues:
        attrs["closedloop.verdict.issues"] = [i.code for i in verdict.issues]
        messages.extend(i.render() for i in verdict.issues[:_MAX_MESSAGES])
    if messages:  # why, not only which code: `closedloop traces show` prints them
        attrs["closedloop.verdict.messages"] = messages


_STEP_FIELDS = (("step_id", "closedloop.step_id"), ("parent_step_id", "closedloop.parent_step_id"),
                ("run_id", "closedloop.run_id"), ("model", "closedloop.model"),
                ("provider", "closedloop.provider"), ("agent_version", "closedloop.agent_version"),
                ("prompt_version", "closedloop.prompt_version"),
                ("cached_input_tokens", "closedloop.usage.cached_input_tokens"),
                ("cost_usd", "closedloop.cost_usd"),
                ("proposal_digest", "closedloop.proposal_digest"))


def step_attributes(attrs: dict[str, Any], event: StepEvent) -> None:
    """The step event's ids, model, versions, labels (``closedloop.label.<name>``), cost and
    proposal digest, as attributes of its root span (those that are set)."""
    for field, key in _STEP_FIELDS:
        value = getattr(event, field)
        if value is not None:
            attrs[key] = value
    if event.labels:
        for name, value in event.labels.items():
            attrs[f"closedloop.label.{name}"] = value


def _end(rec: SpanRecord, done: list[SpanRecord]) -> None:
    rec.end_ns = _time_ns()
    done.append(rec)


def _span(tracer: LoopTracer, action: Action) -> tuple[str, dict[str, Any]]:
    """The span name and attributes of one stage's action."""
    task_type = tracer.spec.task_type
    match action:
        case Propose():
            return tracer.agent_span, dict(tracer.agent)
        case Validate(check=check):
            return "closedloop.validate", {"closedloop.task_type": task_type,
                                           "closedloop.check": check}
        case Verify(check=check):
            return "closedloop.verify", {"closedloop.task_type": task_type,
                                         "closedloop.check": check}
        case Approve():
            return "closedloop.gate", dict(tracer.gate)
        case _:
            return "closedloop.act", dict(tracer.act)


def traced_step(tracer: LoopTracer, machine: Any, task_input: Any, trace_id: str) -> StepGen:
    """Run ``machine(spec, task_input, trace_id)`` with a span for each stage of the step.

    The step's spans are queued together when it ends (one queue operation per step). A step
    started inside another span (the user's, or a closedloop stage's) is its child and takes
    its trace id, which the machine then records in the step event.
    """
    spec, telemetry = tracer.spec, tracer.telemetry
    trace, parent_id, _ = current_parent()
    if trace:
        trace_id = f"{trace:032x}"
    else:
        trace = int(trace_id, 16)
    root = SpanRecord(trace, new_span_id(), parent_id, "closedloop.step", tracer.root.copy(),
                      _time_ns())
    done: list[SpanRecord] = []
    attempt_span: SpanRecord | None = None
    inner: StepGen = machine(spec, task_input, trace_id)
    try:
        action = next(inner)
        while True:
            if type(action) in _UNTRACED:  # a guard, the durable gate's I/O: no stage span
                action = inner.send((yield action))
                continue
            is_check = type(action) is Validate or type(action) is Verify
            if type(action) is Propose:
                if attempt_span is not None:
                    _end(attempt_span, done)
                attempt = action.attempt
                attempt_span = SpanRecord(trace, new_span_id(), root.span_id,
                                          "closedloop.attempt",
                                          {"closedloop.task_type": spec.task_type,
                                           "closedloop.attempt": attempt.number}, _time_ns())
                parent = attempt_span
            elif type(action) is Validate and attempt_span is not None:
                parent = attempt_span
            else:  # gate, action, verification: after the attempts
                if attempt_span is not None:
                    _end(attempt_span, done)
                    attempt_span = None
                parent = root
            name, attributes = _span(tracer, action)
            rec = SpanRecord(trace, new_span_id(), parent.span_id, name, attributes, _time_ns())
            if type(action) is Propose:
                tokens = (attempt.input_tokens, attempt.output_tokens)
                content = rec.content = {"closedloop.input": task_input}
                if attempt.feedback is not None:
                    content["closedloop.feedback"] = attempt.feedback
            token = activate(LiveSpan(rec, telemetry))
            try:
                value = yield action
                if is_check and value is not None and value is not True:
                    # normalised once, here: an iterator of issues can be read only once, and
                    # a value that is no verdict raises TypeError, as in the machine (a crash)
                    value = as_verdict(value, action.check)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - recorded, then handed to the machine
                if is_check:  # a crashed check never counts as passed
                    rec.attributes.update({"closedloop.verdict.passed": False,
                                           "closedloop.verdict.crashed": True})
                deactivate(token)
                rec.attributes["error.type"] = type(exc).__qualname__
                rec.fail(f"{type(exc).__name__}: {exc}")  # redacted, then capped, on export
                _end(rec, done)
                action = inner.throw(exc)
                continue
            except BaseException:  # closed or cancelled while the hook ran
                deactivate(token)
                _end(rec, done)
                raise
            deactivate(token)
            _end(rec, done)
            match action:
                case Propose():
                    rec.attributes["gen_ai.usage.input_tokens"] = (attempt.input_tokens
                                                                   - tokens[0])
                    rec.attributes["gen_ai.usage.output_tokens"] = (attempt.output_tokens
                                                                    - tokens[1])
                    content["closedloop.proposal"] = value
                case Validate(check=check) | Verify(check=check):
                    _verdict_attrs(rec.attributes, value, check)
                case Approve():
                    rec.attributes["closedloop.gate"] = "approved" if value else "rejected"
                case _:
                    rec.content = {"closedloop.result": value}
            action = inner.send(value)
    except StopIteration as stop:
        result = stop.value
        outcome = result.outcome  # StrEnum values are plain strings for every exporter
        attrs = root.attributes
        attrs["closedloop.outcome"] = outcome
        attrs["closedloop.attempts"] = result.attempts
        if result.error_type is not None:
            attrs["closedloop.error_type"] = result.error_type
            if outcome == "error":
                root.fail(result.error_message)
        event = result.event
        if event is not None:
            attrs["closedloop.usage.input_tokens"] = event.input_tokens
            attrs["closedloop.usage.output_tokens"] = event.output_tokens
            step_attributes(attrs, event)
        return result  # type: ignore[no-any-return]
    except GeneratorExit:  # the driver abandoned the step (an async hook under run())
        root.attributes.update({"closedloop.outcome": "error", "error.type": "abandoned"})
        root.fail("step abandoned")
        inner.close()
        raise
    except BaseException as exc:
        root.attributes.update({"closedloop.outcome": "error",
                                "error.type": type(exc).__qualname__})
        root.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if attempt_span is not None:
            _end(attempt_span, done)
        _end(root, done)
        telemetry.submit_many(done)
