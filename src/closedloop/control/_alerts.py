"""Alerts: what tripped, the evidence, and what to do, sent to pluggable sinks.

A sink is anything with ``send(alert)``. Sinks must not block or break the agent: the
webhook posts from its own thread through a bounded queue (overflow is dropped and counted),
and :class:`~closedloop.control.FaultControl` catches and logs any sink's failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from closedloop._redact import redact_text, redact_value
from closedloop._webhook import WebhookPoster

_log = logging.getLogger("closedloop.control")


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One alert: ``kind`` (paused, halted, resumed…), the subject, the evidence, the fix.

    Its texts and evidence are redacted when it is made, so no sink sees a secret.
    """

    kind: str
    subject: str
    summary: str
    action: str
    severity: str = "warning"
    evidence: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for name in ("subject", "summary", "action"):
            object.__setattr__(self, name, redact_text(getattr(self, name)))
        object.__setattr__(self, "evidence", redact_value(self.evidence))

    def to_dict(self) -> dict[str, Any]:
        """The JSON body a webhook receives."""
        out = asdict(self)
        out["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))
        out["source"] = "closedloop"
        return out

    def render(self) -> str:
        """One line for a log."""
        facts = ", ".join(f"{k}={v}" for k, v in self.evidence.items())
        return f"{self.kind} {self.subject}: {self.summary} [{facts}] — {self.action}"


@runtime_checkable
class AlertSink(Protocol):
    """Receives alerts; must return quickly."""

    def send(self, alert: Alert) -> None:
        """Deliver (or queue) one alert."""


class LogSink:
    """Alerts as log records (WARNING, or CRITICAL for a halt) on ``closedloop.control``."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or _log

    def send(self, alert: Alert) -> None:
        level = logging.CRITICAL if alert.severity == "critical" else logging.WARNING
        self.logger.log(level, "closedloop alert: %s", alert.render(),
                        extra={"alert": alert.to_dict()})


class CaptureSink:
    """Keeps alerts in a list: the test double for your own tests."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def send(self, alert: Alert) -> None:
        self.alerts.append(alert)


class MetricSink:
    """Counts alerts in ``closedloop_alerts_total{kind, subject}`` (prometheus_client)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter

        self.counter = Counter("closedloop_alerts", "Alerts raised by closedloop fault control",
                               ["kind", "subject"], registry=registry or REGISTRY)

    def send(self, alert: Alert) -> None:
        self.counter.labels(alert.kind, alert.subject).inc()


class WebhookSink:
    """POSTs each alert as JSON to ``url`` from a background thread (httpx).

    At most ``max_pending`` alerts wait; more are dropped and counted in ``dropped``. A
    failed POST is logged and counted in ``failed``, never raised. ``retries`` (default 0):
    how often a POST that may pass (no connection, 429, 5xx) is tried again, after an
    exponential ``backoff`` (the poster the approval notifications use,
    :class:`closedloop._webhook.WebhookPoster`).
    """

    def __init__(self, url: str, *, timeout: float = 5.0, max_pending: int = 100,
                 headers: dict[str, str] | None = None, retries: int = 0,
                 backoff: float = 1.0) -> None:
        self.url = url
        self._poster = WebhookPoster(url, timeout=timeout, max_pending=max_pending,
                                     headers=headers, retries=retries, backoff=backoff)

    @property
    def sent(self) -> int:
        """Alerts posted."""
        return self._poster.sent

    @property
    def failed(self) -> int:
        """Alerts given up on (logged)."""
        return self._poster.failed

    @property
    def dropped(self) -> int:
        """Alerts dropped because ``max_pending`` were waiting."""
        return self._poster.dropped

    def send(self, alert: Alert) -> None:
        self._poster.post(alert.to_dict())

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued alert was posted (or failed); False on timeout."""
        return self._poster.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued, then stop the thread."""
        self._poster.close(timeout)
