"""The ASGI application ``closedloop serve`` runs: one Starlette app, one port, for the
Prometheus metrics, the JSON API and the dashboard (``/ui``).

:func:`create_app` assembles it from route lists (``routes``: the approvals API,
:data:`closedloop.web._approvals_api.ROUTES`; more sections append theirs), wrapped in the
:class:`Guard` every request passes first:

- **Auth.** A bearer token (``Authorization: Bearer TOKEN``, compared in constant time) is
  required for every write (any method but GET, HEAD and OPTIONS), and for every request at
  all when ``guard_reads`` (the server listens beyond loopback). A server started without a
  token is read-only: writes are refused (403 ``read_only``). Missing or wrong token: 401.
- **Host.** On loopback, only requests whose ``Host`` is a loopback name (or the public
  URL's host) are answered (400 ``bad_host``), so that a page whose DNS name was rebound to
  127.0.0.1 cannot read the API from a visitor's browser.
- **Bounds.** A declared body over ``max_body`` bytes is refused before it is read (413);
  bodies are read with the same cap (:func:`~closedloop.web._json.read_json`).
- **Headers.** JSON responses are ``nosniff``, ``no-store``, framed by no page, and carry a
  ``Content-Security-Policy`` of ``default-src 'none'`` unless the route set its own.

Errors are JSON (``{"error": {"code", "message"}}``): unknown paths 404, wrong methods 405,
anything unexpected 500 without details (logged).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from hashlib import sha256
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from closedloop._errors import ConfigError
from closedloop.web._config import TOKEN_ENV, check_token, is_loopback
from closedloop.web._json import JSON, MAX_BODY, ApiError, error_response
from closedloop.web._openapi import PATH as OPENAPI_PATH
from closedloop.web._openapi import Health, OpenApiDocument, Operation, document

if TYPE_CHECKING:
    from closedloop.store import Store
    from closedloop.web._auth import User

_log = logging.getLogger("closedloop")
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"),
            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
            (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"))


class Guard:
    """The ASGI middleware every request passes first: auth, body bound, safe headers."""

    def __init__(self, app: ASGIApp, *, token: str | None, guard_reads: bool,
                 max_body: int = MAX_BODY, check_host: bool = False,
                 hosts: Sequence[str] = (), dashboard: bool = False) -> None:
        if guard_reads and token is None:
            raise ConfigError("guarding reads needs a token")
        self.app = app
        self.check_host = check_host
        self.dashboard = dashboard
        self.hosts = frozenset(h.lower() for h in hosts)
        self._digest = None if token is None else sha256(token.encode()).digest()
        self.guard_reads = guard_reads
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        async def send_safe(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in _HEADERS if h[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        refused = self._refusal(scope)
        if refused is not None:
            await refused(scope, receive, send_safe)
            return
        await self.app(scope, receive, send_safe)

    def _refusal(self, scope: Scope) -> Response | None:
        headers = dict(scope.get("headers") or [])
        if self.check_host and not self._own_host(headers.get(b"host", b"")):
            return error_response(400, "bad_host", "this server answers only to a loopback "
                                  "host name (or the --public-url's host)", redact=False)
        write = scope["method"] not in _READS
        if self.dashboard and (scope["path"] in ("/", "/ui") or scope["path"].startswith("/ui/")):
            # the dashboard's pages: it signs people in (a session cookie) and checks each
            # read beyond loopback, each write's role and its CSRF token itself
            return self._too_large(headers)
        if write or self.guard_reads:
            if self._digest is None:
                return error_response(403, "read_only", "this server was started without an "
                                      f"API token, so it is read-only (set ${TOKEN_ENV} "
                                      "where it starts to allow writes)", redact=False)
            given = headers.get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            challenge = {"WWW-Authenticate": 'Bearer realm="closedloop"'}
            if scheme.lower() != b"bearer" or not value.strip():
                return error_response(401, "missing_token", "this needs the API token, sent "
                                      "as a bearer token in the Authorization header",
                                      challenge, redact=False)
            if not hmac.compare_digest(sha256(value.strip()).digest(), self._digest):
                return error_response(401, "bad_token", "the API token is wrong", challenge,
                                      redact=False)
        return self._too_large(headers)

    def _too_large(self, headers: dict[bytes, bytes]) -> Response | None:
        size = headers.get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return error_response(413, "too_large",
                                  f"the body must be at most {self.max_body} bytes",
                                  redact=False)
        return None


    def _own_host(self, header: bytes) -> bool:
        """A loopback server answers only to loopback names (and ``hosts``): a web page
        whose DNS name was rebound to 127.0.0.1 cannot read it from a browser."""
        try:
            name = urlsplit("//" + header.decode("latin-1")).hostname or ""
        except ValueError:
            return False
        return is_loopback(name) or name.lower() in self.hosts


class _Asgi:
    """An ASGI app as a route endpoint (Starlette calls plain functions as request handlers)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {404: f"no such path: {request.url.path[:200]}",
               405: f"{request.method} is not allowed here"}.get(exc.status_code,
                                                                 str(exc.detail))
    return error_response(exc.status_code, code, message, getattr(exc, "headers", None))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _crash(request: Request, exc: Exception) -> Response:
    _log.error("closedloop: %s %s failed", request.method, request.url.path,
               exc_info=(type(exc), exc, exc.__traceback__))
    return error_response(500, "internal", "the server failed to answer; see its log")


async def _health(request: Request) -> Response:
    from closedloop import __version__

    return JSON({"status": "ok", "version": __version__,
                 "writable": request.app.state.writable})


async def _openapi(request: Request) -> Response:
    return JSON(request.app.state.openapi)


_OPERATIONS = (
    Operation("GET", "/api/v1/health", _health, "The server is up; whether it takes writes",
              Health, tag="server"),
    Operation("GET", OPENAPI_PATH, _openapi, "This document (OpenAPI 3.1)", OpenApiDocument,
              tag="server"),
)
"""The operations every app serves (the approvals section adds its own)."""


def create_app(*, store: Store, token: str | None = None, guard_reads: bool = False,
               metrics_registry: Any = None, api: bool = True,
               routes: Sequence[BaseRoute] = (), max_body: int = MAX_BODY,
               check_host: bool = False, hosts: Sequence[str] = (),
               dashboard: bool = False, users: Sequence[User] = ()) -> Starlette:
    """The app ``closedloop serve`` runs, on ``store``.

    ``token``: the bearer token writes need (None: read-only). ``guard_reads``: every
    request needs it (a bind beyond loopback). ``metrics_registry``: serve it at
    ``/metrics`` (None: no metrics). ``api``: the approvals API under ``/api/v1``.
    ``routes``: more routes (the dashboard's). ``check_host``: answer only requests whose
    ``Host`` is a loopback name or one of ``hosts`` (a loopback server: no DNS rebinding).
    The JSON API's operations are described at ``/api/openapi.json``
    (:mod:`closedloop.web._openapi`). ``dashboard``: the pages under ``/ui``
    (:mod:`closedloop.web._dashboard`), for ``users`` (and, with ``token``, an ``admin``
    who signs in with it).
    The store is ``app.state.store``.
    """
    token = check_token(token)
    if guard_reads and token is None:
        raise ConfigError("serving beyond loopback needs an API token: set "
                          f"${TOKEN_ENV} (or --token)")
    operations = [*_OPERATIONS]
    if api:
        from closedloop.web._approvals_api import OPERATIONS

        operations.extend(OPERATIONS)
    table: list[BaseRoute] = [op.route() for op in operations]
    if metrics_registry is not None:
        from closedloop.telemetry import metrics_asgi_app

        table.append(Route("/metrics", _Asgi(metrics_asgi_app(metrics_registry)),
                           methods=["GET", "HEAD"]))
    table.extend(routes)
    if dashboard:
        from closedloop.web._auth import Sessions, make_user
        from closedloop.web._dashboard import ROUTES as PAGES
        from closedloop.web._dashboard import Dashboard

        people = list(users)
        if token is not None and not any(u.name == "admin" for u in people):
            people.append(make_user("admin", "admin", token))
        table.extend(PAGES)
    app = Starlette(routes=table, middleware=[
        Middleware(Guard, token=token, guard_reads=guard_reads, max_body=max_body,
                   check_host=check_host, hosts=hosts, dashboard=dashboard)],
        exception_handlers={HTTPException: _http_error, ApiError: _api_error,
                            Exception: _crash})
    app.state.store = store
    from closedloop import __version__

    app.state.openapi = document(operations, version=__version__)
    app.state.writable = token is not None
    if dashboard:
        app.state.dashboard = Dashboard(Sessions(people), guard_reads)
    return app
