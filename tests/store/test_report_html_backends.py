"""``closedloop report --html`` gives the same page on every backend for the same events."""

from __future__ import annotations

from pathlib import Path

import closedloop as cl
from closedloop.learn import html_report
from test_report_html import fill, week


def test_every_backend_gives_the_same_page(any_url: str, tmp_path: Path) -> None:
    reference = fill(tmp_path / "reference.db", week())
    with cl.open_store(reference, read_only=True, create=False) as store:
        expected = html_report(store, title="t")
    store = cl.open_store(any_url)
    try:
        for event in week():
            store.record(event)
        assert store.flush()
        assert html_report(store, title="t") == expected
    finally:
        store.close()
