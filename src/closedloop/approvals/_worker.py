"""The worker: executes approved requests of the user's loops, each exactly once.

A worker knows how to execute a request by its task type: it is given the user's
:class:`~closedloop.Loop` objects (``Worker([loop_a, loop_b])``, or ``closedloop worker --app
module:attribute`` importing them), and runs each approved request of a loop's task type with
that loop's executor and verifiers (:meth:`~closedloop.Loop.run_approved`). Any number of
workers, on any number of machines sharing a store, may run: a request is claimed by one of
them under a fenced lease. Each round also marks requests whose executing process died
(lease run out) ``crashed`` (never re-run: a human decides, ``closedloop approvals retry``)
and pending requests past their expiry ``expired``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from closedloop._errors import ApprovalError, ConfigError, StoreError

if TYPE_CHECKING:
    from closedloop.loop import Loop, StepResult

_log = logging.getLogger("closedloop")


def loops_of(app: object) -> list[Loop]:
    """The loops an ``--app`` attribute names: a :class:`~closedloop.Loop`, an iterable or a
    mapping of them, or a function of no argument returning one of those."""
    from closedloop.loop import Loop

    if callable(app) and not isinstance(app, Loop):
        app = app()
    if isinstance(app, Loop):
        found: list[Any] = [app]
    elif isinstance(app, dict):
        found = list(app.values())
    elif isinstance(app, Iterable) and not isinstance(app, str | bytes):
        found = list(app)
    else:
        found = [app]
    bad = [f for f in found if not isinstance(f, Loop)]
    if bad or not found:
        raise ConfigError(f"expected Loop objects (a Loop, a list or dict of them, or a function "
                          f"returning one), got {type(bad[0] if bad else app).__name__}")
    return found


class Worker:
    """Executes approved requests of ``loops`` (one per task type), exactly once each.

    ``by`` names the worker in the requests' history (default ``worker:HOST:PID``);
    ``poll`` is the pause, in seconds, after a round that found nothing to do.
    """

    def __init__(self, loops: Iterable[Loop] | Loop, *, by: str | None = None,
                 poll: float = 1.0) -> None:
        self.loops = loops_of(loops)
        types = [loop.task_type for loop in self.loops]
        if len(set(types)) != len(types):
            raise ConfigError("a worker takes one loop per task type; "
                              f"got {sorted(types)}")
        if not (isinstance(poll, int | float) and 0 < poll < 1e6):
            raise ConfigError(f"poll must be a positive number of seconds, got {poll!r}")
        self.by = by or f"worker:{socket.gethostname()}:{os.getpid()}"
        self.poll = float(poll)
        self.executed = 0
        self.errors = 0
        self._stop = threading.Event()

    def _housekeeping(self) -> None:
        seen: set[int] = set()
        for loop in self.loops:
            approvals = loop.approval_store()
            if approvals is None or id(approvals) in seen:
                continue
            seen.add(id(approvals))
            try:
                for rid in approvals.reap():
                    _log.error("closedloop: approval request %s was executing when its process "
                               "stopped; marked crashed (a human decides: closedloop approvals "
                               "retry)", rid)
                approvals.expire()
            except Exception:  # noqa: BLE001 - the next round tries again
                _log.warning("closedloop: worker housekeeping failed", exc_info=True)

    def run_once(self, *, limit: int | None = None) -> list[StepResult[Any, Any]]:
        """One round: reap and expire, then execute every approved request there is (at most
        ``limit``); the steps' results."""
        self._housekeeping()
        done: list[StepResult[Any, Any]] = []
        for loop in self.loops:
            while limit is None or len(done) < limit:
                if self._stop.is_set():
                    return done
                try:
                    result = loop.run_approved(by=self.by)
                except ConfigError as exc:  # this loop cannot run here (async hooks): skip it
                    self.errors += 1
                    _log.error("closedloop: %s", exc)
                    break
                except StoreError as exc:  # the store is away: the next round tries again
                    self.errors += 1
                    _log.warning("closedloop: %s", exc)
                    break
                except ApprovalError as exc:  # refused and recorded on its request
                    self.errors += 1
                    _log.error("closedloop: %s", exc)
                    continue
                except Exception:  # noqa: BLE001 - the executor's: recorded on the request
                    self.errors += 1
                    _log.exception("closedloop: executing an approved request of %s raised",
                                   loop.task_type)
                    continue
                if result is None:
                    break
                self.executed += 1
                done.append(result)
        return done

    def run(self, *, rounds: int | None = None) -> None:
        """Run rounds until :meth:`stop` (or ``rounds`` rounds), pausing ``poll`` seconds
        after a round that found nothing."""
        n = 0
        while not self._stop.is_set() and (rounds is None or n < rounds):
            n += 1
            if not self.run_once():
                self._stop.wait(self.poll)

    def stop(self) -> None:
        """Finish the current execution, then stop (what SIGTERM does to ``closedloop
        worker``)."""
        self._stop.set()
