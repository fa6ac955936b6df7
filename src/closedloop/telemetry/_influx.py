"""Every step event, also written to InfluxDB as line protocol (the design's time-series store).

:class:`InfluxSink` is an :class:`~closedloop.store.EventSink`: the store's writer thread hands
it each batch of events, already redacted, and it writes them from a thread of its own, so
the agent's thread never waits for InfluxDB. One point per step, measurement
``closedloop_step`` (see :func:`event_line` for its tags and fields). Both write APIs:

- InfluxDB 1.x: ``POST /write?db=DB[&rp=RP]``, with ``username``/``password`` (HTTP basic
  auth) when the server has authentication on;
- InfluxDB 2.x and 3.x (and 1.8+'s compatibility endpoint): ``POST /api/v2/write?bucket=B
  &org=O`` with ``Authorization: Token T``.

Delivery: points are sent in batches of ``batch_size`` lines, one request at a time. A
request that fails for a reason that may pass (a connection error, a timeout, HTTP 5xx, 429)
keeps its points **held** in memory (at most ``max_held``; the oldest beyond that are dropped
and counted) and is tried again after a growing, jittered delay (``retry_delays``; a 429's
or 503's ``Retry-After`` is honoured): during an outage the sink sends one request per delay,
never more, so it cannot add to the outage. A request the server refuses for its content
(other 4xx: a malformed point, no such database, bad credentials) is not retried: its points
are counted as ``rejected`` and the reason is logged once. Everything is counted in
:class:`~closedloop.store.SinkStats` (``closedloop_sink_events_not_written`` in Prometheus).
On close (and at exit, and on SIGTERM) what is queued is sent once more; what is still held
then is counted as dropped.
"""

from __future__ import annotations

import atexit
import base64
import logging
import math
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from closedloop._batching import BatchQueue
from closedloop._errors import ConfigError
from closedloop._redact import shown_url
from closedloop.store import SinkStats

if TYPE_CHECKING:
    import httpx

    from closedloop._events import StepEvent

log = logging.getLogger("closedloop.telemetry")

URL_ENV = "CLOSEDLOOP_INFLUXDB_URL"
"""The InfluxDB base URL (``http://host:8086``); the settings below complete it."""
SETTINGS_ENV = {
    "db": "CLOSEDLOOP_INFLUXDB_DB",
    "bucket": "CLOSEDLOOP_INFLUXDB_BUCKET",
    "org": "CLOSEDLOOP_INFLUXDB_ORG",
    "token": "CLOSEDLOOP_INFLUXDB_TOKEN",
    "username": "CLOSEDLOOP_INFLUXDB_USERNAME",
    "password": "CLOSEDLOOP_INFLUXDB_PASSWORD",
    "precision": "CLOSEDLOOP_INFLUXDB_PRECISION",
    "measurement": "CLOSEDLOOP_INFLUXDB_MEASUREMENT",
}
MEASUREMENT = "closedloop_step"
MAX_MESSAGE_CHARS = 1024
"""A step's ``error_message`` field is cut to this many characters."""
_PRECISIONS = {"ns": ("n", "ns", 1), "us": ("u", "us", 1_000), "ms": ("ms", "ms", 1_000_000),
               "s": ("s", "s", 1_000_000_000)}
_PRECISION_ALIASES = {"n": "ns", "u": "us", "µs": "us"}

# ---- line protocol --------------------------------------------------------------------------
# https://docs.influxdata.com/influxdb/v1/write_protocols/line_protocol_reference/ : commas and
# spaces are escaped in a measurement; commas, equals signs and spaces in tag keys, tag values
# and field keys; double quotes and backslashes in string field values. A backslash in a tag
# is kept as written (InfluxDB unescapes only the three characters above), so it needs no
# escape, except that a tag can neither end with one nor hold a line break.

_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\n": " ", "\r": " "})
_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": " ", "\r": " "})
_FIELD_ESCAPES = str.maketrans({'"': r"\"", "\\": "\\\\"})
_BREAKS = str.maketrans({"\n": " ", "\r": " "})


def _text(value: str) -> str:
    """The text as UTF-8 can carry it (a lone surrogate becomes U+FFFD)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    return value


def tag_text(value: str) -> str:
    """What a tag value can hold of ``value``, as InfluxDB stores it: line breaks become
    spaces and trailing backslashes are dropped (nothing else changes). ``""``: no tag."""
    return _text(value).translate(_BREAKS).rstrip("\\")


def escape_tag(value: str) -> str:
    """A tag key or value (after :func:`tag_text`) as line protocol writes it."""
    return tag_text(value).translate(_KEY_ESCAPES)


def escape_measurement(value: str) -> str:
    """A measurement name as line protocol writes it."""
    return tag_text(value).translate(_MEASUREMENT_ESCAPES)


def escape_string(value: str) -> str:
    """A string field value, quotes included, as line protocol writes it (line breaks are
    kept: a quoted string may hold them)."""
    if value.isascii() and '"' not in value and "\\" not in value:  # ids: as they are
        return f'"{value}"'
    return '"' + _text(value).translate(_FIELD_ESCAPES) + '"'


_TAGS: dict[str, str] = {}
_MAX_CACHED_TAGS = 10_000


def _tag(value: str) -> str:
    """:func:`escape_tag`, remembered: tag values are few (task types, models, labels)."""
    found = _TAGS.get(value)
    if found is None:
        if len(_TAGS) >= _MAX_CACHED_TAGS:  # bounded, whatever the values
            _TAGS.clear()
        found = _TAGS[value] = escape_tag(value)
    return found


def _float(value: float) -> str | None:
    return repr(float(value)) if math.isfinite(value) else None


def event_line(event: StepEvent, *, measurement: str = MEASUREMENT,
               timestamp: int | None = None) -> str:
    """One step event as one line of line protocol (no trailing newline).

    Tags (low cardinality, each only when set): ``task_type``, ``agent`` (the agent id),
    ``autonomy``, ``outcome``, ``error_type``, ``model``, ``provider``, ``agent_version``,
    ``prompt_version`` and every label as ``label_<name>``. Fields: ``succeeded`` (1 or 0,
    so that ``mean(succeeded)`` is the success rate), ``attempts``, ``input_tokens``,
    ``output_tokens``, ``cached_input_tokens`` (integers), ``latency_ms``, ``propose_ms``,
    ``validate_ms``, ``act_ms``, ``verify_ms``, ``cost_usd`` (floats), ``validation_passed``
    and ``verification_passed`` (1 or 0, when the stage ran), and the strings ``trace_id``,
    ``step_id``, ``run_id``, ``parent_step_id`` and ``error_message`` (cut to
    :data:`MAX_MESSAGE_CHARS`). ``timestamp`` is in the write's precision (default: the
    event's time in nanoseconds).
    """
    # tags in key order (InfluxDB's advice: it sorts them otherwise); labels sort between
    # error_type and model, as every label key starts with "label_"
    head = [escape_measurement(measurement)]
    for key, value in (("agent", event.agent_id), ("agent_version", event.agent_version),
                       ("autonomy", event.autonomy), ("error_type", event.error_type)):
        if value is not None and (text := _tag(str(value))):
            head.append(f"{key}={text}")
    if event.labels:
        for key, value in sorted(event.labels.items()):
            if (text := _tag(str(value))):
                head.append(f"{_tag('label_' + key)}={text}")
    for key, value in (("model", event.model), ("outcome", event.outcome),
                       ("prompt_version", event.prompt_version), ("provider", event.provider),
                       ("task_type", event.task_type)):
        if value is not None and (text := _tag(str(value))):
            head.append(f"{key}={text}")
    fields = [f"succeeded={1 if event.outcome == 'succeeded' else 0}i",
              f"attempts={int(event.attempts)}i",
              f"input_tokens={int(event.input_tokens)}i",
              f"output_tokens={int(event.output_tokens)}i"]
    if event.cached_input_tokens is not None:
        fields.append(f"cached_input_tokens={int(event.cached_input_tokens)}i")
    for name in ("latency_ms", "propose_ms", "validate_ms", "act_ms", "verify_ms", "cost_usd"):
        number = getattr(event, name)
        if number is not None and (shown := _float(number)) is not None:
            fields.append(f"{name}={shown}")
    for name in ("validation_passed", "verification_passed"):
        passed = getattr(event, name)
        if passed is not None:
            fields.append(f"{name}={1 if passed else 0}i")
    for name in ("trace_id", "step_id", "run_id", "parent_step_id"):
        ident = getattr(event, name)
        if ident:
            fields.append(f"{name}={escape_string(str(ident))}")
    if event.error_message:
        fields.append(f"error_message={escape_string(event.error_message[:MAX_MESSAGE_CHARS])}")
    if timestamp is None:
        timestamp = round(event.ts * 1e9)
    return f"{','.join(head)} {','.join(fields)} {timestamp}"


# ---- the sink -------------------------------------------------------------------------------

_sinks: weakref.WeakSet[InfluxSink] = weakref.WeakSet()


def _setting(value: str | None, query: dict[str, list[str]], name: str) -> str | None:
    if value is not None:
        return value
    found = query.get(name)
    return found[-1] if found else None


class InfluxSink:
    """Writes every event its store hands it to InfluxDB (see the module's docstring).

    ``url`` is the server's base URL (``http://127.0.0.1:8086``); settings may also be given
    in its query (``?db=closedloop``, ``?bucket=b&org=o``), user and password in it too
    (``http://user:pass@host:8086``), but pass a ``token`` as an argument or in
    ``$CLOSEDLOOP_INFLUXDB_TOKEN``, never in a URL that may be logged. ``api`` is ``"v1"``
    (``/write``, needs ``db``) or ``"v2"`` (``/api/v2/write``, needs ``bucket``); by default
    v2 when a bucket is given, else v1. ``precision`` (``ns``, ``us``, ``ms``, ``s``): of the
    timestamps written. At ``ns`` a step's time is kept to the microsecond and the last three
    digits count steps within it, so that two steps of one series in one microsecond are two
    points (InfluxDB keeps one point per series and time); at a coarser precision such steps
    overwrite each other.
    """

    name = "influxdb"

    def __init__(
        self,
        url: str,
        *,
        db: str | None = None,
        rp: str | None = None,
        bucket: str | None = None,
        org: str | None = None,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        api: str | None = None,
        precision: str | None = None,
        measurement: str | None = None,
        timeout: float = 5.0,
        max_queue: int = 100_000,
        batch_size: int = 5_000,
        flush_interval: float = 1.0,
        max_held: int = 100_000,
        retry_delays: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
        max_retry_after: float = 300.0,
    ) -> None:
        if not isinstance(url, str) or not url.strip():
            raise ConfigError("InfluxDB URL is empty; use http://HOST:8086")
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"InfluxDB URL must be http(s)://HOST[:PORT], got "
                              f"{_safe_url(url)!r}")
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(f"InfluxDB URL has a bad port: {_safe_url(url)!r}") from None
        query = parse_qs(parts.query)
        self.db = _setting(db, query, "db")
        self.rp = _setting(rp, query, "rp")
        self.bucket = _setting(bucket, query, "bucket")
        self.org = _setting(org, query, "org")
        username = username if username is not None else parts.username
        password = password if password is not None else parts.password
        chosen = (api or "").lower() or ("v2" if self.bucket else "v1")
        if chosen not in ("v1", "v2"):
            raise ConfigError(f"InfluxDB api must be 'v1' or 'v2', got {api!r}")
        self.api = api = chosen
        if api == "v1" and not self.db:
            raise ConfigError("InfluxDB 1.x needs a database: ?db=NAME in the URL, db=, or "
                              f"${SETTINGS_ENV['db']} (or a bucket for the /api/v2 write)")
        if api == "v2" and not self.bucket:
            raise ConfigError("InfluxDB /api/v2/write needs a bucket: ?bucket=NAME, bucket=, "
                              f"or ${SETTINGS_ENV['bucket']}")
        prec = (precision or _setting(None, query, "precision") or "ns").lower()
        prec = _PRECISION_ALIASES.get(prec, prec)
        if prec not in _PRECISIONS:
            raise ConfigError(f"InfluxDB precision must be one of ns, us, ms, s; got {prec!r}")
        self.precision = prec
        self._v1_precision, self._v2_precision, self._divisor = _PRECISIONS[prec]
        self.measurement = measurement or MEASUREMENT
        if not escape_measurement(self.measurement):
            raise ConfigError(f"bad InfluxDB measurement name {self.measurement!r}")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        base = parts.path.rstrip("/")
        for suffix in ("/api/v2/write", "/write"):
            if base.endswith(suffix):
                base = base[:-len(suffix)]
        path = base + ("/write" if api == "v1" else "/api/v2/write")
        self.url = urlunsplit((parts.scheme, netloc, path, "", ""))
        """The write endpoint, without credentials or settings (safe to log)."""
        self._params: dict[str, str] = {}
        if api == "v1":
            self._params["db"] = self.db or ""
            if self.rp:
                self._params["rp"] = self.rp
            self._params["precision"] = self._v1_precision
        else:
            self._params["bucket"] = self.bucket or ""
            if self.org:
                self._params["org"] = self.org
            self._params["precision"] = self._v2_precision
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if token:
            self._headers["Authorization"] = f"Token {token}"
        elif username is not None:
            raw = f"{username}:{password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        self.timeout = timeout
        self.batch_size = batch_size
        self.max_held = max_held
        self.retry_delays = tuple(retry_delays) or (1.0,)
        self.max_retry_after = max_retry_after
        self._client: httpx.Client | None = None
        self._held: deque[str] = deque()
        self._written = self._rejected = self._dropped = self._failures = 0
        self._outage = False
        self._attempt = 0
        self._retry_at = 0.0
        self._seq = 0
        self._warned_rejected = False
        self._stats_lock = threading.Lock()
        self._queue: BatchQueue[StepEvent] = BatchQueue(
            self._write, name="influxdb", max_queue=max_queue, batch_size=batch_size,
            flush_interval=flush_interval, on_wake=self._tick, on_flush=self._settle,
            on_exit=self._exit)
        self.submit_many = self._queue.submit_many
        """``submit_many(events) -> bool``: queue redacted events (False: dropped, counted)."""
        _sinks.add(self)

    # -- the EventSink face ---------------------------------------------------------------

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until what was submitted is sent; False on timeout or while points are held
        because InfluxDB cannot be reached."""
        return self._queue.flush(timeout) and not self._held

    def close(self, timeout: float | None = 10.0) -> None:
        """Send what is queued (one more try for what is held), then stop."""
        if not self._queue.closed:
            self._queue.close(timeout)
            stats = self.stats()
            if stats.not_written:
                log.warning("closedloop influxdb %s: %d events not written (dropped=%d, "
                            "rejected=%d)", self.url, stats.not_written, stats.dropped,
                            stats.rejected)

    def stats(self) -> SinkStats:
        """Written, queued, held, dropped, rejected and failed-request counts."""
        return SinkStats(written=self._written, queued=self._queue.queued,
                         held=len(self._held), dropped=self._dropped + self._queue.dropped,
                         rejected=self._rejected, failures=self._failures)

    def __repr__(self) -> str:
        return f"InfluxSink({self.url!r}, api={self.api!r})"

    # -- the sink's thread ------------------------------------------------------------------

    def _write(self, batch: list[StepEvent]) -> None:
        self._hold([self._line(e) for e in batch])
        if time.monotonic() >= self._retry_at:
            self._send_held()

    def _line(self, event: StepEvent) -> str:
        if self._divisor == 1:  # ns: microseconds, then a counter within the microsecond
            self._seq = (self._seq + 1) % 1000
            stamp = round(event.ts * 1e6) * 1000 + self._seq
        else:
            stamp = round(event.ts * 1e9 / self._divisor)
        return event_line(event, measurement=self.measurement, timestamp=stamp)

    def _hold(self, lines: list[str]) -> None:
        held = self._held
        held.extend(lines)
        excess = len(held) - self.max_held
        if excess > 0:  # the oldest go: memory stays bounded during a long outage
            for _ in range(excess):
                held.popleft()
            self._count_dropped(excess)

    def _count_dropped(self, n: int) -> None:
        with self._stats_lock:
            self._dropped += n

    def _send_held(self) -> bool:
        """Send held points, oldest first, one request at a time; True when none is left."""
        held = self._held
        while held:
            lines = list(islice(held, self.batch_size))
            result = self._post(lines)
            if result is not None:  # a failure that may pass: keep them, try later
                self._begin_outage(*result)
                return False
            for _ in lines:
                held.popleft()
        if self._outage:
            log.warning("closedloop influxdb %s: writes are accepted again; held points sent",
                        self.url)
        self._outage = False
        self._attempt = 0
        return True

    def _post(self, lines: list[str]) -> tuple[str, float | None] | None:
        """Write ``lines``; None when done with them (written, or rejected for good), else
        ``(why, retry_after)`` for a failure worth retrying."""
        import httpx

        client = self._client
        if client is None:
            client = self._client = httpx.Client(timeout=self.timeout)
        body = ("\n".join(lines) + "\n").encode("utf-8")
        try:
            response = client.post(self.url, params=self._params, headers=self._headers,
                                   content=body)
        except httpx.HTTPError as exc:
            self._failures += 1
            return f"{type(exc).__name__}: {exc}", None
        status = response.status_code
        if status < 300:
            self._written += len(lines)
            return None
        if status == 429 or status >= 500:
            self._failures += 1
            return f"HTTP {status}: {_body(response)}", _retry_after(response)
        self._rejected += len(lines)
        level = logging.DEBUG if self._warned_rejected else logging.ERROR
        self._warned_rejected = True
        log.log(level, "closedloop influxdb %s: %d points refused (HTTP %d: %s); they are not "
                "retried. Fix: %s", self.url, len(lines), status, _body(response),
                _fix(status, self.api))
        return None

    def _begin_outage(self, why: str, retry_after: float | None) -> None:
        delay = self.retry_delays[min(self._attempt, len(self.retry_delays) - 1)]
        delay *= random.uniform(0.8, 1.2)  # jitter: processes that failed together spread out
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        self._retry_at = time.monotonic() + delay
        self._attempt += 1
        if self._outage:
            log.debug("closedloop influxdb %s: still failing: %s", self.url, why)
            return
        self._outage = True
        log.error("closedloop influxdb %s: cannot write: %s. Up to %d points are held and "
                  "sent when it answers again (one try every %.3g to %.3g s); beyond that the "
                  "oldest are dropped and counted.", self.url, why, self.max_held,
                  self.retry_delays[0], self.retry_delays[-1])

    def _tick(self) -> None:
        if self._held and time.monotonic() >= self._retry_at:
            self._send_held()

    def _settle(self, final: bool) -> None:
        """At a flush: one try now for what is held (at the end, even while backing off);
        at the end, what is still held is dropped and counted."""
        if self._held and (final or time.monotonic() >= self._retry_at):
            self._send_held()
        if final and self._held:
            self._count_dropped(len(self._held))
            self._held.clear()

    def _exit(self) -> None:
        self._settle(final=True)
        if self._client is not None:
            self._client.close()
            self._client = None


def _body(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    return text[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _fix(status: int, api: str) -> str:
    if status in (401, 403):
        return ("check the credentials (username/password for 1.x, a token with write access "
                "for /api/v2)")
    if status == 404:
        return ("create the database (CREATE DATABASE name)" if api == "v1" else
                "create the bucket, or check its name and the org")
    if status == 413:
        return "lower batch_size"
    return "see the server's message above"


def _safe_url(url: str) -> str:
    return shown_url(url)[:200]


def influx_from_env() -> InfluxSink | None:
    """The sink ``$CLOSEDLOOP_INFLUXDB_URL`` (with the other ``CLOSEDLOOP_INFLUXDB_*``
    settings) describes, or None when it is not set."""
    url = os.environ.get(URL_ENV, "").strip()
    if not url:
        return None
    settings: dict[str, Any] = {}
    for name, env in SETTINGS_ENV.items():
        value = os.environ.get(env, "").strip()
        if value:
            settings[name] = value
    return InfluxSink(url, **settings)


def _close_all_at_exit() -> None:
    # The stores' writers close after this (their exit handler was registered first), so
    # the runtime's store is flushed first: its last events reach its sinks.
    from closedloop._runtime import current_runtime

    try:
        current_runtime().flush(5.0)
    except Exception:  # exit handlers must not raise
        log.exception("closedloop influxdb: error flushing at exit")
    for sink in list(_sinks):
        try:
            sink.close(5.0)
        except Exception:  # exit handlers must not raise
            log.exception("closedloop influxdb: error closing at exit")


def _after_fork_in_child() -> None:
    # the queue starts empty in the child (BatchQueue); so do the held points (the parent
    # sends its own), the counts and the connection pool, which must not be shared
    for sink in list(_sinks):
        sink._client = None
        sink._held = deque()
        sink._written = sink._rejected = sink._dropped = sink._failures = 0
        sink._outage = False
        sink._attempt = 0
        sink._retry_at = 0.0


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
