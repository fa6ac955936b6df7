"""The HTTP side of ``closedloop serve``: one ASGI app (Starlette, served by uvicorn) on one
port, with the Prometheus ``/metrics``, the JSON API under ``/api/v1`` and the
dashboard (``/ui``, docs/dashboard.md). See docs/approvals.md ("HTTP API and notifications").

- :func:`create_app` builds the app on a store; more sections add their routes
  (``routes=``) and read the store from ``request.app.state.store``.
- Auth (:class:`~closedloop.web._app.Guard`): a bearer token (``$CLOSEDLOOP_API_TOKEN``)
  for every write, and for every request when the server listens beyond loopback
  (:func:`is_loopback`); compared in constant time.
- :class:`ServerThread` runs the app with uvicorn off the main thread, on a socket bound
  first (:func:`bind`).

Needs the ``api`` extra (``pip install 'closedloop[api]'``).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from closedloop.web._app import Guard, create_app
    from closedloop.web._auth import USERS_ENV, Role, User, make_user, parse_users
    from closedloop.web._config import MIN_TOKEN, TOKEN_ENV, check_token, is_loopback, url_host
    from closedloop.web._json import MAX_BODY, ApiError, dumps
    from closedloop.web._server import ServerThread, bind

__all__ = [
    "MAX_BODY",
    "MIN_TOKEN",
    "TOKEN_ENV",
    "USERS_ENV",
    "ApiError",
    "Guard",
    "Role",
    "ServerThread",
    "User",
    "bind",
    "check_token",
    "create_app",
    "dumps",
    "is_loopback",
    "make_user",
    "parse_users",
    "url_host",
]


if not TYPE_CHECKING:  # import on use: is_loopback() needs no web framework
    from closedloop._lazy import lazy_exports as _lazy_exports

    __getattr__, __dir__ = _lazy_exports(__name__, {
        "._app": ("Guard", "create_app"),
        "._auth": ("USERS_ENV", "Role", "User", "make_user", "parse_users"),
        "._config": ("MIN_TOKEN", "TOKEN_ENV", "check_token", "is_loopback", "url_host"),
        "._json": ("MAX_BODY", "ApiError", "dumps"),
        "._server": ("ServerThread", "bind"),
    })
