"""The JSON API's one description: each operation (:class:`Operation`) names its handler and
the pydantic models of its path, query, body and answer; the same models validate what a
request sends (:func:`parsed`, :func:`body_of`) and make the OpenAPI 3.1 document
(:func:`document`, served at ``/api/openapi.json``), so the document cannot say other than
the code does. The routes ``create_app`` mounts are made from the operations too
(:meth:`Operation.route`).

- **Requests.** Unknown fields and query parameters, a parameter given twice, a value of the
  wrong type or length: 422 ``invalid``, with one line naming the first problem.
- **Answers.** The success models forbid fields they do not list (``additionalProperties:
  false``): a field added to an answer without its model fails the schema tests. Every error
  is :class:`ErrorBody`; each operation lists the statuses it can answer with.
- **Auth.** ``bearerAuth`` (``Authorization: Bearer TOKEN``): every write needs it; reads need
  it only when the server listens beyond loopback (their ``security`` allows both).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from closedloop.approvals import ApprovalStatus
from closedloop.web._json import MAX_BODY, ApiError, read_json

_M = TypeVar("_M", bound=BaseModel)
PATH = "/api/openapi.json"
"""Where ``closedloop serve`` serves the document."""
_REF = "#/components/schemas/{model}"
_READS = frozenset({"GET", "HEAD"})

ERRORS: dict[int, str] = {
    400: "`bad_json` (the body is not a JSON object), `bad_host` (a loopback server "
         "asked under another host name)",
    401: "`missing_token` or `bad_token`: the API token is needed (writes; every request "
         "when the server listens beyond loopback)",
    403: "`read_only` (the server has no API token), `self_approval`",
    404: "`not_found`: no such request",
    409: "`not_pending`, `same_approver`, `not_retryable`, `cannot_execute`, "
         "`digest_mismatch`",
    410: "`expired`: the request expired before the decision",
    413: f"`too_large`: a body over {MAX_BODY} bytes",
    415: "`unsupported_media_type`: the body must be sent as application/json",
    422: "`invalid`: a parameter or field is missing, unknown or out of bounds",
    503: "`store_unavailable`: the store cannot be read or written now (nothing changed)",
}
"""Each error status the API answers with, and its codes (an operation lists its own)."""
_GUARD = (400, 401, 413)
"""What the guard in front of every route may answer (a read's 401: beyond loopback)."""


class _Strict(BaseModel):
    """A request body: JSON types as sent (no coercion), no field it does not list."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Query(BaseModel):
    """Query or path parameters: text converted to the field's type, no unknown ones."""

    model_config = ConfigDict(extra="forbid")


class _Answer(BaseModel):
    """A success answer: exactly these fields."""

    model_config = ConfigDict(extra="forbid")


# ----- requests -----------------------------------------------------------------------------

_NAME = Field(min_length=1, max_length=200, pattern=r"\S",
              description="who decides: a printable name (recorded redacted)")
_REASON_MAX = 2000


class RequestPath(_Query):
    request_id: str = Field(min_length=1, max_length=200,
                            description="the request's id (32 hex digits)")


class ListQuery(_Query):
    status: ApprovalStatus | None = Field(None, description="only requests in this status")
    task_type: str | None = Field(None, max_length=200,
                                  description="only requests of this task type")
    limit: int = Field(50, ge=1, le=200, description="requests per page")
    cursor: str | None = Field(None, max_length=500,
                               description="the previous page's `next_cursor`")


class ApproveBody(_Strict):
    by: str = _NAME
    reason: str = Field("", max_length=_REASON_MAX, description="why (optional)")


class RejectBody(_Strict):
    by: str = _NAME
    reason: str = Field(min_length=1, max_length=_REASON_MAX, pattern=r"\S",
                        description="why: shown to the requester (and to the agent with "
                                    "`revise`)")
    revise: bool = Field(False, description="ask the agent for a revised proposal")


class RetryBody(_Strict):
    by: str = _NAME
    reason: str = Field(min_length=1, max_length=_REASON_MAX, pattern=r"\S",
                        description="why it is safe to execute again")


# ----- answers ------------------------------------------------------------------------------


class ErrorDetail(_Answer):
    code: str = Field(description="stable, for programs (see each status)")
    message: str = Field(description="one line, for people (redacted)")


class ErrorBody(_Answer):
    error: ErrorDetail


class Health(_Answer):
    status: Literal["ok"]
    version: str
    writable: bool = Field(description="the server has an API token (writes allowed)")


class OpenApiDocument(BaseModel):
    """This document."""

    model_config = ConfigDict(extra="allow")
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


class Decision(_Answer):
    at: float
    time: str = Field(description="`at` as ISO-8601 UTC")
    action: str = Field(description="requested, approved, rejected, expired, claimed, "
                                    "executed, failed, crashed, retried, refused, notified...")
    by: str
    reason: str


class Notification(_Answer):
    state: Literal["sent", "failed", "unsent"]
    rounds: int
    last: str | None
    error: str | None


class _Approval(_Answer):
    request_id: str
    task_type: str
    agent_id: str
    status: ApprovalStatus
    created_at: float
    created: str
    expires_at: float | None
    expires: str | None
    requested_by: str
    step_id: str | None
    trace_id: str | None
    run_id: str | None
    proposal: str = Field(description="the proposal as canonical JSON text, redacted")
    proposal_digest: str = Field(description="SHA-256 of the whole unredacted proposal text")
    task_input: str | None
    portable: Literal["requesting process only", "stored text", "sealed", "?"]
    verdicts: list[dict[str, Any]]
    risk: dict[str, Any] | None
    destructive: bool
    approvals_needed: int
    approvers: list[str]
    revise: bool
    result: dict[str, Any] | None
    lease_epoch: int
    updated_at: float


class ApprovalListed(_Approval):
    """A request as a listing shows it: proposal and task input cut."""

    proposal_truncated: bool


class ApprovalShown(_Approval):
    """A request with its history and how its notification went."""

    history: list[Decision]
    notification: Notification


class ApprovalPage(_Answer):
    requests: list[ApprovalListed]
    next_cursor: str | None = Field(description="pass back as `cursor`; null: the last page")


# ----- parsing ------------------------------------------------------------------------------


def _problem(exc: ValidationError, where: str) -> ApiError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    name = ".".join(str(p) for p in first["loc"]) or where
    if first["type"] == "extra_forbidden":
        text = f"unknown {where} {name!r}"
    elif first["type"] == "missing":
        text = f"{where} {name!r} is required"
    else:
        text = f"{where} {name!r}: {first['msg']}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ApiError(422, "invalid", text[:300] + more)


def parsed(model: type[_M], values: Any, where: str) -> _M:
    """``values`` (a mapping of text, or parsed JSON) as ``model``, or a 422 ``invalid``."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _problem(exc, where) from None


def query_of(request: Request, model: type[_M]) -> _M:
    """The query parameters as ``model`` (422 for a parameter given twice)."""
    query = request.query_params
    for key in query:
        if len(query.getlist(key)) > 1:
            raise ApiError(422, "invalid", f"query parameter {key[:100]!r} is given more than "
                           "once")
    return parsed(model, dict(query), "query parameter")


def path_of(request: Request, model: type[_M]) -> _M:
    """The path parameters as ``model``: 404 when they cannot name anything."""
    try:
        return model.model_validate(request.path_params)
    except ValidationError:
        raise ApiError(404, "not_found", "no such approval request") from None


async def body_of(request: Request, model: type[_M]) -> _M:
    """The JSON body (bounded, :func:`~closedloop.web._json.read_json`) as ``model``."""
    return parsed(model, await read_json(request), "field")


# ----- the document -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operation:
    """One endpoint of the JSON API, as the route table and the document both see it."""

    method: Literal["GET", "POST"]
    path: str
    endpoint: Callable[[Request], Awaitable[Response]]
    summary: str
    answer: type[BaseModel]
    errors: tuple[int, ...] = ()
    path_model: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    tag: str = "approvals"

    @property
    def write(self) -> bool:
        return self.method not in _READS

    def route(self) -> Route:
        return Route(self.path, self.endpoint, methods=[self.method])


def _parameters(model: type[BaseModel], where: str, schemas: dict[str, Any]) -> list[Any]:
    schema = schemas[model.__name__]
    required = set(schema.get("required", ()))
    out = []
    for name, described in schema["properties"].items():
        prop = dict(described)
        options = prop.pop("anyOf", None)
        if options is not None:  # optional: a parameter left out, never a JSON null
            prop.update(next(o for o in options if o.get("type") != "null"))
        if prop.get("default") is None:
            prop.pop("default", None)
        description = prop.pop("description", None)
        prop.pop("title", None)
        out.append({"name": name, "in": where, "required": where == "path" or name in required,
                    "schema": prop, **({"description": description} if description else {})})
    return out


def document(operations: Sequence[Operation], *, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations`` (what one app mounts)."""
    models: dict[str, type[BaseModel]] = {}
    for op in operations:
        for model in (op.answer, op.path_model, op.query, op.body, ErrorBody):
            if model is not None:
                models[model.__name__] = model
    _, defs = models_json_schema(
        [(m, "validation") for m in models.values()], ref_template=_REF)
    schemas: dict[str, Any] = defs.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        statuses = sorted({*_GUARD, *op.errors, *((403, 415) if op.write else ())})
        responses: dict[str, Any] = {"200": {
            "description": op.summary,
            "content": {"application/json": {"schema": {"$ref": _REF.format(
                model=op.answer.__name__)}}}}}
        for status in statuses:
            answer: dict[str, Any] = {
                "description": ERRORS[status],
                "content": {"application/json": {"schema": {"$ref": _REF.format(
                    model="ErrorBody")}}}}
            if status == 401:
                answer["headers"] = {"WWW-Authenticate": {
                    "description": 'Bearer realm="closedloop"', "schema": {"type": "string"}}}
            responses[str(status)] = answer
        entry: dict[str, Any] = {
            "operationId": op.endpoint.__name__.strip("_"), "summary": op.summary, "tags": [op.tag],
            "security": [{"bearerAuth": []}] if op.write else [{}, {"bearerAuth": []}],
            "responses": responses}
        parameters = []
        if op.path_model is not None:
            parameters += _parameters(op.path_model, "path", schemas)
        if op.query is not None:
            parameters += _parameters(op.query, "query", schemas)
        if parameters:
            entry["parameters"] = parameters
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": _REF.format(model=op.body.__name__)}}}}
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    for name in [n for n, m in models.items() if m in (op.path_model for op in operations)
                 or m in (op.query for op in operations)]:
        schemas.pop(name, None)  # described as parameters
    return {
        "openapi": "3.1.0",
        "info": {"title": "closedloop serve", "version": version,
                 "description": "The JSON API of `closedloop serve`: approvals and health. "
                                "Errors are `{\"error\": {\"code\", \"message\"}}`."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearerAuth": {
            "type": "http", "scheme": "bearer",
            "description": "the API token ($CLOSEDLOOP_API_TOKEN)"}}},
    }
