"""One background webhook poster, shared by the alert sink (:class:`closedloop.control.WebhookSink`)
and the approval notifier (:class:`closedloop.approvals.WebhookNotifier`).

A caller hands a JSON body to :meth:`WebhookPoster.post`, which queues it and returns at once
(False when the bounded queue is full: the body is dropped and counted). One thread posts the
bodies with httpx; a failure that may pass (no connection, a timeout, HTTP 429 or 5xx) is tried
again after an exponential backoff with jitter (``Retry-After`` is honoured up to the cap),
without holding up the bodies queued behind it; any other answer (a 4xx) fails at once. Each
body's end is reported to its ``on_done(ok, attempts, error)`` callback from the poster's
thread. Nothing is ever raised to the caller, and the URL (which may hold a secret, as Slack's
do) is never logged whole: only its scheme, host and port (:func:`where`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from closedloop._redact import redact_text  # also puts the redacting filter on the logger

_log = logging.getLogger("closedloop")

OnDone = Callable[[bool, int, str], None]
"""``on_done(ok, attempts, error)``: how a body's delivery ended (``error`` is empty if ok)."""


def where(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what is shown of a webhook (its path and query may
    hold the secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<malformed url>"
    return f"{parts.scheme or '?'}://{host}{port}"


def check_url(url: object, what: str = "webhook") -> str:
    """An http(s) URL with a host, else a :class:`~closedloop.ConfigError` (which never shows
    the URL's path or query)."""
    from closedloop._errors import ConfigError

    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"the {what} URL must be a non-empty http(s) URL")
    try:
        parts = urlsplit(url.strip())
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a bad port raises here
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"the {what} URL must be http(s)://host/..., got {where(url)}")
    return url.strip()


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    body: Any = field(compare=False)
    on_done: OnDone | None = field(compare=False, default=None)
    attempts: int = field(compare=False, default=0)


class WebhookPoster:
    """POSTs JSON bodies to ``url`` from its own thread, with retries and backoff.

    ``retries``: how many times a body is tried again after a failure that may pass (0: one
    try); the n-th retry waits ``backoff * 2**(n-1)`` seconds (±20%), at most
    ``max_backoff``. At most ``max_pending`` bodies wait (queued or between tries). Counters:
    ``sent``, ``failed`` (gave up), ``retried`` (tries again), ``dropped`` (queue full).
    """

    def __init__(self, url: str, *, timeout: float = 5.0, max_pending: int = 100,
                 headers: Mapping[str, str] | None = None, retries: int = 0,
                 backoff: float = 1.0, max_backoff: float = 60.0,
                 name: str = "closedloop-webhook") -> None:
        import httpx

        self.url = url
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(self.backoff, float(max_backoff))
        self.sent = self.failed = self.dropped = self.retried = 0
        self._client = httpx.Client(timeout=timeout, headers=dict(headers or {}),
                                    follow_redirects=False)
        self._max_pending = max_pending
        self._queue: queue.Queue[_Delivery | None] = queue.Queue()
        self._waiting: list[_Delivery] = []  # retries not yet due, by due time
        self._open = 0  # bodies accepted and not yet ended
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._seq = itertools.count()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def shown(self) -> str:
        """The URL as it may be shown: scheme, host and port."""
        return where(self.url)

    def post(self, body: Any, *, on_done: OnDone | None = None) -> bool:
        """Queue ``body`` (JSON-ready) for posting; False (dropped, counted) when full."""
        with self._lock:
            if self._closing or self._open >= self._max_pending:
                self.dropped += 1
                return False
            self._open += 1
        self._queue.put(_Delivery(time.monotonic(), next(self._seq), body, on_done))
        return True

    # ----- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            self._attempt(item)

    def _next(self) -> _Delivery | None:
        while True:
            now = time.monotonic()
            if self._waiting and self._waiting[0].due <= now:
                return heapq.heappop(self._waiting)
            wait = (self._waiting[0].due - now) if self._waiting else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                continue
            if item is None:
                return None
            if item.due <= time.monotonic():
                return item
            heapq.heappush(self._waiting, item)

    def _attempt(self, item: _Delivery) -> None:
        item.attempts += 1
        retry_after: float | None = None
        try:
            response = self._client.post(self.url, json=item.body)
            if response.is_success:
                self._end(item, ok=True, error="")
                return
            error = f"HTTP {response.status_code}"
            retryable = response.status_code == 429 or response.status_code >= 500
            retry_after = _retry_after(response.headers.get("retry-after"))
        except Exception as exc:  # noqa: BLE001 - a webhook must never crash anything
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            retryable = True
        # an error may quote the URL, whose path may be the secret (Slack's)
        error = redact_text(error.replace(self.url, self.shown))[:300]
        if retryable and item.attempts <= self.retries and not self._closing:
            delay = min(self.max_backoff, self.backoff * 2 ** (item.attempts - 1))
            delay *= random.uniform(0.8, 1.2)
            if retry_after is not None:
                delay = min(self.max_backoff, max(delay, retry_after))
            with self._lock:
                self.retried += 1
            _log.info("closedloop: webhook to %s failed (%s); trying again in %.1fs",
                      self.shown, error, delay)
            item.due = time.monotonic() + delay
            heapq.heappush(self._waiting, item)
            return
        _log.warning("closedloop: webhook to %s failed after %d attempt(s): %s", self.shown,
                     item.attempts, error)
        self._end(item, ok=False, error=error)

    def _end(self, item: _Delivery, *, ok: bool, error: str) -> None:
        if item.on_done is not None:
            try:
                item.on_done(ok, item.attempts, error)
            except Exception:  # noqa: BLE001 - a callback's failure is logged, never raised
                _log.exception("closedloop: a webhook delivery callback failed")
        with self._lock:
            if ok:
                self.sent += 1
            else:
                self.failed += 1
            self._open -= 1
            self._idle.notify_all()

    # ----- life cycle ----------------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every accepted body was posted or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._open:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (within ``timeout``), then stop the thread. Bodies still
        waiting for a retry then are abandoned without a callback."""
        self.flush(timeout)
        with self._lock:
            self._closing = True
        self._queue.put(None)
        self._thread.join(timeout)
        with contextlib.suppress(Exception):
            self._client.close()


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None
