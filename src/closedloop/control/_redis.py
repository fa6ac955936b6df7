"""Flow-control and fault-control state shared through Redis, updated by server-side Lua.

:class:`RedisRates` runs the per-key decision logic (a port of
:class:`~closedloop.control.KeyState`, in ``_redis.lua``) inside Redis, one atomic script
call per acquire/confirm/report, so N workers on M machines share one provider's limit with
no read-modify-write race. Time is Redis's own clock unless a ``clock`` is injected.

If Redis becomes unreachable, each worker falls back to a conservative local limit — its
share (the last shared rate divided by the number of workers seen) with no growth — logs a
warning, shows ``degraded`` in its status, retries Redis every ``retry_every`` seconds and
resumes the shared state when it answers. A restarted, empty Redis is re-learned from slow
start.

:class:`RedisLedger` keeps pauses and halts in Redis for every process to see: the cache in
front of the store's durable ledger (see :class:`~closedloop.control.CachedLedger`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from importlib import resources
from typing import Any

from closedloop._errors import ConfigError, ControlUnavailable
from closedloop._redact import redact_text
from closedloop.control._core import Grant, Limits
from closedloop.control._ledger import Stop, StopKind, redacted, shown_url
from closedloop.control._signals import Signal
from closedloop.control._state import LocalRates

_log = logging.getLogger("closedloop.control")

try:
    import redis
    import redis.asyncio as aredis
except ImportError:  # pragma: no cover - the extra is optional
    redis = None  # type: ignore[assignment]
    aredis = None  # type: ignore[assignment]

_SCRIPT = resources.files("closedloop.control").joinpath("_redis.lua").read_text("utf-8")


def _need_redis() -> None:
    if redis is None:  # pragma: no cover
        raise ConfigError("Redis support needs the redis package: pip install 'closedloop[redis]'")


class RedisRates:
    """Per-key rate, queue and breaker state in Redis, shared by every worker."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "closedloop",
        clock: Callable[[], float] | None = None,
        retry_every: float = 1.0,
        socket_timeout: float = 0.5,
        worker_id: str | None = None,
    ) -> None:
        _need_redis()
        self.url = url
        self.prefix = prefix
        self.clock = clock
        self.retry_every = retry_every
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                            socket_connect_timeout=socket_timeout)
        self._script = self._client.register_script(_SCRIPT)
        self._timeout = socket_timeout
        self._aclients: dict[int, tuple[Any, Any]] = {}
        self._fallback = LocalRates(clock=clock or time.time)
        self._last: dict[str, tuple[float, int]] = {}
        self.degraded_since: float | None = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and the local fallback limit is in use."""
        return self.degraded_since is not None

    # ----- the script -----------------------------------------------------------------------
    def _keys(self, key: str) -> list[str]:
        return [f"{self.prefix}:rate:{key}", f"{self.prefix}:workers:{key}"]

    def _args(self, op: str, limits: Limits, *rest: object) -> list[str]:
        now = "" if self.clock is None else repr(self.clock())
        return [op, now, json.dumps(asdict(limits)), self.worker_id,
                *("" if r is None else str(r) for r in rest)]

    def _parse(self, key: str, reply: list[Any]) -> Grant | None:
        values = [v.decode() if isinstance(v, bytes) else v for v in reply]
        self._last[key] = (float(values[6]), max(1, int(values[7])))
        if values[0] == "":
            return None
        return Grant(float(values[0]), int(float(values[1])), float(values[2]),
                     reserved=values[3] == "1", probe=values[4] == "1", reason=values[5])

    # ----- degraded mode --------------------------------------------------------------------
    def _use_redis(self) -> bool:
        return self.degraded_since is None or time.monotonic() >= self._next_try

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            self._next_try = time.monotonic() + self.retry_every
            if self.degraded_since is None:
                self.degraded_since = time.time()
                _log.warning("closedloop: Redis at %s unreachable (%s); falling back to a "
                             "conservative local limit until it answers", self.url, exc)

    def _recovered(self) -> None:
        if self.degraded_since is not None:
            with self._lock:
                _log.warning("closedloop: Redis at %s is back after %.1fs; using the shared "
                             "limit again", self.url, time.time() - self.degraded_since)
                self.degraded_since = None

    def local_limits(self, key: str, limits: Limits) -> Limits:
        """The conservative limit used while Redis is down: this worker's share, no growth."""
        rate, workers = self._last.get(key, (limits.initial_rate, 1))
        share = max(limits.min_rate, rate / workers)
        return replace(limits, initial_rate=share, max_rate=share, slow_start=1.0,
                       min_rate=min(limits.min_rate, share))

    def _local(self, op: str, key: str, limits: Limits, *rest: Any) -> Grant | None:
        local = self.local_limits(key, limits)
        if op == "acquire":
            return self._fallback.acquire(key, local)
        if op == "confirm":
            return self._fallback.confirm(key, local, rest[0], rest[1])
        self._fallback.feedback(key, local, rest[0], rest[1], rest[2])
        return None

    def _call(self, op: str, key: str, limits: Limits, *rest: Any) -> Grant | None:
        if self._use_redis():
            try:
                reply = self._script(keys=self._keys(key), args=self._args(op, limits, *rest),
                                     client=self._client)
            except redis.RedisError as exc:
                self._failed(exc)
            else:
                self._recovered()
                return self._parse(key, reply)
        return self._local(op, key, limits, *rest)

    async def _acall(self, op: str, key: str, limits: Limits, *rest: Any) -> Grant | None:
        if self._use_redis():
            try:
                # the async client's own script object: it reloads the script on NOSCRIPT
                # (a fresh or restarted Redis), which the sync one cannot do for an awaitable
                reply = await self._aclient()[1](keys=self._keys(key),
                                                 args=self._args(op, limits, *rest))
            except redis.RedisError as exc:
                self._failed(exc)
            else:
                self._recovered()
                return self._parse(key, reply)
        return self._local(op, key, limits, *rest)

    def _aclient(self) -> Any:
        import asyncio

        ident = id(asyncio.get_running_loop())
        found = self._aclients.get(ident)
        if found is None:
            client = aredis.Redis.from_url(self.url, socket_timeout=self._timeout,
                                           socket_connect_timeout=self._timeout)
            found = self._aclients[ident] = (client, client.register_script(_SCRIPT))
        return found

    # ----- RateBackend ----------------------------------------------------------------------
    def acquire(self, key: str, limits: Limits) -> Grant:
        grant = self._call("acquire", key, limits)
        assert grant is not None
        return grant

    def confirm(self, key: str, limits: Limits, ticket: int, late: float = 0.0) -> Grant:
        grant = self._call("confirm", key, limits, ticket, repr(late))
        assert grant is not None
        return grant

    def feedback(self, key: str, limits: Limits, signal: Signal, admitted_at: float,
                 retry_after: float | None) -> None:
        self._call("feedback", key, limits, signal, admitted_at, retry_after)

    async def aacquire(self, key: str, limits: Limits) -> Grant:
        grant = await self._acall("acquire", key, limits)
        assert grant is not None
        return grant

    async def aconfirm(self, key: str, limits: Limits, ticket: int,
                       late: float = 0.0) -> Grant:
        grant = await self._acall("confirm", key, limits, ticket, repr(late))
        assert grant is not None
        return grant

    async def afeedback(self, key: str, limits: Limits, signal: Signal, admitted_at: float,
                        retry_after: float | None) -> None:
        await self._acall("feedback", key, limits, signal, admitted_at, retry_after)

    def snapshot(self, key: str, limits: Limits) -> dict[str, Any]:
        """The shared state of ``key`` as Redis holds it (or the fallback's, if degraded)."""
        out: dict[str, Any]
        try:
            raw = self._client.hgetall(self._keys(key)[0])
            workers = self._client.zcard(self._keys(key)[1])
        except redis.RedisError as exc:
            self._failed(exc)
            out = self._fallback.snapshot(key, self.local_limits(key, limits))
        else:
            out = _snapshot_from_hash(raw, limits, self.clock() if self.clock else time.time())
            out["workers"] = int(workers)
        out["backend"] = f"redis {self.url}"
        if self.degraded_since is not None:
            since = time.strftime("%H:%M:%SZ", time.gmtime(self.degraded_since))
            out["degraded"] = f"Redis unreachable since {since}; conservative local limit"
        return out

    def keys(self) -> list[str]:
        """Keys with shared state in Redis."""
        head = f"{self.prefix}:rate:"
        try:
            found = self._client.scan_iter(match=head + "*", count=500)
            return sorted(k.decode()[len(head):] for k in found)
        except redis.RedisError:
            return sorted(self._fallback.keys())

    def close(self) -> None:
        """Close the sync connection pool."""
        self._client.close()

    async def aclose(self) -> None:
        """Close this event loop's async connections (and the sync pool)."""
        import asyncio

        found = self._aclients.pop(id(asyncio.get_running_loop()), None)
        if found is not None:
            await found[0].aclose()
        self.close()


def _snapshot_from_hash(raw: dict[Any, Any], limits: Limits, now: float) -> dict[str, Any]:
    from closedloop.control._core import BreakerState, KeyState

    values = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
    state = KeyState()
    for f in fields(KeyState):  # the script keeps each number under its field's name
        if f.name in values and f.type in ("float", "int"):
            setattr(state, f.name, int(values[f.name]) if f.type == "int" else values[f.name])
    state.breaker = [BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN][
        int(values.get("breaker", 0))]
    state.counts = {k[2:]: int(v) for k, v in values.items() if k.startswith("c:")}
    return state.snapshot(limits, now)


_PUT = """
local lifted = redis.call('HGET', KEYS[3], 'at')
if lifted and tonumber(lifted) >= tonumber(ARGV[5]) then return 0 end
local old = redis.call('HMGET', KEYS[1], 'kind', 'at')
if old[1] == 'halted' and ARGV[1] == 'paused' then return 0 end
if old[1] == ARGV[1] and old[2] == ARGV[5] then return 0 end  -- the same stop, put again
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'stop', ARGV[2], 'kind', ARGV[1], 'at', ARGV[5])
if ARGV[3] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
redis.call('LPUSH', KEYS[2], ARGV[4])
redis.call('LTRIM', KEYS[2], 0, 999)
return 1
"""
_LIFT = """
local stop = redis.call('HGET', KEYS[1], 'stop')
redis.call('HSET', KEYS[3], 'at', ARGV[2], 'by', ARGV[3], 'reason', ARGV[4])
redis.call('PEXPIRE', KEYS[3], 2592000000)
if not stop then return false end
redis.call('DEL', KEYS[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, 999)
return stop
"""


class RedisLedger:
    """Pauses and halts in Redis, for every worker on every machine (atomic scripts).

    On its own it is a ledger that forgets everything when Redis restarts without
    persistence; :func:`~closedloop.control.ledger_for_store` therefore uses it only as the
    cache of the store's durable ledger (:class:`~closedloop.control.CachedLedger`). A lift
    leaves a marker (``PREFIX:lifted:TASK``, 30 days) so that no older stop is put back and
    other machines apply the lift to their own store. Every Redis error is raised as
    :class:`~closedloop.ControlUnavailable`.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "closedloop",
                 clock: Callable[[], float] = time.time, socket_timeout: float = 2.0) -> None:
        _need_redis()
        self.url = url
        self.prefix = prefix
        self.clock = clock
        try:
            self._client = redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                                socket_connect_timeout=socket_timeout)
        except ValueError as exc:
            raise ConfigError(f"malformed Redis URL {shown_url(url)!r}: {exc}; use "
                              "redis://HOST:PORT/DB") from None
        self._put = self._client.register_script(_PUT)
        self._lift = self._client.register_script(_LIFT)

    def __repr__(self) -> str:
        return f"RedisLedger({shown_url(self.url)!r}, prefix={self.prefix!r})"

    def _key(self, task_type: str) -> str:
        return f"{self.prefix}:stop:{task_type}"

    def _unavailable(self, exc: Exception) -> ControlUnavailable:
        return ControlUnavailable(
            f"cannot reach control state in Redis at {shown_url(self.url)}: {exc}")

    def put(self, stop: Stop) -> None:
        stop = redacted(stop)
        body = json.dumps(stop.to_dict(), default=str)
        until = "" if stop.until is None else str(int(stop.until * 1000))
        history = json.dumps({"event": stop.kind.value, **stop.to_dict()}, default=str)
        try:
            self._put(keys=[self._key(stop.task_type), f"{self.prefix}:history",
                            f"{self.prefix}:lifted:{stop.task_type}"],
                      args=[stop.kind.value, body, until, history, repr(stop.at)])
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def read(self, task_type: str) -> tuple[Stop | None, dict[str, Any] | None, bool]:
        """The stop in Redis, the last lift recorded there, and whether Redis was filled."""
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hget(self._key(task_type), "stop")
            pipe.hgetall(f"{self.prefix}:lifted:{task_type}")
            pipe.exists(f"{self.prefix}:filled")
            raw, lifted, filled = pipe.execute()
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        stop = _stop_from_json(raw) if raw else None
        lift = ({k.decode(): v.decode() for k, v in lifted.items()} if lifted else None)
        return (stop if stop is not None and stop.active(self.clock()) else None, lift,
                bool(filled))

    def fill(self, stops: list[Stop]) -> None:
        """Put ``stops`` back (none replaces a halt or a newer lift) and mark Redis filled."""
        for stop in stops:
            self.put(stop)
        try:
            self._client.set(f"{self.prefix}:filled", repr(self.clock()))
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def get(self, task_type: str) -> Stop | None:
        return self.read(task_type)[0]

    def lift(self, task_type: str, *, reason: str, by: str) -> Stop | None:
        now = self.clock()
        reason = redact_text(reason)
        entry = json.dumps({"event": "resumed", "task_type": task_type, "reason": reason,
                            "by": by, "at": now,
                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))})
        try:
            raw = self._lift(keys=[self._key(task_type), f"{self.prefix}:history",
                                   f"{self.prefix}:lifted:{task_type}"],
                             args=[entry, repr(now), by, reason])
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return _stop_from_json(raw) if raw else None

    def stops(self) -> list[Stop]:
        now = self.clock()
        out = []
        try:
            for key in self._client.scan_iter(match=f"{self.prefix}:stop:*", count=500):
                raw = self._client.hget(key, "stop")
                if raw:
                    stop = _stop_from_json(raw)
                    if stop.active(now):
                        out.append(stop)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return sorted(out, key=lambda s: s.task_type)

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        try:
            rows = self._client.lrange(f"{self.prefix}:history", 0, max(0, limit - 1))
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return [json.loads(r) for r in rows]


def _stop_from_json(raw: bytes | str) -> Stop:
    data = json.loads(raw)
    return Stop(task_type=data["task_type"], kind=StopKind(data["kind"]), reason=data["reason"],
                by=data["by"], at=data["at"], until=data.get("until"),
                evidence=data.get("evidence") or {})


