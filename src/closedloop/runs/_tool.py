"""Guarded tools: one decorator turns a function an agent calls into a closed-loop step.

``@closedloop.tool(...)`` wraps the function in a :class:`~closedloop.Loop` whose proposal is
the call's arguments: the arguments are validated (the signature, the annotated types, the
user's validators), the autonomy gate decides, the function acts, the verifiers compare the
outcome with the intent, the event is recorded and an ``execute_tool`` span traced — the same
step machine as every loop, so sync and async tools behave alike. What the model gets back:

- the function's return value when the step succeeded;
- a :class:`ToolFeedback` (a ``str``: every framework passes it to the model as the tool's
  result) when the arguments are invalid, the outcome did not match (with the differences,
  after rolling the action back), or the call was not executed (suggest-only, awaiting
  approval, rejected, paused): the agent-loop form of re-ask, so the model corrects itself;
- :class:`~closedloop.ToolRefused` raised when the agent must stop calling: more invalid calls
  in the run than ``max_invalid``, the run's budget spent or the run halted, the task type
  halted.

The function's exceptions propagate unchanged (recorded first), as the function's own would.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

from closedloop import _runtime
from closedloop._errors import ConfigError, ToolRefused
from closedloop._events import ErrorType, Outcome
from closedloop._verdict import Issue, Verdict
from closedloop.autonomy import Approver, Autonomy
from closedloop.loop import DEFAULT, Attempt, Loop, StepResult, run_scope
from closedloop.runs._run import Run, _adrive, _drive, _Rollback, current_run

F = TypeVar("F", bound=Callable[..., Any])

_NOT_EXECUTED = {
    Outcome.SUGGESTED: "it was not executed: this tool only suggests (suggest-only autonomy)",
    Outcome.AWAITING_APPROVAL: "it was not executed: it needs a human's approval first",
    Outcome.REJECTED: "it was not executed: the approver rejected it",
    Outcome.PAUSED: "it was not executed: the tool is paused for now; try again later",
}
_SUCCEEDED = Outcome.SUCCEEDED  # an enum member read from its class costs ~20 local reads
_REFUSED = frozenset({Outcome.HALTED, Outcome.CONTROL_UNAVAILABLE, Outcome.BUDGET_EXCEEDED})


class ToolFeedback(str):
    """What a guarded tool returns to the model instead of a result: a readable message.

    A ``str`` (frameworks pass it to the model as the tool's output) that also carries, as
    data, the step's ``outcome``, ``error_type``, ``step_id`` and ``issues``."""

    outcome: str
    error_type: str | None
    step_id: str | None
    issues: tuple[Issue, ...]

    def __new__(cls, text: str, result: StepResult[Any, Any],
                issues: tuple[Issue, ...] = ()) -> ToolFeedback:
        new = super().__new__(cls, text)
        new.outcome = result.outcome.value
        new.error_type = result.error_type.value if result.error_type is not None else None
        new.step_id = result.step_id
        new.issues = issues
        return new

    def __reduce__(self) -> tuple[Any, ...]:
        # copied and pickled as what it carries (frameworks deep-copy tool outputs)
        return (_feedback, (str(self), self.outcome, self.error_type, self.step_id,
                            self.issues))


def _feedback(text: str, outcome: str, error_type: str | None, step_id: str | None,
              issues: tuple[Issue, ...]) -> ToolFeedback:
    new = str.__new__(ToolFeedback, text)
    new.outcome, new.error_type, new.step_id, new.issues = outcome, error_type, step_id, issues
    return new


class ToolCall(dict[str, Any]):
    """A tool call's arguments by parameter name: the proposal of a guarded tool's step.

    ``problems`` holds what binding the call found wrong (an argument given twice, extra
    positional arguments), reported by the arguments check."""

    problems: tuple[str, ...] = ()


# ----- argument checks ------------------------------------------------------------------------

_SIMPLE = (str, int, float, bool, list, dict, tuple, set, bytes, type(None))


def _type_check(hint: Any) -> Callable[[Any], bool] | None:
    """A quick check that a value fits ``hint``, or None when the hint is not checked here."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if hint is None or hint is type(None):
        return lambda v: v is None
    if hint is float:
        return lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    if hint is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if hint in _SIMPLE:
        return lambda v: isinstance(v, hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        return lambda v: v in allowed
    if origin is Union or origin is types.UnionType:
        checks = [_type_check(a) for a in typing.get_args(hint)]
        if any(c is None for c in checks):
            return None
        return lambda v: any(c(v) for c in checks)  # type: ignore[misc]
    if origin in _SIMPLE:
        return lambda v: isinstance(v, origin)
    return None


def _exact_types(hint: Any) -> frozenset[type]:
    """Types a value of which fits ``hint`` without calling its check (the common case: a
    ``str`` for ``str``; never ``bool`` for ``int``)."""
    if hint is float:
        return frozenset({float, int})
    if hint in _SIMPLE and hint is not None:
        return frozenset({hint})
    if typing.get_origin(hint) is Union or typing.get_origin(hint) is types.UnionType:
        return frozenset().union(*(_exact_types(a) for a in typing.get_args(hint)))
    return frozenset()


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


class _Signature:
    """What a call must look like: parameter names, required ones, quick type checks."""

    def __init__(self, fn: Callable[..., Any], check_types: bool) -> None:
        sig = inspect.signature(fn)
        kinds = inspect.Parameter
        params = list(sig.parameters.values())
        self.positional = tuple(p.name for p in params
                                if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))
        self.posonly = tuple(p.name for p in params if p.kind is kinds.POSITIONAL_ONLY)
        self.var_pos = next((p.name for p in params if p.kind is kinds.VAR_POSITIONAL), None)
        self.var_kw = next((p.name for p in params if p.kind is kinds.VAR_KEYWORD), None)
        self.names = frozenset(p.name for p in params
                               if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD))
        self.required = tuple(p.name for p in params if p.default is kinds.empty
                              and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD))
        self.required_set = frozenset(self.required)
        self.simple = not self.posonly and self.var_pos is None
        """Called as ``fn(**call)``."""
        self.types: dict[str, tuple[Callable[[Any], bool], str]] = {}
        self.typed: list[tuple[str, frozenset[type], Callable[[Any], bool]]] = []
        """Each typed parameter, the types that fit it as they are, and its check."""
        if check_types:
            try:
                hints = typing.get_type_hints(fn)
            except Exception:  # noqa: BLE001 - unresolvable annotations are not checked
                hints = {}
            for p in params:
                if p.name in hints and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD):
                    check = _type_check(hints[p.name])
                    if check is not None:
                        self.types[p.name] = (check, _type_name(hints[p.name]))
                        self.typed.append((p.name, _exact_types(hints[p.name]), check))

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ToolCall:
        """The call's arguments by name (never raises: problems are kept for the check)."""
        call = ToolCall(kwargs)
        if not args:
            return call
        problems: list[str] = []
        positional = self.positional
        for name, value in zip(positional, args, strict=False):
            if name in call:
                problems.append(f"argument {name!r} was given twice (by position and by name)")
            call[name] = value
        if len(args) > len(positional):
            extra = list(args[len(positional):])
            if self.var_pos is not None:
                call[self.var_pos] = extra
            else:
                problems.append(f"{len(extra)} positional argument(s) too many: the tool "
                                f"takes {', '.join(positional) or 'none'}")
        if problems:
            call.problems = tuple(problems)
        return call

    def invoke(self, fn: Callable[..., Any], call: ToolCall) -> Any:
        """``fn`` called with ``call``'s arguments."""
        if self.simple:
            return fn(**call)
        rest = dict(call)
        args = [rest.pop(name) for name in self.positional if name in rest]
        if self.var_pos is not None:
            args.extend(rest.pop(self.var_pos, ()))
        return fn(*args, **rest)


class _ArgumentCheck:
    """The tool's first validator: the call fits the function's signature and types."""

    name = "arguments"

    def __init__(self, signature: _Signature) -> None:
        self.signature = signature
        self._required = signature.required_set
        self._names = signature.names if signature.var_kw is None else None
        self._typed = tuple(signature.typed)

    def __call__(self, call: ToolCall) -> Verdict | None:
        sig = self.signature
        keys = call.keys()
        names = self._names
        if not call.problems and keys >= self._required and (names is None or keys <= names):
            for name, exact, check in self._typed:  # the common case: all present, typed
                if name in call:
                    value = call[name]
                    if type(value) not in exact and not check(value):
                        break
            else:
                return None
        problems = call.problems
        missing = [n for n in sig.required if n not in call]
        unexpected = [] if sig.var_kw is not None else [k for k in call if k not in sig.names]
        wrong = [(k, t) for k, (check, t) in sig.types.items() if k in call
                 and not check(call[k])]
        issues = [Issue(code="binding", message=p) for p in problems]
        issues += [Issue(code="missing", location=n, message=f"required argument {n!r} is "
                         "missing") for n in missing]
        issues += [Issue(code="unexpected", location=k, message=f"unexpected argument {k!r}; "
                         f"the tool takes {', '.join(sorted(sig.names)) or 'no arguments'}")
                   for k in unexpected]
        issues += [Issue(code="type", location=k, message=f"must be {t}, got "
                         f"{type(call[k]).__name__} {_short(call[k])}") for k, t in wrong]
        return Verdict(issues=tuple(issues), check=self.name)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----- tracing ---------------------------------------------------------------------------------

class _ToolTracing:
    """The tool loop's tracing: each step is an ``execute_tool`` span (when the runtime has
    a telemetry pipeline; untraced otherwise)."""

    def __init__(self, attrs: dict[str, Any], runtime: _runtime.Runtime | None,
                 telemetry: Any) -> None:
        self.attrs = attrs
        self.runtime = runtime
        self.telemetry = telemetry
        self.loop: Loop | None = None
        """The loop this tracing is for: its steps run on its current spec (which follows
        :func:`closedloop.configure`)."""

    def tracer(self, spec: Any) -> _ToolTracer:
        return _ToolTracer(spec, self)


class _ToolTracer:
    __slots__ = ("cached", "owner", "spec")

    def __init__(self, spec: Any, owner: _ToolTracing) -> None:
        self.spec = spec
        self.owner = owner
        self.cached: tuple[Any, Any] | None = None

    def step(self, machine: Any, task_input: Any, trace_id: str) -> Any:
        owner = self.owner
        telemetry = owner.telemetry
        if telemetry is DEFAULT:
            rt = owner.runtime if owner.runtime is not None else _runtime._current
            telemetry = rt.telemetry
        loop = owner.loop
        spec = loop._spec if loop is not None else self.spec
        if telemetry is None:
            return machine(spec, task_input, trace_id)
        cached = self.cached
        if cached is None or cached[0] is not telemetry or cached[1].spec is not spec:
            cached = self.cached = (telemetry, telemetry.tracer(spec, tool=owner.attrs))
        return cached[1].step(machine, task_input, trace_id)


# ----- the tool --------------------------------------------------------------------------------

def _propose(call: ToolCall, attempt: Attempt) -> ToolCall:
    """A tool's "agent": the model already proposed, the call's arguments are the proposal."""
    return call


class GuardedTool:
    """The closed loop behind one guarded function (``fn.closedloop_tool``)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None,
        task_type: str | None,
        description: str | None,
        validators: Iterable[Callable[..., Any]],
        verifiers: Iterable[Callable[..., Any]],
        compensate: Callable[..., Any] | None,
        verify_compensation: Callable[..., Any] | None,
        autonomy: Autonomy | str,
        approver: Approver | None,
        irreversible: bool,
        risk: float | Callable[[ToolCall], float],
        approve_above: float,
        max_invalid: int,
        check_types: bool,
        labels: Mapping[str, str] | None,
        store: Any,
        guards: Any,
        telemetry: Any,
        runtime: _runtime.Runtime | None,
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"@tool needs a function, got {fn!r}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.task_type = task_type or self.name
        self.is_async = inspect.iscoroutinefunction(fn)
        if compensate is not None and not callable(compensate):
            raise ConfigError(f"compensate {compensate!r} is not callable")
        if verify_compensation is not None and compensate is None:
            raise ConfigError("verify_compensation needs compensate")
        if irreversible and compensate is not None:
            raise ConfigError(f"tool {self.name} is irreversible: it cannot have a compensation")
        if not isinstance(max_invalid, int) or isinstance(max_invalid, bool) or max_invalid < 0:
            raise ConfigError(f"max_invalid must be an integer ≥ 0, got {max_invalid!r}")
        if not callable(risk) and (isinstance(risk, bool) or not isinstance(risk, int | float)):
            raise ConfigError(f"risk must be a number or a function of the call, got {risk!r}")
        self.compensate = compensate
        self.verify_compensation = verify_compensation
        self.irreversible = bool(irreversible)
        self.risk = risk
        self.approve_above = approve_above
        self.max_invalid = max_invalid
        self._streak = 0  # consecutive invalid calls outside any run
        self.signature = _Signature(fn, check_types)
        doc = description if description is not None else inspect.getdoc(fn)
        attrs: dict[str, Any] = {"gen_ai.tool.name": self.name, "gen_ai.tool.type": "function"}
        if doc:
            attrs["gen_ai.tool.description"] = doc.strip().splitlines()[0][:500]
        def tracing() -> _ToolTracing | None:
            return None if telemetry is None else _ToolTracing(attrs, runtime, telemetry)

        common: dict[str, Any] = {
            "task_type": self.task_type,
            "validators": (_ArgumentCheck(self.signature), *validators),
            "executor": self._aexecute if self.is_async else self._execute,
            "verifiers": tuple(verifiers), "approver": approver, "max_attempts": 1,
            "agent_id": f"tool:{self.name}", "store": store, "guards": guards,
            "runtime": runtime, "labels": labels,
        }
        self.loop = self._traced(Loop(_propose, autonomy=autonomy, telemetry=tracing(),
                                      **common))
        """The loop every call goes through (or :attr:`gated_loop`)."""
        self.gated_loop = (self._traced(Loop(_propose, autonomy=Autonomy.APPROVE,
                                             telemetry=tracing(), **common))
                           if self.irreversible else None)
        """An irreversible tool's loop for calls above the risk threshold: approval first."""

    @staticmethod
    def _traced(loop: Loop) -> Loop:
        tracing = loop._telemetry
        if isinstance(tracing, _ToolTracing):
            tracing.loop = loop
        return loop

    # ----- the action ---------------------------------------------------------------------
    def _execute(self, call: ToolCall) -> Any:
        result = self.fn(**call) if self.signature.simple else self.signature.invoke(
            self.fn, call)
        if self.compensate is not None:
            self._register(call, result)
        return result

    async def _aexecute(self, call: ToolCall) -> Any:
        result = await (self.fn(**call) if self.signature.simple else self.signature.invoke(
            self.fn, call))
        if self.compensate is not None:
            self._register(call, result)
        return result

    def _undo(self, call: ToolCall, result: Any) -> _Rollback:
        assert self.compensate is not None
        undo = functools.partial(self.compensate, result, **call)
        check = (functools.partial(self.verify_compensation, result, **call)
                 if self.verify_compensation is not None else None)
        return _Rollback(None, undo, (), check, f"{self.name}.compensate",
                         task_type=self.task_type)

    def _register(self, call: ToolCall, result: Any) -> None:
        run = current_run()
        if run is not None:
            entry = self._undo(call, result)
            run.on_rollback(entry.fn, check=entry.check, label=entry.label)

    # ----- a call -------------------------------------------------------------------------
    def loop_for(self, call: ToolCall) -> Loop:
        """The loop this call goes through: an irreversible call whose risk is above the
        threshold (the run's ``approve_irreversible_above``, else the tool's
        ``approve_above``) needs approval."""
        gated = self.gated_loop
        if gated is None:
            return self.loop
        risk = self.risk(call) if callable(self.risk) else self.risk
        run = current_run()
        above = (run.approve_irreversible_above if run is not None
                 and run.approve_irreversible_above is not None else self.approve_above)
        return self.loop if risk <= above else gated  # a NaN risk is not "low": approval

    def answer(self, result: StepResult[Any, Any], run: Run | None) -> Any:
        """What the model gets: the result, a :class:`ToolFeedback`, or a raise."""
        outcome = result.outcome
        if outcome is _SUCCEEDED:
            if run is None:
                self._streak = 0
            return result.result
        name = self.name
        if outcome in _REFUSED:
            raise ToolRefused(f"tool {name} refused the call: {result.error_message}", result)
        if result.error_type in (ErrorType.VALIDATION, ErrorType.BLOCKED):
            count = run.count_invalid(name) if run is not None else self._bump()
            issues = tuple(i for v in result.validation for i in v.blocking_issues)
            if count > self.max_invalid:
                raise ToolRefused(f"tool {name} refused the call: {count} invalid calls "
                                  f"{'in run ' + run.run_id if run else 'in a row'} (at most "
                                  f"{self.max_invalid}); last: {result.error_message}", result)
            lines = [f"closedloop: {name} was not called: its arguments are invalid "
                     f"(invalid call {count} of at most {self.max_invalid}"
                     f"{' in this run' if run else ''})."]
            lines += [f"- {_issue_line(i)}" for i in issues]
            lines.append(f"Fix the arguments and call {name} again." if result.error_type
                         is ErrorType.VALIDATION else f"Do not call {name} with these "
                         "arguments again: the problem is critical.")
            return ToolFeedback("\n".join(lines), result, issues)
        if result.event is not None and result.event.verification_passed is False:
            issues = tuple(i for v in result.verification for i in v.blocking_issues)
            lines = [f"closedloop: {name} ran, but its outcome does not match the intent:"]
            for v in result.verification:
                if v.unknown is not None:
                    lines.append(f"- {v.check}: could not check the outcome: {v.unknown}")
                lines += [f"- {v.check}: {_issue_line(i)}" for i in v.blocking_issues]
            if self.compensate is not None:
                lines.append("The action was rolled back (its compensation ran); decide how to "
                             "proceed.")
            return ToolFeedback("\n".join(lines), result, issues)
        if outcome in _NOT_EXECUTED:
            message = f"closedloop: {name} {_NOT_EXECUTED[outcome]}."
            if result.error_message:
                message += f" ({result.error_message})"
            return ToolFeedback(message, result)
        return result.raise_for_outcome()  # a validator crashed: the check's bug, not the model's

    def _bump(self) -> int:
        self._streak += 1
        return self._streak

    def detached_rollback(self, result: StepResult[Any, Any], call: ToolCall) -> Any:
        """Outside any run, a failed verification is rolled back here: the generator of the
        compensation's actions (recorded like a run's), or None."""
        if (self.compensate is None or result.event is None
                or result.event.verification_passed is not False):
            return None
        entry = self._undo(call, result.result)
        entry.step_id, entry.trace_id = result.step_id, result.trace_id
        return Run.detached(self.loop.store)._rollback(
            [entry], f"verification failed: {result.error_message or ''}")


def _issue_line(issue: Issue) -> str:
    where = f" {issue.location}" if issue.location else ""
    return f"{issue.code}{where}: {issue.message}"


@typing.overload
def tool(fn: F, /) -> F: ...


@typing.overload
def tool(
    fn: None = None,
    *,
    name: str | None = None,
    task_type: str | None = None,
    description: str | None = None,
    validators: Iterable[Callable[..., Any]] = (),
    verifiers: Iterable[Callable[..., Any]] = (),
    compensate: Callable[..., Any] | None = None,
    verify_compensation: Callable[..., Any] | None = None,
    autonomy: Autonomy | str = Autonomy.AUTONOMOUS,
    approver: Approver | None = None,
    irreversible: bool = False,
    risk: float | Callable[[ToolCall], float] = 1.0,
    approve_above: float = 0.0,
    max_invalid: int = 3,
    check_types: bool = True,
    labels: Mapping[str, str] | None = None,
    store: Any = DEFAULT,
    guards: Any = DEFAULT,
    telemetry: Any = DEFAULT,
    runtime: _runtime.Runtime | None = None,
) -> Callable[[F], F]: ...


def tool(
    fn: F | None = None,
    *,
    name: str | None = None,
    task_type: str | None = None,
    description: str | None = None,
    validators: Iterable[Callable[..., Any]] = (),
    verifiers: Iterable[Callable[..., Any]] = (),
    compensate: Callable[..., Any] | None = None,
    verify_compensation: Callable[..., Any] | None = None,
    autonomy: Autonomy | str = Autonomy.AUTONOMOUS,
    approver: Approver | None = None,
    irreversible: bool = False,
    risk: float | Callable[[ToolCall], float] = 1.0,
    approve_above: float = 0.0,
    max_invalid: int = 3,
    check_types: bool = True,
    labels: Mapping[str, str] | None = None,
    store: Any = DEFAULT,
    guards: Any = DEFAULT,
    telemetry: Any = DEFAULT,
    runtime: _runtime.Runtime | None = None,
) -> Any:
    """Guard a function an agent calls as a tool; ``@tool`` or ``@tool(...)``.

    Each call is one closed-loop step of task type ``task_type`` (default: the tool's
    ``name``, default the function's name), recorded in ``store`` and, inside a
    :class:`~closedloop.Run`, part of it (its budgets, its halt, its rollback):

    - **arguments**: the call must fit the function's signature (no missing or unexpected
      argument) and its annotated types (``str``, ``int``, ``float``, ``bool``, containers,
      ``Literal``, unions and ``Optional`` of them; ``check_types=False`` skips them); then
      each of ``validators`` (``validator(arguments: dict)``, any verdict-like return). An
      invalid call is not executed: the tool returns a :class:`ToolFeedback` naming every
      issue, for the model to correct itself; after ``max_invalid`` invalid calls in the
      run (in a row, outside a run) the next one raises :class:`~closedloop.ToolRefused`.
    - **gate**: ``autonomy`` and ``approver`` as for a :class:`~closedloop.Loop`. An
      ``irreversible`` tool needs approval (``autonomy=approve``, through ``approver``) for
      every call whose ``risk`` (a number, or a function of the arguments) is above the
      run's ``approve_irreversible_above``, else the tool's ``approve_above`` (default 0: all).
    - **action**: the function (sync or ``async def``; the wrapper is the same kind, with
      the function's name, docstring, signature and annotations, for frameworks that read
      them). Its exceptions propagate unchanged.
    - **verification**: each of ``verifiers`` (``verifier(arguments, result)``). A mismatch
      is returned to the model as a :class:`ToolFeedback` with the differences, after the
      action is rolled back: ``compensate(result, **arguments)`` undoes it and
      ``verify_compensation(result, **arguments)`` checks the state was restored (inside a
      run, the compensation also runs when the run ends aborted or with an exception).
    - **trace**: a GenAI ``execute_tool {name}`` span with the stages as children, when a
      telemetry pipeline is configured (``telemetry=None``: never).
    """
    options = {"name": name, "task_type": task_type, "description": description,
               "validators": tuple(validators), "verifiers": tuple(verifiers),
               "compensate": compensate, "verify_compensation": verify_compensation,
               "autonomy": autonomy, "approver": approver, "irreversible": irreversible,
               "risk": risk, "approve_above": approve_above, "max_invalid": max_invalid,
               "check_types": check_types, "labels": labels, "store": store, "guards": guards,
               "telemetry": telemetry, "runtime": runtime}

    def decorate(func: F) -> F:
        guarded = GuardedTool(func, **options)
        bind, loop_for, answer = guarded.signature.bind, guarded.loop_for, guarded.answer
        wrapper: Any
        if guarded.is_async:
            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                call = bind(args, kwargs)
                result = await loop_for(call).arun(call)
                run = current_run()
                if run is None and guarded.compensate is not None:
                    rollback = guarded.detached_rollback(result, call)
                    if rollback is not None:
                        await _adrive(rollback)
                return answer(result, run)
            wrapper = async_wrapper
        else:
            loop = guarded.loop if guarded.gated_loop is None else None
            compensates = guarded.compensate is not None

            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                call = bind(args, kwargs)
                result = (loop or loop_for(call)).run(call)
                run = run_scope.get()
                if run is None and compensates:
                    rollback = guarded.detached_rollback(result, call)
                    if rollback is not None:
                        _drive(rollback)
                return answer(result, run if isinstance(run, Run) else None)
            wrapper = sync_wrapper
        wrapper.closedloop_tool = guarded
        return typing.cast(F, wrapper)

    if fn is not None:
        return decorate(fn)
    return decorate
