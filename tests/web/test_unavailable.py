"""A page whose data the store cannot give now (a level store failing closed: the autonomy
evidence timed out) answers 503 with the reason, not a crash."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import closedloop as cl
from closedloop.web import _dashboard, create_app


def test_control_unavailable_is_a_503_page(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(store: object) -> None:
        raise cl.ControlUnavailable("cannot count the evidence: statement timeout")

    monkeypatch.setattr(_dashboard, "autonomy_data", failing)
    store = cl.open_store("memory://")
    app = create_app(store=store, dashboard=True)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await http.get("/ui/autonomy")

    answer = asyncio.run(get())
    store.close()
    assert answer.status_code == 503 and "statement timeout" in answer.text
