"""``closedloop serve``: one HTTP server for the agents writing to a store: Prometheus
``/metrics`` fed by their spans, and the approvals JSON API under ``/api/v1`` (with the
``api`` extra), on one port.

Agents in other processes write spans to the store (``closedloop.telemetry.configure()``);
this process tails them into metrics. Counters start at zero when the server starts
(Prometheus' ``rate()`` handles the reset); ``--from-start`` replays the whole store first.

The API reads freely on loopback; every write needs the bearer token (``--token`` or
``$CLOSEDLOOP_API_TOKEN``), and beyond loopback every request does: the server refuses to
start on such an address without one. With ``--webhook`` (``$CLOSEDLOOP_APPROVAL_WEBHOOK``) it
also notifies pending approval requests that nobody notified yet, or whose notification
failed, every ``--notify-interval`` seconds. Ctrl-C (SIGINT) stops it and exits 130; SIGTERM
stops it and exits 0.
"""

from __future__ import annotations

import importlib.util
import signal
import threading
import time
from types import FrameType
from typing import Any

import click

from closedloop._errors import ConfigError, StoreError
from closedloop.cli import main
from closedloop.cli._common import open_store_to_read, open_store_to_write, say, store_option


def _api_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("starlette", "uvicorn"))


@main.command()
@store_option
@click.option("--metrics/--no-metrics", "serve_metrics", default=True, show_default=True,
              help="Serve Prometheus metrics at /metrics.")
@click.option("--api/--no-api", "serve_api", default=None,
              help="Serve the approvals JSON API under /api/v1 (default: when the 'api' "
                   "extra is installed).")
@click.option("--dashboard/--no-dashboard", "serve_dashboard", default=None,
              help="Serve the dashboard under /ui (default: with the API, when jinja2 is "
                   "installed). People sign in with a token of "
                   "$CLOSEDLOOP_DASHBOARD_USERS (name:role:token, roles viewer, approver, "
                   "admin) or the API token (as admin).")
@click.option("--port", type=click.IntRange(0, 65535), default=9464, show_default=True,
              help="Port to listen on; 0 picks a free one.")
@click.option("--addr", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond loopback (0.0.0.0) every request needs the "
                   "token.")
@click.option("--token", envvar="CLOSEDLOOP_API_TOKEN", default=None, metavar="TOKEN",
              show_envvar=True,
              help="Bearer token every write needs (and every request beyond loopback); "
                   "prefer the variable: a command line is visible to other users.")
@click.option("--webhook", envvar="CLOSEDLOOP_APPROVAL_WEBHOOK", default=None, metavar="URL",
              show_envvar=True,
              help="Notify pending approval requests not notified yet to this webhook.")
@click.option("--webhook-format", type=click.Choice(["json", "slack"]), default=None,
              envvar="CLOSEDLOOP_APPROVAL_WEBHOOK_FORMAT", show_envvar=True,
              help="The webhook's body: generic JSON, or Slack-compatible (default: slack "
                   "for hooks.slack.com, else json).")
@click.option("--public-url", envvar="CLOSEDLOOP_PUBLIC_URL", default=None, metavar="URL",
              show_envvar=True,
              help="Where people reach this server, for the links in notifications "
                   "(default: the address served, on a specific address).")
@click.option("--notify-interval", type=click.FloatRange(0.05, 86400), default=30.0,
              show_default=True, help="Seconds between looks for unsent notifications.")
@click.option("--notify-grace", type=click.FloatRange(0, 86400), default=120.0,
              show_default=True,
              help="Seconds a new request is left to the process that created it (which "
                   "notifies it if it has a notifier) before serve notifies it.")
@click.option("--interval", type=click.FloatRange(0.05, 3600), default=1.0, show_default=True,
              help="Seconds between reads of new spans from the store.")
@click.option("--from-start", is_flag=True, help="Count every span already in the store.")
def serve(  # noqa: PLR0917 - click passes every option as an argument
        store_url: str, serve_metrics: bool, serve_api: bool | None,
        serve_dashboard: bool | None, port: int, addr: str,
        token: str | None, webhook: str | None, webhook_format: str | None,
        public_url: str | None, notify_interval: float, notify_grace: float,
        interval: float, from_start: bool) -> None:
    """Serve Prometheus /metrics, the approvals JSON API and the dashboard, until stopped."""
    from closedloop.web import check_token, is_loopback, url_host

    token = check_token(token)
    loopback = is_loopback(addr)
    if not loopback and token is None:
        raise ConfigError(f"serving on {addr} (beyond loopback) needs an API token: set "
                          "$CLOSEDLOOP_API_TOKEN (or --token)")
    use_app = serve_api is True or token is not None or not loopback or (
        serve_api is None and _api_installed())
    api = use_app and serve_api is not False
    dashboard = api and serve_dashboard is not False and (
        serve_dashboard is True or importlib.util.find_spec("jinja2") is not None)
    if not (serve_metrics or api):
        raise click.UsageError("nothing to serve: --no-metrics needs the API (--api)")
    host = url_host(addr)
    wildcard = addr.strip().strip("[]") in ("0.0.0.0", "::", "")  # noqa: S104 - a test
    notifier = None
    if webhook:
        from closedloop.approvals import WebhookNotifier

        notifier = WebhookNotifier(webhook, format=webhook_format, public_url=public_url)
    if use_app:
        import starlette  # noqa: F401 - a missing extra is named before anything starts
        import uvicorn  # noqa: F401

    registry = metrics = tail = None
    if serve_metrics:
        from prometheus_client import CollectorRegistry

        from closedloop.telemetry import Metrics

        registry = CollectorRegistry()
        metrics = Metrics(registry)
    writes = (api and (token is not None)) or notifier is not None
    store = open_store_to_write(store_url) if writes else open_store_to_read(store_url)
    if metrics is not None:
        from closedloop.control import ledger_for_store
        from closedloop.telemetry import StoreTail, span_store_for

        # pauses and halts live in the store's file, so this process can show them too
        metrics.watch_control(ledger=ledger_for_store(store))
        tail = StoreTail(span_store_for(store), metrics, from_start=from_start)

    from urllib.parse import urlsplit

    if public_url:
        from closedloop._webhook import check_url

        public_url = check_url(public_url, "public")
    public_host = urlsplit(public_url).hostname if public_url else None
    stop_server = _start(store, addr=addr, port=port, use_app=use_app, api=api, token=token,
                         guard_reads=not loopback, registry=registry,
                         hosts=[public_host] if public_host else [], dashboard=dashboard)
    stop = threading.Event()
    received: list[int] = []

    def _stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    bound = stop_server.port
    if notifier is not None and public_url is None and api and not wildcard:
        notifier.public_url = f"http://{host}:{bound}"  # the links point here
    parts = []
    if serve_metrics:
        parts.append(f"metrics on http://{host}:{bound}/metrics")
    if api:
        parts.append(f"the approvals API on http://{host}:{bound}/api/v1/approvals "
                     f"({'writes need the token' if token else 'read-only: no token'}"
                     f"{'; every request needs it' if not loopback else ''})")
    if dashboard:
        parts.append(f"the dashboard on http://{host}:{bound}/ui/")
    notes = f"; notifying a {notifier.shown}" if notifier is not None else ""
    say(f"serving {' and '.join(parts)} from {store.url}{notes}", err=True)
    next_sweep = time.monotonic()
    try:
        while not stop.is_set():
            if tail is not None:
                tail.poll()
            if notifier is not None and time.monotonic() >= next_sweep:
                _resend(store, notifier, notify_grace)
                next_sweep = time.monotonic() + notify_interval
            stop.wait(interval)
    finally:
        stop_server.stop()
        if notifier is not None:
            notifier.close(5.0)
        store.close()
    if signal.SIGINT in received:  # ends as Ctrl-C ends any command (closedloop.cli._Group)
        raise KeyboardInterrupt


def _resend(store: Any, notifier: Any, grace_s: float) -> None:
    from closedloop.approvals import resend_unsent

    try:
        resend_unsent(store=store, notifier=notifier, grace_s=grace_s)
    except (StoreError, ConfigError) as exc:  # the next look tries again
        from closedloop._redact import redact_text

        say(f"warning: cannot look for unsent notifications: {redact_text(str(exc))}",
            err=True)


class _Stopper:
    """What serves, with its port and a ``stop()``."""

    def __init__(self, port: int, stop: Any) -> None:
        self.port = port
        self.stop = stop


def _start(store: Any, *, addr: str, port: int, use_app: bool, api: bool, token: str | None,
           guard_reads: bool, registry: Any, hosts: list[str], dashboard: bool) -> _Stopper:
    if not use_app:  # metrics only, without the 'api' extra: prometheus_client's own server
        from closedloop.telemetry import start_metrics_server

        try:
            server = start_metrics_server(port, addr, registry)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") \
                from None
        return _Stopper(server.server_port, server.shutdown)
    from closedloop.web import ServerThread, bind, create_app

    users: list[Any] = []
    if dashboard:
        import os

        from closedloop.web import USERS_ENV, parse_users

        users = parse_users(os.environ.get(USERS_ENV))
    app = create_app(store=store, token=token, guard_reads=guard_reads,
                     metrics_registry=registry, api=api, check_host=not guard_reads,
                     hosts=hosts, dashboard=dashboard, users=users)
    try:
        sock = bind(addr, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from None
    thread = ServerThread(app, sock)
    try:
        thread.start()
    except RuntimeError as exc:
        raise ConfigError(f"cannot serve on {addr}:{port}: {exc}") from None
    return _Stopper(thread.port, thread.stop)
