"""JSON in and out of the HTTP API: responses that are safe to open anywhere, bounded request
bodies, and errors as one JSON shape (``{"error": {"code", "message"}}``).

Stored text (proposals, reasons, names) is returned as JSON data, never interpreted: the body
is ASCII JSON in which ``<``, ``>`` and ``&`` are written as ``\\u003c``, ``\\u003e`` and
``\\u0026`` (and every control or non-ASCII character escaped), so that the decoded value is
exactly what was stored while no byte of the body can close a ``<script>`` or start markup
when a browser or a log viewer shows it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from closedloop._redact import clip, redact_text

MAX_BODY = 64 * 1024
"""Bytes of a request body the API reads at most (413 beyond)."""
MAX_MESSAGE = 500
"""Characters of an error's message at most, the mark of a cut included."""
_CUT_MARK = 64
"""Room for that mark (``…[truncated N of M chars]``) after the kept text."""
_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def dumps(content: Any) -> str:
    """``content`` as the API writes it: ASCII JSON with ``<``, ``>`` and ``&`` escaped."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"),
                      default=str).translate(_SAFE)


class JSON(Response):
    """A JSON response written by :func:`dumps`."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("ascii")


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a stable ``code`` and a one-line
    ``message`` (redacted and cut before it is sent)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None, *, redact: bool = True) -> JSON:
    """The JSON error body: ``{"error": {"code": ..., "message": ...}}``, the message on one
    line, cut, and redacted (it may quote what was sent or stored) unless ``redact=False``
    (the server's own fixed words)."""
    text = " ".join(str(message).split())
    text = clip(redact_text(text) if redact else text, MAX_MESSAGE - _CUT_MARK)
    return JSON({"error": {"code": code, "message": text}}, status_code=status,
                headers=headers)


async def read_json(request: Request, *, max_body: int = MAX_BODY) -> dict[str, Any]:
    """The request's body: a JSON object of at most ``max_body`` bytes, sent as
    ``application/json`` (415 otherwise, which also keeps a browser form on another site from
    posting here), else an :class:`ApiError` (400, 413)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > max_body):
        raise ApiError(413, "too_large", f"the body must be at most {max_body} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_body:
            raise ApiError(413, "too_large", f"the body must be at most {max_body} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return value
