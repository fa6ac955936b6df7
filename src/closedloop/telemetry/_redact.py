"""Redaction and size caps for captured prompts, responses and tool arguments.

Content is captured per destination: :class:`Capture` says whether a destination receives
content at all, which :class:`Redactor` scrubs it and how long it may be. The local store
captures redacted content by default; OTLP destinations receive none unless asked
(the GenAI conventions make message content opt-in).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from re import Pattern
from typing import Any

REDACTED = "[REDACTED]"

# (name, pattern): provider keys and tokens, bearer credentials, AWS keys, e-mail addresses.
DEFAULT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("anthropic_key", r"sk-ant-[A-Za-z0-9_\-]{20,}"),
    ("openai_key", r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}"),
    ("google_key", r"AIza[0-9A-Za-z_\-]{35}"),
    ("github_token", r"gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"),
    ("slack_token", r"xox[abprs]-[A-Za-z0-9\-]{10,}"),
    ("huggingface_token", r"hf_[A-Za-z0-9]{30,}"),
    ("bearer", r"(?i:bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*"),
    ("aws_access_key", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"),
    ("aws_secret_key",
     r"(?i:aws_secret_access_key|aws_secret_key|secret_access_key)[\"']?\s*[:=]\s*[\"']?"
     r"[A-Za-z0-9/+=]{40}"),
    ("email", r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b"),
)


@dataclass(frozen=True, slots=True)
class Redactor:
    """Replaces secrets and personal data in text with ``[REDACTED:<kind>]``.

    ``patterns`` adds the user's own regular expressions (redacted as ``[REDACTED:custom]``)
    to the built-in ones; ``defaults=False`` keeps only the user's.
    """

    patterns: Iterable[str | Pattern[str]] = ()
    defaults: bool = True
    _compiled: tuple[tuple[str, Pattern[str]], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        compiled: list[tuple[str, Pattern[str]]] = []
        if self.defaults:
            compiled.extend((name, re.compile(p)) for name, p in DEFAULT_PATTERNS)
        for p in self.patterns:
            compiled.append(("custom", p if isinstance(p, Pattern) else re.compile(p)))
        object.__setattr__(self, "_compiled", tuple(compiled))

    def __call__(self, text: str) -> str:
        """``text`` with every match replaced."""
        for name, pattern in self._compiled:
            text = pattern.sub(f"[REDACTED:{name}]", text)
        return text


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` with the cut marked and the original length stated."""
    if len(text) <= max_chars:
        return text
    marker = f"…[truncated {len(text) - max_chars} of {len(text)} chars]"
    return text[:max_chars] + marker


def to_text(value: object) -> str:
    """Content as text: strings as-is, JSON for data, ``repr`` for anything else."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Capture:
    """Whether and how one destination receives captured content."""

    content: bool = True
    redactor: Redactor | None = field(default_factory=Redactor)
    max_chars: int = 8192

    @classmethod
    def none(cls) -> Capture:
        """No content at all (only ids, timings, verdicts and usage)."""
        return cls(content=False, redactor=None)

    def apply(self, content: dict[str, Any] | None) -> dict[str, str]:
        """The span's captured content, redacted and capped; empty when capture is off."""
        if not self.content or not content:
            return {}
        out: dict[str, str] = {}
        for key, value in content.items():
            text = to_text(value)
            if self.redactor is not None:
                text = self.redactor(text)
            out[key] = truncate(text, self.max_chars)
        return out
