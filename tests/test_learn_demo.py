"""Failure clusters on the demo's seeded faults: each cluster holds one kind of fault, as the
simulated model's ledger records it (purity ≥ 0.9, the issue's target), without splitting the
kinds into many clusters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import closedloop as cl
from closedloop.demo import DemoSummary, run_demo
from closedloop.learn import cluster_purity, failure_clusters

pytestmark = pytest.mark.slow

FAILED = ("failed", "error", "blocked")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[cl.Store, DemoSummary]]:
    path = tmp_path_factory.mktemp("demo") / "events.db"
    store = cl.open_store(f"sqlite:///{path}")
    summary = run_demo(400, seed=11, store=store, traces=False)
    yield store, summary
    store.close()


def test_clusters_separate_the_seeded_fault_kinds(demo: tuple[cl.Store, DemoSummary]) -> None:
    store, summary = demo
    result = failure_clusters(store, top=100)
    kind = {trace: entries[-1].kind for trace, entries in summary.ledger.by_trace().items()}
    failed = [(e.error_type, e.error_message, str(kind[e.trace_id]))
              for e in store.events() if e.outcome in FAILED]
    purity = cluster_purity(result, failed)
    assert purity.failures == len(failed) > 60
    assert None not in purity.table  # every failed step is in a cluster
    assert purity.purity >= 0.9
    assert purity.kinds >= 8  # the run injected most kinds of fault ...
    assert purity.clusters <= 2 * purity.kinds  # ... and they are not split into crumbs
    assert purity.inverse_purity >= 0.8
    assert sum(c.count for c in result.clusters) == len(failed)


def test_the_failures_command_lists_the_demos_clusters(
        demo: tuple[cl.Store, DemoSummary]) -> None:
    from click.testing import CliRunner

    from closedloop.cli import main

    store, _ = demo
    result = CliRunner().invoke(main, ["failures", "--store", store.url],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for code in ("tag_missing", "instance_type", "destructive"):
        assert code in result.stdout


def test_purity_counts_a_mixed_cluster() -> None:
    from closedloop.learn import clusters_from_cells
    from closedloop.store import FailureCell

    cells = [FailureCell(error_type="agent", group="boom", task_type="t", model=None,
                         period=0, count=2, first_ts=0.0, last_ts=0.0)]
    result = clusters_from_cells(cells, {0: 2})
    got = cluster_purity(result, [("agent", "boom", "a"), ("agent", "boom", "b"),
                                  ("agent", "boom", "a")])
    assert (got.purity, got.inverse_purity, got.clusters, got.kinds) == (2 / 3, 1.0, 1, 2)
