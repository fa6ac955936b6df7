"""Reading traces back: a tree with timings and verdicts, and a step-by-step diff of two traces.

``diff_traces`` aligns the spans of two traces by their position in the tree (name and
occurrence), so a failed run of a task type can be compared with a successful one: the first
row whose verdict, status, outcome or captured content differs is where they diverged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from closedloop._spans import StoredSpan, iter_children

STATUS_ERROR = 2
"""A failed span's stored status (the telemetry layer's ``STATUS_ERROR``, kept here so that
reading traces back never imports OpenTelemetry)."""

# The attributes that say what a stage decided; compared by the diff and shown in the tree.
DECISIVE = ("closedloop.outcome", "closedloop.verdict.passed", "closedloop.verdict.unknown",
            "closedloop.verdict.crashed", "closedloop.verdict.issues", "closedloop.gate",
            "closedloop.error_type", "gen_ai.response.finish_reasons", "error.type")


def span_label(span: StoredSpan) -> str:
    """One line for a span: name, duration, and the decisive attributes it carries."""
    parts = [span.name, f"{span.duration_ms:.1f} ms"]
    for key in DECISIVE:
        if key in span.attributes:
            parts.append(f"{key.removeprefix('closedloop.')}={span.attributes[key]}")
    tokens = [span.attributes.get(k) for k in ("gen_ai.usage.input_tokens",
                                               "gen_ai.usage.output_tokens")]
    if any(t is not None for t in tokens):
        parts.append(f"tokens={tokens[0] or 0}/{tokens[1] or 0}")
    if span.status == STATUS_ERROR and span.status_message:
        parts.append(f"error: {span.status_message}")
    return "  ".join(parts)


def verdict_messages(span: StoredSpan) -> list[str]:
    """Why a check decided as it did: its issues' messages (``[severity] code: message``)."""
    found = span.attributes.get("closedloop.verdict.messages")
    if isinstance(found, list):
        return [str(m) for m in found]
    return [str(found)] if found else []


def _keyed(spans: Sequence[StoredSpan]) -> list[tuple[str, int, StoredSpan]]:
    """Spans in tree order, each with its path of names and its occurrence on that path."""
    out: list[tuple[str, int, StoredSpan]] = []
    seen: dict[str, int] = {}
    stack: list[str] = []
    for depth, span in iter_children(spans):
        del stack[depth:]
        stack.append(span.name)
        path = " / ".join(stack)
        seen[path] = seen.get(path, 0) + 1
        out.append((path, seen[path], span))
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class DiffRow:
    """One aligned stage of two traces and what differs between them."""

    path: str
    occurrence: int
    a: StoredSpan | None
    b: StoredSpan | None
    differences: dict[str, tuple[Any, Any]]

    @property
    def diverges(self) -> bool:
        """True when the stage is missing on one side or decided differently."""
        return self.a is None or self.b is None or bool(self.differences)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"path": self.path, "occurrence": self.occurrence,
                "a_ms": round(self.a.duration_ms, 3) if self.a else None,
                "b_ms": round(self.b.duration_ms, 3) if self.b else None,
                "differences": {k: list(v) for k, v in self.differences.items()}}


def _differences(a: StoredSpan, b: StoredSpan) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in DECISIVE:
        if a.attributes.get(key) != b.attributes.get(key):
            out[key] = (a.attributes.get(key), b.attributes.get(key))
    if a.status != b.status:
        out["status"] = (a.status_message or a.status, b.status_message or b.status)
    for key in sorted(set(a.content) | set(b.content)):
        if a.content.get(key) != b.content.get(key):
            out[key] = (a.content.get(key), b.content.get(key))
    return out


def diff_traces(a: Sequence[StoredSpan], b: Sequence[StoredSpan]) -> list[DiffRow]:
    """Every stage of either trace, aligned, in A's tree order then B's extra stages."""
    keyed_b = {(path, n): span for path, n, span in _keyed(b)}
    rows: list[DiffRow] = []
    for path, n, span in _keyed(a):
        other = keyed_b.pop((path, n), None)
        rows.append(DiffRow(path=path, occurrence=n, a=span, b=other,
                            differences=_differences(span, other) if other else {}))
    for (path, n), span in keyed_b.items():
        rows.append(DiffRow(path=path, occurrence=n, a=None, b=span, differences={}))
    return rows


def first_divergence(rows: Sequence[DiffRow]) -> DiffRow | None:
    """The earliest divergent stage with no divergent stage inside it: where runs split.

    A step's outcome differs whenever anything inside it does, so the root is only reported
    when nothing more specific diverged.
    """
    divergent = [r for r in rows if r.diverges]
    for row in divergent:
        inner = row.path + " / "
        if not any(other.path.startswith(inner) for other in divergent):
            return row
    return None
