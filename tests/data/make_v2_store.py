"""Make ``store_v2.db``: a real schema-version-2 SQLite store, written by closedloop's code of
that version (commit 1a06e45, the last main before event schema v3). Kept for the record; the
file it made is committed and the migration tests read a copy of it.

How it was made::

    mkdir -p /tmp/v2 && git archive 1a06e45 | tar -x -C /tmp/v2
    PYTHONPATH=/tmp/v2/src python tests/data/make_v2_store.py tests/data/store_v2.db

It holds six step events of two task types (succeeded, a validation failure with its
re-ask detail, an agent exception, a verification failure), the spans of those steps (the
telemetry pipeline writing into the store), two scores, and a halt of ``deploy`` with its
history row. The event timestamps come from a fixed clock; trace ids and span times are
whatever the run gave.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import closedloop as cl
from closedloop import telemetry
from closedloop.control import SQLiteLedger, Stop, StopKind
from closedloop.telemetry import record_score

T0 = 1_790_000_000.0


def main(path: Path) -> None:
    if path.exists():
        raise SystemExit(f"{path} exists; remove it first")
    store = cl.open_store(path)
    pipeline = telemetry.configure(store=store, metrics=False)
    ticks = iter(range(100))

    def wallclock() -> float:
        return T0 + 60.0 * next(ticks)

    def agent(task: str, attempt: cl.Attempt) -> dict[str, object]:
        if task == "boom":
            raise RuntimeError("model unreachable at 10.0.0.7")
        attempt.record_usage(100, 20)
        return {"name": task, "size": "small" if attempt.is_retry else "huge"}

    def size_ok(proposal: dict[str, object]) -> str | None:
        return None if proposal["size"] == "small" else "size must be small"

    def verifier(intent: str, result: dict[str, object]) -> str | None:
        return "region mismatch: eu-west-1 != us-east-1" if intent == "drift" else None

    provision = cl.Loop(agent, task_type="ec2.provision", validators=[size_ok],
                        executor=lambda p: p, verifiers=[verifier], store=store, guards=(),
                        wallclock=wallclock)
    deploy = cl.Loop(agent, task_type="deploy", executor=lambda p: p, store=store, guards=(),
                     wallclock=wallclock)
    first = provision.run("web-1")  # re-asked once, then succeeded
    provision.run("drift")  # verification failed
    deploy.run("api")
    deploy.run("worker")
    with contextlib.suppress(RuntimeError):  # the agent's exception is re-raised
        deploy.run("boom")
    provision.run("db-1")
    record_score(first.trace_id, "quality", 0.75, comment="fine", source="human", store=store,
                 clock=lambda: T0 + 3600.0)
    record_score(first.trace_id, "verdict", "good", source="rule", store=store,
                 clock=lambda: T0 + 3601.0)
    pipeline.shutdown()
    store.close()
    SQLiteLedger(path).put(Stop(task_type="deploy", kind=StopKind.HALTED,
                                reason="verification failed 3 times in 5 min",
                                by="fixture@make_v2_store", at=T0 + 7200.0,
                                evidence={"failures": 3}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
