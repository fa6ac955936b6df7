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
Parameters and bodies are read through the models of :data:`OPERATIONS`, which also describe
this section in the OpenAPI document (:mod:`closedloop.web._openapi`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from closedloop import approvals as service
from closedloop._errors import ApprovalError, ConfigError, StoreError
from closedloop.web._json import JSON, ApiError
from closedloop.web._openapi import (
    ApprovalPage,
    ApprovalShown,
    ApproveBody,
    ListQuery,
    Operation,
    RejectBody,
    RequestPath,
    RetryBody,
    body_of,
    path_of,
    query_of,
)

_T = TypeVar("_T")
LIST_TEXT = 4000
"""Characters of a proposal or task input a listing carries (``show`` has all of it)."""
STATUS = {"not_found": 404, "self_approval": 403, "same_approver": 409, "not_pending": 409,
          "not_retryable": 409, "cannot_execute": 409, "digest_mismatch": 409, "expired": 410,
          "unavailable": 503}


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
    query = query_of(request, ListQuery)
    store = _store(request)
    page = await _call(lambda: service.list_requests(
        status=query.status, task_type=query.task_type or None, limit=query.limit,
        cursor=query.cursor or None, store=store))
    return JSON({"requests": [listed(r) for r in page.requests],
                 "next_cursor": page.next_cursor})


def _request_id(request: Request) -> str:
    return path_of(request, RequestPath).request_id


async def show_approval(request: Request) -> Response:
    rid, store = _request_id(request), _store(request)
    found = await _call(lambda: service.get_request(rid, store=store))
    return JSON(shown(found))


async def approve(request: Request) -> Response:
    rid, store = _request_id(request), _store(request)
    body = await body_of(request, ApproveBody)
    done = await _decide(lambda: service.approve(rid, by=body.by, reason=body.reason,
                                                 store=store), rid, store)
    return JSON(shown(done))


async def reject(request: Request) -> Response:
    rid, store = _request_id(request), _store(request)
    body = await body_of(request, RejectBody)
    done = await _decide(lambda: service.reject(rid, by=body.by, reason=body.reason,
                                                revise=body.revise, store=store), rid, store)
    return JSON(shown(done))


async def retry(request: Request) -> Response:
    rid, store = _request_id(request), _store(request)
    body = await body_of(request, RetryBody)
    done = await _call(lambda: service.retry(rid, by=body.by, reason=body.reason,
                                             store=store))
    return JSON(shown(done))


_DECIDE = (404, 409, 410, 422, 503)
OPERATIONS = (
    Operation("GET", "/api/v1/approvals", list_approvals, "A page of requests, newest first",
              ApprovalPage, (422, 503), query=ListQuery),
    Operation("GET", "/api/v1/approvals/{request_id}", show_approval,
              "One request with its history and notification", ApprovalShown, (404, 422, 503),
              path_model=RequestPath),
    Operation("POST", "/api/v1/approvals/{request_id}/approve", approve,
              "Approve a pending request", ApprovalShown, _DECIDE, path_model=RequestPath,
              body=ApproveBody),
    Operation("POST", "/api/v1/approvals/{request_id}/reject", reject,
              "Reject a pending request, saying why", ApprovalShown, _DECIDE,
              path_model=RequestPath, body=RejectBody),
    Operation("POST", "/api/v1/approvals/{request_id}/retry", retry,
              "Send a crashed or failed request back to approved", ApprovalShown,
              (404, 409, 422, 503), path_model=RequestPath, body=RetryBody),
)
"""The approvals section of the API, described (:mod:`closedloop.web._openapi`)."""
ROUTES = [op.route() for op in OPERATIONS]
"""The approvals section's routes (``create_app`` mounts them)."""
