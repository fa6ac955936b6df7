"""Shared state in Redis: the Lua port behaves like the Python logic, N workers share one limit,
the halt is seen everywhere, and losing Redis falls back to a local limit and back again."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from closedloop.cli import main
from closedloop.control import (
    Backpressure,
    CaptureSink,
    FaultControl,
    Grant,
    Limits,
    LocalRates,
    RateBackend,
    RedisLedger,
    RedisRates,
    Signal,
    Stop,
    StopKind,
)

from .conftest import OwnRedis

FIXED = Limits(initial_rate=10.0, slow_start=1.0)


def _script(backend: RateBackend, clock: list[float]) -> list[Any]:
    """A fixed sequence of operations covering pacing, overload, breaker and probes."""
    out: list[Any] = []

    def at(t: float) -> None:
        clock[0] = 1000.0 + t

    at(0)
    grants = [backend.acquire("k", FIXED) for _ in range(4)]
    out += grants
    queued = [backend.acquire("k", FIXED) for _ in range(100)]  # callers keep the key busy
    out.append(queued[-1])
    at(0.13)
    out.append(backend.confirm("k", FIXED, grants[1].ticket, 0.03))  # overslept by 30 ms
    at(0.2)
    out.append(backend.confirm("k", FIXED, grants[2].ticket))  # its slot was kept
    at(0.3)
    out.append(backend.confirm("k", FIXED, grants[3].ticket))
    for i in range(20):
        at(0.4 + i * 0.1)
        g = backend.acquire("k", FIXED)
        backend.feedback("k", FIXED, Signal.OK, g.at, None)
    at(2.5)
    backend.feedback("k", FIXED, Signal.OVERLOADED, 2.45 + 1000, None)
    out.append(backend.acquire("k", FIXED))
    for i in range(5):  # the landing: a second 429 measures what was delivered since
        at(2.55 + i * 0.05)
        backend.feedback("k", FIXED, Signal.OK, 1002.5, None)
    at(2.9)
    backend.feedback("k", FIXED, Signal.OVERLOADED, 1002.85, None)
    out.append(backend.acquire("k", FIXED))
    out.append(backend.snapshot("k", FIXED)["ceiling"])
    at(2.92)
    out.append(backend.snapshot("k", FIXED)["rate"])  # held at the halved rate for a latency
    for i in range(10):  # enough successes since that 429 to measure the ceiling from
        at(2.95 + i * 0.02)
        backend.feedback("k", FIXED, Signal.OK, 1002.86 + i * 0.02, None)
    at(3.2)
    backend.feedback("k", FIXED, Signal.OVERLOADED, 1003.15, None)
    out.append(backend.snapshot("k", FIXED)["ceiling"])
    at(3.25)
    backend.feedback("k", FIXED, Signal.OVERLOADED, 1003.22, None)  # soon after: a step down
    out.append(backend.snapshot("k", FIXED)["ceiling"])
    out.append(backend.confirm("k", FIXED, grants[0].ticket))  # a retry keeps its place
    out.append(backend.confirm("k", FIXED, queued[0].ticket))
    for i in range(5):
        at(3.3 + i * 0.01)
        backend.feedback("k", FIXED, Signal.UNAVAILABLE, 1003.3, None)
    out.append(backend.acquire("k", FIXED))
    at(3.8)
    probe = backend.acquire("k", FIXED)
    out += [probe, backend.acquire("k", FIXED)]
    backend.feedback("k", FIXED, Signal.OK, probe.at, None)
    out.append(backend.acquire("k", FIXED))
    snap = backend.snapshot("k", FIXED)
    out.append({k: snap[k] for k in ("rate", "ceiling", "breaker", "failures", "counts")})
    fast = Limits(initial_rate=100.0, slow_start=1.0)
    at(10)
    heads = [backend.acquire("fast", fast) for _ in range(3)]
    at(10.03)  # the head's caller is still asleep: the one behind it may go
    out += [*heads, backend.confirm("fast", fast, heads[2].ticket)]
    at(30)
    for _ in range(500):  # a busy key: a 429, 23 successes in a second, a 429 (measured)...
        backend.acquire("under", fast)
    backend.feedback("under", fast, Signal.OK, 1029.9, None)
    at(31.1)
    backend.feedback("under", fast, Signal.OVERLOADED, 1031.0, None)
    for i in range(23):
        at(31.1 + (i + 0.5) / 23)
        backend.feedback("under", fast, Signal.OK, 1031.0 + (i + 0.5) / 23, None)
    at(32.1)
    backend.feedback("under", fast, Signal.OVERLOADED, 1032.0, None)
    out.append(backend.snapshot("under", fast)["ceiling"])
    for i in range(10):  # ...then callers that wake up late leave most of the rate unused
        at(32.2 + (i + 0.5) * 0.12)
        backend.feedback("under", fast, Signal.OK, 1032.1 + (i + 0.5) * 0.12, None)
    at(33.4)
    backend.feedback("under", fast, Signal.OVERLOADED, 1033.3, None)
    out += [backend.snapshot("under", fast)[k] for k in ("ceiling", "rate")]
    quota = Limits(initial_rate=100.0, max_rate=100.0)  # told the provider's quota
    at(40)
    told = [backend.acquire("quota", quota) for _ in range(300)]
    for i in range(1, 100):  # the callers go at every turn
        at(40 + i / 100)
        out.append(backend.confirm("quota", quota, told[i].ticket).ready)
    at(41)
    backend.feedback("quota", quota, Signal.OVERLOADED, 1040.95, None)  # clumps: let pass
    out.append(backend.snapshot("quota", quota)["rate"])
    for i in range(1, 8):  # ...until more than 5% of the calls are refused
        at(41 + i / 100)
        backend.feedback("quota", quota, Signal.OVERLOADED, 1040.96 + i / 100, None)
    snap = backend.snapshot("quota", quota)
    out += [snap["rate"], snap["counts"]]
    queue = iter(told[100:])
    head = next(queue)
    for i in range(100):  # callers go at every turn while the rate climbs back; a 429:
        at(41.1 + i / 100)  # refusals before the decrease are not counted again, a clump
        if backend.confirm("quota", quota, head.ticket).ready:
            head = next(queue)
    backend.feedback("quota", quota, Signal.OVERLOADED, 1042.05, None)
    out.append(backend.snapshot("quota", quota)["counts"])
    for i in range(30):  # one caller at a time, 10/s: an idle key, so a 429 is a signal
        at(45 + i / 10)
        out.append(backend.acquire("idle", quota).ready)
    backend.feedback("idle", quota, Signal.OVERLOADED, 1047.9, None)
    out.append(backend.snapshot("idle", quota)["counts"])
    at(60)  # callers that go at every turn and a downstream that lets fewer through:
    busy = iter([backend.acquire("fell", fast) for _ in range(400)])
    head = next(busy)
    oks = [(1061.1, Signal.OVERLOADED, 1061.0)]
    oks += [(1061.0 + (i + 0.5) / 23 + 0.1, Signal.OK, 1061.0 + (i + 0.5) / 23)
            for i in range(23)]
    oks += [(1062.1, Signal.OVERLOADED, 1062.0)]
    oks += [(1062.1 + (i + 0.5) * 0.075 + 0.1, Signal.OK, 1062.1 + (i + 0.5) * 0.075)
            for i in range(12)]
    oks += [(1063.1, Signal.OVERLOADED, 1063.0)]
    for i in range(3100):
        at(60 + i / 1000)
        while oks and oks[0][0] <= clock[0]:
            _, signal, sent = oks.pop(0)
            backend.feedback("fell", fast, signal, sent, None)
        if backend.confirm("fell", fast, head.ticket).ready:
            head = next(busy)
    for _, signal, sent in oks:
        backend.feedback("fell", fast, signal, sent, None)
    out += [backend.snapshot("fell", fast)[k] for k in ("ceiling", "rate", "counts")]
    at(70)  # a ceiling of 60/s; callers that wake up late (25/s); a 429 once the rate has
    busy = iter([backend.acquire("probe", fast) for _ in range(400)])  # gone above it
    head = next(busy)
    oks = [(1071.1, Signal.OVERLOADED, 1071.0)]
    oks += [(1071.0 + (i + 0.5) / 60 + 0.1, Signal.OK, 1071.0 + (i + 0.5) / 60)
            for i in range(60)]
    oks += [(1072.1, Signal.OVERLOADED, 1072.0), (1073.55, Signal.OVERLOADED, 1073.5)]
    for i in range(3600):
        at(70 + i / 1000)
        while oks and oks[0][0] <= clock[0]:
            _, signal, sent = oks.pop(0)
            backend.feedback("probe", fast, signal, sent, None)
        if (i < 2100 or i % 40 == 0) and backend.confirm("probe", fast, head.ticket).ready:
            head = next(busy)
    out += [backend.snapshot("probe", fast)[k] for k in ("ceiling", "rate", "counts")]
    at(50)  # slots every 10 ms; callers that say they wake up late are owed missed slots
    owed = [backend.acquire("owed", fast) for _ in range(5)]
    at(50.02)
    out.append(backend.confirm("owed", fast, owed[1].ticket, 0.01))
    at(50.03)
    out.append(backend.confirm("owed", fast, owed[3].ticket))
    at(50.031)
    out.append(backend.confirm("owed", fast, owed[2].ticket, 0.011))
    at(50.04)
    out.append(backend.confirm("owed", fast, owed[4].ticket))
    return out


def _rounded(items: list[Any]) -> list[Any]:
    return [(round(i.wait, 6), i.ticket, round(i.at, 6), i.reserved, i.probe, i.reason)
            if isinstance(i, Grant) else i for i in items]


def test_the_lua_port_decides_exactly_like_the_python_logic(redis_url: str,
                                                             prefix: str) -> None:
    clock = [0.0]
    now: Callable[[], float] = lambda: clock[0]  # noqa: E731
    rates = LocalRates(clock=now)
    local = _rounded(_script(rates, clock))
    assert rates.state("k").counts["decreases"] == 4
    assert rates.state("k").measured  # the script covers a measured ceiling too
    # ...clumps let pass, then a rate signal; and owed slots
    assert rates.state("quota").counts["decreases"] >= 1
    assert local[-2][0] == 0 and local[-2][3]  # the late caller took the slot it missed
    # five clumps let pass (5% of ~100 calls), then a rate signal; after that decrease one
    # more, since refusals are counted afresh
    assert rates.state("quota").counts["clumps"] == 6
    assert rates.state("idle").counts["decreases"] == 1
    assert rates.state("fell").ceiling < 15  # refused calls are not a rate left unused
    assert rates.state("probe").counts["decreases"] == 3  # above the ceiling: no clump
    shared = _rounded(_script(RedisRates(redis_url, prefix=prefix, clock=now), clock))
    assert shared == local


_WORKER = """
import json, sys, time
from closedloop.control import Backpressure, Limits, RedisRates
url, prefix, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
bp = Backpressure(backend=RedisRates(url, prefix=prefix),
                  limits=Limits(initial_rate=40.0, slow_start=1.0, burst=1))
calls = []  # per call: a time before it asked for a slot, and one after it got it
end = time.time() + seconds
while time.time() < end:
    asked = time.time()
    bp.call("provider", lambda: calls.append((asked, time.time())))
print(json.dumps(calls))
"""


def test_two_processes_share_one_limit(redis_url: str, prefix: str, tmp_path: Path) -> None:
    from closedloop.control._core import CATCH_UP

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), redis_url, prefix, "1.5"],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(outs), "both workers made calls"
    calls = [(asked, got) for out in outs for asked, got in out]
    # Any one-second window holds at most rate + burst slots (and the lateness the limiter
    # catches up). A call's slot lies between its two times, so the calls counted for a
    # window are those with both times in it, whatever the load delayed: no lower bound on
    # how many calls a loaded machine manages, and no window miscounted by a late clock read.
    rate, burst = 40.0, 1
    worst = max(sum(1 for asked, got in calls if end - 1.0 <= asked and got <= end)
                for end in (got for _, got in calls))
    assert worst <= int(rate * (1.0 + CATCH_UP)) + burst


def test_losing_redis_falls_back_to_a_local_limit_and_resyncs(
        own_redis: OwnRedis, caplog: pytest.LogCaptureFixture) -> None:
    rates = RedisRates(own_redis.url, retry_every=0.05, socket_timeout=0.2)
    bp = Backpressure(backend=rates, limits=Limits(initial_rate=50.0, slow_start=1.0))
    bp.call("provider", lambda: None)
    assert not rates.degraded
    own_redis.stop()
    bp.call("provider", lambda: None)  # still works, on the local share
    assert rates.degraded_since is not None
    assert "falling back" in caplog.text
    assert "degraded" in bp.status()["provider"]
    assert rates.local_limits("provider", bp.limits).max_rate <= 50.0
    own_redis.start()
    time.sleep(0.06)
    bp.call("provider", lambda: None)
    assert not rates.degraded
    assert "is back" in caplog.text
    assert rates.keys() == ["provider"]


def test_a_halt_in_redis_stops_every_worker(redis_url: str, prefix: str) -> None:
    ledger = RedisLedger(redis_url, prefix=prefix)
    here = FaultControl(ledger=ledger, sinks=[CaptureSink()], recheck=0.0)
    elsewhere = FaultControl(ledger=RedisLedger(redis_url, prefix=prefix), sinks=[],
                             recheck=0.0)
    ledger.put(Stop(task_type="provision", kind=StopKind.HALTED, reason="bad outcomes",
                    by="FaultControl", at=time.time()))
    refusal = elsewhere.admit("provision")
    assert refusal is not None
    assert refusal.outcome == "halted"
    here.resume("provision", reason="fixed", by="bob")
    assert elsewhere.admit("provision") is None
    assert ledger.history(1)[0]["by"] == "bob"


def test_a_pause_in_redis_never_replaces_a_halt(redis_url: str, prefix: str) -> None:
    ledger = RedisLedger(redis_url, prefix=prefix)
    now = time.time()
    ledger.put(Stop(task_type="t", kind=StopKind.HALTED, reason="h", by="x", at=now))
    ledger.put(Stop(task_type="t", kind=StopKind.PAUSED, reason="p", by="x", at=now,
                    until=now + 60))
    stop = ledger.get("t")
    assert stop is not None
    assert stop.kind is StopKind.HALTED


def test_status_shows_the_shared_limits(redis_url: str, prefix: str) -> None:
    bp = Backpressure(backend=RedisRates(redis_url, prefix=prefix))
    bp.call("openai/gpt-4o", lambda: None)
    result = CliRunner().invoke(main, ["status", "--store", "memory://", "--redis", redis_url,
                                       "--prefix", prefix, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["keys"]["openai/gpt-4o"]["breaker"] == "closed"
    assert data["keys"]["openai/gpt-4o"]["workers"] == 1


async def test_the_async_driver_shares_the_limit_too(redis_url: str, prefix: str) -> None:
    rates = RedisRates(redis_url, prefix=prefix)
    bp = Backpressure(backend=rates)

    async def call() -> str:
        return "ok"
    try:
        assert await bp.acall("k", call) == "ok"
        assert bp.status()["k"]["counts"]["ok"] == 1
    finally:
        await rates.aclose()


async def test_the_async_driver_reloads_the_script_on_a_fresh_redis(own_redis: OwnRedis) -> None:
    import redis as redis_lib

    rates = RedisRates(own_redis.url)
    bp = Backpressure(backend=rates)

    async def call() -> str:
        return "ok"
    try:
        assert await bp.acall("k", call) == "ok"
        # our own server, never the shared one: it forgets its scripts, as after a restart
        redis_lib.Redis.from_url(own_redis.url).script_flush()
        assert await bp.acall("k", call) == "ok"
        assert not rates.degraded  # NOSCRIPT is answered by loading the script, not a fallback
        assert bp.status()["k"]["counts"]["ok"] == 2
    finally:
        await rates.aclose()
