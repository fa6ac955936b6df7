"""``closedloop approvals list|show|approve|reject|retry`` and ``closedloop worker``.

People decide durable approval requests here (the same service API as the HTTP API,
:mod:`closedloop.approvals`); ``worker`` executes approved ones with the user's loops. The
proposal, its risk and every reason are printed as data: literally, control characters
escaped (``--json`` carries them raw).
"""

from __future__ import annotations

import getpass
import importlib
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from closedloop._errors import ConfigError
from closedloop.cli import main
from closedloop.cli._common import EXIT_NO_DATA, console, echo_json, iso, say, styled

if TYPE_CHECKING:
    from closedloop.approvals import ApprovalRequest
    from closedloop.store import Store

APPROVER_ENV = "CLOSEDLOOP_APPROVER"
_STATUSES = ("pending", "approved", "rejected", "expired", "executing", "executed", "failed",
             "crashed")


def _default_store_url() -> str:
    from closedloop.store import default_store_url

    return default_store_url()


def _store_option(f: Any) -> Any:
    return click.option(
        "--store", "store_url", metavar="URL", default=_default_store_url,
        show_default="$CLOSEDLOOP_STORE, else ~/.local/share/closedloop/closedloop.db",
        help="The store holding the requests: sqlite:///PATH or postgresql://...")(f)


def _by_option(f: Any) -> Any:
    return click.option(
        "--by", "by", metavar="NAME", default=lambda: os.environ.get(APPROVER_ENV) or None,
        show_default=f"${APPROVER_ENV}, else your login name",
        help="Who decides (recorded; never the agent that asked).")(f)


def _who(by: str | None) -> str:
    if by and by.strip():
        return by
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise ConfigError(f"say who decides: --by NAME (or ${APPROVER_ENV})") from None


def _open(store_url: str) -> Store:
    from closedloop.store import open_store

    return open_store(store_url, create=False)


def _ago(ts: float) -> str:
    seconds = time.time() - ts
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            text = f"{seconds / size:.1f}{unit}"
            break
    else:
        text = f"{seconds:.0f}s"
    return f"in {text}" if future else f"{text} ago"


@main.group()
def approvals() -> None:
    """Durable approval requests: list, show, approve, reject, retry them.

    A step gated for approval (the approve level, or a high-stakes proposal at any level)
    waits here until a person decides; an approved request then executes exactly once, in
    the process that asked or in a `closedloop worker`. See docs/approvals.md.
    """


@approvals.command("list")
@_store_option
@click.option("--status", type=click.Choice(_STATUSES), default=None,
              help="Only requests in this state (default: every state).")
@click.option("--task-type", help="Only requests of this task type.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="How many requests to list at most.")
@click.option("--cursor", help="Continue a listing: the next_cursor a previous page gave.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_approvals(store_url: str, status: str | None, task_type: str | None,  # noqa: PLR0917 - click passes every option
                   limit: int, cursor: str | None, as_json: bool) -> None:
    """Requests newest first (past-due pending ones are marked expired first).

    \b
    Exit codes: 0 listed; 1 none, or the store cannot be read; 2 usage error.
    """
    from closedloop.approvals import list_requests

    store = _open(store_url)
    try:
        page = list_requests(status=status, task_type=task_type, limit=limit, cursor=cursor,
                             store=store)
    finally:
        store.close()
    if as_json:
        echo_json(page.to_dict())
        return
    if not page.requests:
        say("no approval requests" + (f" {status}" if status else ""), err=True)
        sys.exit(EXIT_NO_DATA)
    from rich.table import Table

    table = Table(title=styled(f"Approval requests ({store.url})"))
    table.add_column("request", no_wrap=True, min_width=32)  # whole: it is what one types
    for col in ("status", "task type", "agent", "asked", "risk", "approvals"):
        table.add_column(col)
    for r in page.requests:
        risk = r.risk.get("summary", "") if r.risk else ""
        table.add_row(styled(r.request_id), styled(r.status.value, _STYLE.get(r.status.value,
                                                                              "")),
                      styled(r.task_type), styled(r.agent_id), _ago(r.created_at),
                      styled(risk, "red" if r.destructive else ""),
                      f"{len(r.approvers)}/{r.approvals_needed}")
    out = console()
    out.print(table)
    if page.next_cursor:
        out.print(styled(f"more: --cursor {page.next_cursor}"))


_STYLE = {"pending": "yellow", "approved": "green", "executed": "green", "rejected": "red",
          "failed": "red", "crashed": "bold red", "expired": "dim"}


def _show(r: ApprovalRequest) -> None:
    from rich.table import Table

    out = console()
    head = Table(show_header=False, title=styled(f"Approval request {r.request_id}"))
    head.add_column("field", style="bold")
    head.add_column("value")
    rows: list[tuple[str, str]] = [
        ("status", r.status.value), ("task type", r.task_type), ("agent", r.agent_id),
        ("requested by", r.requested_by), ("created", f"{iso(r.created_at)} "
                                                     f"({_ago(r.created_at)})"),
        ("expires", "never" if r.expires_at is None else f"{iso(r.expires_at)} "
                                                         f"({_ago(r.expires_at)})"),
        ("approvals", f"{len(r.approvers)} of {r.approvals_needed}"
                      + (f" ({', '.join(r.approvers)})" if r.approvers else "")),
        ("step / trace", f"{r.step_id or '-'} / {r.trace_id or '-'}"),
        ("digest", f"sha256:{r.proposal_digest}"),
        ("executable by", {0: "only the process that asked (the proposal held a secret)",
                           1: "any worker", 2: "a worker with CLOSEDLOOP_APPROVAL_KEY (sealed)"}
         .get(r.portable, "?")),
    ]
    if r.result is not None:
        rows.append(("result", json.dumps(r.result, sort_keys=True)))
    for name, value in rows:
        head.add_row(name, styled(value))
    out.print(head)
    if r.risk:
        out.print(styled(f"RISK: {r.risk.get('summary', '')}",
                         "bold red" if r.destructive else "bold yellow"))
        for item in r.risk.get("items") or []:
            out.print(styled("  - " + ", ".join(f"{k}={v}" for k, v in item.items())))
    failing = [v for v in r.verdicts if v.get("issues")]
    if failing:
        out.print(styled("Validation notes:", "bold"))
        for v in failing:
            for issue in v.get("issues") or []:
                out.print(styled(f"  {v.get('check', '')}: [{issue.get('severity', '')}] "
                                 f"{issue.get('message', '')}"))
    out.print(styled("Proposal (as stored, redacted):", "bold"))
    out.print(_pretty(r.proposal))
    if r.task_input is not None:
        out.print(styled("Task input:", "bold"))
        out.print(_pretty(r.task_input))
    history = Table(title=styled("History"))
    for col in ("time", "action", "by", "reason"):
        history.add_column(col)
    for d in r.history:
        history.add_row(iso(d.at), styled(d.action), styled(d.by), styled(d.reason))
    out.print(history)


def _pretty(text: str) -> Any:
    """A stored JSON text indented for reading, as literal text (never markup)."""
    from rich.text import Text

    from closedloop.cli._common import literal

    try:
        value = json.loads(text)
        shown = value if isinstance(value, str) else json.dumps(value, indent=2,
                                                                 ensure_ascii=False)
    except ValueError:
        shown = text
    return Text(literal(shown, newlines=True))


@approvals.command("show")
@click.argument("request_id")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_approval(request_id: str, store_url: str, as_json: bool) -> None:
    """One request: the proposal, its risk and verdicts, its whole history.

    \b
    Exit codes: 0 shown; 1 no such request, or the store cannot be read; 2 usage error.
    """
    from closedloop.approvals import get_request

    store = _open(store_url)
    try:
        found = get_request(request_id, store=store)
    finally:
        store.close()
    if as_json:
        echo_json(found.to_dict())
        return
    _show(found)


def _decided(r: ApprovalRequest, as_json: bool) -> None:
    if as_json:
        echo_json(r.to_dict())
        return
    if r.status.value == "pending":
        say(f"{r.request_id}: approval recorded ({len(r.approvers)} of "
            f"{r.approvals_needed}); it needs another approver")
    else:
        say(f"{r.request_id}: {r.status.value}")


@approvals.command("approve")
@click.argument("request_id")
@_by_option
@click.option("--reason", default="", help="Why (recorded).")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the request as decided (JSON).")
def approve_cmd(request_id: str, by: str | None, reason: str, store_url: str,
                as_json: bool) -> None:
    """Approve REQUEST_ID: it then executes once (in the process that asked, or a worker).

    \b
    Exit codes: 0 approved (or recorded, when a second approver is needed); 1 refused:
    not pending, expired, your own request, you already approved it, or the store cannot
    be written; 2 usage error.
    """
    from closedloop.approvals import approve

    store = _open(store_url)
    try:
        decided = approve(request_id, by=_who(by), reason=reason, store=store)
    finally:
        store.close()
    _decided(decided, as_json)


@approvals.command("reject")
@click.argument("request_id")
@_by_option
@click.option("--reason", required=True, help="Why (recorded; sent to the agent with "
                                              "--revise).")
@click.option("--revise", is_flag=True,
              help="Ask the agent for a revised proposal, with the reason as feedback.")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the request as decided (JSON).")
def reject_cmd(request_id: str, by: str | None, reason: str, revise: bool,  # noqa: PLR0917 - click passes every option
               store_url: str, as_json: bool) -> None:
    """Reject REQUEST_ID, saying why; it never executes.

    \b
    Exit codes: 0 rejected; 1 refused (not pending, expired) or the store cannot be
    written; 2 usage error (no --reason).
    """
    from closedloop.approvals import reject

    store = _open(store_url)
    try:
        decided = reject(request_id, by=_who(by), reason=reason, revise=revise, store=store)
    finally:
        store.close()
    _decided(decided, as_json)


@approvals.command("retry")
@click.argument("request_id")
@_by_option
@click.option("--reason", required=True, help="Why it is safe to execute again (recorded).")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print the request (JSON).")
def retry_cmd(request_id: str, by: str | None, reason: str, store_url: str,
              as_json: bool) -> None:
    """Send a crashed (or failed) REQUEST_ID back to approved: a worker executes it again,
    with the same idempotency key. Check first that the first execution took no effect.

    \b
    Exit codes: 0 sent back; 1 not crashed or failed, or the store cannot be written;
    2 usage error (no --reason).
    """
    from closedloop.approvals import retry

    store = _open(store_url)
    try:
        decided = retry(request_id, by=_who(by), reason=reason, store=store)
    finally:
        store.close()
    _decided(decided, as_json)


@main.command()
@click.option("--app", "app", required=True, metavar="MODULE:ATTR",
              help="Your loops: a Loop, a list or dict of Loops, or a function returning one "
                   "(imported from the working directory).")
@click.option("--store", "store_url", metavar="URL", default=None,
              help="Configure this store first (default: the loops' own, $CLOSEDLOOP_STORE).")
@click.option("--poll", type=click.FloatRange(0.01, 3600), default=1.0, show_default=True,
              help="Seconds to pause after a round that found nothing to execute.")
@click.option("--once", is_flag=True, help="Run one round, then exit.")
@click.option("--by", "by", default=None, help="This worker's name in the requests' "
                                               "history (default worker:HOST:PID).")
def worker(app: str, store_url: str | None, poll: float, once: bool, by: str | None) -> None:
    """Execute approved requests of your loops, each exactly once, until stopped.

    Each round marks requests whose executing process died `crashed` (never re-run: see
    `closedloop approvals retry`) and past-due pending ones `expired`, then executes every
    approved request of the loops' task types. SIGTERM or Ctrl-C finishes the execution
    under way, then stops.

    \b
    Exit codes: 0 stopped; 1 the app cannot be imported; 2 usage error.
    """
    from closedloop.approvals import Worker, loops_of

    if store_url:
        import closedloop

        closedloop.configure(store=store_url)
    module_name, sep, attr = app.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter("use MODULE:ATTR, e.g. myapp.agents:loops", param_hint="--app")
    sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        say(f"error: cannot import {app}: {exc}", err=True)
        sys.exit(1)
    runner = Worker(loops_of(target), by=by, poll=poll)
    previous = signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        if once:
            done = runner.run_once()
            say(f"executed {len(done)} approved request(s)")
        else:
            say(f"closedloop worker: executing approved requests of "
                f"{', '.join(loop.task_type for loop in runner.loops)}", err=True)
            runner.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for loop in runner.loops:  # the steps' events are written before the worker exits
            if loop.store is not None:
                loop.store.flush()
