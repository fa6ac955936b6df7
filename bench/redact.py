"""What redaction costs: per KB of text, per step's spans, per event and per log line.

Run: ``python bench/redact.py`` (options: ``--rounds``, ``--number``).

* per KB: the default redactor on 1 KiB of clean prose, a JSON proposal, base64, log lines,
  64 KiB of prose, and 1 KiB with three secrets in it; with the RE2 gate (``google-re2``
  installed, the ``re2`` extra) and without it (the pure-``re`` path: every rule whose
  keywords occur runs). Texts are fresh per call (no cache: the cache only serves texts of
  at most 256 characters).
* per step: converting one step's six spans to stored rows (``to_stored``, what the store
  exporter does on the pipeline's thread), and within it redacting their attributes
  against merely copying them.
* per event: what the store writer adds per event (``redact_event``) for a succeeded step
  (no text) and a failed one (a 200-character message and a detail).
* per log line: the filter on closedloop's loggers, for a record with two arguments.
* false positives: how many of ``--corpus`` random UUIDs, SHA-256 hashes, trace ids, span
  ids, base64 payloads and 16-digit numbers that fail the Luhn sum the redactor changes
  (the expected answer is none).

Figures are medians of ``--rounds`` rounds of ``--number`` calls each.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable

import closedloop as cl
from closedloop._redact import LOG_FILTER, Redactor, redact_event
from closedloop.telemetry import Capture
from closedloop.telemetry._export import to_stored
from closedloop.telemetry._span import SpanRecord

rng = random.Random(1)


def texts() -> dict[str, str]:
    prose = ("Create a t3.micro instance in eu-west-1 with 20 GiB of gp3 storage, tag it with "
             "the owner and the cost centre, and attach the default security group. ")
    plan = json.dumps({"resource_changes": [
        {"address": f"aws_instance.web[{i}]", "type": "aws_instance",
         "change": {"actions": ["create"], "after": {
             "instance_type": "t3.micro", "ami": "ami-0abcdef1234567890",
             "tags": {"owner": "platform", "id": f"{rng.getrandbits(128):032x}"}}}}
        for i in range(8)]})
    log = "".join(f"2026-12-01T09:{i:02d}:00Z INFO step {rng.getrandbits(64):016x} "
                  f"task=provision_ec2 outcome=succeeded latency_ms={rng.random() * 90:.1f}\n"
                  for i in range(20))
    dirty = (prose * 5)[:900] + (" sk-proj-" + "a1B2" * 12 + " to bob@example.com via "
                                 "postgres://app:hunter2@db:5432/x")
    return {
        "prose 1 KiB": (prose * 10)[:1024],
        "JSON proposal 1 KiB": plan[:1024],
        "base64 1 KiB": base64.b64encode(rng.randbytes(768)).decode(),
        "log lines 1 KiB": log[:1024],
        "prose 64 KiB": (prose * 500)[:65536],
        "3 secrets in 1 KiB": dirty[:1024],
    }


def median_us(fn: Callable[[], object], number: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(samples)


def per_kb(rounds: int, number: int) -> None:
    print("\nper KiB of text (µs/KiB, median):")
    print(f"  {'text':22s} {'RE2 gate':>10s} {'no gate':>10s}")
    for name, text in texts().items():
        row = []
        for gate in (True, False):
            redactor = Redactor(gate=gate)
            redactor._redact(text)  # compile outside the timer
            n = max(1, number // max(1, len(text) // 1024))
            us = median_us(lambda r=redactor, t=text: r._redact(t), n, rounds)  # type: ignore[misc]
            row.append(us / (len(text) / 1024))
        print(f"  {name:22s} {row[0]:10.2f} {row[1]:10.2f}")


def step_spans() -> list[SpanRecord]:
    attrs = {"closedloop.task_type": "provision_ec2"}
    names = [("closedloop.step", {**attrs, "closedloop.agent_id": "agent",
                                  "closedloop.autonomy": "autonomous",
                                  "closedloop.outcome": "succeeded", "closedloop.attempts": 1}),
             ("closedloop.attempt", {**attrs, "closedloop.attempt": 1}),
             ("invoke_agent agent", {"gen_ai.operation.name": "invoke_agent",
                                     "gen_ai.agent.name": "agent",
                                     "gen_ai.usage.input_tokens": 100,
                                     "gen_ai.usage.output_tokens": 20}),
             ("closedloop.validate", {**attrs, "closedloop.check": "has_owner_tag",
                                      "closedloop.verdict.passed": True}),
             ("closedloop.act", dict(attrs)),
             ("closedloop.verify", {**attrs, "closedloop.check": "instance_matches",
                                    "closedloop.verdict.passed": True})]
    return [SpanRecord(1, i + 1, 0, n, a, 0) for i, (n, a) in enumerate(names)]


def per_step(rounds: int, number: int) -> None:
    spans = step_spans()
    capture = Capture.none()
    redactor = Redactor()

    def convert() -> None:
        for s in spans:
            to_stored(s, capture)

    def redact_attributes() -> None:
        for s in spans:
            redactor.attributes(s.attributes)

    def copy_attributes() -> None:
        for s in spans:
            dict(s.attributes)

    convert()
    redact_attributes()
    print("\nper step, six spans on the pipeline's thread (µs/step, median):")
    print(f"  {'to_stored, all six':32s} {median_us(convert, number, rounds):8.2f}")
    redacted = median_us(redact_attributes, number, rounds)
    copied = median_us(copy_attributes, number, rounds)
    print(f"  {'attributes redacted':32s} {redacted:8.2f}")
    print(f"  {'attributes copied (baseline)':32s} {copied:8.2f}")
    print(f"  {'redaction':32s} {redacted - copied:8.2f}")


def per_event(rounds: int, number: int) -> None:
    ok = cl.StepEvent(1.0, "0" * 32, "a", "t", "autonomous", "succeeded", 1, 100, 20, 1.0,
                      True, True, None, None, 0.1, 0.1, 0.1, 0.1, None)
    failed = ok._replace(outcome="failed", error_type="verification",
                         error_message="instance_matches: type is t3.large, wanted t3.micro; "
                                       * 4,
                         detail={"verification": [{"check": "instance_matches",
                                                   "issues": [{"code": "mismatch",
                                                               "message": "type differs"}]}]})
    print("\nper event, in the store writer (µs/event, median):")
    for label, event in (("succeeded (no text)", ok), ("failed, 200-char message", failed)):
        us = median_us(lambda e=event: redact_event(e), number, rounds)  # type: ignore[misc]
        print(f"  {label:26s} {us:8.3f}")


def per_log_line(rounds: int, number: int) -> None:
    record = logging.LogRecord("closedloop.store", logging.WARNING, __file__, 1,
                               "closedloop store %s: write of %d events failed; retrying",
                               ("sqlite:///var/lib/closedloop.db", 4096), None)

    def one() -> None:
        record.msg = "closedloop store %s: write of %d events failed; retrying"
        record.args = ("sqlite:///var/lib/closedloop.db", 4096)
        LOG_FILTER.filter(record)

    print("\nper log line, the filter on closedloop's loggers (µs/record, median):")
    print(f"  {'two arguments':26s} {median_us(one, number, rounds):8.3f}")


def false_positives(n: int) -> None:
    import hashlib
    import uuid

    def luhn_ok(digits: str) -> bool:
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
                    for i, d in enumerate(int(c) for c in reversed(digits)))
        return total % 10 == 0

    def failing_luhn() -> str:
        while True:
            number = "4" + "".join(rng.choice("0123456789") for _ in range(15))
            if not luhn_ok(number):
                return number

    kinds: dict[str, Callable[[], str]] = {
        "UUIDs": lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "SHA-256 hex": lambda: hashlib.sha256(rng.randbytes(16)).hexdigest(),
        "trace ids (32 hex)": lambda: f"{rng.getrandbits(128):032x}",
        "span ids (16 hex)": lambda: f"{rng.getrandbits(64):016x}",
        "base64 (48 bytes)": lambda: base64.b64encode(rng.randbytes(48)).decode(),
        "Visa-like, bad Luhn": failing_luhn,
    }
    redactor = Redactor()
    print(f"\nfalse positives among {n:,} random values of each kind:")
    for name, make in kinds.items():
        changed = 0
        for _ in range(n):
            value = make()
            if redactor(f"id {value} ok") != f"id {value} ok":
                changed += 1
        print(f"  {name:22s} {changed:8d}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--corpus", type=int, default=20_000)
    args = parser.parse_args()
    try:
        import re2  # noqa: F401
        gate = "google-re2 installed"
    except ImportError:
        gate = "google-re2 NOT installed: both columns are the pure-re path"
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}, {gate}")
    per_kb(args.rounds, args.number)
    per_step(args.rounds, args.number)
    per_event(args.rounds, args.number * 10)
    per_log_line(args.rounds, args.number * 10)
    false_positives(args.corpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
