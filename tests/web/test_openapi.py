"""The JSON API's OpenAPI document: it names every JSON route the app mounts and nothing else,
``closedloop serve`` serves it, every answer in every state of a request conforms to it, and
schemathesis fuzzes a real server (SQLite and PostgreSQL) from it: no 5xx, answers as
described, bad input refused with a 4xx and a one-line error, bounded bodies."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

import closedloop as cl
from closedloop.approvals import approvals_for
from closedloop.web import create_app

from .conftest import TOKEN, Served, make_request

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("CLOSEDLOOP_FUZZ_EXAMPLES", "25"))
"""Examples per operation and generation mode: the whole fuzz stays within a minute or so
per backend (CI's time), while each run draws new inputs; set the variable for a deeper run."""
MAX_ANSWER = 1 << 20


def _json_routes(app: Any) -> set[tuple[str, str]]:
    out = set()
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/api/"):
            out |= {(m, route.path) for m in route.methods or () if m != "HEAD"}
    return out


def _described(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


@pytest.mark.parametrize("api", [True, False])
def test_the_document_names_every_json_route_and_nothing_else(tmp_path: Path,
                                                              api: bool) -> None:
    with cl.open_store(f"sqlite:///{tmp_path / 'a.db'}") as store:
        app = create_app(store=store, token=TOKEN, dashboard=True, api=api)
    doc = app.state.openapi
    assert _described(doc) == _json_routes(app)
    assert ("POST", "/api/v1/approvals/{request_id}/approve") in _described(doc) or not api
    assert not any(path.startswith(("/ui", "/metrics")) for path in doc["paths"])
    # a valid OpenAPI 3.1 document (schemathesis refuses to load one that is not)
    assert doc["openapi"] == "3.1.0"
    loaded = schemathesis.openapi.from_dict(doc)
    assert len(list(loaded.get_all_operations())) == len(_described(doc))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            writes = method != "get"
            assert op["security"] == ([{"bearerAuth": []}] if writes
                                      else [{}, {"bearerAuth": []}]), (method, path)
            assert "401" in op["responses"] and "200" in op["responses"]
            if writes:
                assert {"403", "413", "415", "422"} <= set(op["responses"]), path
                assert op["requestBody"]["required"] is True
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_the_bodies_the_document_describes_are_the_ones_the_server_takes(tmp_path: Path,
                                                                         ) -> None:
    with cl.open_store(f"sqlite:///{tmp_path / 'a.db'}") as store:
        doc = create_app(store=store, token=TOKEN).state.openapi
    schemas = doc["components"]["schemas"]
    reject = schemas["RejectBody"]
    assert reject["additionalProperties"] is False
    assert set(reject["required"]) == {"by", "reason"}
    assert reject["properties"]["revise"]["type"] == "boolean"
    assert reject["properties"]["by"]["maxLength"] == 200
    listing = doc["paths"]["/api/v1/approvals"]["get"]["parameters"]
    limit = next(p for p in listing if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 200)
    status = next(p for p in listing if p["name"] == "status")
    assert "crashed" in schemas[status["schema"]["$ref"].rsplit("/", 1)[1]]["enum"]


def _states(store_url: str) -> list[str]:
    """One request in each state the API can show, with a result, a risk and two approvers:
    their ids."""
    now = time.time()
    made = [make_request(store_url, destructive=True, two_approvers=True),
            *(make_request(store_url) for _ in range(5)),
            make_request(store_url, created=now - 120, expires_in=60)]
    ids = [r.request_id for r in made]
    with cl.open_store(store_url) as store:
        approvals = approvals_for(store)
        approvals.decide(ids[0], approve=True, by="alice", reason="first of two")
        approvals.decide(ids[1], approve=False, by="bob", reason="too big", revise=True)
        for rid in ids[2:5]:
            approvals.decide(rid, approve=True, by="carol")
        done = approvals.claim(ids[2], by="worker", lease_s=60)
        assert done is not None
        assert approvals.finish(ids[2], done.token, ok=True, result={"outcome": "succeeded",
                                                                     "instances": ["i-1"]})
        assert approvals.claim(ids[3], by="worker", lease_s=0.01) is not None
        approvals.reap(now=now + 60)
    return ids


def test_every_answer_in_every_state_conforms_to_the_document(served: Served) -> None:
    ids = _states(served.store_url)
    with served.client() as http:
        schema = schemathesis.openapi.from_dict(http.get("/api/openapi.json").json())
        answers = [http.get("/api/v1/approvals", params={"limit": 200}),
                   http.get("/api/v1/approvals", params={"limit": 2}),
                   http.get("/api/v1/health"),
                   *(http.get(f"/api/v1/approvals/{rid}") for rid in ids),
                   http.post(f"/api/v1/approvals/{ids[0]}/approve", json={"by": "dave"}),
                   http.post(f"/api/v1/approvals/{ids[3]}/retry",
                             json={"by": "dave", "reason": "nothing ran"}),
                   http.post(f"/api/v1/approvals/{ids[5]}/reject",
                             json={"by": "dave", "reason": "no"}),
                   http.post(f"/api/v1/approvals/{ids[6]}/approve", json={"by": "dave"}),
                   http.post(f"/api/v1/approvals/{ids[1]}/approve", json={"by": "dave"})]
    statuses = {a.json()["status"] for a in answers[3:3 + len(ids)]}
    assert statuses == {"approved", "pending", "rejected", "executed", "crashed", "expired"}
    assert [a.status_code for a in answers[-5:]] == [200, 200, 200, 410, 409]
    for answer in answers:
        route = answer.request.url.path
        for rid in ids:
            route = route.replace(rid, "{request_id}")
        operation = schema[route][answer.request.method]
        assert operation.validate_response(answer) is not False, (route, answer.text)


def test_the_served_document_is_the_apps(served: Served, tmp_path: Path) -> None:
    with served.client(token=None) as http:
        answer = http.get("/api/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    doc = answer.json()
    assert doc["info"]["version"] == cl.__version__
    with cl.open_store(f"sqlite:///{tmp_path / 'b.db'}") as store:
        assert doc == create_app(store=store, token=TOKEN, dashboard=True).state.openapi


def test_bad_parameters_are_named_on_one_line(served: Served) -> None:
    made = make_request(served.store_url)
    path = f"/api/v1/approvals/{made.request_id}"
    with served.client() as http:
        twice = http.get("/api/v1/approvals", params=[("limit", "5"), ("limit", "500")])
        typed = http.get("/api/v1/approvals", params={"limit": "five"})
        unknown = http.post(path + "/approve", json={"by": "alice", "as": "root"})
        missing = http.post(path + "/reject", json={"by": "alice"})
        long_by = http.post(path + "/approve", json={"by": "a" * 201})
        surrogate = http.post(path + "/approve", content=b'{"by": "al\\ud800ice"}',
                              headers={"content-type": "application/json"})
        blank = http.post(path + "/reject", json={"by": "alice", "reason": "   "})
    expected = {twice: "'limit' is given more than once", typed: "'limit'",
                unknown: "unknown field 'as'", missing: "field 'reason' is required",
                long_by: "'by'", surrogate: "'by'", blank: "'reason'"}
    for answer, words in expected.items():
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "invalid" and words in error["message"], error
        assert "\n" not in error["message"] and len(error["message"]) <= 500
    with served.client() as http:
        assert http.get(path).json()["status"] == "pending"


@schemathesis.check
def one_line_bounded(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every answer is bounded; an error is the one JSON shape with a one-line message."""
    assert len(response.content) <= MAX_ANSWER, f"{len(response.content)} bytes"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["code"], error
        message = error["message"]
        assert "\n" not in message and 0 < len(message) <= 500, message
    return None


CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance, response_headers_conformance, negative_data_rejection,
          one_line_bounded]


@pytest.fixture
def fuzzed(served: Served) -> tuple[Served, list[str]]:
    return served, _states(served.store_url)


def test_fuzz_the_api_from_its_document(fuzzed: tuple[Served, list[str]]) -> None:
    """Positive and negative cases for every operation, half of them on requests that exist
    (in every state), sent with the token to a real ``closedloop serve``."""
    served, ids = fuzzed
    schema = schemathesis.openapi.from_url(f"{served.url}/api/openapi.json")
    auth = {"Authorization": f"Bearer {served.token}"}
    failures = []
    ran = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        takes_input = bool(operation.path_parameters or operation.query
                           or operation.body)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not takes_input:
                continue
            strategy = operation.as_strategy(generation_mode=mode)
            if operation.path_parameters and mode is GenerationMode.POSITIVE:
                strategy = st.one_of(strategy, *(operation.as_strategy(
                    generation_mode=mode, path_parameters={"request_id": rid})
                    for rid in ids))

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), derandomize=False)
            def run(case: Any) -> None:
                case.call_and_validate(base_url=served.url, headers=auth, checks=CHECKS,
                                       timeout=30)

            try:
                run()
            except Exception as exc:  # noqa: BLE001 - collected: every operation runs
                failures.append(f"{operation.label} ({mode.value}): {exc}"[:4000])
            ran += 1
    assert ran >= 10
    assert not failures, "\n\n".join(failures)
    assert not any("Traceback" in line for line in served.err), "".join(served.err)[-3000:]
