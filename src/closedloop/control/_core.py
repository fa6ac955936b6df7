"""The per-key flow-control decision logic: adaptive rate, pacing, breaker. No I/O, no clock.

One :class:`KeyState` per key (provider/model/endpoint). Every method takes ``now`` (seconds,
from an injected clock), so the same logic runs in a unit test, in the virtual-time
benchmark and behind the sync and async drivers. The Redis backend runs a line-by-line Lua
port of it (:mod:`closedloop.control._redis`) so that N workers share one state atomically.

**Rate.** Until the first overload the rate grows geometrically (slow start,
``slow_start`` times per second of busy time). A 429 means the downstream's allowance was
empty when that call arrived; two such moments bracket an interval in which the downstream
let through exactly its rate times the interval, whatever its burst, so the successes of
the calls sent in between, divided by the time, *measure* its capacity (the ceiling). The
first 429 has no predecessor (and a burst allowance hid the moment slow start crossed the
limit): the rate that call was sent at is only an upper bound, so the rate is halved
(``first_backoff``) and held for one call latency, and halved again while calls sent at it
are still refused; the next 429 measures. After each measured 429 the rate restarts at
``backoff`` x ceiling and follows a curve after TCP CUBIC: a quick concave climb back to
the ceiling, a plateau just under it, then a probe above it, slow at first (``probe`` per
second: a burst allowance hides a small overshoot for a while) and accelerating
(``probe_cubic``) in case capacity has really grown. Only calls admitted *after* the last
decrease can trigger another one, so the calls already in flight when the downstream
pushes back do not collapse the rate. 503s and timeouts cut the rate to ``outage_backoff``
of what it was without forgetting the ceiling, and a successful probe after an outage
resumes at ``backoff`` x ceiling, so recovery is fast. Time during which nobody waited for
a token is not growth time, so a key that is not busy does not "learn" a rate it never
tried, and an interval with an idle spell measures nothing.

**Late callers.** On a loaded machine queued callers wake up late and then go together, and
a clump larger than the downstream's burst allowance draws a 429 at a rate that is fine. A
429 sent at a rate known to work (at most the measured ceiling while the callers left part
of their rate unused, or at the configured ``max_rate``) is a clump, not a rate signal, as
long as the downstream refused at most ``CLUMP_SHARE`` of the calls made since the last
decrease; it cuts nothing (see :meth:`KeyState._clumped`). "Unused" compares the calls that
went with the rate given, so calls the downstream refused count as used. Where queued
callers report lateness, a slot whose caller had not woken up is owed: others may take up
to ``OWED`` such slots back to back.

**Pacing.** Each caller takes a numbered ticket; tokens are issued at the current rate
(up to ``burst`` ahead of the queue's head) and ticket *n* may go once *n + 1* tokens are
out. The queue is first come first served, which keeps many agents fair, and a rate change
applies at once to everyone waiting: a waiter sleeps until its estimated turn (never more
than ``max_sleep``) and then confirms. No tokens accrue while the breaker is open or the
key is paused, so a recovering downstream is not hit by a flood, and departures stay at
least ``1/rate`` apart beyond the burst (GCRA), in ticket order, so waiters that wake late
do not leave in a clump. A retry after a refusal keeps its first attempt's ticket, so it
goes at the next slot instead of queueing a second time.

**Breaker.** ``failure_threshold`` consecutive unavailable/timeout results open it for
``open_for`` seconds (at least the downstream's ``Retry-After``); then ``half_open_probes``
calls probe; a success closes it, a failure reopens it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from closedloop._errors import ConfigError
from closedloop.control._signals import Signal

WAKE_SLACK = 0.004
"""Seconds of wake-up lateness a paced caller may have without losing its slot."""
CATCH_UP = 0.05
"""Most wake-up lateness (seconds) a queued caller may report and the key catch up."""
LANDING_OKS = 8
"""Successes needed between two 429s to measure the downstream's rate from them."""
LANDING_HOLD = 1.0
"""After a cut to an upper bound, the rate is held for this many call latencies."""
UNDER_USED = 0.9
"""Callers that made fewer calls than this fraction of the rate they were given (while they
queued) left it unused: late wake-ups on a loaded machine. The successes between two 429s
then only bound the downstream's rate from below, and a lone 429 is a clump of late callers
draining its burst allowance, not a sign that the rate is too high."""
CLUMP_SHARE = 0.05
"""...as long as the downstream refused at most this share of the calls made meanwhile."""
OWED = 3
"""Slots left unused by a caller that woke up late that others may take back to back."""
LATE_MIN = 0.001
"""Queued callers must say they wake up this late on average (a moving average) for slots
left unused to be owed (never in virtual time)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """How one key is controlled. The defaults suit LLM providers; none needs the real limit."""

    initial_rate: float = 5.0
    """Requests per second before anything is learned."""
    min_rate: float = 0.2
    max_rate: float = 100_000.0
    """Never above this; set it to a provider's known quota. At ``max_rate`` a 429 cuts the
    rate only once more than 5% of the calls since the last decrease were refused (a few
    callers going together drain a provider's burst allowance without the rate being
    wrong)."""
    burst: float = 1.0
    """Calls that may go back to back (token-bucket depth)."""
    max_in_flight: int = 64
    """Concurrent calls per process for this key."""
    slow_start: float = 32.0
    """Rate growth factor per busy second until the first overload (x2 every 200 ms)."""
    backoff: float = 0.9
    """After an overload the rate restarts at this fraction of the measured ceiling."""
    first_backoff: float = 0.5
    """...or of the refused rate, when the ceiling cannot be measured yet (first 429)."""
    outage_backoff: float = 0.5
    """After a 503/timeout the rate is cut to this fraction (the ceiling is kept)."""
    cubic: float = 0.1
    """Cubic coefficient (1/s³) of the climb back: with backoff 0.9 the ceiling is ~1 s away."""
    probe: float = 0.02
    """Above the ceiling the rate grows by this fraction of it per second, plus..."""
    probe_cubic: float = 0.002
    """...this cubic term (1/s³), so that a much larger capacity is still found in seconds."""
    window: float = 1.0
    """Seconds over which the delivered (succeeded) rate is measured."""
    key_pause_after: float = 2.0
    """A ``Retry-After`` at least this long pauses the whole key, not just the refused call."""
    failure_threshold: int = 5
    open_for: float = 0.25
    half_open_probes: int = 1
    max_sleep: float = 0.25
    """Longest a queued caller sleeps before checking its turn again."""

    def __post_init__(self) -> None:
        checks = {
            "initial_rate": self.initial_rate > 0, "min_rate": self.min_rate > 0,
            "max_rate": self.max_rate >= self.min_rate, "burst": self.burst >= 1,
            "max_in_flight": self.max_in_flight >= 1, "slow_start": self.slow_start >= 1,
            "backoff": 0 < self.backoff < 1, "first_backoff": 0 < self.first_backoff < 1,
            "outage_backoff": 0 < self.outage_backoff < 1,
            "cubic": self.cubic > 0, "window": self.window > 0, "probe": self.probe >= 0,
            "probe_cubic": self.probe_cubic >= 0 and self.probe + self.probe_cubic > 0,
            "key_pause_after": self.key_pause_after >= 0,
            "failure_threshold": self.failure_threshold >= 1, "open_for": self.open_for > 0,
            "half_open_probes": self.half_open_probes >= 1, "max_sleep": self.max_sleep > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid Limits: {', '.join(bad)} out of range")


class BreakerState(StrEnum):
    """The circuit breaker's state for one key."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to an acquire: go at ``at`` (after waiting ``wait`` seconds).

    ``reserved`` grants hold a ticket in the queue and are confirmed after the wait;
    unreserved ones mean "nothing for you yet, ask again then" (breaker open, key
    paused). ``probe`` marks a half-open breaker's probe call.
    """

    wait: float
    ticket: int
    at: float = 0.0
    """When the call may go, on the backend's clock (handed back with its feedback)."""
    reserved: bool = True
    probe: bool = False
    reason: str = ""

    @property
    def ready(self) -> bool:
        """True when the call may go now."""
        return self.wait <= 0 and self.reserved


@dataclass(slots=True)
class KeyState:
    """The mutable state of one key; all logic, no I/O. ``Limits`` are passed to each call."""

    rate0: float = 0.0
    """The rate at ``since`` (the start of the current growth curve)."""
    since: float = 0.0
    cut_at: float = 0.0
    """When the rate was last decreased: calls sent before then cannot decrease it again."""
    ceiling: float = 0.0
    """The last measured capacity; 0 while still in slow start."""
    issued: float = 0.0
    tat: float = 0.0
    """Earliest departure time of the next call (GCRA), to space departures."""
    tickets: int = 0
    void_below: int = 0
    """Tickets below this were cancelled by a breaker trip or a pause; they re-queue."""
    measured: int = 0
    """1 once the ceiling was measured between two 429s (before: only an upper bound)."""
    last_out: int = 0
    """The highest ticket that has gone (due tickets leave in order behind it)."""
    last_fill: float = 0.0
    busy_since: float = 0.0
    mark_at: float = 0.0
    """Admission time of the refused call behind the last decrease (the downstream's
    allowance was empty then); 0 before the first."""
    mark_ok: int = 0
    """Successful calls admitted since ``mark_at``."""
    allowed: float = 0.0
    """Calls the rate has allowed so far (cumulative), to compare with what the callers made
    of it."""
    mark_allowed: float = 0.0
    sent: int = 0
    """Calls that have gone (cumulative), to compare with what the rate allowed."""
    mark_sent: int = 0
    refused: int = 0
    """429s received for calls sent after the last decrease (cumulative)."""
    mark_refused: int = 0
    mark_fill: float = 0.0
    """``allowed`` and the time when the last decrease was made."""
    lateness: float = 0.0
    """Moving average of how late queued callers say they woke up."""
    latency: float = 0.0
    """Moving average of a successful call's duration (admission to answer)."""
    hold_until: float = 0.0
    win_start: float = 0.0
    win_cur: float = 0.0
    win_prev: float = 0.0
    breaker: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    open_for: float = 0.0
    probes: int = 0
    probe_at: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    # ----- rate -------------------------------------------------------------------------
    def rate(self, limits: Limits, now: float) -> float:
        """The current admitted rate (requests per second)."""
        if self.rate0 <= 0:
            return limits.initial_rate
        t = max(0.0, now - self.since)
        if self.ceiling <= 0:
            r = self.rate0 * math.pow(limits.slow_start, t)
        else:
            frac = min(1.0, self.rate0 / self.ceiling)
            x = t - math.cbrt((1.0 - frac) / limits.cubic)
            if x <= 0:  # concave: back to the ceiling
                r = self.ceiling * (1.0 + limits.cubic * x**3)
            elif not self.measured:  # above a bound that was only a guess: find it fast
                r = self.ceiling * math.pow(limits.slow_start, x)
            else:  # probe: slowly at first (a provider's burst hides overshoot), then faster
                r = self.ceiling * (1.0 + limits.probe * x + limits.probe_cubic * x**3)
        return min(limits.max_rate, max(limits.min_rate, r))

    def delivered(self, limits: Limits, now: float) -> float:
        """Successes per second over the last ``window`` (a two-bucket sliding estimate)."""
        self._roll(limits, now)
        w = limits.window
        weight = 1.0 - (now - self.win_start) / w
        return float((self.win_prev * max(0.0, weight) + self.win_cur) / w)

    def _roll(self, limits: Limits, now: float) -> None:
        w = limits.window
        elapsed = now - self.win_start
        if elapsed < w:
            return
        self.win_prev = self.win_cur if elapsed < 2 * w else 0.0
        self.win_cur = 0.0
        self.win_start = now - (elapsed % w)

    def _restart(self, limits: Limits, now: float, rate: float) -> None:
        self._fill(limits, now)
        self.rate0 = min(limits.max_rate, max(limits.min_rate, rate))
        self.since = self.cut_at = now

    def _fill(self, limits: Limits, now: float) -> None:
        dt = max(0.0, now - self.last_fill)
        if self.breaker is BreakerState.CLOSED and self.hold_until <= now:
            # the mean of the rates at both ends: the rate moves fast in slow start
            rate = 0.5 * (self.rate(limits, self.last_fill) + self.rate(limits, now))
            cap = self.tickets + limits.burst - 1.0
            self.allowed += rate * dt
            if self.issued + rate * dt > cap:
                # nobody was waiting for part of dt: the rate was not the limit then, so
                # that time does not count as growth (TCP's congestion-window validation),
                # nor as a rate the callers left unused
                self.since += dt - max(0.0, cap - self.issued) / rate
                self.busy_since = self.mark_fill = now
                self.issued = cap
                self.mark_allowed, self.mark_sent = self.allowed, self.sent
                self.mark_refused = self.refused
            else:
                self.issued += rate * dt
            # tokens are not issued further than the burst ahead of the queue's head: a
            # backlog of due tickets held back by the spacing would race for each slot in
            # no order (the wait's tail was 2.4x the oracle's at 200/s), and would make a
            # busy key look idle. Unless the head is late for its slot (its caller has not
            # woken up yet): then they keep coming for up to CATCH_UP, so that the callers
            # behind it do not all wait for it
            late = min(CATCH_UP, max(0.0, now - self.tat))
            self.issued = min(self.issued, self._head() + limits.burst + late * rate)
        self.last_fill = now

    def _head(self) -> int:
        """The ticket at the head of the queue (the first that has not gone)."""
        return max(self.last_out, self.void_below - 1) + 1

    def _turn(self, limits: Limits, now: float, ticket: int, late: float = 0.0) -> Grant:
        self._fill(limits, now)
        rate = self.rate(limits, now)
        short = ticket + 1.0 - self.issued
        if short > 1e-9:
            wait = min(limits.max_sleep, short / rate)
            return Grant(wait, ticket, now + wait)
        # its turn has come; departures are still spaced 1/rate apart (beyond the burst),
        # so waiters that wake up late together do not leave in a clump
        early = self.tat - now - (limits.burst - 1.0) / rate
        if early > 1e-9:
            return Grant(early, ticket, now + early)
        # A caller that wakes up late (timer slack, a busy event loop: ~1 ms; a loaded
        # machine: tens of ms) keeps the schedule: the next departures catch the lateness up
        # instead of it being lost on every call (8% of the rate at 100/s on an idle
        # machine, half of it with two cores busy). Up to WAKE_SLACK is assumed; more is
        # caught up only as far as the caller says it overslept (its driver knows), since
        # otherwise the key was idle or short of tokens and the schedule restarts now.
        lag = min(late, CATCH_UP, now - self.tat)
        if lag > 0 and self.issued >= self._head() + limits.burst - 1e-9:
            # the tokens held back (above) while the head of the queue overslept
            self.issued = min(self.tickets + limits.burst - 1.0, self.issued + lag * rate)
        self.last_out = max(self.last_out, ticket)
        self.sent += 1
        interval = 1.0 / rate
        slack = max(min(interval, WAKE_SLACK), lag + 1e-9)
        if now - self.tat < slack:
            base = self.tat
        elif self.lateness >= LATE_MIN and self.busy_since <= self.tat:
            # callers queued all along but the one whose slot it was had not woken up (a
            # loaded machine): whoever is awake may take up to OWED of the slots it left,
            # instead of each late wake-up costing one (0.77-0.82 R -> 0.91-0.94 R in the
            # virtual-time model of a loaded machine). Only where callers say they wake late:
            # in virtual time a rising rate makes sleeps too long, and catching that up
            # clumps departures and spoils what is measured between two 429s
            base = max(self.tat, now - min(CATCH_UP, OWED * interval))
        else:
            base = now
        self.tat = base + interval
        return Grant(0.0, ticket, now)

    # ----- admission --------------------------------------------------------------------
    def acquire(self, limits: Limits, now: float) -> Grant:
        """Ask to make one call now: a place in the queue, or a time to ask again."""
        if self.rate0 <= 0:
            self.rate0 = limits.initial_rate
            self.since = self.win_start = self.last_fill = self.busy_since = now
            self.mark_fill = now
            self.issued = limits.burst
        if self.hold_until > now:
            self._fill(limits, now)
            return Grant(self.hold_until - now, -1, self.hold_until, reserved=False,
                         reason="downstream asked to wait (Retry-After)")
        if self.breaker is BreakerState.OPEN:
            reopen = self.opened_at + self.open_for
            if now < reopen:
                return Grant(reopen - now, -1, reopen, reserved=False, reason="circuit open")
            self.breaker, self.probes = BreakerState.HALF_OPEN, limits.half_open_probes
            self.probe_at = now
        if self.breaker is BreakerState.HALF_OPEN:
            if self.probes <= 0 and now >= self.probe_at + limits.open_for:
                self.probes = limits.half_open_probes  # a probe never reported back
            if self.probes > 0:
                self.probes -= 1
                self.probe_at = now
                self._count("granted")
                return Grant(0.0, -1, now, probe=True)
            return Grant(limits.open_for / 4, -1, now + limits.open_for / 4, reserved=False,
                         reason="circuit half-open, probing")
        ticket = self.tickets
        self.tickets += 1
        self._count("granted")
        return self._turn(limits, now, ticket)

    def confirm(self, limits: Limits, now: float, ticket: int, late: float = 0.0) -> Grant:
        """After waiting in the queue: go if the ticket's turn has come, else wait more.

        ``late``: how much longer than told the caller slept (its lateness is caught up).
        """
        if ticket < self.void_below or self.breaker is not BreakerState.CLOSED or (
            self.hold_until > now
        ):
            self._count("requeued")
            return self.acquire(limits, now)
        if late > 0 or self.lateness > 0:
            self.lateness += 0.125 * (late - self.lateness)
        return self._turn(limits, now, ticket, late)

    # ----- feedback ---------------------------------------------------------------------
    def feedback(
        self,
        limits: Limits,
        now: float,
        signal: Signal,
        *,
        admitted_at: float,
        retry_after: float | None = None,
    ) -> None:
        """Learn from one call's outcome; ``admitted_at`` is when its slot was granted."""
        self._count(signal.value)
        if signal is Signal.OK or signal is Signal.REJECTED:
            if signal is Signal.OK:
                self._roll(limits, now)
                self.win_cur += 1
                if admitted_at >= self.mark_at:
                    self.mark_ok += 1
                took = max(0.0, now - admitted_at)
                self.latency = took if self.latency <= 0 else self.latency + 0.125 * (
                    took - self.latency)
            if self.breaker is not BreakerState.CLOSED:
                self.breaker, self.failures = BreakerState.CLOSED, 0
                # the probe got through: resume just under the last known capacity
                self.since = self.cut_at = self.busy_since = self.last_fill = now
                if self.ceiling > 0:
                    self.rate0 = max(self.rate0, limits.backoff * self.ceiling)
                self._count("breaker_closed")
            self.failures = 0
            return
        if signal is Signal.ERROR:
            return
        if retry_after is not None and retry_after >= limits.key_pause_after:
            self.hold_until = max(self.hold_until, now + retry_after)
            self._void(limits)
        if signal is Signal.OVERLOADED:
            if admitted_at < self.cut_at:
                return  # sent before the last decrease: already accounted for
            self.refused += 1
            if self._clumped(limits, now, admitted_at):
                return
            # The downstream's allowance was empty when this call arrived, and it was empty
            # when the call behind the last decrease arrived: what it let through in between
            # is its rate times the time, whatever its burst (the refill was never capped
            # while callers queued). Calls whose answer is still due are left out.
            end = min(admitted_at, now - self.latency)
            hold = 0.0
            if (self.mark_at > 0 and self.mark_ok >= LANDING_OKS and end > self.mark_at
                    and self.busy_since <= self.mark_at):
                count = self.mark_ok / (end - self.mark_at)
                allowed = self.allowed + self.rate(limits, now) * max(0.0, now - self.last_fill)
                given = (allowed - self.mark_allowed) / max(1e-9, now - self.mark_fill)
                used = (self.sent - self.mark_sent) / max(1e-9, now - self.mark_fill)
                if used >= UNDER_USED * given or not self.measured:
                    self.ceiling = count
                    self.measured = 1
                # else the callers did not use the rate they were given (on a loaded machine
                # they wake up late), so the downstream's allowance filled up and spilled in
                # between: the count only bounds its rate from below, and this 429 says more
                # about a clump of late callers than about the rate; the ceiling is kept
                # (the first measurement is always taken: the bound before it was a guess)
                rate = limits.backoff * self.ceiling
            else:
                # the first 429 (a downstream's burst allowance hid the moment slow start
                # crossed its rate), or too little seen since the last: the rate this call
                # was sent at is an upper bound
                sent = self.rate(limits, admitted_at)
                self.ceiling = min(self.ceiling, sent) if self.ceiling > 0 else sent
                rate = limits.backoff * self.ceiling
                if not self.measured:
                    # nothing measured yet: halve, and hold that until calls sent at it
                    # have answered (still too fast?) before climbing back to the bound
                    rate = limits.first_backoff * self.ceiling
                    hold = LANDING_HOLD * self.latency
            self.mark_at = admitted_at
            self.mark_ok = 0
            self._restart(limits, now, rate)
            self.mark_allowed, self.mark_fill = self.allowed, now
            self.mark_sent, self.mark_refused = self.sent, self.refused
            self.since = now + hold
            self._count("decreases")
            return
        # UNAVAILABLE / TIMEOUT: the breaker counts it; the rate is cut, the ceiling kept
        if admitted_at >= self.cut_at and self.breaker is BreakerState.CLOSED:
            self._restart(limits, now, limits.outage_backoff * self.rate(limits, now))
        if self.breaker is BreakerState.HALF_OPEN:
            self._trip(limits, now, retry_after)
            return
        self.failures += 1
        if self.breaker is BreakerState.CLOSED and self.failures >= limits.failure_threshold:
            self._trip(limits, now, retry_after)

    def _clumped(self, limits: Limits, now: float, admitted_at: float) -> bool:
        """True if this 429 is a clump of late callers, not a sign of a rate too high.

        The call went at a rate known to work (at most the ceiling), the callers
        queued all along yet made fewer calls than the rate gave them (they woke up late: a
        loaded machine), and the downstream refused hardly any of them: the late ones went
        together and drained its burst allowance. Cutting the rate would not have helped,
        and costs seconds of climbing back (two to six cuts per run on a loaded machine
        were what kept the 4-process Redis scenario outside +-5%). The same holds at the
        configured ``max_rate`` (the user told us the quota) whether or not the callers used
        it, since catching owed slots up (``OWED``) also sends a few together. The refused
        call retries; once the downstream has refused more than ``CLUMP_SHARE`` of the calls
        made since the last decrease, 429s are a rate signal again.
        """
        sent_at = self.rate(limits, admitted_at)
        if sent_at < limits.max_rate and not 0 < sent_at <= self.ceiling:
            return False
        allowed = self.allowed + self.rate(limits, now) * max(0.0, now - self.last_fill)
        given = allowed - self.mark_allowed
        used = self.sent - self.mark_sent
        if used >= UNDER_USED * given and sent_at < limits.max_rate:
            return False  # the callers used their rate
        if self.refused - self.mark_refused > CLUMP_SHARE * used:
            # the downstream refused more than a clump's worth (so at least 20 calls must
            # have gone since the last decrease for one refusal to be a clump)
            return False
        self._count("clumps")
        return True

    def _trip(self, limits: Limits, now: float, retry_after: float | None) -> None:
        self.breaker = BreakerState.OPEN
        self.opened_at = now
        self.open_for = max(limits.open_for, retry_after or 0.0)
        self._void(limits)
        self._count("breaker_opened")

    def _void(self, limits: Limits) -> None:
        # everyone queued re-queues after the pause/trip, so abandoned places cost nothing
        self.void_below = self.tickets
        self.issued = self.tickets + limits.burst - 1.0

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def snapshot(self, limits: Limits, now: float) -> dict[str, Any]:
        """A JSON-ready view for ``closedloop status`` and metrics."""
        return {
            "rate": round(self.rate(limits, now), 3),
            "ceiling": round(self.ceiling, 3) if self.ceiling > 0 else None,
            "delivered": round(self.delivered(limits, now), 3),
            "breaker": self.breaker.value,
            "failures": self.failures,
            "paused_for": round(max(0.0, self.hold_until - now), 3),
            "counts": dict(self.counts),
        }
