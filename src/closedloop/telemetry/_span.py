"""Spans as cheap data: what the hot path records, and the OpenTelemetry face it shows user code.

A :class:`SpanRecord` is a slotted object filled on the agent's thread (ids, name, times,
attributes); nothing is converted, serialised or exported there. While a stage runs user code,
a :class:`LiveSpan` is the current OpenTelemetry span: it carries the record's ids, so a user's
own OpenTelemetry spans started inside a closedloop stage are its children, and attributes a
user sets on ``trace.get_current_span()`` land on closedloop's record.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY  # the key set_span_in_context uses
from opentelemetry.util import types

from closedloop._redact import clip

if TYPE_CHECKING:
    from closedloop.telemetry._pipeline import Telemetry

_getrandbits = random.getrandbits
_time_ns = time.time_ns
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)

# OTLP span kinds, as stored (same numbering as opentelemetry.trace.SpanKind)
KIND_INTERNAL = 0
KIND_CLIENT = 2

STATUS_UNSET = 0
STATUS_OK = 1
STATUS_ERROR = 2


def new_span_id() -> int:
    """A random non-zero 64-bit span id."""
    return _getrandbits(64) or 1


class SpanRecord:
    """One finished (or running) span as plain data; ids are ints, times are ns since epoch.

    ``content`` holds captured prompt/response text kept apart from ``attributes`` so that
    each destination decides whether (and how redacted) content leaves the process.
    """

    __slots__ = ("attributes", "content", "end_ns", "events", "kind", "name", "parent_id",
                 "span_id", "start_ns", "status", "status_message", "trace_id")

    def __init__(  # noqa: PLR0917 - positional on purpose: built on the hot path
        self,
        trace_id: int,
        span_id: int,
        parent_id: int,
        name: str,
        attributes: dict[str, Any],
        start_ns: int,
        kind: int = KIND_INTERNAL,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.name = name
        self.attributes = attributes
        self.start_ns = start_ns
        self.end_ns = 0
        self.kind = kind
        self.status = STATUS_UNSET
        self.status_message: str | None = None
        self.content: dict[str, Any] | None = None
        self.events: list[tuple[str, int, dict[str, Any]]] | None = None

    @property
    def trace_id_hex(self) -> str:
        """The trace id as 32 lowercase hex digits (W3C form)."""
        return f"{self.trace_id:032x}"

    @property
    def span_id_hex(self) -> str:
        """The span id as 16 lowercase hex digits."""
        return f"{self.span_id:016x}"

    @property
    def parent_id_hex(self) -> str | None:
        """The parent span id as hex, or None for a root span."""
        return f"{self.parent_id:016x}" if self.parent_id else None

    @property
    def duration_s(self) -> float:
        """End minus start, in seconds."""
        return (self.end_ns - self.start_ns) / 1e9

    def fail(self, message: str | None) -> None:
        """Mark the span as an error with a short description."""
        self.status = STATUS_ERROR
        self.status_message = message

    def __repr__(self) -> str:
        return (f"SpanRecord({self.name!r}, trace={self.trace_id_hex}, span={self.span_id_hex}, "
                f"parent={self.parent_id_hex})")


class LiveSpan(trace.Span):
    """The OpenTelemetry span user code sees while a closedloop stage runs.

    Its :class:`~opentelemetry.trace.SpanContext` is built only when asked (a user starting a
    child span asks; most stages never do). Setting attributes, events or status writes into
    closedloop's record; ``end()`` is ignored because closedloop ends its own spans.
    """

    __slots__ = ("_context", "record", "telemetry")

    def __init__(self, record: SpanRecord, telemetry: Telemetry | None) -> None:
        self.record = record
        self.telemetry = telemetry
        self._context: SpanContext | None = None

    def get_span_context(self) -> SpanContext:
        ctx = self._context
        if ctx is None:
            rec = self.record
            ctx = self._context = SpanContext(rec.trace_id, rec.span_id, False, _SAMPLED)
        return ctx

    def is_recording(self) -> bool:
        return self.record.end_ns == 0

    def end(self, end_time: int | None = None) -> None:
        """closedloop ends its own spans; a user's ``end()`` is a no-op."""

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        self.record.attributes.update(attributes)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        self.record.attributes[key] = value

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        rec = self.record
        if rec.events is None:
            rec.events = []
        rec.events.append((name, timestamp or _time_ns(), dict(attributes or {})))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        """Links are not recorded by closedloop's spans."""

    def update_name(self, name: str) -> None:
        self.record.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        code = status.status_code if isinstance(status, Status) else status
        if code is StatusCode.ERROR:
            msg = status.description if isinstance(status, Status) else description
            self.record.fail(msg or description)
        elif code is StatusCode.OK:
            self.record.status = STATUS_OK

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        attrs: dict[str, Any] = {"exception.type": type(exception).__qualname__,
                                 "exception.message": clip(str(exception), 2000)}
        attrs.update(attributes or {})
        self.add_event("exception", attrs, timestamp)

    def __repr__(self) -> str:
        return f"LiveSpan({self.record!r})"


_get_value = otel_context.get_value
_attach = otel_context.attach
_detach = otel_context.detach
_Context = otel_context.Context


def activate(span: LiveSpan) -> object:
    """Make ``span`` the current OpenTelemetry span; returns the token for :func:`deactivate`."""
    current = otel_context.get_current()
    return _attach(_Context({**current, _SPAN_KEY: span}))


def deactivate(token: object) -> None:
    """Restore the context that was current before :func:`activate`."""
    _detach(token)  # type: ignore[arg-type]


def current_parent() -> tuple[int, int, Telemetry | None]:
    """``(trace_id, span_id, telemetry)`` of the current span; zeros when there is none."""
    span = _get_value(_SPAN_KEY)
    if span is None:
        return 0, 0, None
    if type(span) is LiveSpan:
        rec = span.record
        return rec.trace_id, rec.span_id, span.telemetry
    ctx = span.get_span_context()  # type: ignore[attr-defined]
    if not ctx.is_valid:
        return 0, 0, None
    return ctx.trace_id, ctx.span_id, None


def hex_id(value: int, width: int) -> str:
    """An id as fixed-width lowercase hex."""
    return f"{value:0{width}x}"


def jsonable(value: object) -> object:
    """Attribute values as JSON-ready data (tuples become lists)."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [jsonable(v) for v in value]
    return value
