"""Backpressure benchmark: closedloop against the baselines, on a simulated rate-limited provider.

Scenario 1 runs in VIRTUAL TIME: an asyncio event loop whose clock only advances when every
task is waiting (a discrete-event simulation), so 30 simulated seconds of 64 agents take a
second or two of CPU, and the result is deterministic for a seed. The provider admits R
requests/s (token bucket, burst 5), answers after 100 ms ± 30 ms, says 429 with
``Retry-After: 1`` when over its limit, and is fully down (503) for 5 s in the middle.
Strategies compared in the same run: naive immediate retry, tenacity (exponential backoff
with full jitter), a faithful port of the design's controller (started at 2R), aiolimiter
with the true R (the oracle), and closedloop (not told R).

``--only late`` runs scenario 2's shape in virtual time with each worker process taken off
the CPU at random (``--run-ms``, ``--stall-ms``; the provider too with ``--server-stall-ms``):
late wake-ups and requests handled in a clump, deterministic for a seed.

Scenario 2 runs in REAL TIME against the Redis at 127.0.0.1:6379 (or $CLOSEDLOOP_REDIS_URL):
4 worker processes share one Redis-backed limiter on a provider of rate R; it reports their
aggregate rate against R, and the cost of one Redis-backed acquire (p50, p99).

    python bench/backpressure.py            # both scenarios
    python bench/backpressure.py --only sim # scenario 1 only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import selectors
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiolimiter
import tenacity

from closedloop.control import Backpressure, BackpressureError, Limits

# ----------------------------------------------------------------------------------------
# virtual time


class _VirtualSelector(selectors.DefaultSelector):
    """Instead of sleeping until the next timer, jump the virtual clock to it.

    Every pass also moves the clock by 0.1 µs, as a real clock would, so that code which
    re-arms a timer for "now + rounding error" (aiolimiter does) cannot spin forever.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready and self.loop is not None:
            self.loop.vtime += max(timeout or 0.0, 1e-7)
        return ready


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual: sleeps cost no wall-clock time."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self.vtime = 0.0

    def time(self) -> float:
        return self.vtime


# ----------------------------------------------------------------------------------------
# the simulated provider


class ProviderError(Exception):
    """What an HTTP client raises on 429/503: a status code and the response headers."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers


@dataclass
class Provider:
    rate: float
    burst: float
    outage: tuple[float, float]
    rng: random.Random
    latency: float = 0.1
    jitter: float = 0.03
    refuse_at_once: bool = False
    """Admission on arrival: the 429 is answered at once, only admitted calls take latency."""
    tokens: float = 0.0
    last: float = 0.0
    calls: int = 0
    throttled: int = 0
    unavailable: int = 0
    successes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    async def call(self) -> float:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.calls += 1
        delay = self.latency + self.rng.uniform(-self.jitter, self.jitter)
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.outage[0] <= now < self.outage[1]:
            self.unavailable += 1
            await asyncio.sleep(delay)
            raise ProviderError(503, {})
        if self.tokens < 1.0:
            self.throttled += 1
            retry_after = math.ceil((1.0 - self.tokens) / self.rate)
            await asyncio.sleep(0.0 if self.refuse_at_once else delay)
            raise ProviderError(429, {"Retry-After": str(retry_after)})
        self.tokens -= 1.0
        await asyncio.sleep(delay)
        self.successes.append(loop.time())
        return delay


# ----------------------------------------------------------------------------------------
# the design's controller, ported faithfully from the article's Go code


class DesignController:
    """The article's BackpressureController: refill = maxRate / multiplier, 100 ms polls."""

    def __init__(self, max_rate: float, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.tokens = max_rate
        self.max_tokens = max_rate
        self.refill_rate = max_rate
        self.last_refill = clock()
        self.failure_count = 0
        self.success_count = 0
        self.backoff_multiplier = 1.0

    async def acquire(self) -> None:
        while True:
            now = self.clock()
            elapsed = now - self.last_refill
            self.tokens = min(self.max_tokens,
                              self.tokens + elapsed * self.refill_rate / self.backoff_multiplier)
            self.last_refill = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            await asyncio.sleep(0.1)

    def record_success(self) -> None:
        self.success_count += 1
        self.failure_count = 0
        if self.success_count >= 10:
            self.backoff_multiplier = max(1.0, self.backoff_multiplier * 0.9)
            self.success_count = 0

    def record_failure(self) -> None:
        self.failure_count += 1
        self.success_count = 0
        if self.failure_count >= 3:
            self.backoff_multiplier = min(16.0, self.backoff_multiplier * 2.0)
            self.failure_count = 0


# ----------------------------------------------------------------------------------------
# strategies: each returns "make one successful call" (retrying as it sees fit)

Strategy = Callable[[Provider], Awaitable[float]]


def naive(_: float, __: random.Random) -> Strategy:
    async def call(p: Provider) -> float:
        while True:
            try:
                return await p.call()
            except ProviderError:
                continue
    return call


def with_tenacity(_: float, __: random.Random) -> Strategy:
    retrying = tenacity.AsyncRetrying(
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=20),
        retry=tenacity.retry_if_exception_type(ProviderError),
        stop=tenacity.stop_never, reraise=True, sleep=asyncio.sleep,
    )

    async def call(p: Provider) -> float:
        async for attempt in retrying.copy():
            with attempt:
                return await p.call()
        raise AssertionError("unreachable")
    return call


def design(rate: float, _: random.Random) -> Strategy:
    ctl: DesignController | None = None

    async def call(p: Provider) -> float:
        nonlocal ctl
        if ctl is None:
            ctl = DesignController(2 * rate, asyncio.get_running_loop().time)
        while True:
            await ctl.acquire()
            try:
                latency = await p.call()
            except ProviderError:
                ctl.record_failure()
                continue
            ctl.record_success()
            return latency
    return call


def oracle(rate: float, _: random.Random) -> Strategy:
    limiter = aiolimiter.AsyncLimiter(1, 1.0 / rate)  # smooth: one call per 1/R seconds

    async def call(p: Provider) -> float:
        while True:
            async with limiter:
                try:
                    return await p.call()
                except ProviderError:
                    continue
    return call


def closedloop(_: float, rng: random.Random) -> Strategy:
    bp: Backpressure | None = None

    async def call(p: Provider) -> float:
        nonlocal bp
        if bp is None:
            loop = asyncio.get_running_loop()
            bp = Backpressure(clock=loop.time, rng=rng, limits=LIMITS[0])
            TRACE.append(bp)
        return await bp.acall("provider", p.call)
    return call


ORACLE = "aiolimiter, true R (oracle)"
CLOSEDLOOP = "closedloop (not told R)"
TRACE: list[Backpressure] = []
LIMITS = [Limits()]

STRATEGIES: dict[str, Callable[[float, random.Random], Strategy]] = {
    "naive retry": naive,
    "tenacity backoff+jitter": with_tenacity,
    "design controller (2R)": design,
    ORACLE: oracle,
    CLOSEDLOOP: closedloop,
}


# ----------------------------------------------------------------------------------------
# one run

@dataclass
class Result:
    name: str
    goodput: float
    throttled_per_success: float
    wait_p50: float
    wait_p99: float
    recovery: float
    jain: float
    calls_per_success_outage: float
    steady_wait_p99: float
    """p99 wait of the calls whose successful attempt started in the steady window."""


def simulate(name: str, make: Callable[[float, random.Random], Strategy], *, rate: float,
             agents: int, duration: float, outage_at: float, outage_len: float,
             seed: int, provider_burst: float = 5.0, refuse_at_once: bool = False,
             steady: tuple[float, float] = (5.0, 20.0)) -> Result:
    rng = random.Random(seed)
    random.seed(seed)  # tenacity's jitter uses the module-level generator
    outage = (outage_at, outage_at + outage_len)
    provider = Provider(rate=rate, burst=provider_burst, outage=outage, rng=rng,
                        refuse_at_once=refuse_at_once)
    strategy = make(rate, random.Random(seed + 1))
    per_agent = [0] * agents
    waits: list[float] = []
    steady_waits: list[float] = []

    async def agent(i: int) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(rng.uniform(0, 0.05))
        while loop.time() < duration:
            start = loop.time()
            try:
                latency = await strategy(provider)
            except (ProviderError, BackpressureError):
                continue  # the strategy gave up on this call; the agent tries the next one
            end = loop.time()
            if end <= duration:
                per_agent[i] += 1
                waits.append(end - start - latency)
                if steady[0] <= end - latency < steady[1]:
                    steady_waits.append(end - start - latency)

    async def main() -> None:
        tasks = [asyncio.create_task(agent(i)) for i in range(agents)]
        await asyncio.sleep(duration)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    loop = VirtualLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    ok = [t for t in provider.successes if t <= duration]
    up_time = duration - outage_len
    goodput = sum(1 for t in ok if not outage[0] <= t < outage[1]) / (rate * up_time)
    recovery = _recovery(ok, outage[1], rate, duration)
    jain = sum(per_agent) ** 2 / (agents * sum(c * c for c in per_agent)) if any(per_agent) else 0
    in_outage = provider.unavailable / max(1.0, rate * outage_len)
    waits.sort()
    steady_waits.sort()
    return Result(name, goodput, provider.throttled / max(1, len(ok)),
                  _pct(waits, 0.5), _pct(waits, 0.99), recovery, jain, in_outage,
                  _pct(steady_waits, 0.99))


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _recovery(ok: list[float], end: float, rate: float, duration: float,
              window: float = 0.5) -> float:
    """Seconds after the outage until the trailing ``window`` success rate reaches 0.9 R."""
    times = [t for t in ok if t >= end]
    need = 0.9 * rate * window
    j = 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        if i - j + 1 >= need and t >= end + window:
            return t - end
    return math.inf if not times or times[-1] < duration else duration - end


def scenario_sim(rate: float, agents: int, duration: float, seed: int) -> list[Result]:
    out = []
    for name, make in STRATEGIES.items():
        out.append(simulate(name, make, rate=rate, agents=agents, duration=duration,
                            outage_at=duration / 2 - 2.5, outage_len=5.0, seed=seed))
    return out


def scenario_check(rates: list[float], seeds: list[int], *, agents: int, duration: float,
                   provider_burst: float, refuse_at_once: bool) -> list[dict[str, Any]]:
    """The independent check's setup: no outage; closedloop against the oracle per R and seed."""
    rows = []
    for rate in rates:
        for seed in seeds:
            found = {name: simulate(name, STRATEGIES[name], rate=rate, agents=agents,
                                    duration=duration, outage_at=duration, outage_len=0.0,
                                    seed=seed, provider_burst=provider_burst,
                                    refuse_at_once=refuse_at_once)
                     for name in (ORACLE, CLOSEDLOOP)}
            ours, best = found[CLOSEDLOOP], found[ORACLE]
            rows.append({"rate": rate, "seed": seed, "goodput": ours.goodput,
                         "throttled_per_success": ours.throttled_per_success,
                         "steady_p99": ours.steady_wait_p99,
                         "oracle_steady_p99": best.steady_wait_p99,
                         "p99_ratio": ours.steady_wait_p99 / best.steady_wait_p99,
                         "jain": ours.jain})
    return rows


def print_check(rows: list[dict[str, Any]], agents: int, duration: float,
                provider_burst: float, refuse_at_once: bool) -> None:
    refusal = "answered at once" if refuse_at_once else "answered after the latency"
    print(f"\nIndependent check (virtual time): provider burst {provider_burst:g}, 429 "
          f"{refusal}, {agents} agents, {duration:g} s, no outage; steady window 5-20 s")
    print(f"{'R':>5} {'seed':>4} {'goodput/R':>9} {'429/ok':>7} {'p99 wait':>9} "
          f"{'oracle p99':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['rate']:5g} {r['seed']:4d} {r['goodput']:9.3f} "
              f"{r['throttled_per_success']:7.3f} {r['steady_p99']:8.3f}s "
              f"{r['oracle_steady_p99']:9.3f}s {r['p99_ratio']:6.2f}")


def print_table(results: list[Result], rate: float) -> None:
    print(f"\nScenario 1 (virtual time): R = {rate:g}/s, 64 agents, 5 s outage")
    print(f"{'strategy':30} {'goodput/R':>9} {'429/ok':>7} {'wait p50':>9} {'wait p99':>9} "
          f"{'recover':>8} {'Jain':>6} {'calls/R·s in outage':>20}")
    for r in results:
        print(f"{r.name:30} {r.goodput:9.3f} {r.throttled_per_success:7.3f} "
              f"{r.wait_p50:8.3f}s {r.wait_p99:8.3f}s {r.recovery:7.2f}s {r.jain:6.3f} "
              f"{r.calls_per_success_outage:20.2f}")


# ----------------------------------------------------------------------------------------
# scenario 2 in virtual time: worker processes that wake up late (a loaded machine)


class Stalls:
    """When one worker process is off the CPU: runs and stalls alternate at random.

    A loaded machine deschedules a process for a few ms at a time and, now and then, for
    tens or a hundred and more; everything of that process that was due meanwhile (timers,
    answers) runs together when it is back, which is what sends its callers out in a clump.
    """

    def __init__(self, rng: random.Random, run_ms: float, stall_ms: float, sigma: float) -> None:
        self.rng = rng
        self.run = run_ms / 1000
        self.stall = stall_ms / 1000
        self.sigma = sigma
        self.spans: list[tuple[float, float]] = []
        self.until = 0.0

    def resume(self, t: float) -> float:
        """When the process runs again if something of it is due at ``t``."""
        while self.until <= t:
            start = self.until + self.rng.expovariate(1 / self.run)
            end = start + min(0.5, self.stall * math.exp(self.rng.gauss(0.0, self.sigma)))
            self.spans.append((start, end))
            self.until = end
        for start, end in reversed(self.spans):
            if end <= t:
                break
            if start <= t:
                return end
        return t


def scenario_late(rate: float, *, workers: int = 4, agents: int = 16, seconds: float = 20.0,
                  seed: int = 1, quota: float = 0.0, run_ms: float = 20.0,
                  stall_ms: float = 8.0, sigma: float = 1.0, server_run_ms: float = 50.0,
                  server_stall_ms: float = 0.0) -> dict[str, Any]:
    """Scenario 2's shape (4 processes x 16 agents, one shared state, provider burst 5,
    50 ms latency, 429 with ``Retry-After: 1``), in virtual time, with each process off the
    CPU at random (:class:`Stalls`): what a loaded machine does to the callers' wake-ups.
    With ``server_stall_ms`` the provider is off the CPU now and then too, and handles what
    reached it meanwhile at once (a clump at its clock, whatever the callers did)."""
    from closedloop.control import LocalRates

    rng = random.Random(seed)
    provider = Provider(rate=rate, burst=5.0, outage=(seconds, seconds), rng=rng,
                        latency=0.05, jitter=0.0)
    late: list[float] = []
    # the provider is a process too: what reaches it during a stall is handled at its end
    server = Stalls(random.Random(seed * 100 + 99), server_run_ms, server_stall_ms, sigma)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        shared = LocalRates(clock=loop.time)
        limits = Limits(initial_rate=quota, max_rate=quota) if quota else Limits()

        async def agent(bp: Backpressure, cpu: Stalls) -> None:
            async def get() -> float:
                await back(server)
                answer = await provider.call()
                await back(cpu)  # the answer is read when the process runs again
                return answer
            await asyncio.sleep(rng.uniform(0, 0.5))
            while loop.time() < seconds:
                try:
                    await bp.acall("provider", get)
                except (ProviderError, BackpressureError):
                    await back(cpu)

        async def back(cpu: Stalls) -> None:
            t = loop.time()
            r = cpu.resume(t)
            late.append(r - t)
            if r > t:
                await asyncio.sleep(r - t)

        def sleeper(cpu: Stalls) -> Callable[[float], Awaitable[None]]:
            async def asleep(s: float) -> None:
                await asyncio.sleep(s)
                await back(cpu)
            return asleep

        tasks = []
        for w in range(workers):
            cpu = Stalls(random.Random(seed * 100 + w), run_ms, stall_ms, sigma)
            bp = Backpressure(backend=shared, limits=limits, clock=loop.time,
                              asleep=sleeper(cpu), rng=random.Random(seed * 1000 + w))
            tasks += [asyncio.create_task(agent(bp, cpu)) for _ in range(agents)]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        TRACE_LATE.append(shared.state("provider").counts)

    loop = VirtualLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    ok = sorted(t for t in provider.successes if t <= seconds)
    steady = [t for t in ok if t >= seconds / 3]
    aggregate = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0
    late.sort()
    counts = TRACE_LATE[-1]
    return {"rate": rate, "seed": seed, "quota": quota, "ratio": aggregate / rate,
            "throttled_per_success": provider.throttled / max(1, len(ok)),
            "decreases": counts.get("decreases", 0), "clumps": counts.get("clumps", 0),
            "late_ms": [round(1000 * _pct(late, q), 1) for q in (0.5, 0.9, 0.99)]}


TRACE_LATE: list[dict[str, int]] = []


def print_late(rows: list[dict[str, Any]]) -> None:
    print("\nScenario 2 in virtual time: 4 processes x 16 agents share one state, provider "
          "burst 5, 50 ms latency; each process off the CPU at random")
    for r in rows:
        told = f"told {r['quota']:g}/s" if r["quota"] else "not told R"
        p50, p90, p99 = r["late_ms"]
        print(f"R = {r['rate']:g}/s {told}, seed {r['seed']}: {r['ratio']:.3f} R, "
              f"429/ok {r['throttled_per_success']:.3f}, {r['decreases']} rate cuts, "
              f"{r['clumps']} clumps let pass; wake-up lateness p50/p90/p99 "
              f"{p50:g}/{p90:g}/{p99:g} ms")


# ----------------------------------------------------------------------------------------
# scenario 2: 4 worker processes, one Redis-backed limiter, a real loopback provider


class LoopbackProvider:
    """An HTTP server on 127.0.0.1 admitting R requests/s (token bucket, burst 5)."""

    def __init__(self, rate: float, latency: float = 0.05) -> None:
        self.rate = rate
        self.latency = latency
        self.tokens = 5.0
        self.last = 0.0
        self.ok: list[float] = []
        self.throttled = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                now = loop.time()
                self.tokens = min(5.0, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    status, extra = "200 OK", ""
                    self.ok.append(now)
                else:
                    self.throttled += 1
                    status, extra = "429 Too Many Requests", "Retry-After: 1\r\n"
                await asyncio.sleep(self.latency)
                writer.write(f"HTTP/1.1 {status}\r\n{extra}Content-Length: 2\r\n\r\nok"
                             .encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


_WORKER = """
import asyncio, sys, time
import httpx
from closedloop.control import Backpressure, Limits, RedisRates
url, redis_url, prefix, until = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
quota = float(sys.argv[5])  # 0: learn the rate; else the provider's known quota, shared
async def main():
    rates = RedisRates(redis_url, prefix=prefix)
    limits = Limits(initial_rate=quota, max_rate=quota) if quota else Limits()
    bp = Backpressure(backend=rates, limits=limits)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
        async def get():
            r = await client.get(url)
            r.raise_for_status()
        async def agent():
            while time.time() < until:
                try:
                    await bp.acall("provider", get)
                except Exception:
                    pass
        await asyncio.gather(*(agent() for _ in range(16)))
    await rates.aclose()
asyncio.run(main())
"""


def scenario_redis(rate: float, workers: int, seconds: float, redis_url: str, *,
                   quota: float = 0.0, burn: int = 0) -> dict[str, Any]:
    import subprocess
    import tempfile
    import time as wall
    import uuid

    from closedloop.control import LocalRates, RedisRates

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    provider = LoopbackProvider(rate)
    # processes that do nothing but burn a core each, for the whole run (a loaded machine)
    burners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(burn)]

    async def run() -> None:
        server = await asyncio.start_server(provider.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        until = wall.time() + seconds
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(_WORKER)
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, f.name, f"http://127.0.0.1:{port}/", redis_url, prefix,
            str(until), str(quota)) for _ in range(workers)]
        await asyncio.gather(*(p.wait() for p in procs))
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(run())
    finally:
        for b in burners:
            b.kill()
            b.wait()
    ok = sorted(provider.ok)
    start = ok[0]
    steady = [t for t in ok if t >= start + seconds / 3]  # after learning
    span = (steady[-1] - steady[0]) if len(steady) > 1 else 1.0
    aggregate = (len(steady) - 1) / span

    # the cost of one acquire: shared (Redis, one Lua call) and local, same limits
    limits = Limits(initial_rate=1e6, max_rate=1e6, slow_start=1.0, burst=1e6)
    costs: dict[str, tuple[float, float]] = {}
    for name, backend in (("redis", RedisRates(redis_url, prefix=prefix + "-cost")),
                          ("local", LocalRates())):
        samples = []
        for _ in range(3000):
            t0 = wall.perf_counter()
            backend.acquire("cost", limits)
            samples.append(wall.perf_counter() - t0)
        samples.sort()
        costs[name] = (_pct(samples, 0.5) * 1e6, _pct(samples, 0.99) * 1e6)
    import redis

    client = redis.Redis.from_url(redis_url)
    state = {k.decode(): v.decode() for k, v in
             client.hgetall(f"{prefix}:rate:provider").items()}  # type: ignore[union-attr]
    counts = {k[2:]: int(float(v)) for k, v in state.items() if k.startswith("c:")}
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    return {"rate": rate, "workers": workers, "seconds": seconds, "quota": quota, "burn": burn,
            "aggregate": aggregate, "ratio": aggregate / rate,
            "throttled_per_success": provider.throttled / max(1, len(ok)),
            "decreases": counts.get("decreases", 0), "acquire_us": costs}


def print_redis(r: dict[str, Any]) -> None:
    told = (f"shared limiter told the quota {r['quota']:g}/s" if r["quota"]
            else "shared limiter not told R (learns it)")
    load = f"; {r['burn']} core-burning processes alongside" if r["burn"] else ""
    print(f"\nScenario 2 (real time, Redis): R = {r['rate']:g}/s, {r['workers']} worker "
          f"processes x 16 agents, {r['seconds']:g} s; {told}{load}")
    print(f"aggregate rate over the last two thirds: {r['aggregate']:.1f}/s = "
          f"{r['ratio']:.3f} R  (429s per success {r['throttled_per_success']:.3f}, "
          f"{r['decreases']} rate cuts)")
    (rp50, rp99), (lp50, lp99) = r["acquire_us"]["redis"], r["acquire_us"]["local"]
    print(f"one acquire: Redis p50 {rp50:.0f} us, p99 {rp99:.0f} us; "
          f"local p50 {lp50:.1f} us, p99 {lp99:.1f} us; added by Redis p50 "
          f"{rp50 - lp50:.0f} us, p99 {rp99 - lp99:.0f} us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=["sim", "check", "redis", "late"])
    parser.add_argument("--rates", default="20,50,100,200",
                        help="check: provider rates R to run (comma-separated)")
    parser.add_argument("--seeds", default="1,2,3", help="check: seeds (comma-separated)")
    parser.add_argument("--provider-burst", type=float, default=10.0,
                        help="check: the provider's token-bucket depth")
    parser.add_argument("--refuse-late", action="store_true",
                        help="check: answer a 429 after the latency, not at once on arrival")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--redis-rate", type=float, default=100.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quota", type=float, default=0.0,
                        help="scenario 2: tell the shared limiter the provider's quota (0: learn)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--burn", type=int, default=0,
                        help="scenario 2: start this many core-burning processes alongside")
    parser.add_argument("--runs", type=int, default=1, help="scenario 2: consecutive runs")
    parser.add_argument("--run-ms", type=float, default=20.0,
                        help="late: mean time a worker process runs between stalls (ms)")
    parser.add_argument("--stall-ms", type=float, default=8.0,
                        help="late: median stall off the CPU (ms; lognormal, sigma 1)")
    parser.add_argument("--server-stall-ms", type=float, default=0.0,
                        help="late: the provider's median stall (ms), one every 50 ms on average")
    parser.add_argument("--redis-url", default=os.environ.get("CLOSEDLOOP_REDIS_URL",
                                                            "redis://127.0.0.1:6379/0"))
    args = parser.parse_args(argv)
    if args.only in (None, "sim"):
        results = scenario_sim(args.rate, args.agents, args.duration, args.seed)
        if args.json:
            print(json.dumps([r.__dict__ for r in results], indent=2))
        else:
            print_table(results, args.rate)
    if args.only in (None, "check"):
        check_duration = 20.0
        rows = scenario_check([float(r) for r in args.rates.split(",")],
                              [int(x) for x in args.seeds.split(",")], agents=args.agents,
                              duration=check_duration, provider_burst=args.provider_burst,
                              refuse_at_once=not args.refuse_late)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print_check(rows, args.agents, check_duration, args.provider_burst,
                        not args.refuse_late)
    if args.only in (None, "late"):
        rows = [scenario_late(args.redis_rate, seed=seed, quota=args.quota,
                              workers=args.workers, run_ms=args.run_ms,
                              stall_ms=args.stall_ms, server_stall_ms=args.server_stall_ms)
                for seed in [int(x) for x in args.seeds.split(",")]]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print_late(rows)
    if args.only in (None, "redis"):
        for _ in range(args.runs):
            found = scenario_redis(args.redis_rate, args.workers, args.seconds,
                                   args.redis_url, quota=args.quota, burn=args.burn)
            if args.json:
                print(json.dumps(found, indent=2))
            else:
                print_redis(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
