"""What each destination receives of captured prompts, responses and tool arguments.

Content is captured per destination: :class:`Capture` says whether a destination receives
content at all, which redactor scrubs it and how long it may be. The local store captures
redacted content by default; OTLP destinations receive none unless asked (the GenAI
conventions make message content opt-in). The redactor itself lives in
:mod:`closedloop._redact`, shared by everything closedloop stores, exports or logs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from closedloop._redact import (
    DEFAULT_RULES,
    REDACTED,
    Redactor,
    default_redactor,
    redact_text,
    truncate,
)

__all__ = ["DEFAULT_RULES", "REDACTED", "Capture", "Redactor", "redact_text", "to_text",
           "truncate"]


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
    """Whether and how one destination receives captured content.

    ``redactor`` defaults to the process default (:func:`closedloop.set_default_redactor`);
    ``None`` sends content unredacted, which only makes sense for a destination you trust as
    much as the process itself. Content is redacted before it is serialised and before it is
    capped at ``max_chars``.
    """

    content: bool = True
    redactor: Callable[[str], str] | None = field(default=redact_text)
    max_chars: int = 8192

    @classmethod
    def none(cls) -> Capture:
        """No content at all (only ids, timings, verdicts and usage)."""
        return cls(content=False, redactor=None)

    def apply(self, content: dict[str, Any] | None) -> dict[str, str]:
        """The span's captured content, redacted and capped; empty when capture is off."""
        if not self.content or not content:
            return {}
        redactor = self.redactor
        if redactor is redact_text:  # the process default: looked up once per span
            redactor = default_redactor()
        out: dict[str, str] = {}
        for key, value in content.items():
            if redactor is None:
                text = to_text(value)
            elif isinstance(value, str):
                text = redactor(value)
            else:
                # data: its strings are redacted before JSON escapes them, then the text is
                # redacted again for what only shows in it (reprs of unknown objects)
                as_data = redactor.value(value) if isinstance(redactor, Redactor) else value
                text = redactor(to_text(as_data))
            out[key] = truncate(text, self.max_chars)
        return out
