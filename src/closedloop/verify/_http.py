"""HTTP outcome verification: status, JSON-path expectations and a latency bound (httpx)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from closedloop._checks import clip, require
from closedloop._errors import ConfigError
from closedloop._verdict import Issue, Verdict

_STEP = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\["((?:[^"\\]|\\.)*)"\]""")
_MISSING = object()


def parse_path(path: str) -> list[str | int]:
    """``$.items[0].name`` / ``$["a key"]`` → ``["items", 0, "name"]`` / ``["a key"]``.

    The subset of JSONPath that names one value (no wildcards or filters); the same syntax
    the structured validators use for locations.
    """
    if not path.startswith("$"):
        raise ConfigError(f"JSON path {path!r} must start with '$'")
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            raise ConfigError(f"JSON path {path!r}: cannot read {path[pos:]!r}")
        name, index, quoted = m.groups()
        steps.append(name if name is not None else int(index) if index is not None
                     else quoted.replace('\\"', '"'))
        pos = m.end()
    return steps


def resolve(doc: Any, steps: Iterable[str | int]) -> Any:
    """The value at ``steps`` in ``doc``, or a private sentinel when absent."""
    for step in steps:
        found = (isinstance(step, int) and isinstance(doc, list) and 0 <= step < len(doc)) or (
            isinstance(step, str) and isinstance(doc, Mapping) and step in doc)
        if not found:
            return _MISSING
        doc = doc[step]
    return doc


Expectation = object | Callable[[Any], bool]


class HttpVerifier:
    """Requests a URL and checks the response: status, JSON values by path, latency.

    ``url`` is a string or ``url(intent, result)``. ``json`` maps JSON paths (``$.status``)
    to an expected value or a predicate. ``max_latency`` (seconds) bounds the request time.
    A transport failure (refused, DNS, timeout) is *unknown*: the target could not be read.
    """

    def __init__(
        self,
        url: str | Callable[[Any, Any], str],
        *,
        method: str = "GET",
        status: int | Iterable[int] = 200,
        json: Mapping[str, Expectation] | None = None,
        max_latency: float | None = None,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        client: Any = None,
        clock: Callable[[], float] = time.perf_counter,
        name: str = "http",
    ) -> None:
        require("httpx")
        self.url = url
        self.method = method
        self.status = frozenset([status] if isinstance(status, int) else status)
        self.json = {p: (parse_path(p), want) for p, want in (json or {}).items()}
        self.max_latency = max_latency
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.client = client
        self.clock = clock
        self.name = name

    def _url(self, intent: Any, result: Any) -> str:
        return self.url(intent, result) if callable(self.url) else self.url

    def __call__(self, intent: Any, result: Any) -> Verdict:
        import httpx

        url = self._url(intent, result)
        client = self.client or httpx.Client(timeout=self.timeout)
        started = self.clock()
        try:
            response = client.request(self.method, url, headers=self.headers)
        except httpx.TransportError as exc:
            return self._unreachable(url, exc)
        finally:
            if self.client is None:
                client.close()
        return self.judge(response, self.clock() - started)

    async def acheck(self, intent: Any, result: Any) -> Verdict:
        """The same check with ``httpx.AsyncClient``, for ``Loop.arun`` verifiers."""
        import httpx

        url = self._url(intent, result)
        started = self.clock()
        try:
            if self.client is not None:
                response = await self.client.request(self.method, url, headers=self.headers)
            else:
                async with httpx.AsyncClient(timeout=self.timeout) as client:
                    response = await client.request(self.method, url, headers=self.headers)
        except httpx.TransportError as exc:
            return self._unreachable(url, exc)
        return self.judge(response, self.clock() - started)

    def _unreachable(self, url: str, exc: Exception) -> Verdict:
        return Verdict.cannot_tell(f"cannot reach {url}: {type(exc).__name__}: "
                                   f"{clip(str(exc), 200)}", check=self.name)

    def judge(self, response: Any, latency: float) -> Verdict:
        """Every mismatch between a response (taking ``latency`` s) and the expectations."""
        where = f"{response.request.method} {response.request.url}"
        issues = []
        if response.status_code not in self.status:
            want = " or ".join(str(s) for s in sorted(self.status))
            issues.append(Issue(code="http_status", location=where,
                                message=f"status is {response.status_code}, expected {want}"))
        if self.max_latency is not None and latency > self.max_latency:
            issues.append(Issue(code="http_latency", location=where,
                                message=f"took {latency * 1000:.0f} ms, over the bound of "
                                        f"{self.max_latency * 1000:.0f} ms"))
        if self.json:
            try:
                doc = response.json()
            except ValueError:
                issues.append(Issue(code="http_not_json", location=where,
                                    message="the response body is not JSON"))
                return Verdict(issues=tuple(issues), check=self.name)
            for path, (steps, expected) in self.json.items():
                issue = _expect(path, resolve(doc, steps), expected)
                if issue is not None:
                    issues.append(issue)
        return Verdict(issues=tuple(issues), check=self.name)


def _expect(path: str, have: Any, want: Expectation) -> Issue | None:
    if have is _MISSING:
        return Issue(code="http_json_missing", location=path, message="no value at this path")
    if callable(want):
        if want(have):
            return None
        label = getattr(want, "__name__", "predicate")
        return Issue(code="http_json_value", location=path,
                     message=f"{clip(repr(have), 80)} does not satisfy {label}")
    if have == want:
        return None
    return Issue(code="http_json_value", location=path,
                 message=f"is {clip(repr(have), 80)}, expected {clip(repr(want), 80)}")


class AsyncHttpVerifier(HttpVerifier):
    """:class:`HttpVerifier` for ``Loop.arun``: the request is made with ``httpx.AsyncClient``
    (pass an ``AsyncClient`` as ``client`` to reuse connections)."""

    async def __call__(self, intent: Any, result: Any) -> Verdict:  # type: ignore[override]
        return await self.acheck(intent, result)
