"""``closedloop status`` and ``closedloop resume``: the control layer's state, and the human lift.

Both read the one source of pause and halt state agents use
(:func:`~closedloop.control.ledger_for_store`): the store's ledger, cached in Redis when
``--redis``/``$CLOSEDLOOP_REDIS_URL`` is set. ``status`` shows pauses and halts per task type
(who, why, when, evidence) and, with Redis, the shared per-key limits (rate, learned ceiling,
breaker, workers). ``resume`` lifts a halt or pause; it requires a reason, which is logged
with who lifted it. Stored text is printed as data, never as markup.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import click

from closedloop.cli import main
from closedloop.cli._common import (
    console,
    echo_json,
    open_store_to_read,
    say,
    store_option,
    styled,
)

if TYPE_CHECKING:
    from closedloop.control import ControlLedger

# closedloop.control._ledger.REDIS_ENV, spelled out so that `closedloop --help` need not import
# the ledger (a test checks the two agree).
_REDIS_ENV = "CLOSEDLOOP_REDIS_URL"


def _redis_option(f: Any) -> Any:
    return click.option(
        "--redis", "redis_url", metavar="URL", default=lambda: os.environ.get(_REDIS_ENV),
        help=f"Redis caching the store's control state across machines (default "
             f"${_REDIS_ENV}).",
    )(click.option("--prefix", default="closedloop", show_default=True,
                   help="Redis key prefix.")(f))


def _ledger(store_url: str, redis_url: str | None, prefix: str) -> tuple[ControlLedger, str]:
    """The ledger agents use for this store (and Redis), and where it is, for people."""
    from closedloop._redact import shown_url
    from closedloop.control import ledger_for_store

    store = open_store_to_read(store_url)
    try:
        ledger = ledger_for_store(store, redis_url=redis_url or None, prefix=prefix)
        where = store.url
    finally:
        store.close()
    if redis_url:
        where += f", cached in Redis {shown_url(redis_url)}"
    return ledger, where


def _degraded(ledger: ControlLedger) -> str | None:
    if getattr(ledger, "degraded_since", None) is None:
        return None
    return ("Redis unreachable: showing the store's stops and none raised on other machines "
            "since Redis went away")


def _drift_firings(store_url: str, limit: int) -> list[dict[str, Any]]:
    """The drift detections recorded in the store (newest first, at most ``limit``)."""
    from closedloop.learn import recorded_firings
    from closedloop.store import LevelBackend, level_store_for

    store = open_store_to_read(store_url)
    try:
        if not isinstance(store.backend, LevelBackend):
            return []
        return [f.to_dict() for f in recorded_firings(level_store_for(store))[:max(0, limit)]]
    finally:
        store.close()


def _ago(ts: float) -> str:
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


@main.command()
@store_option
@_redis_option
@click.option("--history", "history_n", type=int, default=5, show_default=True,
              help="How many recent stop/resume entries and drift detections to show.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(store_url: str, redis_url: str | None, prefix: str, history_n: int,
           as_json: bool) -> None:
    """Pauses and halts per task type and (with --redis) shared limits per key.

    \b
    Exit codes:
      0  shown (also when nothing is paused or halted, and when Redis is
         unreachable: then a warning says only the store's state is shown)
      1  the store cannot be read
      2  usage error (bad store or Redis URL)
    """
    ledger, where = _ledger(store_url, redis_url, prefix)
    stops = ledger.stops()
    history = ledger.history(history_n)
    drift = _drift_firings(store_url, history_n)
    degraded = _degraded(ledger)
    keys: dict[str, Any] = {}
    if redis_url:
        from closedloop.control import Limits, RedisRates

        rates = RedisRates(redis_url, prefix=prefix)
        try:
            keys = {k: rates.snapshot(k, Limits()) for k in rates.keys()}  # noqa: SIM118 - a method, not a dict
        finally:
            rates.close()
    else:
        published = getattr(ledger, "published", None)
        keys = published() if published is not None else {}
    if as_json:
        echo_json({"source": where, "degraded": degraded, "stops": [s.to_dict() for s in stops],
                   "keys": keys, "history": history, "drift": drift})
        return
    from rich.table import Table

    out = console()
    if degraded:
        out.print(styled(f"warning: {degraded}", "yellow"))
    if stops:
        table = Table(title=styled(f"Paused and halted task types ({where})"))
        for col in ("task type", "state", "since", "by", "reason", "until"):
            table.add_column(col)
        for s in stops:
            table.add_row(styled(s.task_type), s.kind.value.upper(), _ago(s.at), styled(s.by),
                          styled(s.reason), "a human resumes it" if s.until is None else
                          time.strftime("%H:%M:%SZ", time.gmtime(s.until)))
        out.print(table)
    else:
        out.print(styled(f"No task type is paused or halted ({where})."))
    if keys:
        title = ("Shared limits per key (Redis)" if redis_url else
                 "Limits per key, as last published by each process (Backpressure publish_to)")
        table = Table(title=title)
        for col in ("key", "rate/s", "ceiling/s", "delivered/s", "breaker", "workers",
                    "429s", "state / published"):
            table.add_column(col)
        for key, snap in keys.items():
            table.add_row(styled(key), f"{snap['rate']:.2f}",
                          "learning" if snap["ceiling"] is None else f"{snap['ceiling']:.2f}",
                          f"{snap['delivered']:.2f}", snap["breaker"], str(snap.get("workers", "")),
                          str(snap["counts"].get("overloaded", 0)),
                          styled(str(snap.get("degraded", snap.get("published", "ok")))))
        out.print(table)
    elif not redis_url:
        out.print(styled("No per-key limits published here; pass --redis URL (or "
                         f"${_REDIS_ENV}) for shared ones, or give Backpressure publish_to=."))
    if drift:
        table = Table(title=styled("Drift and budget detections (newest first)"))
        for col in ("task type", "model", "signal", "when", "actions", "reason"):
            table.add_column(col)
        for f in drift:
            table.add_row(styled(f["task_type"]), styled(f["model"] or ""), styled(f["signal"]),
                          _ago(f["at"]), styled(", ".join(f["actions"])), styled(f["reason"]))
        out.print(table)
    if history:
        out.print("Recent:")
        for h in history:
            out.print(styled(f"  {h.get('time', '')}  {h['event']:8} {h['task_type']}  by "
                             f"{h['by']}: {h['reason']}"))


@main.command()
@click.argument("task_type")
@click.option("--reason", required=True, help="Why it is safe to resume (logged).")
@click.option("--by", "by", default=None, help="Who resumes it (default user@host).")
@store_option
@_redis_option
def resume(task_type: str, reason: str, by: str | None, store_url: str,  # noqa: PLR0917 - click passes every option
           redis_url: str | None, prefix: str) -> None:
    """Lift the halt (or pause) of TASK_TYPE; only this, or the API, lifts a halt.

    \b
    Exit codes:
      0  resumed
      1  TASK_TYPE was neither halted nor paused, or the state cannot be read or
         written (then nothing was lifted)
      2  usage error (no --reason, bad store or Redis URL)
    """
    from closedloop.control import resume as lift

    ledger, where = _ledger(store_url, redis_url, prefix)
    stop = lift(ledger, task_type, reason=reason, by=by)  # by default: user@host (pid)
    if stop is None:
        say(f"error: {task_type} is neither halted nor paused in {where}", err=True)
        raise SystemExit(1)
    say(f"resumed {task_type} (was {stop.kind.value} by {stop.by}: {stop.reason})")
