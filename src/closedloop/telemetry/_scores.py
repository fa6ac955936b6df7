"""Semantic scores: judgements attached to a trace after the fact, and their summary.

A user's thumbs-down, a reviewer's quality grade, a rule's or a model's evaluation: each is a
:class:`~closedloop.telemetry.Score` on a trace id (optionally one span), stored next to the
trace and readable as a ``gen_ai.evaluation.result`` event.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError
from closedloop._redact import default_redactor, redact_text
from closedloop._spans import Score, TaskScores
from closedloop.store import span_store_for

if TYPE_CHECKING:
    from closedloop.store import Store

__all__ = ["SOURCES", "OTelScoreExporter", "TaskScores", "otlp_http_scores", "record_score"]

SOURCES = ("human", "rule", "model")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_SPAN_ID = re.compile(r"^[0-9a-f]{16}$")


def record_score(
    trace_id: str,
    name: str,
    value: float | bool | str | None = None,
    *,
    label: str | None = None,
    span_id: str | None = None,
    comment: str | None = None,
    source: str = "human",
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
) -> Score:
    """Attach a score to a trace (or one of its spans) and store it.

    ``value`` may be a number, a bool (stored as 1/0) or a string (stored as the categorical
    ``label``). A malformed id, an empty name, an unknown source or a non-finite value is a
    :class:`~closedloop.ConfigError`.
    """
    trace_id = trace_id.strip().lower()
    if not _TRACE_ID.match(trace_id):
        raise ConfigError(f"trace id {trace_id!r} is not 32 hex digits")
    if span_id is not None:
        span_id = span_id.strip().lower()
        if not _SPAN_ID.match(span_id):
            raise ConfigError(f"span id {span_id!r} is not 16 hex digits")
    if not name or not name.strip():
        raise ConfigError("score name must be a non-empty string")
    if source not in SOURCES:
        raise ConfigError(f"score source must be one of {', '.join(SOURCES)}, got {source!r}")
    number: float | None = None
    if isinstance(value, str):
        if label is not None:
            raise ConfigError("give a categorical score as value or label, not both")
        label = value
    elif value is not None:
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"score value must be finite, got {value!r}")
    if number is None and label is None:
        raise ConfigError(f"score {name!r} needs a value or a label")
    if store is None:
        from closedloop.store import default_store

        store = default_store()
    # free text is redacted before it is stored (a comment may quote what went wrong)
    score = Score(trace_id=trace_id, span_id=span_id, name=name.strip(), value=number,
                  label=None if label is None else redact_text(label),
                  comment=None if comment is None else redact_text(comment), source=source,
                  ts=clock())
    span_store_for(store).add_score(score)
    return score


class OTelScoreExporter:
    """Sends scores as ``gen_ai.evaluation.result`` events (OTLP log records with the event
    name, the trace and span ids, and the score attributes) through an official OpenTelemetry
    log exporter, so evaluation tools see them next to the traces."""

    def __init__(self, exporter: Any, *, service_name: str = "closedloop") -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        from closedloop._version import __version__

        self.exporter = exporter
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("closedloop", __version__)

    def export(self, scores: Sequence[Score]) -> bool:
        """Send the scores; True when the exporter reports success."""
        from opentelemetry._logs import LogRecord
        from opentelemetry.sdk._logs import ReadableLogRecord
        from opentelemetry.sdk._logs.export import LogRecordExportResult
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
        from opentelemetry.trace import set_span_in_context as in_context

        records = []
        for score in scores:
            event = score.to_event()
            ts = int(score.ts * 1e9)
            span = SpanContext(int(score.trace_id, 16),
                               int(score.span_id, 16) if score.span_id else 0, False,
                               TraceFlags(TraceFlags.SAMPLED))
            record = LogRecord(timestamp=ts, observed_timestamp=ts,
                               context=in_context(NonRecordingSpan(span)),
                               event_name=event["name"],
                               attributes=default_redactor().attributes(event["attributes"]))
            records.append(ReadableLogRecord(record, self.resource, self.scope))
        return self.exporter.export(records) is LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        """Shut the log exporter down."""
        self.exporter.shutdown()


def otlp_http_scores(endpoint: str, *, timeout: float = 10.0) -> OTelScoreExporter:
    """Scores over OTLP/HTTP (``endpoint`` like ``http://collector:4318/v1/logs``)."""
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    return OTelScoreExporter(OTLPLogExporter(endpoint=endpoint, timeout=timeout))
