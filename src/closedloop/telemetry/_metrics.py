"""Prometheus metrics, derived from finished spans on the pipeline's thread.

:class:`Metrics` is a span exporter: the agent's thread only records spans, and the counters
and histograms are updated from them in the background (or, for ``closedloop serve
--metrics``, from the spans other processes wrote to the store). Names follow Prometheus
conventions and, where one exists, the OpenTelemetry GenAI metric translated to Prometheus
(``gen_ai.client.operation.duration`` → ``gen_ai_client_operation_duration_seconds``).
Cardinality is bounded: every label takes at most ``max_label_values`` distinct values
(later ones are reported as ``other``), and no trace id or free text is ever a label.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from closedloop.telemetry._span import STATUS_ERROR, SpanRecord

if TYPE_CHECKING:
    from closedloop._spans import SpanStore, StoredSpan
    from closedloop.store import Store
    from closedloop.telemetry._pipeline import Telemetry

OTHER = "other"
_MAX_LABEL_CHARS = 64
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0)
# Bucket boundaries advised by the GenAI semantic conventions.
GEN_AI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                           20.48, 40.96, 81.92)
GEN_AI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                        16777216, 67108864)
_log = logging.getLogger("closedloop.telemetry")
BREAKER_STATES = ("closed", "open", "half_open", "paused", "halted")


class _Bounded:
    """Keeps a label's distinct values under a cap; values past it become ``other``."""

    __slots__ = ("_lock", "_seen", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = str(value)[:_MAX_LABEL_CHARS] if value is not None else ""
        if text in self._seen:
            return text
        with self._lock:
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(text)
        return text


class Metrics:
    """closedloop's Prometheus metrics, in ``registry`` (the process default unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 max_label_values: int = 100) -> None:
        self.registry = registry if registry is not None else REGISTRY
        self._bound: dict[str, _Bounded] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._batch: dict[tuple[Counter, tuple[str, ...]], float] | None = None
        self.max_label_values = max_label_values
        r = self.registry
        self.task_runs = Counter("closedloop_task_runs", "Loop steps by task type and outcome.",
                                 ["task_type", "outcome"], registry=r)
        self.step_duration = Histogram("closedloop_step_duration_seconds",
                                       "Wall time of a loop step.", ["task_type", "outcome"],
                                       buckets=STEP_BUCKETS, registry=r)
        self.cost = Counter("closedloop_cost_usd", "What loop steps' model calls cost, in US "
                            "dollars (priced steps only).", ["task_type"], registry=r)
        self.reasks = Counter("closedloop_reasks", "Attempts after the first (re-asks).",
                              ["task_type"], registry=r)
        self.validation_failures = Counter(
            "closedloop_validation_failures", "Validator verdicts that did not pass.",
            ["task_type", "check", "kind"], registry=r)
        self.verification_failures = Counter(
            "closedloop_verification_failures", "Verifier verdicts that did not pass.",
            ["task_type", "check", "kind"], registry=r)
        self.tokens = Counter("closedloop_tokens", "Model tokens used by loop steps.",
                              ["task_type", "type"], registry=r)
        self.model_tokens = Counter(
            "closedloop_model_tokens", "Tokens by model call, including cache reads.",
            ["gen_ai_provider_name", "gen_ai_request_model", "type"], registry=r)
        self.op_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "GenAI operation duration.",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
             "error_type"], buckets=GEN_AI_DURATION_BUCKETS, registry=r)
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Tokens per GenAI operation (input and output).",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
             "gen_ai_token_type"], buckets=GEN_AI_TOKEN_BUCKETS, registry=r)
        self.rate_limited_total = Counter(
            "closedloop_rate_limited", "HTTP 429 responses from model providers.",
            ["key"], registry=r)
        self.retry_after = Gauge("closedloop_rate_limit_retry_after_seconds",
                                 "Last Retry-After a provider asked for.", ["key"], registry=r)
        # Fault-control and flow-control state is read from its sources at scrape time
        # (see watch_control); set_breaker_state/set_limiter_available add explicit values.
        self._states: dict[str, str] = {}
        self._available: dict[str, float] = {}
        self._control: list[tuple[Any, Any]] = []
        r.register(_ControlCollector(self))
        self.drift_firings = Counter(
            "closedloop_drift_firings", "Drift and budget detections that fired, by task type "
            "and signal.", ["task_type", "signal"], registry=r)
        self._drift: list[Any] = []
        r.register(_DriftCollector(self))

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _inc(self, metric: Counter, labels: tuple[str, ...], n: float = 1.0) -> None:
        batch = self._batch
        if batch is None:
            self._child(metric, labels).inc(n)
        else:
            key = (metric, labels)
            batch[key] = batch.get(key, 0.0) + n

    def _label(self, name: str, value: object) -> str:
        bound = self._bound.get(name)
        if bound is None:
            bound = self._bound.setdefault(name, _Bounded(self.max_label_values))
        return bound(value)

    # -- the exporter face -------------------------------------------------------------

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Update the metrics from a batch of finished spans (counters summed per batch)."""
        batch: dict[tuple[Counter, tuple[str, ...]], float] = {}
        self._batch = batch
        try:
            for s in spans:
                self.observe(s.name, s.attributes, s.duration_s, s.status == STATUS_ERROR)
        finally:
            self._batch = None
            for (metric, labels), n in batch.items():
                self._child(metric, labels).inc(n)
        return True

    def observe_stored(self, spans: Iterable[StoredSpan]) -> None:
        """Update the metrics from spans read back from a store."""
        for s in spans:
            self.observe(s.name, s.attributes, s.duration_ms / 1000.0, s.status == STATUS_ERROR)

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Metrics are updated synchronously; nothing is buffered."""
        return True

    def shutdown(self) -> None:
        """Metrics stay registered; unregister them from the registry to remove them."""

    def observe(self, name: str, attrs: Mapping[str, Any], duration_s: float,
                error: bool) -> None:
        """Update the metrics one span implies."""
        label = self._label
        if name.startswith("closedloop.step"):
            task = label("task_type", attrs.get("closedloop.task_type"))
            outcome = label("outcome", attrs.get("closedloop.outcome"))
            self._inc(self.task_runs, (task, outcome))
            self._child(self.step_duration, (task, outcome)).observe(duration_s)
            for kind in ("input", "output"):
                n = attrs.get(f"closedloop.usage.{kind}_tokens")
                if n:
                    self._inc(self.tokens, (task, kind), n)
            cost = attrs.get("closedloop.cost_usd")
            if cost:
                self._inc(self.cost, (task,), cost)
        elif name == "closedloop.attempt":
            if int(attrs.get("closedloop.attempt", 1)) > 1:
                self._inc(self.reasks, (label("task_type", attrs.get("closedloop.task_type")),))
        elif name in ("closedloop.validate", "closedloop.verify"):
            if attrs.get("closedloop.verdict.passed", True):
                return
            if attrs.get("closedloop.verdict.crashed"):
                kind = "crashed"
            elif attrs.get("closedloop.verdict.unknown"):
                kind = "unknown"
            else:
                kind = "failed"
            counter = (self.validation_failures if name == "closedloop.validate"
                       else self.verification_failures)
            self._inc(counter, (label("task_type", attrs.get("closedloop.task_type")),
                                label("check", attrs.get("closedloop.check")), kind))
        operation = attrs.get("gen_ai.operation.name")
        if operation is None or operation == "invoke_agent":
            return
        op = label("gen_ai_operation_name", operation)
        provider = label("gen_ai_provider_name", attrs.get("gen_ai.provider.name"))
        model = label("gen_ai_request_model", attrs.get("gen_ai.request.model"))
        err = label("error_type", attrs.get("error.type", "_OTHER" if error else ""))
        self._child(self.op_duration, (op, provider, model, err)).observe(duration_s)
        for key, kind in (("gen_ai.usage.input_tokens", "input"),
                          ("gen_ai.usage.output_tokens", "output"),
                          ("gen_ai.usage.cache_read.input_tokens", "cache_read")):
            n = attrs.get(key)
            if n is None:
                continue
            if kind != "cache_read":
                self._child(self.token_usage, (op, provider, model, kind)).observe(n)
            if n:
                self._inc(self.model_tokens, (provider, model, kind), n)

    # -- state the control layer reports -----------------------------------------------

    def rate_limited(self, key: str, retry_after_s: float | None) -> None:
        """Count a 429 for ``key`` (provider or model) and remember its Retry-After."""
        k = self._label("key", key)
        self.rate_limited_total.labels(k).inc()
        if retry_after_s is not None:
            self.retry_after.labels(k).set(retry_after_s)

    def set_breaker_state(self, task_type: str, state: str) -> None:
        """Report the fault-control state of a task type (one of :data:`BREAKER_STATES`)."""
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown state {state!r}; use one of {', '.join(BREAKER_STATES)}")
        self._states[self._label("task_type", task_type)] = state

    def set_limiter_available(self, key: str, ratio: float) -> None:
        """Report the share (0..1) of a rate limiter's capacity available now."""
        self._available[self._label("key", key)] = ratio

    def watch_control(self, *, ledger: Any = None, backpressure: Any = None) -> None:
        """Expose a control ledger's pauses/halts and a Backpressure's per-key state.

        Read at scrape time: ``ledger.stops()`` gives each task type's paused/halted state;
        ``backpressure.status()`` gives per key the learned rate, the share of the in-flight
        cap that is free, and the circuit breaker's state.
        """
        self._control.append((ledger, backpressure))

    def watch_drift(self, monitor: Any) -> None:
        """Expose a :class:`~closedloop.learn.DriftMonitor`'s detectors at scrape time:
        ``closedloop_drift_state{task_type, signal}``, each signal's largest CUSUM statistic
        over its models as a share of its limit (0: in control; 1 fires)."""
        self._drift.append(monitor)

    def drift_fired(self, task_type: str, signal: str) -> None:
        """Count one drift firing."""
        self._child(self.drift_firings, (self._label("task_type", task_type),
                                         self._label("signal", signal))).inc()

    def watch(self, *, telemetry: Telemetry | None = None, store: Store | None = None) -> None:
        """Also export the dropped/failed counters of a telemetry pipeline and an event store."""
        self.registry.register(_HealthCollector(telemetry, store))


class _ControlCollector(Collector):
    """Task-type fault-control state and per-key flow-control state, at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        states = dict(m._states)
        available = dict(m._available)
        rates: dict[str, float] = {}
        circuits: dict[str, str] = {}
        now = time.time()
        for ledger, backpressure in list(m._control):
            try:
                if ledger is not None:
                    for stop in ledger.stops():
                        if stop.active(now):
                            states[m._label("task_type", stop.task_type)] = str(stop.kind)
                if backpressure is not None:
                    for key, st in backpressure.status().items():
                        k = m._label("key", key)
                        cap = max(1, int(st.get("max_in_flight") or 1))
                        available[k] = max(0.0, 1.0 - int(st.get("in_flight") or 0) / cap)
                        rates[k] = float(st.get("rate") or 0.0)
                        circuits[k] = str(st.get("breaker") or "closed")
            except Exception:  # noqa: BLE001 - a scrape must not fail on one unreadable source
                _log.exception("closedloop: could not read control state for metrics")
        yield _states("closedloop_breaker_state",
                      "Fault-control state per task type (closed: running; paused; halted).",
                      "task_type", states, BREAKER_STATES)
        yield _gauge("closedloop_rate_limiter_available_ratio",
                     "Share of a key's in-flight cap free right now.", available)
        yield _gauge("closedloop_rate_limiter_rate",
                     "Requests per second a key's adaptive limiter allows now.", rates)
        yield _states("closedloop_circuit_breaker_state", "Circuit breaker of each downstream key.",
                      "key", circuits, ("closed", "open", "half_open"))

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _DriftCollector(Collector):
    """Drift detectors' states, at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        values: dict[tuple[str, str], float] = {}
        for monitor in list(m._drift):
            try:
                for row in monitor.snapshot():
                    key = (m._label("task_type", row["task_type"]),
                           m._label("signal", row["signal"]))
                    values[key] = max(values.get(key, 0.0), float(row["statistic"]))
            except Exception:  # noqa: BLE001 - a scrape must not fail on one source
                _log.exception("closedloop: could not read the drift detectors for metrics")
        family = GaugeMetricFamily(
            "closedloop_drift_state", "Drift detector statistic per task type and signal, as "
            "a share of its alarm limit (0: in control, 1: fires).",
            labels=["task_type", "signal"])
        for key, value in sorted(values.items()):
            family.add_metric(list(key), value)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _states(name: str, doc: str, label: str, current: Mapping[str, str],
            states: Sequence[str]) -> StateSetMetricFamily:
    family = StateSetMetricFamily(name, doc, labels=[label])
    for value, state in sorted(current.items()):
        family.add_metric([value], {s: s == state for s in states})
    return family


def _gauge(name: str, doc: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["key"])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class _HealthCollector(Collector):
    """Dropped-telemetry counters, read from the pipeline and the store at scrape time."""

    def __init__(self, telemetry: Telemetry | None, store: Store | None) -> None:
        self.telemetry = telemetry
        self.store = store

    def collect(self) -> Iterator[Metric]:
        if self.telemetry is not None:
            stats = self.telemetry.stats()
            dropped = CounterMetricFamily("closedloop_telemetry_spans_dropped",
                                          "Spans dropped because the queue was full.")
            dropped.add_metric([], stats.dropped)
            yield dropped
            failures = CounterMetricFamily("closedloop_telemetry_export_failures",
                                           "Span batches an exporter failed to deliver.",
                                           labels=["exporter"])
            for exporter, n in sorted(stats.export_failures.items()):
                failures.add_metric([exporter], n)
            yield failures
        if self.store is not None:
            s = self.store.stats()
            not_written = CounterMetricFamily("closedloop_store_events_not_written",
                                              "Step events that did not reach the store.",
                                              labels=["reason"])
            for reason, n in (("dropped", s.dropped), ("dead_lettered", s.dead_lettered),
                              ("lost", s.lost)):
                not_written.add_metric([reason], n)
            yield not_written
            held = GaugeMetricFamily("closedloop_store_events_held",
                                     "Step events held in memory while the store refuses writes.")
            held.add_metric([], s.held)
            yield held
            # the families are there (without series) when the store has no sink
            sent = CounterMetricFamily("closedloop_sink_events_written",
                                       "Step events an event sink (InfluxDB) delivered.",
                                       labels=["sink"])
            lost = CounterMetricFamily("closedloop_sink_events_not_written",
                                       "Step events an event sink dropped or had refused.",
                                       labels=["sink", "reason"])
            waiting = GaugeMetricFamily("closedloop_sink_events_held",
                                        "Step events a sink holds while its destination "
                                        "cannot be reached.", labels=["sink"])
            for name, st in sorted(self.store.sink_stats().items()):
                sent.add_metric([name], st.written)
                lost.add_metric([name, "dropped"], st.dropped)
                lost.add_metric([name, "rejected"], st.rejected)
                waiting.add_metric([name], st.held)
            yield sent
            yield lost
            yield waiting

    def describe(self) -> Iterator[Metric]:
        return iter(())


class StoreTail:
    """Feeds :class:`Metrics` from spans other processes write to a store (``serve``)."""

    def __init__(self, spans: SpanStore, metrics: Metrics, *, from_start: bool = False) -> None:
        self.spans = spans
        self.metrics = metrics
        self.cursor = 0 if from_start else spans.span_cursor()

    def poll(self) -> int:
        """Read spans written since the last poll into the metrics (a page at most: a large
        backlog is caught up over several polls); returns how many."""
        batch, self.cursor = self.spans.spans_since(self.cursor)
        self.metrics.observe_stored(batch)
        return len(batch)


def start_metrics_server(port: int, addr: str = "127.0.0.1",
                         registry: CollectorRegistry | None = None) -> Any:
    """Serve ``/metrics`` from a daemon thread in this process; returns the HTTP server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr,
                                        registry=registry if registry is not None else REGISTRY)
    return server


def metrics_asgi_app(registry: CollectorRegistry | None = None) -> Any:
    """An ASGI app serving the metrics, to mount in a user's own app (``/metrics``)."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry=registry if registry is not None else REGISTRY)
