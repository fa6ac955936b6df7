"""The approvals section of the JSON API (``/api/v1/approvals``), over the service API
:mod:`closedloop.approvals` (no SQL here; the service keeps every rule).

==========================================  ===============================================
``GET  /api/v1/approvals``                  a page, newest first: ``?status=&task_type=&
                                            limit=&cursor=`` → ``{"requests", "next_cursor"}``
``GET  /api/v1/approvals/{id}``             one request with its history and notification
``POST /api/v1/approvals/{id}/approve``     ``{"by", "reason"?}``
``POST /api/v1/approvals/{id}/reject``      ``{"by", "reason", "revise"?}``
``POST /api/v1/approvals/{id}/retry``       ``{"by", "reason"}`` (a crashed or failed one)
==========================================  ===============================================

A write answers the request as stored after it. The service's refusals map to HTTP:
``not_found`` 404, ``self_approval`` 403, ``not_pending``, ``same_approver``,
``not_retryable``, ``cannot_execute`` and ``digest_mismatch`` 409, ``expired`` 410 (also
for a decision on a request an earlier read already marked expired), a bad
argument (a ConfigError) 422, a store that cannot be read or written 503 (nothing changed).
The store is called from a worker thread, so a slow database never blocks the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from closedloop import approvals as service
from closedloop._errors import ApprovalError, ConfigError, StoreError
from closedloop.web._json import JSON, ApiError, read_json

_T = TypeVar("_T")
MAX_LIMIT = 200
LIST_TEXT = 4000
"""Characters of a proposal or task input a listing carries (``show`` has all of it)."""
STATUS = {"not_found": 404, "self_approval": 403, "same_approver": 409, "not_pending": 409,
          "not_retryable": 409, "cannot_execute": 409, "digest_mismatch": 409, "expired": 410,
          "unavailable": 503}
_QUERY = frozenset({"status", "task_type", "limit", "cursor"})


async def _call(work: Callable[[], _T]) -> _T:
    try:
        return await run_in_threadpool(work)
    except ApprovalError as exc:
        raise ApiError(STATUS.get(exc.code, 409), exc.code, str(exc)) from None
    except ConfigError as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    except StoreError as exc:
        raise ApiError(503, "store_unavailable", f"the store cannot be used now: {exc}") \
            from None


async def _decide(work: Callable[[], _T], rid: str, store: Any) -> _T:
    """A decision; one refused because the request already expired is 410 ``expired``,
    whether this call or an earlier read marked it so."""
    try:
        return await _call(work)
    except ApiError as exc:
        if exc.code != "not_pending":
            raise
        found = await _call(lambda: service.get_request(rid, store=store))
        if found.status is service.ApprovalStatus.EXPIRED:
            raise ApiError(410, "expired", f"request {rid} expired at "
                           f"{found.to_dict()['expires']}") from None
        raise


def _store(request: Request) -> Any:
    return request.app.state.store


def _text(value: object, name: str, *, required: bool, limit: int = 2000) -> str:
    if value is None:
        if required:
            raise ApiError(422, "invalid", f"{name!r} is required")
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ApiError(422, "invalid", f"{name!r} must be a string of at most {limit} "
                       "characters")
    return value


def _fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(422, "invalid", f"unknown field(s): {', '.join(unknown)[:200]}; "
                       f"allowed: {', '.join(sorted(allowed))}")


def _clipped(text: str | None) -> tuple[str | None, bool]:
    if text is None or len(text) <= LIST_TEXT:
        return text, False
    return text[:LIST_TEXT], True


def listed(request: service.ApprovalRequest) -> dict[str, Any]:
    """A request as a listing shows it: its proposal and task input cut to
    :data:`LIST_TEXT` characters (``proposal_truncated`` says so)."""
    out = request.to_dict()
    out["proposal"], cut = _clipped(request.proposal)
    out["task_input"], cut_input = _clipped(request.task_input)
    out["proposal_truncated"] = cut or cut_input
    out.pop("history", None)
    return out


def shown(request: service.ApprovalRequest) -> dict[str, Any]:
    """A request as ``show`` answers it: everything but the sealed copy, with its history
    and how its notification went."""
    out = request.to_dict()
    out["notification"] = service.notification_state(request)
    return out


async def list_approvals(request: Request) -> Response:
    query = request.query_params
    unknown = sorted(set(query.keys()) - _QUERY)
    if unknown:
        raise ApiError(422, "invalid", f"unknown query parameter(s): {', '.join(unknown)[:200]}"
                       f"; allowed: {', '.join(sorted(_QUERY))}")
    raw_limit = query.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ApiError(422, "invalid", f"limit must be an integer from 1 to {MAX_LIMIT}")
    status = _text(query.get("status"), "status", required=False, limit=40) or None
    task_type = _text(query.get("task_type"), "task_type", required=False, limit=200) or None
    cursor = _text(query.get("cursor"), "cursor", required=False, limit=500) or None
    store = _store(request)
    page = await _call(lambda: service.list_requests(
        status=status, task_type=task_type, limit=int(raw_limit), cursor=cursor, store=store))
    return JSON({"requests": [listed(r) for r in page.requests],
                 "next_cursor": page.next_cursor})


def _request_id(request: Request) -> str:
    rid = str(request.path_params["request_id"])
    if not rid or len(rid) > 200:
        raise ApiError(404, "not_found", "no such approval request")
    return rid


async def show_approval(request: Request) -> Response:
    rid, store = _request_id(request), _store(request)
    found = await _call(lambda: service.get_request(rid, store=store))
    return JSON(shown(found))


async def approve(request: Request) -> Response:
    rid, store = _request_id(request), _store(request)
    body = await read_json(request)
    _fields(body, {"by", "reason"})
    by = _text(body.get("by"), "by", required=True, limit=200)
    reason = _text(body.get("reason"), "reason", required=False)
    done = await _decide(lambda: service.approve(rid, by=by, reason=reason, store=store),
                         rid, store)
    return JSON(shown(done))


async def reject(request: Request) -> Response:
    rid, store = _request_id(request), _store(request)
    body = await read_json(request)
    _fields(body, {"by", "reason", "revise"})
    by = _text(body.get("by"), "by", required=True, limit=200)
    reason = _text(body.get("reason"), "reason", required=True)
    revise = body.get("revise", False)
    if not isinstance(revise, bool):
        raise ApiError(422, "invalid", "'revise' must be true or false")
    done = await _decide(lambda: service.reject(rid, by=by, reason=reason, revise=revise,
                                                store=store), rid, store)
    return JSON(shown(done))


async def retry(request: Request) -> Response:
    rid, store = _request_id(request), _store(request)
    body = await read_json(request)
    _fields(body, {"by", "reason"})
    by = _text(body.get("by"), "by", required=True, limit=200)
    reason = _text(body.get("reason"), "reason", required=True)
    done = await _call(lambda: service.retry(rid, by=by, reason=reason, store=store))
    return JSON(shown(done))


ROUTES = [
    Route("/api/v1/approvals", list_approvals, methods=["GET"]),
    Route("/api/v1/approvals/{request_id}", show_approval, methods=["GET"]),
    Route("/api/v1/approvals/{request_id}/approve", approve, methods=["POST"]),
    Route("/api/v1/approvals/{request_id}/reject", reject, methods=["POST"]),
    Route("/api/v1/approvals/{request_id}/retry", retry, methods=["POST"]),
]
"""The approvals section's routes (``create_app`` mounts them)."""
