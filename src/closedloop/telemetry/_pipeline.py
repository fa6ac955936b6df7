"""The telemetry pipeline: spans recorded on the hot path, exported from one background thread.

``Telemetry`` keeps finished :class:`~closedloop.telemetry.SpanRecord` objects in a bounded
queue (a ``deque`` append, no lock) and a daemon thread hands them in batches to each exporter
— the embedded store, OTLP over HTTP or gRPC, the Prometheus metrics. Overflow policy: when
``max_queue`` spans are waiting, new spans are dropped and counted (the agent never waits).
An exporter that raises or reports failure is logged and counted, never retried into the
agent's thread. Pending spans are exported on :meth:`Telemetry.flush`, on
:meth:`Telemetry.shutdown` and at interpreter exit; after ``fork()`` the child starts a fresh
queue and thread. The queue and its thread are :class:`closedloop._batching.BatchQueue`,
shared with the event store's writer.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from closedloop._batching import BatchQueue
from closedloop.loop import current_run_id
from closedloop.telemetry._span import (
    KIND_INTERNAL,
    LiveSpan,
    SpanRecord,
    _time_ns,
    activate,
    current_parent,
    deactivate,
    new_span_id,
)

if TYPE_CHECKING:
    from closedloop.loop import StepSpec
    from closedloop.telemetry._looptrace import LoopTracer

log = logging.getLogger("closedloop.telemetry")


@runtime_checkable
class SpanExporter(Protocol):
    """A destination for finished spans; called only from the pipeline's thread."""

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Deliver a batch; return False (or raise) when it did not arrive."""

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Push out anything the exporter buffers itself."""

    def shutdown(self) -> None:
        """Release connections; no export follows."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryStats:
    """What the pipeline did with the spans it was given."""

    exported: int
    queued: int
    dropped: int
    export_failures: dict[str, int]


_pipelines: weakref.WeakSet[Telemetry] = weakref.WeakSet()


class Telemetry:
    """Records spans cheaply and exports them in the background to ``exporters``."""

    def __init__(
        self,
        exporters: Iterable[SpanExporter] = (),
        *,
        max_queue: int = 65_536,
        batch_size: int = 2048,
        flush_interval: float = 0.5,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.exporters: tuple[SpanExporter, ...] = tuple(exporters)
        self.shutdown_timeout = shutdown_timeout
        self._lock = threading.Lock()
        self._queue: BatchQueue[SpanRecord] = BatchQueue(
            self._export, name="telemetry", max_queue=max_queue, batch_size=batch_size,
            flush_interval=flush_interval)
        self.submit = self._queue.submit
        """``submit(span) -> bool``: queue a finished span (False: dropped and counted)."""
        self.submit_many = self._queue.submit_many
        """``submit_many(spans) -> bool``: queue a step's spans at once, or drop them all."""
        self._reset()
        _pipelines.add(self)

    def _reset(self) -> None:
        self._exported = 0
        self._failures: dict[str, int] = {}

    # -- hot path ----------------------------------------------------------------------

    def start_span(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        *,
        kind: int = KIND_INTERNAL,
        parent: SpanRecord | None = None,
    ) -> SpanRecord:
        """Start a span, child of ``parent`` or else of the current OpenTelemetry span.

        ``kind`` is an OpenTelemetry ``SpanKind``'s value (``SpanKind.CLIENT.value`` for a
        call out of the process); internal by default.
        """
        if parent is not None:
            trace_id, parent_id = parent.trace_id, parent.span_id
        else:
            trace_id, parent_id, _ = current_parent()
            if not trace_id:
                trace_id = new_span_id() << 64 | new_span_id()
        attributes = attributes if attributes is not None else {}
        run_id = current_run_id()
        if run_id is not None:  # every span made inside a run names it
            attributes.setdefault("closedloop.run_id", run_id)
        return SpanRecord(trace_id, new_span_id(), parent_id, name, attributes, _time_ns(), kind)

    def end_span(self, span: SpanRecord) -> None:
        """Stamp the end time and queue the span for export (never blocks)."""
        span.end_ns = _time_ns()
        self.submit(span)

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[LiveSpan]:
        """A span around a block, current for OpenTelemetry while the block runs.

        An exception marks the span as an error (and propagates).
        """
        record = self.start_span(name, attributes)
        live = LiveSpan(record, self)
        token = activate(live)
        try:
            yield live
        except BaseException as exc:
            record.fail(f"{type(exc).__name__}: {exc}")  # redacted, then capped, on export
            record.attributes.setdefault("error.type", type(exc).__qualname__)
            raise
        finally:
            deactivate(token)
            self.end_span(record)

    def tracer(self, spec: StepSpec, *, tool: dict[str, Any] | None = None) -> LoopTracer:
        """The tracer a :class:`~closedloop.Loop` uses for its steps (built once per loop).

        ``tool``: the GenAI attributes of a guarded tool (``gen_ai.tool.name``...): its steps
        are traced as ``execute_tool`` spans (see :func:`closedloop.tool`)."""
        from closedloop.telemetry._looptrace import LoopTracer

        return LoopTracer(self, spec, tool)

    # -- control -----------------------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Export every span finished before this call; False on timeout."""
        if not self._queue.flush(timeout):
            return False
        return self._flush_exporters(timeout)

    def _flush_exporters(self, timeout: float | None) -> bool:
        ok = True
        for exporter in self.exporters:
            try:
                ok = bool(exporter.force_flush(timeout if timeout is not None else 30.0)) and ok
            except Exception:
                log.exception("closedloop telemetry: %r failed to flush", exporter)
                ok = False
        return ok

    def shutdown(self, timeout: float | None = None) -> TelemetryStats:
        """Export what is queued, stop the thread and shut the exporters down."""
        if not self._queue.closed:
            timeout = self.shutdown_timeout if timeout is None else timeout
            self._queue.close(timeout)
            self._flush_exporters(timeout)
            for exporter in self.exporters:
                try:
                    exporter.shutdown()
                except Exception:
                    log.exception("closedloop telemetry: %r failed to shut down", exporter)
            stats = self.stats()
            if stats.dropped or stats.export_failures:
                log.warning("closedloop telemetry: %d spans dropped, export failures %s",
                            stats.dropped, stats.export_failures)
        return self.stats()

    def stats(self) -> TelemetryStats:
        """A snapshot of the counters."""
        with self._lock:
            failures = dict(self._failures)
        return TelemetryStats(exported=self._exported, queued=self._queue.queued,
                              dropped=self._queue.dropped, export_failures=failures)

    # -- internals ---------------------------------------------------------------------

    def _export(self, batch: Sequence[SpanRecord]) -> None:
        for exporter in self.exporters:
            try:
                ok = exporter.export(batch)
            except Exception:
                log.exception("closedloop telemetry: exporter %r failed", exporter)
                ok = False
            if not ok:
                name = type(exporter).__name__
                with self._lock:
                    self._failures[name] = self._failures.get(name, 0) + 1
        self._exported += len(batch)


def _shutdown_all() -> None:
    for pipeline in list(_pipelines):
        try:
            pipeline.shutdown(pipeline.shutdown_timeout)
        except Exception:
            log.exception("closedloop telemetry: shutdown at exit failed")


def _after_fork_in_child() -> None:
    for pipeline in list(_pipelines):
        pipeline._reset()


atexit.register(_shutdown_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_telemetry() -> Telemetry | None:
    """The current runtime's pipeline, which loops use unless given one; None until
    configured (see :mod:`closedloop._runtime`)."""
    from closedloop._runtime import current_runtime

    telemetry: Telemetry | None = current_runtime().telemetry
    return telemetry


def active_telemetry() -> Telemetry | None:
    """The pipeline of the current closedloop span (inside a loop step: its loop's), else
    :func:`default_telemetry`; what instrumentation records a span to when given none."""
    _, _, telemetry = current_parent()
    return telemetry if telemetry is not None else default_telemetry()


def set_default_telemetry(telemetry: Telemetry | None) -> Telemetry | None:
    """Install (or with None remove) the current runtime's pipeline; returns the previous
    one, which is left running (the caller's to shut down)."""
    from closedloop._runtime import current_runtime

    return current_runtime().set_telemetry(telemetry)


def reset_default_telemetry() -> None:
    """Shut down and remove the current runtime's pipeline (its store and the rest stay)."""
    previous = set_default_telemetry(None)
    if previous is not None:
        previous.shutdown()
