"""The learning layer's answers: trends with intervals that tell a change from noise, factors
ranked by what they explain, failure clusters by what went wrong; and the commands that print
them (``closedloop trends``, ``failures``, ``factors``), stored text shown literally."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from closedloop.cli import main
from closedloop.cli._common import literal
from closedloop.cli._learn import sparkline
from closedloop.learn import factors, failure_clusters, parse_issues, trends
from closedloop.learn._stats import chi2_sf, g_test, histogram_percentile, wilson, z_of
from closedloop.store import latency_bounds, latency_bucket

DAY = 86_400.0
T0 = 1_790_035_200.0  # a midnight, UTC
Z = z_of(0.95)


def ev(i: int, ts: float, **kw: Any) -> cl.StepEvent:
    base = cl.StepEvent(
        ts=ts, trace_id=f"{i:032x}", agent_id="a", task_type="deploy", autonomy="autonomous",
        outcome="succeeded", attempts=1, input_tokens=100, output_tokens=20, latency_ms=20.0,
        validation_passed=True, verification_passed=True, error_type=None, error_message=None,
        propose_ms=1.0, validate_ms=1.0, act_ms=1.0, verify_ms=1.0, detail=None)
    return base._replace(**kw)


def fail(i: int, ts: float, message: str, error_type: str = "verification",
         **kw: Any) -> cl.StepEvent:
    return ev(i, ts, outcome="failed" if error_type != "agent" else "error",
              verification_passed=False if error_type == "verification" else None,
              error_type=error_type, error_message=message, **kw)


def fill(url: str, events: list[cl.StepEvent]) -> cl.Store:
    store = cl.open_store(url)
    for e in events:
        store.record(e)
    assert store.flush()
    return store


# ----- statistics -----------------------------------------------------------------------

def test_wilson_interval_matches_the_textbook() -> None:
    est = wilson(81, 263, Z)
    assert est is not None
    assert (round(est.low, 4), round(est.high, 4)) == (0.2553, 0.3662)  # Newcombe 1998
    zero = wilson(0, 10, Z)
    assert zero is not None and zero.low == 0.0 and 0.27 < zero.high < 0.28
    assert wilson(0, 0, Z) is None


def test_chi_square_tail_and_g_test() -> None:
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(0.0, 3) == 1.0
    g, bits = g_test([(100, 50), (100, 50)])
    assert (g, bits) == (0.0, 0.0)
    g, bits = g_test([(100, 100), (100, 0)])  # the value decides failure: one whole bit
    assert bits == pytest.approx(1.0)


def test_a_histogram_percentile_lies_in_the_bucket_of_the_exact_one() -> None:
    rng = random.Random(4)
    values = sorted(rng.lognormvariate(3, 1) for _ in range(5000))
    counts: dict[int, int] = {}
    for v in values:
        counts[latency_bucket(v)] = counts.get(latency_bucket(v), 0) + 1
    est = histogram_percentile(counts, 95, Z, latency_bounds)
    assert est is not None
    exact = values[4749]
    low, high = latency_bounds(latency_bucket(exact))
    assert low <= est.value < high
    assert est.low <= exact <= est.high


# ----- trends ---------------------------------------------------------------------------

def _days(pass_rates: list[float], per_day: int = 400, seed: int = 1) -> list[cl.StepEvent]:
    rng = random.Random(seed)
    out = []
    for day, rate in enumerate(pass_rates):
        for j in range(per_day):
            i = day * per_day + j
            ts = T0 + day * DAY + j * (DAY / per_day)
            out.append(ev(i, ts) if rng.random() < rate else
                       fail(i, ts, f"i-{i:x} is a t3.large, requested m5.xlarge"))
    return out


@pytest.fixture
def drop(tmp_path: Path) -> Iterator[cl.Store]:
    """Five days at 98 % verified, then a day at 85 %."""
    store = fill(f"sqlite:///{tmp_path / 'drop.db'}", _days([0.98] * 5 + [0.85]))
    yield store
    store.close()


def test_a_real_drop_is_a_significant_change(drop: cl.Store) -> None:
    result = trends(drop)
    (series,) = result.series
    assert series.value == "deploy" and series.steps == 2400
    assert result.periods == tuple(T0 + d * DAY for d in range(6))  # from the first step
    change = series.changes["verification_pass_rate"]
    assert change.significant and change.delta < -0.05
    assert change.high < 0
    assert not series.changes["tokens_per_step"].significant  # unchanged: 120 every step


def test_noise_is_no_significant_change(tmp_path: Path) -> None:
    with fill(f"sqlite:///{tmp_path / 'flat.db'}", _days([0.9] * 6, seed=9)) as store:
        result = trends(store, periods=6)
    (series,) = result.series
    assert len(series.points) == 6
    assert not series.changes["verification_pass_rate"].significant
    assert not series.changes["failure_rate"].significant


def test_trends_split_by_model_and_label(memory_store: cl.Store) -> None:
    for i in range(40):
        memory_store.record(ev(i, T0 + i, model="m-a" if i % 2 else "m-b",
                               labels={"tier": "gold"} if i < 10 else None))
    assert memory_store.flush()
    by_model = trends(memory_store, by="model")
    assert [(s.value, s.steps) for s in by_model.series] == [("m-a", 20), ("m-b", 20)]
    by_tier = trends(memory_store, by="label:tier", window="week")
    assert [(s.value, s.steps) for s in by_tier.series] == [(None, 30), ("gold", 10)]


def test_trends_of_an_empty_store_are_empty(memory_store: cl.Store) -> None:
    assert trends(memory_store).empty


# ----- factors --------------------------------------------------------------------------

def test_the_dimension_that_decides_failure_ranks_first(memory_store: cl.Store) -> None:
    rng = random.Random(2)
    for i in range(2000):
        model = rng.choice(["good", "bad"])
        ts = T0 + rng.randrange(int(DAY))
        failed = rng.random() < (0.4 if model == "bad" else 0.05)
        labels = {"region": rng.choice(["eu", "us"])}
        memory_store.record(fail(i, ts, "x", model=model, labels=labels) if failed
                            else ev(i, ts, model=model, labels=labels))
    assert memory_store.flush()
    result = factors(memory_store, task_type="deploy")
    first = result.factors[0]
    assert first.dimension == "model" and first.significant
    assert [v.value for v in first.values] == ["bad", "good"]
    assert first.values[0].rate.low > first.values[1].rate.high
    region = next(f for f in result.factors if f.dimension == "label:region")
    assert not region.significant  # independent of failure
    assert region.explained < first.explained


# ----- clusters -------------------------------------------------------------------------

def test_parse_issues_reads_the_loops_failure_messages() -> None:
    issues = parse_issues("verify: [error] tag_missing at instance.tags.env: no tag; a b; "
                          "verify: [error] count: expected 1; other: unknown: timed out")
    assert issues is not None
    assert [(i.check, i.code, i.location, i.text) for i in issues] == [
        ("verify", "tag_missing", "instance.tags.env", "no tag; a b"),
        ("verify", "count", None, "expected 1"),
        ("other", "unknown", None, "timed out")]
    assert parse_issues("RuntimeError: boom") is None


def _mixed() -> list[cl.StepEvent]:
    out = []
    for i in range(60):
        ts = T0 + i * 600.0
        kind = i % 3
        if kind == 0:
            out.append(fail(i, ts, f"check: [error] tag_missing at instance.tags.env: "
                                   f"i-{i:x} has no tag 'env' (wanted 'dev')", model="m1"))
        elif kind == 1:
            out.append(fail(i, ts, f"check: [error] instance_type at instance.instance_type: "
                                   f"i-{i:x} is a t3.large, requested m5.xlarge", model="m2"))
        else:
            out.append(fail(i, ts, f"TimeoutError: model call {i} timed out after {i % 7} s",
                            error_type="agent", task_type="plan"))
        out.append(ev(1000 + i, ts + 1))
    return out


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_clusters_separate_what_went_wrong(kind: str, tmp_path: Path) -> None:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'c.db'}"
    with fill(url, _mixed()) as store:
        result = failure_clusters(store)
    assert (result.failures, result.steps) == (60, 120)
    assert [(c.count, c.error_type) for c in result.clusters] == [
        (20, "agent"), (20, "verification"), (20, "verification")]
    titles = " | ".join(c.title for c in result.clusters)
    assert "tag_missing" in titles and "instance_type" in titles and "timed out" in titles
    tags = next(c for c in result.clusters if "tag_missing" in c.title)
    assert tags.locations == (("instance.tags.env", 20),)
    assert tags.models == (("m1", 20),) and tags.task_types == (("deploy", 20),)
    assert tags.examples == (f"{57:032x}", f"{54:032x}", f"{51:032x}")  # newest first
    assert tags.first_ts == T0 and tags.last_ts == T0 + 57 * 600.0
    assert sum(n for _, n in tags.periods) == 20


def test_a_growing_cluster_is_a_significant_change(memory_store: cl.Store) -> None:
    for i in range(400):
        day = i // 200
        failed = (i % 200) < (4 if day == 0 else 60)
        ts = T0 + day * DAY + (i % 200) * 60.0
        memory_store.record(fail(i, ts, "TimeoutError: upstream") if failed else ev(i, ts))
    assert memory_store.flush()
    (cluster,) = failure_clusters(memory_store).clusters
    assert cluster.change is not None and cluster.change.significant
    assert cluster.change.delta == pytest.approx(0.3 - 0.02)


# ----- the commands ---------------------------------------------------------------------

HOSTILE = "[red]x[/red] \x1b[31mred\x1b[0m a\rb n\x00ul :thumbs_up: \u202eevil"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop",
                              env={"COLUMNS": "400"})


def strings(data: object) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield k
            yield from strings(v)
    elif isinstance(data, list):
        for v in data:
            yield from strings(v)


@pytest.fixture
def hostile(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'hostile.db'}"
    events = []
    for i in range(40):
        ts = T0 + i * 3600.0
        events.append(ev(i, ts, task_type=f"deploy{HOSTILE}", model=f"model{HOSTILE}",
                         labels={"tier": HOSTILE}))
        events.append(fail(100 + i, ts + 1, f"RuntimeError: {HOSTILE}", error_type="agent",
                           task_type=f"deploy{HOSTILE}", model=f"model{HOSTILE}"))
    fill(url, events).close()
    return url


@pytest.mark.parametrize("command", [
    ("trends",), ("trends", "--by", "model"), ("trends", "--by", "label:tier"),
    ("failures",), ("factors", "--task-type", f"deploy{HOSTILE}")])
def test_commands_print_stored_text_literally(hostile: str, command: tuple[str, ...]) -> None:
    result = invoke(*command, "--store", hostile)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    flat = " ".join(result.stdout.replace("│", " ").split())
    for raw in ("\x1b", "\x00", "\r", "\u202e"):
        assert raw not in result.stdout
    assert "[red]x[/red]" in flat
    assert literal("\x1b[31mred") in flat


@pytest.mark.parametrize("command", [("trends",), ("failures",),
                                     ("factors", "--task-type", f"deploy{HOSTILE}")])
def test_json_output_carries_the_raw_text(hostile: str, command: tuple[str, ...]) -> None:
    result = invoke(*command, "--json", "--store", hostile)
    assert result.exit_code == 0, result.output
    assert any(HOSTILE in text for text in strings(json.loads(result.stdout)))


def test_an_empty_window_is_one_line_and_exit_1(hostile: str) -> None:
    for command in (("trends", "--task-type", "nothing"), ("failures", "--since", "1d"),
                    ("factors", "--task-type", "nothing")):
        result = invoke(*command, "--store", hostile)
        assert result.exit_code == 1, result.output
        assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    (("trends", "--by", f"colour{HOSTILE}"), "cannot split by"),
    (("trends", "--window", "month"), "month"),
    (("factors",), "--task-type")])
def test_usage_errors_are_one_line(hostile: str, args: tuple[str, ...], message: str) -> None:
    result = invoke(*args, "--store", hostile)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "\x1b" not in result.stderr


def test_sparkline_scales_from_low_to_high() -> None:
    assert sparkline([0.0, 0.5, 1.0, None]) == "▁▅█ "
    assert sparkline([2.0, 2.0]) == "▁▁"
    assert sparkline([None]) == ""


def test_the_same_latency_distribution_twice_is_no_significant_change(
        memory_store: cl.Store) -> None:
    rng = random.Random(12)
    for day in range(2):
        for j in range(300):
            memory_store.record(ev(day * 1000 + j, T0 + day * DAY + j,
                                   latency_ms=rng.lognormvariate(3, 1)))
    assert memory_store.flush()
    (series,) = trends(memory_store).series
    assert not series.changes["latency_p50_ms"].significant
    assert not series.changes["latency_p95_ms"].significant
    for point in series.points:
        p95 = point.figures["latency_p95_ms"]
        assert p95.low <= p95.value <= p95.high
        assert (p95.low, p95.high) == (latency_bounds(latency_bucket(p95.low))[0],
                                       latency_bounds(latency_bucket(p95.high * 0.999999))[1])
