"""Exactly-once approval under kill -9: real processes, killed between approval and execution
and during execution, then a person's-eye check of every request.

Run: ``python bench/approvals.py`` (options: ``--iterations 1000``, ``--store URL``,
``--batch 50``; default store: a SQLite file in a temporary folder).

Each iteration gates one step (the loop stores a request), approves it, and forks a worker
process that executes it; the bench kills that process with SIGKILL at a random moment:

- mode ``between`` (even iterations): the worker pauses 0-20 ms before it claims, and is
  killed 0-10 ms after it starts, so most kills land between approval and execution;
- mode ``during`` (odd iterations): the worker claims at once and its executor runs for
  10 ms (writing the effect at the end); it is killed 0-12 ms after its executor started
  (it says so through a pipe), so most kills land while it executes, a few just after.

After each batch, two surviving workers race over the store: they mark requests whose lease
ran out ``crashed`` and execute every request still approved. Then every request is checked:

- duplicate executions: an idempotency key in the effect log more than once (must be 0);
- lost approvals: a request still ``approved`` or ``executing``, or ``executed`` with no
  effect (must be 0);
- digest: every effect's proposal digest equals the approved one, and so does the
  ``executed_digest`` the worker recorded (must always hold).

``crashed`` requests are counted apart: the process died while executing, so the effect may
or may not have happened (the log says which); they are never re-run unless a person retries.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import closedloop as cl
from closedloop import approvals as ap

LEASE_S = 0.3


def build(store: cl.Store, log: Path, state: dict[str, float]) -> cl.Loop:
    def agent(task: dict[str, Any], attempt: cl.Attempt) -> dict[str, Any]:
        return {"action": "launch", "n": task["n"], "nonce": task["nonce"]}

    def execute(proposal: dict[str, Any]) -> dict[str, Any]:
        if state["signal_fd"] >= 0:  # tell the bench the executor runs: the kill comes now
            os.write(int(state["signal_fd"]), b"x")
        time.sleep(state["exec_s"])
        line = json.dumps({"key": cl.current_idempotency_key(),
                           "digest": ap.proposal_digest(proposal), "pid": os.getpid()})
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
        return {"launched": proposal["n"]}

    return cl.Loop(agent, task_type="bench.launch", agent_id="bench-agent", executor=execute,
                   autonomy="approve", store=store, guards=(),
                   approval=cl.ApprovalPolicy(lease=LEASE_S))


def child(loop: cl.Loop, store: cl.Store, pause: float, request_id: str | None) -> None:
    """A worker process: executes ``request_id`` (else one round over every approved
    request), then exits (never returns)."""
    code = 0
    try:
        if pause:
            time.sleep(pause)
        if request_id is not None:
            loop.run_approved(request_id, by=f"bench-worker-{os.getpid()}")
        else:
            ap.Worker([loop], by=f"bench-survivor-{os.getpid()}").run_once()
        store.flush(10.0)
    except BaseException:  # noqa: BLE001 - a child reports by exit code only
        code = 1
    os._exit(code)


def fork(loop: cl.Loop, store: cl.Store, pause: float = 0.0,
         request_id: str | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        child(loop, store, pause, request_id)
    return pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--store", default=None)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="cl-approvals-bench-"))
    url = args.store or f"sqlite:///{tmp / 'approvals.db'}"
    log = tmp / "effects.log"
    state = {"exec_s": 0.0, "signal_fd": -1.0}
    store = cl.open_store(url)
    loop = build(store, log, state)
    approvals = ap.approvals_for(store)
    ids: list[str] = []
    modes: dict[str, str] = {}
    kill_state: Counter[str] = Counter()
    started = time.perf_counter()
    cpu0 = os.times()
    for first in range(0, args.iterations, args.batch):
        batch = range(first, min(first + args.batch, args.iterations))
        for i in batch:
            result = loop.run({"n": i, "nonce": rng.randrange(10**6)})
            rid = result.approval_id
            assert rid is not None, result
            ap.approve(rid, by="bench-human", reason="bench", store=store)
            ids.append(rid)
            if i % 2 == 0:
                modes[rid] = "between"
                state["exec_s"] = 0.0
                pid = fork(loop, store, pause=rng.uniform(0.0, 0.020), request_id=rid)
                time.sleep(rng.uniform(0.0, 0.010))
            else:
                modes[rid] = "during"
                state["exec_s"] = 0.010
                read_end, write_end = os.pipe()
                state["signal_fd"] = write_end
                pid = fork(loop, store, request_id=rid)
                os.close(write_end)
                state["signal_fd"] = -1
                ready, _, _ = select.select([read_end], [], [], 30.0)
                os.close(read_end)
                assert ready, "the worker never started executing"
                time.sleep(rng.uniform(0.0, 0.012))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            found = approvals.get(rid)
            assert found is not None
            kill_state[f"{modes[rid]}: killed with the request {found.status.value}"] += 1
        # survivors: after the leases ran out, two workers race over what is left
        time.sleep(LEASE_S * 1.5)
        state["exec_s"] = 0.0
        survivors = [fork(loop, store) for _ in range(2)]
        for pid in survivors:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "a surviving worker failed"
    elapsed = time.perf_counter() - started
    cpu = os.times()
    effects = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() \
        else []
    by_key = Counter(e["key"] for e in effects)
    duplicates = sum(n - 1 for n in by_key.values() if n > 1)
    lost = bad_digest = 0
    final: Counter[str] = Counter()
    crashed_with_effect = 0
    for rid in ids:
        found = approvals.get(rid)
        assert found is not None
        final[found.status.value] += 1
        status = found.status
        if status in (ap.ApprovalStatus.APPROVED, ap.ApprovalStatus.EXECUTING):
            lost += 1
            print(f"lost: {rid} {status.value}: " + "; ".join(
                f"{d.action} by {d.by} ({d.reason})" for d in found.history), file=sys.stderr)
        elif status is ap.ApprovalStatus.EXECUTED:
            if by_key[rid] != 1:
                lost += 1
            if found.result is None or found.result.get("executed_digest") \
                    != found.proposal_digest:
                bad_digest += 1
        elif status is ap.ApprovalStatus.CRASHED:
            crashed_with_effect += by_key[rid] > 0
        else:
            lost += 1  # rejected, expired, failed: none should be here
    digests = {rid: approvals.get(rid) for rid in by_key}
    bad_digest += sum(1 for e in effects
                      if (r := digests.get(e["key"])) is None or e["digest"] != r.proposal_digest)
    load = os.getloadavg()
    print(f"store: {store.url}")
    print(f"iterations: {len(ids)} ({sum(m == 'between' for m in modes.values())} between, "
          f"{sum(m == 'during' for m in modes.values())} during), batch {args.batch}, "
          f"seed {args.seed}")
    print("where the kill landed (the request's state right after it):")
    for key, n in sorted(kill_state.items()):
        print(f"  {key}: {n}")
    print("final states: " + ", ".join(f"{k} {v}" for k, v in sorted(final.items())))
    print(f"crashed requests whose effect did happen before the kill: {crashed_with_effect} "
          f"(surfaced as crashed, never re-run)")
    print(f"effects written: {len(effects)}")
    print(f"DUPLICATE EXECUTIONS: {duplicates}")
    print(f"LOST APPROVALS: {lost}")
    print(f"DIGEST MISMATCHES: {bad_digest}")
    parent = cpu.user - cpu0.user + cpu.system - cpu0.system
    children = (cpu.children_user - cpu0.children_user + cpu.children_system
                - cpu0.children_system)
    print(f"wall {elapsed:.1f} s, parent CPU {parent:.1f} s, children CPU {children:.1f} s; "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    store.close()
    if duplicates or lost or bad_digest:
        sys.exit(1)


if __name__ == "__main__":
    main()
