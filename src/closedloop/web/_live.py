"""Live updates of the dashboard: server-sent events of what was stored since a page was made.

``GET /ui/live/steps`` (the steps page's filters, and ``cursor``: the page's
:attr:`~closedloop.store.StepPage.head_cursor`) sends each step stored after the cursor as an
``event: step``; ``GET /ui/live/approvals`` (``since``: the newest request's creation time the
page knew) each new pending request as an ``event: approval``; ``GET /ui/live/overview``
(``window``, ``state``: the digest of what the page shows) the overview's figures as an
``event: overview`` whenever they differ from what the page shows (computed again every
:data:`OVERVIEW_S` seconds, the same aggregates as the page). Each stream polls the store's
keyset query (:meth:`~closedloop.store.Store.steps_after`, the newest page of pending
requests) every :data:`POLL_S` seconds, so its cost does not grow with the store; every event
carries its position as ``id:``, so a browser that reconnects (``Last-Event-ID``) goes on
where it was.

Bounded: at most :data:`MAX_STREAMS` streams at once (more: 503), each at most
:data:`MAX_AGE_S` seconds (the browser then reconnects), a comment line every
:data:`HEARTBEAT_S` seconds of silence (proxies keep the connection; a client gone is
noticed), and every stream ends at once when the server stops
(:meth:`~closedloop.web._dashboard.Dashboard.close`). Reads are allowed as for the pages.

An event's data is JSON of text already prepared for people (times formatted, control
characters written out, captured content redacted); ``static/live.js`` puts it in the page
with ``textContent`` only, so stored text arrives as text.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from closedloop._errors import ConfigError, StoreError
from closedloop.web._dashboard import (
    WINDOWS,
    PageError,
    _call,
    _can_read,
    _param,
    _shown,
    _state,
    _visible,
    _when,
    overview_data,
    overview_payload,
    overview_state,
    step_query,
)

OVERVIEW_S = 10.0
"""Seconds between two computations of the overview's figures by one stream."""
MAX_STREAMS = 16
"""Live streams one server keeps open at once."""
POLL_S = 2.0
"""Seconds between two polls of the store by one stream."""
HEARTBEAT_S = 10.0
MAX_AGE_S = 600.0
BATCH = 50
"""Steps or requests one poll sends at most (a full batch is followed by another poll)."""
_OUTCOMES = frozenset({"succeeded", "failed", "error", "blocked", "paused", "suggested",
                       "escalated", "pending", "rejected", "cancelled"})

Found = list[tuple[str | None, dict[str, Any]]]
Poll = Callable[[str | None], tuple[Found, str | None]]
"""One poll: from a position, the ``(id, data)`` of what is new and the position after it."""


def _text(value: object) -> str:
    return "" if value is None else str(_visible(str(value)))


def _verdict(value: bool | None) -> str:
    return {True: "passed", False: "failed", None: "\u2013"}[value]


def step_data(step: Any) -> dict[str, Any]:
    """A step as the steps page's row shows it: each cell's text (and the trace's link)."""
    outcome = step.outcome if step.outcome in _OUTCOMES else ""
    return {"cells": [
        {"text": _when(step.ts), "class": "nowrap"},
        {"text": _text(step.task_type)},
        {"text": _text(step.outcome), "badge": f"out-{outcome}" if outcome else ""},
        {"text": str(step.attempts), "class": "num"},
        {"text": _verdict(step.validation_passed)},
        {"text": _verdict(step.verification_passed)},
        {"text": f"{step.latency_ms:,.1f} ms", "class": "num"},
        {"text": _text((step.error_message or "")[:200]), "strong": _text(step.error_type),
         "class": "clip"},
        {"text": _text(step.trace_id[-12:]), "href": "/ui/traces/" + quote(step.trace_id, ""),
         "class": "mono"},
    ]}


def request_data(r: Any) -> dict[str, Any]:
    """A pending approval request as the approvals page's card shows it."""
    risk = r.risk or {}
    return {"href": "/ui/approvals/" + quote(r.request_id, ""),
            "task_type": _text(r.task_type),
            "asked": _text(f"asked by {r.requested_by} \u00b7 {_when(r.created_at)}"),
            "risk": _text(risk.get("summary", "")) if risk else "",
            "destructive": bool(risk.get("destructive")),
            "proposal": _text(_shown(r.proposal[:600]))}


def _event(kind: str, ident: str | None, data: dict[str, Any]) -> str:
    # ASCII JSON: no line break can end the data early
    head = f"event: {kind}\n" + ("" if ident is None else f"id: {ident}\n")
    return f"{head}data: {json.dumps(data, ensure_ascii=True)}\n\n"


class _Stream(StreamingResponse):
    """An event stream that ends when the client goes, the server stops, or it is old; it
    frees its place among :data:`MAX_STREAMS` however it ends."""

    def __init__(self, request: Request, kind: str, poll: Poll, cursor: str | None) -> None:
        super().__init__(iter(()), media_type="text/event-stream",
                         headers={"X-Accel-Buffering": "no"})
        self.dash = _state(request)
        self.kind = kind
        self.poll = poll
        self.cursor = cursor
        self.dash.streams += 1

    async def _events(self, gone: anyio.Event) -> AsyncIterator[str]:
        closing = self.dash.closing
        started = quiet = time.monotonic()
        yield f"retry: {int(POLL_S * 1000)}\n\n"
        while not (gone.is_set() or closing.is_set()):
            try:
                found, after = await run_in_threadpool(self.poll, self.cursor)
            except (StoreError, ConfigError):
                found, after = [], None  # the store is away: try again next time
            for ident, data in found:
                if gone.is_set():
                    return
                yield _event(self.kind, ident, data)
            if found:
                quiet = time.monotonic()
                self.cursor = after or self.cursor
                if len(found) >= BATCH:
                    continue
            now = time.monotonic()
            if now - started > MAX_AGE_S:
                return
            if now - quiet >= HEARTBEAT_S:
                quiet = now
                yield ": keep-alive\n\n"
            deadline = now + POLL_S
            # closing is a threading.Event, set from the thread that stops the server
            while not (gone.is_set() or closing.is_set()) and time.monotonic() < deadline:  # noqa: ASYNC110
                await anyio.sleep(0.1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = anyio.Event()

        async def listen() -> None:
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return

        try:
            self.body_iterator = self._events(gone)
            async with anyio.create_task_group() as group:
                group.start_soon(listen)
                await self.stream_response(send)
                group.cancel_scope.cancel()
        except OSError:
            pass  # the client went away mid-write
        finally:
            self.dash.streams -= 1


def _open(request: Request) -> None:
    _can_read(request)
    if _state(request).streams >= MAX_STREAMS:
        raise PageError(503, "too many live views are open on this server; reload the page "
                        "later")
    if _state(request).closing.is_set():
        raise PageError(503, "the server is stopping")


def _position(request: Request, name: str) -> str | None:
    last = request.headers.get("last-event-id")
    if last:
        if len(last) > 500:
            raise PageError(422, "Last-Event-ID is too long")
        return last
    return _param(request, name, 500)


async def steps_stream(request: Request) -> Response:
    """``event: step`` for each step stored after ``cursor`` that the filters keep."""
    _open(request)
    _, query = step_query(request)
    store = request.app.state.store
    cursor = _position(request, "cursor")

    def poll(position: str | None) -> tuple[Found, str | None]:
        page = store.steps_after(position, limit=BATCH, **query)
        last = len(page.steps) - 1
        # a batch's last step carries its position (the others none: a browser that
        # reconnects mid-batch is sent that batch again)
        return [(page.next_cursor if i == last else None, step_data(step))
                for i, step in enumerate(page.steps)], page.next_cursor

    await _call(lambda: store.steps_after(cursor, limit=1, **query))  # a bad cursor: 422 now
    return _Stream(request, "step", poll, cursor)


async def approvals_stream(request: Request) -> Response:
    """``event: approval`` for each request pending now that was created after ``since``."""
    from closedloop.approvals import approvals_for

    _open(request)
    given = _position(request, "since")
    try:
        since = float(given) if given is not None else 0.0
    except ValueError:
        raise PageError(422, "since must be a time in seconds") from None
    store = request.app.state.store
    approvals = approvals_for(store)

    def poll(position: str | None) -> tuple[Found, str | None]:
        after = float(position or 0.0)
        found = approvals.list(status="pending", limit=BATCH).requests
        new = sorted((r for r in found if r.created_at > after), key=lambda r: r.created_at)
        return [(repr(r.created_at), request_data(r)) for r in new], (
            repr(new[-1].created_at) if new else None)

    return _Stream(request, "approval", poll, repr(since))


async def overview_stream(request: Request) -> Response:
    """``event: overview`` with the overview's figures (:func:`overview_payload`) whenever
    they differ from the ``state`` the page (or the last event) showed."""
    _open(request)
    window = request.query_params.get("window", "7d")
    if window not in WINDOWS:
        raise PageError(422, f"window must be one of {', '.join(WINDOWS)}")
    state = _position(request, "state")
    store = request.app.state.store
    ledger = _state(request).ledger_for(store)
    # the page computed the figures a moment ago; without its state, compute them now
    clock = {"next": time.monotonic() + OVERVIEW_S if state is not None else 0.0}

    def poll(position: str | None) -> tuple[Found, str | None]:
        if time.monotonic() < clock["next"]:
            return [], None  # computed a moment ago (or the page was): nothing new to ask
        clock["next"] = time.monotonic() + OVERVIEW_S
        payload = overview_payload(overview_data(store, ledger, WINDOWS[window]))
        now = overview_state(payload)
        return ([] if now == position else [(now, payload)]), now

    return _Stream(request, "overview", poll, state)
