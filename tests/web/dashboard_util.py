"""Helpers of the dashboard tests: people and their tokens, a signed-in client, hostile
stored text, and an HTML reader that lists every element and attribute a page has."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

import httpx

import closedloop as cl
from closedloop.control import Stop, StopKind, ledger_for_store
from closedloop.telemetry import StoreExporter, Telemetry

from .conftest import TOKEN, Served, make_request, start_serve

APPROVER = "approver-token-" + "9c4e1b" * 4
VIEWER = "viewer-token-" + "5d2a7f" * 4
USERS = f"alice:approver:{APPROVER},vera:viewer:{VIEWER}"
HOSTILE = ('<script>alert(1)</script>', '"><img src=x onerror=alert(2)>', "' onmouseover='x",
           "<b>bold</b>", "[red]markup[/red]", "\x1b[31mred\x1b[0m", "a\rb", "n\x00ul",
           "\u202eevil", "&amp; {{ 7*7 }}")
TEXT = " ".join(HOSTILE)
PRINTABLE = " ".join(h for h in HOSTILE if h.isprintable())
"""The hostile strings a name may hold (names must be printable)."""
TASK_TYPE = "deploy<i>x</i>\x1b[31m"
# What a page may contain: the templates' own elements and attributes, nothing else.
TAGS = {"html", "head", "meta", "title", "link", "body", "header", "a", "nav", "div", "span",
        "form", "input", "button", "main", "p", "h1", "h2", "h3", "table", "thead", "tbody",
        "tr", "th", "td", "svg", "polyline", "rect", "select", "option", "label", "section",
        "dl", "dt", "dd", "pre", "ol", "ul", "li", "details", "summary", "article", "b",
        "textarea", "code", "script"}
ATTRS = {"lang", "charset", "name", "content", "http-equiv", "rel", "href", "class", "method",
         "action", "placeholder",
         "type", "value", "data-role", "role", "id", "autocomplete", "required", "for",
         "selected", "size", "viewbox", "width", "height", "aria-label", "points", "x", "y",
         "preserveaspectratio", "aria-hidden", "open", "title", "rows", "maxlength", "hidden",
         "data-live", "data-live-kind", "data-live-status", "data-live-count", "data-live-empty",
         "data-live-table", "data-field"}
SCRIPT = {"src": "/ui/static/live.js", "defer": None}
"""The one script a page may have: the package's own, from this server."""


@dataclass
class Page(HTMLParser):
    """A parsed page: its elements with their attributes, and its text."""

    elements: list[tuple[str, dict[str, str | None]]] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    @property
    def text(self) -> str:
        return " ".join("".join(self.parts).split())

    def forms(self) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == "form"]


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


def assert_safe(html: str) -> Page:
    """No element or attribute but the templates' own (no script but live.js), no raw
    control character."""
    page = parse(html)
    for tag, attrs in page.elements:
        assert tag in TAGS, (tag, attrs)
        if tag == "script":
            assert attrs == SCRIPT, attrs
            continue
        for name in attrs:
            assert name in ATTRS, (tag, name, attrs)
    for raw in ("\x1b", "\x00", "\r", "\u202e"):
        assert raw not in html
    return page


def safe_texts(pages: dict[str, httpx.Response]) -> dict[str, str]:
    """Each page's text, after checking it answered 200 and is safe (:func:`assert_safe`)."""
    texts = {}
    for path, answer in pages.items():
        assert answer.status_code == 200, (path, answer.text)
        texts[path] = assert_safe(answer.text).text
    return texts


def visible(text: str) -> str:
    """``text`` as a page shows it: controls written out, whitespace collapsed."""
    out = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)
    return " ".join(out.replace("\u202e", "\\u202e").split())


def csrf_of(html: str) -> str:
    for tag, attrs in parse(html).elements:
        if tag == "input" and attrs.get("name") == "csrf" and attrs.get("value"):
            return str(attrs["value"])
    raise AssertionError("no CSRF field on the page")


@contextmanager
def signed_in(served: Served, token: str) -> Iterator[httpx.Client]:
    """A client (no bearer header) signed in through the login form."""
    with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
        answer = http.post("/ui/login", data={"token": token})
        assert answer.status_code == 303, answer.text
        yield http


def start_dashboard(store_url: str, *args: str) -> Served:
    return start_serve(store_url, *args, env={"CLOSEDLOOP_DASHBOARD_USERS": USERS})


def seed_hostile(store_url: str) -> dict[str, Any]:
    """One traced step, one approval request, one halt: every text in them hostile."""
    store = cl.open_store(store_url)
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)

    def agent(task: dict[str, str], attempt: cl.Attempt) -> dict[str, object]:
        return {"plan": TEXT, "n": attempt.number}

    def validator(plan: dict[str, object]) -> str | None:
        return None if plan["n"] != 1 else f"validator says {TEXT}"

    def verifier(intent: object, result: object) -> cl.Verdict:
        return cl.Verdict.fail(f"verifier says {TEXT}")

    loop = cl.Loop(agent, task_type=TASK_TYPE, validators=[validator], executor=lambda p: p,
                   verifiers=[verifier], store=store, telemetry=pipeline, max_attempts=2,
                   guards=())
    trace_id = loop.run({"ask": TEXT}).trace_id
    pipeline.shutdown()
    store.flush()
    ledger_for_store(store, redis_url=None).put(Stop(
        task_type=f"halted {TEXT}", kind=StopKind.HALTED, reason=f"reason {TEXT}",
        by=f"by {TEXT}", at=time.time(), evidence={"why": TEXT}))
    store.close()
    request = make_request(store_url, proposal={"plan": TEXT}, task_type=f"t {TEXT}",
                           requested_by=f"agent {PRINTABLE}", destructive=True,
                           verdicts=[{"check": f"check {TEXT}", "passed": False,
                                      "messages": [f"message {TEXT}"]}])
    return {"trace_id": trace_id, "request_id": request.request_id}


__all__ = ["TOKEN"]
