"""The dashboard: server-rendered pages under ``/ui`` of ``closedloop serve``, on the public
APIs of the store, the learning layer, approvals, autonomy and control (no SQL here).

==============================  ==========================================================
``GET  /ui/``                   overview per task type: runs, pass rates with sparklines,
                                cost, autonomy level, pauses and halts, pending approvals,
                                active drift alarms (:func:`active_firings`)
``GET  /ui/steps``              steps, newest first, filtered (task type, outcome, error
                                type, model, label ``KEY=VALUE``, run, time range),
                                keyset-paginated with the store's cursor
``GET  /ui/runs``               runs, newest first, filtered (outcome, start time),
                                keyset-paginated; each links to its steps
``GET  /ui/traces``             traces, newest first, two of them picked to compare;
                                ``/ui/traces/{id}``: one trace's span tree with timings,
                                verdict messages, captured content and the proposal
``GET  /ui/diff?a=..&b=..``     two traces side by side, stage by stage, what differs and
                                where they first split (:func:`closedloop.learn.diff_traces`)
``GET  /ui/failures``           failure clusters (:func:`closedloop.learn.failure_clusters`)
                                with links to example traces
``GET  /ui/factors``            what goes with failure (:func:`closedloop.learn.factors`)
``GET  /ui/live/steps``,        server-sent events: the steps (of the page's filters) and
``GET  /ui/live/approvals``     pending requests stored since the page was made
                                (:mod:`closedloop.web._live`; ``static/live.js`` inserts
                                them as text); ``/ui/live/overview``: the overview's
                                figures again whenever they change
``GET  /ui/approvals``          the pending queue and recent decisions; ``/ui/approvals/{id}``
                                one request with approve and reject forms (approver)
``GET  /ui/control``            pauses and halts with their evidence, resume form (admin);
                                the recent drift detections (active ones marked)
``GET  /ui/autonomy``           each task type's level, the evidence since it was entered
                                (agreement, approval and verification rates with their
                                Wilson lower bounds, decisions, the recommendation) and the
                                audit trail; promote, demote or set with a reason (admin)
``GET|POST /ui/login``          sign in with a token; ``POST /ui/logout``
==============================  ==========================================================

Every stored string reaches the page through Jinja2 with autoescaping on (and through
:func:`~closedloop._redact.redact_text` where it is captured content or a proposal), so it is
shown as text, never as markup; the pages carry a ``Content-Security-Policy`` that runs no
script but the package's own ``/ui/static/live.js`` (no inline script), which inserts what
arrives live with ``textContent``. Every page works without it.
Reads follow the API's rule (free on loopback; beyond it, sign in first); every write needs a
signed-in person of the right role (:mod:`closedloop.web._auth`) and the form's CSRF token,
and is recorded by the service it calls with ``by`` set to ``NAME (web)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from closedloop._errors import ApprovalError, ConfigError, ControlUnavailable, StoreError
from closedloop._redact import redact_text
from closedloop.store import parse_duration, parse_label_filter
from closedloop.web._auth import COOKIE, Role, Session, Sessions, csrf_ok

_T = TypeVar("_T")
PAGE = 50
FORM_MAX = 16 * 1024
TEXT_MAX = 20_000
"""Characters of one captured content or proposal a page shows (the rest is cut, said so)."""
CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; "
       "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATUS_ERROR = 2  # a failed span's stored status (closedloop.learn's STATUS_ERROR)
LIVE_S = 10
"""Seconds between reloads of a page opened with ``?live=1`` (the overview, the first page of
steps, the approval queue, control): new steps and requests appear without scripts."""
_LIVE = frozenset({"overview.html", "steps.html", "approvals.html", "control.html"})
STEP_FILTERS = ("task_type", "outcome", "error_type", "model", "label", "run_id", "since",
                "until")
"""The steps page's filters (query parameters), as the live stream takes them too."""
_NOTICES = {"approved": "Approved.", "rejected": "Rejected.", "resumed": "Resumed.",
            "signed_in": "Signed in.", "level_set": "Level set.", "signed_out": "Signed out."}


class PageError(Exception):
    """An answer other than a page: status and a one-line message (shown escaped)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Dashboard:
    """The dashboard's state on ``app.state.dashboard``: sessions, whether reads need a
    session (a server beyond loopback), and the control ledger (made on first use)."""

    sessions: Sessions
    guard_reads: bool
    ledger: Any = None
    closing: threading.Event = field(default_factory=threading.Event)
    """Set when the server stops: live streams end at once."""
    streams: int = 0
    """Live streams open now (at most :data:`closedloop.web._live.MAX_STREAMS`)."""

    def close(self) -> None:
        """End the live streams (the server is stopping)."""
        self.closing.set()

    def ledger_for(self, store: Any) -> Any:
        if self.ledger is None:
            from closedloop.control import ledger_for_store

            self.ledger = ledger_for_store(store)
        return self.ledger


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("closedloop.web", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                      finalize=_visible)
    env.filters["when"] = _when
    env.filters["pct"] = _pct
    env.filters["ms"] = lambda v: "" if v is None else f"{v:,.1f} ms"
    env.filters["usd"] = lambda v: "" if v is None else f"${v:,.4f}"
    env.filters["redacted"] = _shown
    env.filters["pretty"] = _pretty
    env.filters["value"] = _value
    env.filters["short_id"] = short_id
    return env


_ENV: Environment | None = None


def _env() -> Environment:
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))
             if chr(c) not in "\n\t"}
_CONTROLS.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F),
                                               *range(0x2066, 0x206A), 0x200E, 0x200F)})


def _visible(value: Any) -> Any:
    """What every ``{{ }}`` of a template prints: text with its control characters (ANSI
    escapes, ``\\r``, NUL, bidi overrides) written out as ``\\x1b``, so stored text can
    neither hide nor reorder what a page shows; then Jinja2 escapes it."""
    if isinstance(value, str):
        return value.translate(_CONTROLS)
    return value


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def _pct(value: float | None) -> str:
    return "\u2013" if value is None else f"{100 * value:.1f}%"


def _shown(text: object) -> str:
    """Stored text as a page shows it: redacted again, cut to :data:`TEXT_MAX`."""
    value = redact_text(str(text))
    if len(value) > TEXT_MAX:
        return value[:TEXT_MAX] + f"\n… ({len(value) - TEXT_MAX} more characters not shown)"
    return value


def _pretty(text: object) -> str:
    """A stored proposal (JSON text, perhaps of a JSON string) indented for people, then as
    :func:`_shown`; text that is not JSON is shown as it is."""
    value: Any = text
    for _ in range(2):
        if not isinstance(value, str):
            break
        try:
            value = json.loads(value)
        except ValueError:
            break
    if not isinstance(value, str):
        value = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return _shown(value)


def _value(value: object, limit: int = 300) -> str:
    """A stored value of any type (a span attribute, captured content) as short text."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           default=str)
    shown = redact_text(text)
    return shown if len(shown) <= limit else shown[:limit] + "…"


def _state(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


def _session(request: Request) -> Session | None:
    return _state(request).sessions.get(request.cookies.get(COOKIE))


def _render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    session = _session(request)
    notice = _NOTICES.get(request.query_params.get("done", ""))
    live = request.query_params.get("live") == "1" and template in _LIVE
    body = _env().get_template(template).render(
        session=session, user=session.user if session else None,
        role=session.user.role.name.lower() if session else None,
        csrf=session.csrf if session else "", notice=notice,
        writable=bool(_state(request).sessions.users), path=request.url.path,
        refresh=LIVE_S if live else None, live=live, **context)
    return Response(body, status_code=status, media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": CSP,
                             # not "no-referrer": with it a browser sends its forms with
                             # "Origin: null", which _form refuses
                             "Referrer-Policy": "same-origin"})


def _can_read(request: Request) -> None:
    if _state(request).guard_reads and _session(request) is None:
        raise PageError(401, "sign in first: this server is reachable beyond loopback")


async def _call(work: Callable[[], _T]) -> _T:
    try:
        return await run_in_threadpool(work)
    except ApprovalError as exc:
        raise PageError({"not_found": 404, "self_approval": 403, "expired": 410}.get(
            exc.code, 409), str(exc)) from None
    except ConfigError as exc:
        raise PageError(422, str(exc)) from None
    except (StoreError, ControlUnavailable) as exc:
        raise PageError(503, f"the store cannot be used now: {exc}") from None


def _param(request: Request, name: str, limit: int = 200) -> str | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if len(value) > limit:
        raise PageError(422, f"{name} is too long")
    return value


# ----- reading ------------------------------------------------------------------------------

def _sparkline(values: list[float | None], width: int = 96, height: int = 20) -> str | None:
    """An SVG polyline's points for ``values`` in [0, 1] (None: a gap), or None."""
    known = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(known) < 2:
        return None
    step = width / max(1, len(values) - 1)
    return " ".join(f"{i * step:.1f},{height - 2 - v * (height - 4):.1f}" for i, v in known)


WINDOWS = {"24h": 86400.0, "7d": 7 * 86400.0, "30d": 30 * 86400.0, "all": None}
"""The overview's periods (``?window=``); 7 days unless asked."""
SPARK_PERIODS = {"24h": 24, "7d": 7, "30d": 30, "all": 14}
"""Periods a sparkline of the overview covers (hours for 24h, else days), up to the newest."""


def _merged(cells: Iterable[Any], value: str | None) -> Any:
    """One :class:`~closedloop.store.SeriesCell` adding up ``cells`` (its period 0)."""
    from closedloop.store import SeriesCell

    total = SeriesCell(value=value, period=0)
    for cell in cells:
        for name in _SUMMED:
            setattr(total, name, getattr(total, name) + getattr(cell, name))
        for bucket, n in cell.latency.items():
            total.latency[bucket] = total.latency.get(bucket, 0) + n
    return total


_SUMMED = ("steps", "validated", "validation_passed", "reasked", "verified",
           "verification_passed", "succeeded", "failed", "tokens", "tokens_sq",
           "succeeded_tokens", "priced", "cost_usd", "cost_sq", "succeeded_cost",
           "latency_sum")


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """One row of the overview (``task_type`` None: every task type), from the learning
    layer's aggregates: the p95 is estimated from the latency histogram (within its bucket,
    nine per decade), as the trends page estimates it."""

    task_type: str | None
    runs: int
    validated: int
    validation_passed: int
    verified: int
    verification_passed: int
    cost_usd: float | None
    latency_p95_ms: float | None


def _figures(cell: Any) -> Figures:
    from closedloop.learn import trends_from_cells

    found = trends_from_cells([cell], by="task_type", window="day", first=0, last=0)
    figures = found.series[0].points[0].figures if found.series else {}
    p95 = figures.get("latency_p95_ms")
    return Figures(task_type=cell.value, runs=cell.steps, validated=cell.validated,
                   validation_passed=cell.validation_passed, verified=cell.verified,
                   verification_passed=cell.verification_passed,
                   cost_usd=cell.cost_usd if cell.priced else None,
                   latency_p95_ms=None if p95 is None else p95.value)


def _sparklines(cells: list[Any], periods: int) -> dict[str | None, Any]:
    """Per task type, the SVG points of its validation and verification pass rates over the
    last ``periods`` periods up to the newest one with steps (a line needs two)."""
    if not cells:
        return {}
    last = max(c.period for c in cells)
    first = last - periods + 1
    rates: dict[str | None, dict[str, list[float | None]]] = {}
    for c in cells:
        if c.period < first:
            continue
        lines = rates.setdefault(c.value, {name: [None] * periods for name in _RATES})
        for name, (passed, of) in _RATES.items():
            total = getattr(c, of)
            lines[name][c.period - first] = getattr(c, passed) / total if total else None
    return {value: {name: _sparkline(line) for name, line in lines.items()}
            for value, lines in rates.items()}


_RATES = {"validation_pass_rate": ("validation_passed", "validated"),
          "verification_pass_rate": ("verification_passed", "verified")}


DRIFT_ACTIVE_S = 86400.0
"""How long a drift detection stays an active alarm on the overview: a firing of the last
24 hours (its ``at``, the time of the step that set it off), unless its task type was resumed
after it (a person looked at it). The detector itself re-arms after ``rearm_steps``
observations, counted in steps, not time: no clock says when a drift is over."""
DRIFT_SHOWN = 50
"""Drift detections the control page lists (newest first; the store keeps the last 200)."""


def drift_firings(store: Any) -> list[Any]:
    """The drift detections recorded in ``store`` (:func:`closedloop.learn.recorded_firings`),
    newest first; none where its backend keeps no level store."""
    from closedloop.learn import recorded_firings
    from closedloop.store import LevelBackend, level_store_for

    if not isinstance(store.backend, LevelBackend):
        return []
    return recorded_firings(level_store_for(store))


def active_firings(firings: Iterable[Any], history: Iterable[Mapping[str, Any]],
                   now: float) -> list[Any]:
    """The ``firings`` that are active alarms at ``now`` (see :data:`DRIFT_ACTIVE_S`), given
    the control ledger's recent ``history`` (its ``resumed`` entries)."""
    resumed: dict[str, float] = {}
    for h in history:
        if h.get("event") == "resumed":
            task, at = str(h.get("task_type")), float(h.get("at", 0.0))
            resumed[task] = max(resumed.get(task, at), at)
    return [f for f in firings
            if f.at >= now - DRIFT_ACTIVE_S and f.at > resumed.get(f.task_type, -math.inf)]


def short_id(value: str) -> str:
    """An id as a page shows it: whole up to 13 characters, else its first and last six.
    Run and step ids are 20 random digits per process and a 12-digit count, trace ids a time
    in ms and 80 random bits: the start tells processes (or hours) apart, the end the ids of
    one process (or millisecond); neither alone does."""
    return value if len(value) <= 13 else f"{value[:6]}\u2026{value[-6:]}"


def overview_data(store: Any, ledger: Any, window_s: float | None = 7 * 86400.0,
                  now: float | None = None) -> dict[str, Any]:
    """Per task type over the last ``window_s`` seconds (None: every step): its figures
    (:class:`Figures`) and sparklines of its daily pass rates (hourly over a day, or when
    the days give no line), all from one series of the learning layer's aggregates
    (:meth:`~closedloop.store.Store.series`: the hourly roll-up where the backend keeps
    one), the stored autonomy level, the stop in force, the pending approvals, the active
    drift alarms (:func:`active_firings`)."""
    from closedloop import approvals
    from closedloop.store import level_store_for

    now = time.time() if now is None else now
    since = None if window_s is None else now - window_s
    name = next((k for k, v in WINDOWS.items() if v == window_s), None)
    periods = SPARK_PERIODS.get(name or "", max(2, round((window_s or 0) / 86400)))
    window = "hour" if window_s is not None and window_s <= 86400 else "day"
    try:
        cells = store.series(by="task_type", window=window, since=since)
    except ConfigError:  # steps over more days than a series spans (decades): weeks
        window = "week"
        cells = store.series(by="task_type", window=window, since=since)
    spark = _sparklines(cells, periods)
    if window == "day" and not any(line for lines in spark.values() for line in lines.values()):
        newest = max((c.period for c in cells), default=None)
        if newest is not None:  # one day of steps: its hours
            end = (newest + 1) * 86400.0
            try:
                hours = store.series(by="task_type", window="hour",
                                     since=max(end - 86400.0, since or end - 86400.0))
            except (ConfigError, StoreError):
                hours = []
            found = _sparklines(hours, 24)
            if any(line for lines in found.values() for line in lines.values()):
                spark, window = found, "hour"
    per_task: dict[str, list[Any]] = {}
    for cell in cells:
        per_task.setdefault(cell.value, []).append(cell)
    levels = {r.key.task_type: r for r in level_store_for(store).levels()
              if r.key.action_class is None and r.key.agent_id == "*"}
    stops = {s.task_type: s for s in ledger.stops()}
    pending: dict[str, int] = {}
    for r in approvals.list_requests(status="pending", limit=200, store=store).requests:
        pending[r.task_type] = pending.get(r.task_type, 0) + 1
    alarms = active_firings(drift_firings(store), ledger.history(50), now)
    drift: dict[str, list[Any]] = {}
    for firing in alarms:  # newest first
        drift.setdefault(firing.task_type, []).append(firing)
    rows = []
    for task in sorted(per_task):
        f = _figures(_merged(per_task[task], task))
        rows.append({"f": f, "spark": spark.get(task, {}), "level": levels.get(task),
                     "stop": stops.get(task), "pending": pending.get(task, 0),
                     "drift": drift.get(task, []),
                     "validation": f.validation_passed / f.validated if f.validated else None,
                     "verification": (f.verification_passed / f.verified if f.verified
                                      else None)})
    return {"rows": rows, "overall": _figures(_merged(cells, None)),
            "stops": list(stops.values()),
            "trend_window": f"per {window}",
            "pending_total": sum(pending.values()), "drift": alarms}


def drift_title(firings: list[Any]) -> str:
    """The title of an overview row's drift cell: the newest active firing's signal and
    reason (redacted again, cut short), and how many more there are."""
    if not firings:
        return ""
    newest = firings[0]
    more = f" (and {len(firings) - 1} more)" if len(firings) > 1 else ""
    return _value(f"{newest.signal}: {newest.reason}{more}", 500)


def overview_payload(data: Mapping[str, Any]) -> dict[str, Any]:
    """The overview's figures as its live updates send them (``event: overview``): the tiles'
    texts and each row's cells, as :mod:`closedloop.web._live`'s step rows are sent (text
    prepared for people, stored text with its control characters written out), which
    ``static/live.js`` puts in the page with ``textContent``."""
    env = _env()
    pct, ms, usd = env.filters["pct"], env.filters["ms"], env.filters["usd"]
    o = data["overall"]
    tiles = {"runs": f"{o.runs:,}",
             "validation": pct(o.validation_passed / o.validated) if o.validated else "\u2013",
             "verification": (pct(o.verification_passed / o.verified) if o.verified
                              else "\u2013"),
             "cost": usd(o.cost_usd) if o.cost_usd is not None else "\u2013",
             "pending": str(data["pending_total"]), "stops": str(len(data["stops"])),
             "drift": str(len(data["drift"]))}
    rows = []
    for row in data["rows"]:
        f, level, stop = row["f"], row["level"], row["stop"]
        task = _visible(f.task_type or "")
        rows.append({"cells": [
            {"text": task, "href": "/ui/steps?" + urlencode({"task_type": f.task_type or ""})},
            {"text": f"{f.runs:,}", "class": "num"},
            {"text": pct(row["validation"]), "class": "num"},
            {"spark": row["spark"].get("validation_pass_rate"), "kind": "val"},
            {"text": pct(row["verification"]), "class": "num"},
            {"spark": row["spark"].get("verification_pass_rate"), "kind": "ver"},
            {"text": ms(f.latency_p95_ms), "class": "num"},
            {"text": usd(f.cost_usd), "class": "num"},
            ({"text": _visible(level.level), "badge": f"lvl-{level.level}"} if level
             else {"text": "default", "class": "muted"}),
            ({"text": stop.kind.value, "badge": f"stop-{stop.kind.value}"} if stop
             else {"text": "running", "badge": "ok"}),
            {"text": str(row["pending"]), "class": "num"},
            ({"text": str(len(row["drift"])), "class": "num bad", "href": "/ui/control#drift",
              "title": _visible(drift_title(row["drift"]))} if row["drift"]
             else {"text": "0", "class": "num muted"})]})
    return {"tiles": tiles, "rows": rows, "trend": data["trend_window"]}


def overview_state(payload: Mapping[str, Any]) -> str:
    """A digest of what the overview shows: its live stream sends only what differs."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _tree(spans: list[Any]) -> list[dict[str, Any]]:
    """Spans in tree order with their depth and their bar's offset and width in percent."""
    from closedloop.learn import span_label, verdict_messages

    ids = {s.span_id for s in spans}
    children: dict[str | None, list[Any]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in ids else None
        children.setdefault(parent, []).append(s)
    start = min((s.start_ns for s in spans), default=0)
    total = max(1, max((s.end_ns for s in spans), default=0) - start)
    out: list[dict[str, Any]] = []
    stack = [(s, 0) for s in reversed(children.get(None, []))]
    while stack:
        span, depth = stack.pop()
        label = span_label(span).split("  ", 2)  # name, duration, the decisive attributes
        failed = (span.status == STATUS_ERROR
                  or span.attributes.get("closedloop.verdict.passed") is False)
        out.append({"span": span, "depth": min(depth, 12),
                    "label": label[2] if len(label) > 2 else "",
                    "messages": verdict_messages(span), "failed": failed,
                    "left": 100 * (span.start_ns - start) / total,
                    "width": max(0.5, 100 * (span.end_ns - span.start_ns) / total)})
        stack.extend((c, depth + 1) for c in reversed(children.get(span.span_id, [])))
    return out


def trace_data(store: Any, trace_id: str) -> dict[str, Any]:
    from closedloop.store import span_store_for

    spans = span_store_for(store).trace(trace_id)
    steps = list(store.events(trace_id=trace_id, limit=50))
    if not spans and not steps:
        raise PageError(404, "no such trace in this store")
    return {"trace_id": trace_id, "rows": _tree(spans), "steps": steps}


# ----- pages --------------------------------------------------------------------------------

async def overview(request: Request) -> Response:
    _can_read(request)
    store = request.app.state.store
    ledger = _state(request).ledger_for(store)
    window = request.query_params.get("window", "7d")
    if window not in WINDOWS:
        raise PageError(422, f"window must be one of {', '.join(WINDOWS)}")
    data = await _call(lambda: overview_data(store, ledger, WINDOWS[window]))
    live_url = "/ui/live/overview?" + urlencode(
        {"window": window, "state": overview_state(overview_payload(data))})
    return _render(request, "overview.html", window=window, windows=list(WINDOWS),
                   live_url=live_url, drift_title=drift_title, **data)




def _time(text: str | None, name: str, now: float | None = None) -> float | None:
    """A time filter: ``2026-05-01T12:00`` (UTC unless it says), or a duration before now
    (``24h``, ``7d``)."""
    if text is None:
        return None
    from datetime import UTC, datetime

    try:
        return (time.time() if now is None else now) - parse_duration(text)
    except ConfigError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise PageError(422, f"{name} must be a time like 2026-05-01T12:00 (UTC) or a "
                        "duration before now like 24h or 7d") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def step_query(request: Request) -> tuple[dict[str, str], dict[str, Any]]:
    """The steps filters of ``request``: as given (to carry in links) and as
    :meth:`~closedloop.store.Store.steps` takes them."""
    given = {k: v for k in STEP_FILTERS if (v := _param(request, k)) is not None}
    query: dict[str, Any] = {k: given.get(k) for k in ("task_type", "outcome", "error_type",
                                                       "model", "run_id")}
    try:
        query["label"] = parse_label_filter(given["label"]) if "label" in given else None
    except ConfigError as exc:
        raise PageError(422, str(exc)) from None
    query["since"] = _time(given.get("since"), "since")
    query["until"] = _time(given.get("until"), "until")
    return given, query


async def steps(request: Request) -> Response:
    _can_read(request)
    store = request.app.state.store
    given, query = step_query(request)
    cursor = _param(request, "cursor", 500)
    page = await _call(lambda: store.steps(limit=PAGE, cursor=cursor, **query))
    nxt = None
    if page.next_cursor:
        nxt = "?" + urlencode({**given, "cursor": page.next_cursor})
    live_url = None
    if cursor is None and "until" not in given:  # the first page: new steps go on top
        live_url = "/ui/live/steps?" + urlencode(
            {**given, **({"cursor": page.head_cursor} if page.head_cursor else {})})
    from closedloop import Outcome

    return _render(request, "steps.html", page=page, filters=given, next_url=nxt,
                   outcomes=[o.value for o in Outcome], live_url=live_url)


async def traces(request: Request) -> Response:
    _can_read(request)
    from closedloop.store import span_store_for

    store = request.app.state.store
    task_type = _param(request, "task_type")
    cursor = _param(request, "cursor", 500)
    page = await _call(lambda: span_store_for(store).traces(limit=PAGE, task_type=task_type,
                                                            cursor=cursor))
    nxt = None
    if page.next_cursor:
        nxt = "?" + urlencode({**({"task_type": task_type} if task_type else {}),
                               "cursor": page.next_cursor})
    return _render(request, "traces.html", page=page, task_type=task_type, next_url=nxt)


RUN_OUTCOMES = ("succeeded", "budget_exceeded", "halted", "aborted", "error", "running")


async def runs(request: Request) -> Response:
    _can_read(request)
    store = request.app.state.store
    outcome = _param(request, "outcome")
    given_since = _param(request, "since")
    since = _time(given_since, "since")
    cursor = _param(request, "cursor", 500)
    page = await _call(lambda: store.runs().list_runs(since=since, outcome=outcome,
                                                      limit=PAGE, cursor=cursor))
    given = {k: v for k, v in (("outcome", outcome), ("since", given_since)) if v}
    nxt = "?" + urlencode({**given, "cursor": page.next_cursor}) if page.next_cursor else None
    return _render(request, "runs.html", page=page, filters=given, next_url=nxt,
                   outcomes=RUN_OUTCOMES)


def _trace_id(value: str | None) -> str:
    if value is None or not 1 <= len(value) <= 64 or not all(
            c in "0123456789abcdef" for c in value):
        raise PageError(404, "no such trace (a trace id is up to 32 hex digits)")
    return value


def diff_data(store: Any, a: str, b: str) -> dict[str, Any]:
    """Two traces' stages aligned (:func:`closedloop.learn.diff_traces`), each side's steps,
    and the first stage where they split."""
    from closedloop.learn import diff_traces, first_divergence
    from closedloop.store import span_store_for

    spans = span_store_for(store)
    sides = {}
    for name, trace_id in (("a", a), ("b", b)):
        found = spans.trace(trace_id)
        steps = list(store.events(trace_id=trace_id, limit=20))
        if not found and not steps:
            raise PageError(404, f"no trace {trace_id} in this store")
        sides[name] = {"trace_id": trace_id, "spans": found, "steps": steps}
    rows = diff_traces(sides["a"]["spans"], sides["b"]["spans"])
    first = first_divergence(rows)
    return {"a": sides["a"], "b": sides["b"], "rows": rows, "first": first,
            "differing": sum(r.diverges for r in rows)}


async def diff(request: Request) -> Response:
    _can_read(request)
    picked = request.query_params.getlist("t")
    a, b = request.query_params.get("a"), request.query_params.get("b")
    if a is None and b is None and picked:
        if len(picked) != 2:
            raise PageError(422, f"pick two traces to compare, not {len(picked)}")
        a, b = picked
    store = request.app.state.store
    data = await _call(lambda: diff_data(store, _trace_id(a), _trace_id(b)))
    return _render(request, "diff.html", **data)


LEARN_WINDOWS = {"24h": 86400.0, "7d": 7 * 86400.0, "30d": 30 * 86400.0, "all": None}


def _learn_params(request: Request) -> tuple[str | None, str, float | None]:
    task_type = _param(request, "task_type")
    window = request.query_params.get("window", "7d")
    if window not in LEARN_WINDOWS:
        raise PageError(422, f"window must be one of {', '.join(LEARN_WINDOWS)}")
    span = LEARN_WINDOWS[window]
    return task_type, window, None if span is None else time.time() - span


async def failures(request: Request) -> Response:
    _can_read(request)
    from closedloop.learn import failure_clusters

    task_type, window, since = _learn_params(request)
    period = "hour" if window == "24h" else "day"
    store = request.app.state.store
    found = await _call(lambda: failure_clusters(store, window=period, since=since,
                                                 task_type=task_type, top=20, examples=3))
    return _render(request, "failures.html", result=found, task_type=task_type,
                   window=window, windows=list(LEARN_WINDOWS))


def factor_link(dimension: str, value: str | None) -> str | None:
    """The steps page of a factor's value, where the steps page can filter by it."""
    if value is None:
        return None
    if dimension == "model":
        return "/ui/steps?" + urlencode({"model": value})
    if dimension.startswith("label:"):
        return "/ui/steps?" + urlencode({"label": f"{dimension[len('label:'):]}={value}"})
    return None


async def factors_page(request: Request) -> Response:
    _can_read(request)
    from closedloop.learn import factors

    task_type, window, since = _learn_params(request)
    store = request.app.state.store
    found = await _call(lambda: factors(store, task_type=task_type, since=since))
    return _render(request, "factors.html", result=found, task_type=task_type,
                   window=window, windows=list(LEARN_WINDOWS), link=factor_link)


async def trace(request: Request) -> Response:
    _can_read(request)
    trace_id = _trace_id(str(request.path_params["trace_id"]))
    store = request.app.state.store
    data = await _call(lambda: trace_data(store, trace_id))
    return _render(request, "trace.html", **data)


async def approvals_page(request: Request) -> Response:
    _can_read(request)
    from closedloop import approvals

    store = request.app.state.store
    pending = await _call(lambda: approvals.list_requests(status="pending", limit=200,
                                                          store=store).requests)
    # planned deletions first, then oldest first
    pending = sorted(pending, key=lambda r: (not (r.risk or {}).get("destructive"),
                                             r.created_at))
    recent = await _call(lambda: [r for r in approvals.list_requests(limit=50,
                                                                     store=store).requests
                                  if r.status.value != "pending"])
    # the live stream sends the pending requests created after the newest one listed here
    since = max((r.created_at for r in (*pending, *recent)), default=0.0)
    return _render(request, "approvals.html", pending=pending, recent=recent,
                   since=repr(since))


def _rid(request: Request) -> str:
    rid = str(request.path_params["request_id"])
    if not 1 <= len(rid) <= 200:
        raise PageError(404, "no such approval request")
    return rid


async def approval(request: Request) -> Response:
    _can_read(request)
    from closedloop import approvals

    store, rid = request.app.state.store, _rid(request)
    found = await _call(lambda: approvals.get_request(rid, store=store))
    return _render(request, "approval.html", r=found, risk_items=risk_items(found.risk))


def risk_items(risk: Mapping[str, Any] | None) -> list[Any]:
    """The risk's items, planned deletions (and replacements) first."""
    items = (risk or {}).get("items") or []
    if not isinstance(items, list):
        return []

    def rank(item: Any) -> int:
        action = str(item.get("action", "")) if isinstance(item, Mapping) else ""
        return 0 if "delete" in action or "destroy" in action or "drop" in action else 1

    return sorted(items, key=rank)


async def control(request: Request) -> Response:
    _can_read(request)
    store = request.app.state.store
    ledger = _state(request).ledger_for(store)
    stops = await _call(ledger.stops)
    history = await _call(lambda: ledger.history(50))
    firings = await _call(lambda: drift_firings(store)[:DRIFT_SHOWN])
    now = time.time()
    alarms = {id(f) for f in active_firings(firings, history, now)}
    active = {i for i, f in enumerate(firings) if id(f) in alarms}  # (a Firing is unhashable)
    return _render(request, "control.html", stops=stops, history=history[:30], now=now,
                   firings=firings, active=active)


def autonomy_data(store: Any) -> dict[str, Any]:
    """Each key's stored level (or none: the default applies), its evidence since it entered
    that level and what it takes to move up (:meth:`AutonomyLevels.assess`), the levels a
    person may promote or demote it to, and the audit trail."""
    from closedloop.autonomy import LEVELS, AutonomyLevels
    from closedloop.store import level_store_for

    levels = AutonomyLevels(store, sinks=[])
    rows = []
    pairs = levels.keys()  # not a dict: (key, stored record or None)
    for key, record in pairs:
        found = levels.assess(key, record)
        at = LEVELS.index(found.level)
        rows.append({"key": key, "rec": record, "a": found, "ev": found.evidence,
                     "up": LEVELS[at + 1] if at + 1 < len(LEVELS) else None,
                     "down": LEVELS[at - 1] if at > 0 else None})
    return {"rows": rows, "history": level_store_for(store).history(limit=50),
            "default": levels.default.value}


async def autonomy(request: Request) -> Response:
    _can_read(request)
    from closedloop.autonomy import Autonomy

    store = request.app.state.store
    data = await _call(lambda: autonomy_data(store))
    return _render(request, "autonomy.html", levels=[a.value for a in Autonomy], **data)


# ----- writing ------------------------------------------------------------------------------

async def _form(request: Request) -> dict[str, str]:
    """The POSTed form (``application/x-www-form-urlencoded``, at most :data:`FORM_MAX`
    bytes), after checking the request came from one of this server's pages."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        if urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
            raise PageError(403, "this form was sent from another site")
    elif origin == "null":
        raise PageError(403, "this form was sent from an opaque origin")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise PageError(415, "send the form as application/x-www-form-urlencoded")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > FORM_MAX:
            raise PageError(413, f"the form must be at most {FORM_MAX} bytes")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise PageError(400, "the form cannot be read") from None
    return dict(pairs)


async def _writer(request: Request, role: Role) -> tuple[Session, dict[str, str]]:
    """The signed-in session allowed to do this write and its form (CSRF checked)."""
    form = await _form(request)
    session = _session(request)
    if session is None:
        raise PageError(401, "sign in first: every change needs a signed-in person")
    if not csrf_ok(session, form.get("csrf")):
        raise PageError(403, "the form's CSRF token is missing or stale: reload the page")
    if session.user.role < role:
        raise PageError(403, f"this needs the {role.name.lower()} role; "
                        f"{session.user.name} is a {session.user.role.name.lower()}")
    return session, form


def _reason(form: Mapping[str, str], *, required: bool) -> str:
    reason = form.get("reason", "").strip()
    if required and not reason:
        raise PageError(422, "a reason is required")
    if len(reason) > 2000:
        raise PageError(422, "the reason must be at most 2000 characters")
    return reason


def by(session: Session) -> str:
    """Who a web decision is recorded as."""
    return f"{session.user.name} (web)"


async def decide(request: Request) -> Response:
    from closedloop import approvals

    session, form = await _writer(request, Role.APPROVER)
    store, rid = request.app.state.store, _rid(request)
    action = form.get("action")
    reason = _reason(form, required=action == "reject")
    if action == "approve":
        await _call(lambda: approvals.approve(rid, by=by(session), reason=reason, store=store))
    elif action == "reject":
        await _call(lambda: approvals.reject(rid, by=by(session), reason=reason,
                                             revise=form.get("revise") == "1", store=store))
    else:
        raise PageError(422, "action must be approve or reject")
    return RedirectResponse(f"/ui/approvals/{rid}?done={action}d", status_code=303)


async def resume(request: Request) -> Response:
    from closedloop.control import resume as lift

    session, form = await _writer(request, Role.ADMIN)
    task_type = form.get("task_type", "")
    reason = _reason(form, required=True)
    store = request.app.state.store
    ledger = _state(request).ledger_for(store)
    stop = await _call(lambda: lift(ledger, task_type, reason=reason, by=by(session)))
    if stop is None:
        raise PageError(409, f"{task_type} is neither halted nor paused")
    return RedirectResponse("/ui/control?done=resumed", status_code=303)


def change_level(store: Any, task_type: str, level: str, *, by: str,
                 reason: str) -> Any:
    """Store ``level`` for ``task_type`` as a person's decision: ``promoted`` or ``demoted``
    (with the evidence at that moment in the audit trail) when it moves, else ``set``."""
    from closedloop.autonomy import LEVELS, Autonomy, AutonomyLevels, LevelKey

    levels = AutonomyLevels(store, sinks=[])
    value = Autonomy.parse(level).value
    found = levels.assess(LevelKey(task_type=task_type))
    move = LEVELS.index(value) - LEVELS.index(found.level)
    kind = "set" if move == 0 else "promoted" if move > 0 else "demoted"
    return levels.set(task_type, value, by=by, reason=reason, kind=kind,
                      evidence=found.evidence.to_dict())


async def set_level(request: Request) -> Response:
    session, form = await _writer(request, Role.ADMIN)
    task_type = form.get("task_type", "")
    if not 1 <= len(task_type) <= 200:
        raise PageError(422, "task_type is missing or too long")
    reason = _reason(form, required=True)
    level = form.get("level", "")
    store = request.app.state.store
    await _call(lambda: change_level(store, task_type, level, by=by(session), reason=reason))
    return RedirectResponse("/ui/autonomy?done=level_set", status_code=303)


async def login(request: Request) -> Response:
    if request.method == "GET":
        return _render(request, "login.html", error=None)
    form = await _form(request)
    sessions = _state(request).sessions
    user = sessions.authenticate(form.get("token", ""))
    if user is None:
        return _render(request, "login.html", status=401, error="That token signs nobody in.")
    old = request.cookies.get(COOKIE)
    sessions.end(old)
    sid, _ = sessions.start(user)
    response = RedirectResponse("/ui/?done=signed_in", status_code=303)
    response.set_cookie(COOKIE, sid, max_age=int(sessions.ttl), path="/ui", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


async def logout(request: Request) -> Response:
    await _writer(request, Role.VIEWER)
    _state(request).sessions.end(request.cookies.get(COOKIE))
    response = RedirectResponse("/ui/login?done=signed_out", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


_STATIC = {"dashboard.css": "text/css", "live.js": "text/javascript"}


async def static(request: Request) -> Response:
    name = str(request.path_params["name"])
    kind = _STATIC.get(name)
    if kind is None:
        raise PageError(404, "no such file")
    body = resources.files("closedloop.web").joinpath(f"static/{name}").read_bytes()
    return Response(body, media_type=kind, headers={"Cache-Control": "max-age=300"})


async def live_steps(request: Request) -> Response:
    from closedloop.web._live import steps_stream

    return await steps_stream(request)


async def live_overview(request: Request) -> Response:
    from closedloop.web._live import overview_stream

    return await overview_stream(request)


async def live_approvals(request: Request) -> Response:
    from closedloop.web._live import approvals_stream

    return await approvals_stream(request)


async def root(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


def _page(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    async def wrapped(request: Request) -> Response:
        try:
            response: Response = await handler(request)
        except PageError as exc:
            return _render(request, "error.html", status=exc.status,
                           message=" ".join(exc.message.split())[:500])
        return response
    return wrapped


ROUTES = [
    Route("/", root, methods=["GET"]),
    Route("/ui/", _page(overview), methods=["GET"]),
    Route("/ui/steps", _page(steps), methods=["GET"]),
    Route("/ui/traces", _page(traces), methods=["GET"]),
    Route("/ui/traces/{trace_id}", _page(trace), methods=["GET"]),
    Route("/ui/runs", _page(runs), methods=["GET"]),
    Route("/ui/diff", _page(diff), methods=["GET"]),
    Route("/ui/failures", _page(failures), methods=["GET"]),
    Route("/ui/factors", _page(factors_page), methods=["GET"]),
    Route("/ui/live/steps", _page(live_steps), methods=["GET"]),
    Route("/ui/live/approvals", _page(live_approvals), methods=["GET"]),
    Route("/ui/live/overview", _page(live_overview), methods=["GET"]),
    Route("/ui/approvals", _page(approvals_page), methods=["GET"]),
    Route("/ui/approvals/{request_id}", _page(approval), methods=["GET"]),
    Route("/ui/approvals/{request_id}/decide", _page(decide), methods=["POST"]),
    Route("/ui/control", _page(control), methods=["GET"]),
    Route("/ui/autonomy", _page(autonomy), methods=["GET"]),
    Route("/ui/autonomy/set", _page(set_level), methods=["POST"]),
    Route("/ui/control/resume", _page(resume), methods=["POST"]),
    Route("/ui/login", _page(login), methods=["GET", "POST"]),
    Route("/ui/logout", _page(logout), methods=["POST"]),
    Route("/ui/static/{name}", _page(static), methods=["GET"]),
]
"""The dashboard's routes (``create_app(dashboard=True)`` mounts them)."""
