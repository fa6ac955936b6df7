"""Full instrumentation per step: closedloop's telemetry against the stock OpenTelemetry SDK
and prometheus_client doing the same spans and metrics.

Run: ``python bench/telemetry.py`` (options: ``--steps``, ``--rounds``).

A trivial agent (reports 100/20 tokens), one validator, an executor and one verifier.

* closedloop: ``Loop(..., telemetry=Telemetry([Metrics(registry), no-op exporter]))`` — six
  spans per step (step, attempt, agent, validator, action, verifier; the OpenTelemetry
  context active around each hook) and the step's Prometheus metrics (runs, duration, tokens
  by type), derived from the spans on the pipeline's thread. Its overhead is measured against
  the same ``Loop`` without telemetry.
* stock: the same six spans with the OpenTelemetry SDK (``BatchSpanProcessor``, no-op
  exporter), the same attributes, and the same four ``labels(...).inc()/observe()`` updates
  with ``prometheus_client``, around the same four bare calls. Its overhead is measured
  against those bare calls.

Each round times ``--steps`` steps and then the flush that waits until the background work
(span conversion, metrics, export) is done, so "all-in" counts the background thread's cost
too; "hot path" rounds time only the steps (flushing outside the timer). Rounds of all
variants are interleaved; figures are medians.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, Counter, Histogram

import closedloop as cl
from closedloop.telemetry import Metrics, SpanRecord, Telemetry


def agent(task: int, attempt: cl.Attempt) -> int:
    attempt.record_usage(100, 20)
    return task


def validator(proposal: int) -> None:
    return None


def executor(proposal: int) -> int:
    return proposal


def verifier(intent: int, result: int) -> bool:
    return result == intent


class NoopSDKExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NoopExporter:
    def export(self, spans: Sequence[SpanRecord]) -> bool:
        return True

    def force_flush(self, timeout: float = 10.0) -> bool:
        return True

    def shutdown(self) -> None:
        pass


class Stock:
    """The same spans and metrics, written by hand with the stock SDKs."""

    def __init__(self) -> None:
        self.provider = TracerProvider()
        self.provider.add_span_processor(BatchSpanProcessor(NoopSDKExporter(),
                                                            max_queue_size=1_000_000))
        self.tracer = self.provider.get_tracer("bench")
        r = CollectorRegistry()
        self.runs = Counter("closedloop_task_runs", "", ["task_type", "outcome"], registry=r)
        self.duration = Histogram("closedloop_step_duration_seconds", "",
                                  ["task_type", "outcome"], registry=r)
        self.tokens = Counter("closedloop_tokens", "", ["task_type", "type"], registry=r)

    def step(self, task: int) -> int:
        tracer = self.tracer
        t0 = time.perf_counter()
        attempt = cl.Attempt(number=1, trace_id="", task_type="bench")
        with tracer.start_as_current_span("closedloop.step", attributes={
                "closedloop.task_type": "bench", "closedloop.agent_id": "agent",
                "closedloop.autonomy": "autonomous"}) as root:
            with tracer.start_as_current_span("closedloop.attempt", attributes={
                    "closedloop.task_type": "bench", "closedloop.attempt": 1}):
                with tracer.start_as_current_span("invoke_agent agent", attributes={
                        "gen_ai.operation.name": "invoke_agent",
                        "gen_ai.agent.name": "agent"}) as s:
                    proposal = agent(task, attempt)
                    s.set_attribute("gen_ai.usage.input_tokens", 100)
                    s.set_attribute("gen_ai.usage.output_tokens", 20)
                with tracer.start_as_current_span("closedloop.validate", attributes={
                        "closedloop.task_type": "bench", "closedloop.check": "validator"}) as s:
                    s.set_attribute("closedloop.verdict.passed", validator(proposal) is None)
            with tracer.start_as_current_span("closedloop.act", attributes={
                    "closedloop.task_type": "bench"}):
                result = executor(proposal)
            with tracer.start_as_current_span("closedloop.verify", attributes={
                    "closedloop.task_type": "bench", "closedloop.check": "verifier"}) as s:
                s.set_attribute("closedloop.verdict.passed", verifier(task, result))
            root.set_attributes({"closedloop.outcome": "succeeded", "closedloop.attempts": 1})
        self.runs.labels("bench", "succeeded").inc()
        self.duration.labels("bench", "succeeded").observe(time.perf_counter() - t0)
        self.tokens.labels("bench", "input").inc(100)
        self.tokens.labels("bench", "output").inc(20)
        return result

    def flush(self) -> None:
        self.provider.force_flush()


def bare(task: int) -> int:
    attempt = cl.Attempt(number=1, trace_id="", task_type="bench")
    proposal = agent(task, attempt)
    validator(proposal)
    result = executor(proposal)
    verifier(task, result)
    return result


def timed(fn: Callable[[int], object], steps: int, flush: Callable[[], object] | None,
          all_in: bool) -> float:
    start = time.perf_counter()
    for i in range(steps):
        fn(i)
    if flush is not None and all_in:
        flush()
    elapsed = time.perf_counter() - start
    if flush is not None and not all_in:
        flush()
    return elapsed / steps * 1e6


def run(steps: int, rounds: int) -> dict[str, dict[str, float]]:
    pipeline = Telemetry([Metrics(CollectorRegistry()), NoopExporter()], max_queue=1_000_000,
                         batch_size=4096)
    traced = cl.Loop(agent, task_type="bench", validators=[validator], executor=executor,
                     verifiers=[verifier], store=None, telemetry=pipeline)
    plain = cl.Loop(agent, task_type="bench", validators=[validator], executor=executor,
                    verifiers=[verifier], store=None, telemetry=None)
    stock = Stock()
    variants: dict[str, tuple[Callable[[int], object], Callable[[], object] | None]] = {
        "closedloop traced": (traced.run, pipeline.flush),
        "closedloop untraced": (plain.run, None),
        "stock traced": (stock.step, stock.flush),
        "stock bare": (bare, None),
    }
    results: dict[str, dict[str, float]] = {}
    for mode in ("all-in", "hot path"):
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for fn, flush in variants.values():  # warm up
            timed(fn, steps, flush, True)
        gc.collect()
        for _ in range(rounds):
            for name, (fn, flush) in variants.items():
                samples[name].append(timed(fn, steps, flush, mode == "all-in"))
        results[mode] = {name: statistics.median(v) for name, v in samples.items()}
    stats = pipeline.shutdown()
    assert stats.dropped == 0 and not stats.export_failures, stats
    stock.provider.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}")
    for mode, r in run(args.steps, args.rounds).items():
        ours = r["closedloop traced"] - r["closedloop untraced"]
        theirs = r["stock traced"] - r["stock bare"]
        print(f"[{mode}] per step (median of rounds):")
        for name, us in r.items():
            print(f"  {name:22s} {us:8.2f} µs")
        print(f"  closedloop instrumentation {ours:7.2f} µs/step  (target ≤ 50 µs)")
        print(f"  stock SDK instrumentation  {theirs:7.2f} µs/step")
        print(f"  ratio stock / closedloop   {theirs / ours:7.2f}x  (target ≥ 2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
