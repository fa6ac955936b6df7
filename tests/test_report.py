"""The learning layer's report: figures worked out by hand from real loop runs."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import closedloop as cl
from _report_scenario import run_scenario
from closedloop.cli import main
from closedloop.learn import (
    MessageCount,
    Rate,
    Report,
    build_report,
    message_group,
    percentile,
    report_from_store,
)

T0 = 1_700_000_000.0
EVERY_OUTCOME = [o.value for o in cl.Outcome]


def ms(value: float) -> object:
    """A latency as measured through a float clock: equal up to rounding."""
    return pytest.approx(value, rel=1e-9, abs=1e-9)


@pytest.fixture
def report(store: cl.Store) -> Report:
    run_scenario(store, T0)
    return report_from_store(store)


def test_one_row_per_task_type_sorted_by_name(report: Report) -> None:
    assert [r.task_type for r in report.rows] == ["provision", "review", "summarize"]
    assert [r.runs for r in report.rows] == [6, 2, 2]


def test_validation_pass_rate_counts_the_last_attempt_among_validated_steps(
    report: Report,
) -> None:
    assert report.row("provision").validation == Rate(count=5, total=6)
    # the paused step never reached validation, the agent crash neither
    assert report.row("review").validation == Rate(count=1, total=1)
    assert report.row("summarize").validation == Rate(count=1, total=1)


def test_reask_rate_and_reask_success(report: Report) -> None:
    provision = report.row("provision")
    assert provision.reask == Rate(count=3, total=6)
    assert provision.reask_success == Rate(count=2, total=3)


def test_a_rate_with_nothing_to_count_is_none_not_zero(report: Report) -> None:
    summarize = report.row("summarize")
    assert summarize.reask_success == Rate(count=0, total=0)
    assert summarize.reask_success.value is None
    assert summarize.verification.value is None
    assert summarize.to_dict()["verification"] == {"count": 0, "total": 0, "rate": None}


def test_verification_pass_rate_is_among_verified_steps(report: Report) -> None:
    assert report.row("provision").verification == Rate(count=3, total=5)


def test_outcomes_list_every_outcome_including_paused(report: Report) -> None:
    review = report.row("review")
    assert list(review.outcomes) == EVERY_OUTCOME
    assert {k: v for k, v in review.outcomes.items() if v} == {"suggested": 1, "paused": 1}
    assert {k: v for k, v in report.row("provision").outcomes.items() if v} == {
        "succeeded": 3, "failed": 3}


def test_latency_percentiles_are_nearest_rank(report: Report) -> None:
    provision = report.row("provision").latency  # 10, 20, 30, 40, 50, 60 ms
    assert provision.p50_ms == ms(30)
    assert provision.p95_ms == ms(60)
    assert provision.mean_ms == ms(35)
    assert provision.max_ms == ms(60)
    summarize = report.row("summarize").latency  # 5, 7 ms
    assert (summarize.p50_ms, summarize.p95_ms, summarize.mean_ms) == (ms(5), ms(7), ms(6))


def test_tokens_add_up_every_attempt(report: Report) -> None:
    provision = report.row("provision").tokens  # 9 attempts of 100 in / 10 out
    assert (provision.input_total, provision.output_total) == (900, 90)
    assert (provision.input_per_run, provision.output_per_run) == (150.0, 15.0)


def test_top_errors_by_count_with_share_of_runs(report: Report) -> None:
    assert [(e.error_type, e.count, e.share) for e in report.row("provision").top_errors] == [
        ("verification", 2, 2 / 6), ("validation", 1, 1 / 6)]


def test_overall_row_aggregates_every_task_type(report: Report) -> None:
    overall = report.overall
    assert overall.task_type is None
    assert overall.runs == 10
    assert overall.validation == Rate(count=7, total=8)
    assert overall.reask == Rate(count=3, total=8)
    assert overall.reask_success == Rate(count=2, total=3)
    assert overall.verification == Rate(count=3, total=5)
    assert {k: v for k, v in overall.outcomes.items() if v} == {
        "succeeded": 4, "suggested": 1, "failed": 3, "error": 1, "paused": 1}
    # latencies 0 3 5 7 10 20 30 40 50 60: rank ceil(5) = 5th, ceil(9.5) = 10th
    assert (overall.latency.p50_ms, overall.latency.p95_ms) == (ms(10), ms(60))
    assert overall.latency.mean_ms == ms(22.5)
    assert (overall.tokens.input_total, overall.tokens.output_per_run) == (1200, 12.0)
    assert (overall.first_ts, overall.last_ts) == (T0 + 1, T0 + 10)


def test_top_errors_break_ties_by_name_and_are_bounded(store: cl.Store) -> None:
    run_scenario(store, T0)
    overall = report_from_store(store, top_errors=3).overall
    # validation (1) ties with agent and paused and is cut by the bound
    assert [(e.error_type, e.count) for e in overall.top_errors] == [
        ("verification", 2), ("agent", 1), ("paused", 1)]
    assert report_from_store(store, top_errors=0).overall.top_errors == ()


def test_since_keeps_only_events_at_or_after_it(store: cl.Store) -> None:
    run_scenario(store, T0)
    run_scenario(store, T0 + 1000)
    assert report_from_store(store).overall.runs == 20
    recent = report_from_store(store, since=T0 + 1001)
    assert recent.overall.runs == 10
    assert recent.since == T0 + 1001
    assert recent.overall.first_ts == T0 + 1001


def test_task_type_filter_reports_only_that_task_type(store: cl.Store) -> None:
    run_scenario(store, T0)
    only = report_from_store(store, task_type="summarize")
    assert [r.task_type for r in only.rows] == ["summarize"]
    assert only.overall.runs == 2
    assert only.task_type == "summarize"


def test_no_events_make_an_empty_report(store: cl.Store) -> None:
    empty = report_from_store(store)
    assert empty.empty
    assert empty.rows == ()
    assert empty.overall.latency.p50_ms is None
    assert empty.overall.tokens.input_per_run is None
    assert empty.overall.outcomes == dict.fromkeys(EVERY_OUTCOME, 0)


def test_to_dict_is_json_with_stable_keys(report: Report) -> None:
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert list(data) == ["since", "until", "task_type", "overall", "task_types"]
    row_keys = ["task_type", "runs", "first_ts", "last_ts", "validation", "reask",
                "reask_success", "verification", "outcomes", "latency", "tokens", "top_errors",
                "top_messages", "cost"]
    assert list(data["overall"]) == row_keys
    assert all(list(row) == row_keys for row in data["task_types"])
    provision = data["task_types"][0]
    assert provision["reask"] == {"count": 3, "total": 6, "rate": 0.5}
    assert list(provision["latency"]) == ["p50_ms", "p95_ms", "mean_ms", "max_ms"]
    assert list(provision["tokens"]) == ["input_total", "output_total", "input_per_run",
                                         "output_per_run", "cached_input_total"]
    assert list(provision["cost"]) == ["total_usd", "priced", "per_success_usd"]
    assert provision["top_errors"][0] == {"error_type": "verification", "count": 2,
                                          "share": 2 / 6}
    lands = "lands: [error] failed: check lands returned False"
    assert provision["top_messages"][0] == {"error_type": "verification", "message": lands,
                                            "example": lands, "count": 2, "share": 2 / 6}


def test_build_report_reads_its_events_once(store: cl.Store) -> None:
    run_scenario(store, T0)
    consumed: list[cl.StepEvent] = []

    def once() -> Iterator[cl.StepEvent]:
        for event in store.events():
            consumed.append(event)
            yield event

    assert build_report(once()).overall.runs == 10
    assert len(consumed) == 10


def test_report_does_not_depend_on_event_order(store: cl.Store) -> None:
    run_scenario(store, T0)
    events = list(store.events())
    shuffled = events[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != events
    assert build_report(shuffled) == build_report(events)


def test_memory_and_sqlite_stores_give_the_same_report(
    store: cl.Store, memory_store: cl.Store
) -> None:
    run_scenario(store, T0)
    run_scenario(memory_store, T0)
    from_sqlite = report_from_store(store).to_dict()
    from_memory = report_from_store(memory_store).to_dict()
    assert json.dumps(from_sqlite, sort_keys=True) == json.dumps(from_memory, sort_keys=True)


def test_outcomes_unknown_to_this_version_are_still_counted() -> None:
    newer = cl.StepEvent(T0, "t" * 32, "a", "x", "autonomous", "escalated", 1, 0, 0, 1.0,
                         True, None, None, None, 0.0, 0.0, 0.0, 0.0, None)
    outcomes = build_report([newer]).overall.outcomes
    assert outcomes["escalated"] == 1
    assert list(outcomes)[: len(EVERY_OUTCOME)] == EVERY_OUTCOME


@pytest.mark.parametrize(
    ("p", "expected"),
    [(50, 3.0), (95, 5.0), (100, 5.0), (20, 1.0), (21, 2.0), (0.001, 1.0)],
)
def test_percentile_is_nearest_rank(p: float, expected: float) -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], p) == expected


@given(values=st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200),
       p=st.floats(min_value=0.01, max_value=100))
def test_percentile_is_the_smallest_value_with_p_percent_at_or_below(
    values: list[float], p: float
) -> None:
    ordered = sorted(values)
    result = percentile(ordered, p)
    assert result in ordered
    at_or_below = sum(1 for v in ordered if v <= result)
    assert at_or_below * 100 >= p * len(ordered) * (1 - 1e-12)
    below = sum(1 for v in ordered if v < result)
    assert below * 100 < p * len(ordered)


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 50) is None


@pytest.mark.parametrize("p", [0, -1, 101, math.nan])
def test_percentile_outside_0_100_is_a_config_error(p: float) -> None:
    with pytest.raises(cl.ConfigError, match="percentile"):
        percentile([1.0], p)


def test_negative_top_errors_is_a_config_error() -> None:
    with pytest.raises(cl.ConfigError, match="top_errors"):
        build_report([], top_errors=-1)


def test_report_includes_semantic_scores_per_task_type(tmp_path: Path) -> None:
    from closedloop.telemetry import record_score

    url = f"sqlite:///{tmp_path / 'scored.db'}"
    day = 1_790_000_000.0
    with cl.open_store(url) as store:
        loop = cl.Loop(lambda t, a: t, task_type="answer", validators=[lambda p: p > 0],
                       store=store, guards=(), wallclock=lambda: day)
        ok, bad = loop.run(1), loop.run(-1)
        store.flush()
        record_score(ok.trace_id, "satisfaction", 5, store=store, clock=lambda: day)
        record_score(bad.trace_id, "satisfaction", 2, store=store, clock=lambda: day + 86400)
        record_score(ok.trace_id, "quality", "good", source="model", store=store,
                     clock=lambda: day)

    result = CliRunner().invoke(main, ["report", "--store", url, "--json"])
    assert result.exit_code == 0, result.output
    (scores,) = json.loads(result.output)["scores"]
    assert scores["task_type"] == "answer"
    assert scores["success_rate"] == 0.5
    assert scores["scores"]["satisfaction"] == {"n": 2, "mean": 3.5}
    assert scores["labels"]["quality"] == {"good": 1}
    assert list(scores["daily"].values()) == [{"satisfaction": 5.0}, {"satisfaction": 2.0}]

    table = CliRunner().invoke(main, ["report", "--store", url])
    assert table.exit_code == 0, table.output
    assert "Semantic scores" in table.output
    assert "3.5 (2)" in table.output
    assert "Scores by day" in table.output


def test_report_json_has_an_empty_scores_list_without_scores(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    with cl.open_store(url) as store:
        cl.Loop(lambda t, a: t, task_type="t", store=store).run(1)
    result = CliRunner().invoke(main, ["report", "--store", url, "--json"])
    assert json.loads(result.output)["scores"] == []
    assert "Semantic scores" not in CliRunner().invoke(main, ["report", "--store", url]).output


def test_top_failure_messages_per_task_type_and_overall(report: Report) -> None:
    verification = MessageCount(error_type="verification",
                                message="lands: [error] failed: check lands returned False",
                                example="lands: [error] failed: check lands returned False",
                                count=2, share=2 / 6)
    malformed = "well_formed: [error] invalid: proposal 'bad' is malformed"
    assert report.row("provision").top_messages == (
        verification, MessageCount(error_type="validation", message=malformed,
                                   example=malformed, count=1, share=1 / 6))
    assert [(m.error_type, m.message, m.count) for m in report.overall.top_messages] == [
        ("verification", verification.message, 2),
        ("agent", "RuntimeError: model timed out", 1),
        ("paused", "validation failure spike", 1)]


@pytest.mark.parametrize(("message", "group"), [
    ("i-0a1b2c is a m5.large, requested c5.xlarge", "<*> is a <*>, requested <*>"),
    ("has tag cost-center='cc-614-x', wanted 'cc-614'", "has tag cost-center='<*>', wanted '<*>'"),
    ("Invalid JSON: trailing comma at line 1 column 205",
     "Invalid JSON: trailing comma at line <*> column <*>"),
    ("no tag 'env'   (wanted\n'staging')", "no tag 'env' (wanted 'staging')"),
    ("x" * 600, "x" * 500 + "…"),
])
def test_message_group_masks_words_holding_digits(message: str, group: str) -> None:
    assert message_group(message) == group


def _failed(ts: float, message: str, task_type: str = "t") -> cl.StepEvent:
    return cl.StepEvent(ts, "0" * 32, "a", task_type, "autonomous", "failed", 1, 0, 0, 1.0,
                        True, False, "verification", message, 0.0, 0.0, 0.0, 0.0, None)


def test_messages_differing_only_in_values_are_one_group_with_the_latest_example() -> None:
    events = [_failed(1.0, "i-01 is a t3.large, wanted t3.micro"),
              _failed(2.0, "i-02 is a m5.large, wanted c5.xlarge"),
              _failed(3.0, "i-03 has no tag 'owner'"),
              _failed(4.0, "i-04 is a t3.nano, wanted t3.small")]
    rows = build_report(events, top_messages=1).overall.top_messages
    assert rows == (MessageCount(error_type="verification", message="<*> is a <*>, wanted <*>",
                                 example="i-04 is a t3.nano, wanted t3.small", count=3,
                                 share=3 / 4),)
    assert build_report(events, top_messages=0).overall.top_messages == ()


def test_the_overall_row_merges_groups_across_task_types() -> None:
    events = [_failed(1.0, "disk 1 full", "a"), _failed(2.0, "disk 2 full", "b")]
    (group,) = build_report(events).overall.top_messages
    assert (group.message, group.example, group.count) == ("disk <*> full", "disk 2 full", 2)


def test_the_overall_rows_example_is_the_latest_message_of_any_task_type() -> None:
    events = [_failed(1.0, "disk 1 full", "a"), _failed(2.0, "disk 2 full", "b"),
              _failed(3.0, "disk 3 full", "a")]
    (group,) = build_report(events).overall.top_messages
    assert (group.example, group.count) == ("disk 3 full", 3)


def test_distinct_message_groups_are_bounded() -> None:
    events = [_failed(float(i), f"unique word {chr(0x4E00 + i)}") for i in range(1500)]
    overall = build_report(events, top_messages=2000).overall
    assert len(overall.top_messages) == 1001  # 1000 groups, then one "other" per error type
    other = overall.top_messages[0]
    assert (other.message, other.count) == ("(other messages)", 500)
    assert sum(m.count for m in overall.top_messages) == 1500


def test_negative_top_messages_is_a_config_error() -> None:
    with pytest.raises(cl.ConfigError, match="top_messages"):
        build_report([], top_messages=-1)


# ----- closedloop steps ---------------------------------------------------------------------

def _steps(url: str, *args: str) -> Any:
    result = CliRunner().invoke(main, ["steps", "--store", url, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_steps_pages_through_every_step_newest_first(store: cl.Store) -> None:
    run_scenario(store, T0)
    listed: list[dict[str, Any]] = []
    cursor: list[str] = []
    while True:
        page = _steps(store.url, "--limit", "3", *cursor)
        listed.extend(page["steps"])
        assert len(listed) <= 10, "the cursor does not move on"
        if page["next_cursor"] is None:
            break
        cursor = ["--cursor", page["next_cursor"]]
    assert [s["ts"] for s in listed] == [T0 + i for i in range(10, 0, -1)]
    assert {s["trace_id"] for s in listed} == {e.trace_id for e in store.events()}
    assert listed[0]["time"].endswith("Z")


def test_steps_filters_by_task_type_outcome_error_type_and_time(store: cl.Store) -> None:
    run_scenario(store, T0)
    failed = _steps(store.url, "--task-type", "provision", "--outcome", "failed")["steps"]
    assert [s["error_type"] for s in failed] == ["verification", "verification",
                                                "validation"]
    agent = _steps(store.url, "--error-type", "agent")["steps"]
    assert [s["task_type"] for s in agent] == ["summarize"]
    window = _steps(store.url, "--since", "2023-11-14T22:13:23Z",
                    "--until", "2023-11-14T22:13:26Z")["steps"]
    assert [s["ts"] for s in window] == [T0 + 5, T0 + 4, T0 + 3]


def test_steps_prints_stored_text_literally(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    with cl.open_store(url) as s:
        s.record(_failed(T0, "[bold red]boom[/] :smile: \x1b[31m"))
    result = CliRunner().invoke(main, ["steps", "--store", url])
    assert result.exit_code == 0, result.output
    text = "".join(result.output.split())
    assert "[boldred]boom[/]:smile:\\x1b[31m" in text


def test_steps_says_when_nothing_matches(store: cl.Store) -> None:
    run_scenario(store, T0)
    result = CliRunner().invoke(main, ["steps", "--store", store.url, "--task-type", "none"])
    assert result.exit_code == 1
    assert "no steps match" in result.output
    as_json = CliRunner().invoke(main, ["steps", "--store", store.url, "--task-type", "none",
                                        "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {"steps": [], "next_cursor": None}


def test_steps_with_a_cursor_of_no_page_is_a_usage_error(store: cl.Store) -> None:
    run_scenario(store, T0)
    result = CliRunner().invoke(main, ["steps", "--store", store.url, "--cursor", "nope"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "not a page cursor" in result.output


def test_the_steps_page_limit_is_the_stores_own() -> None:
    from closedloop.cli import _report
    from closedloop.store import MAX_PAGE

    assert _report.MAX_PAGE == MAX_PAGE


def test_report_reads_no_event_when_the_store_answers_in_sql(store: cl.Store) -> None:
    run_scenario(store, T0)
    reads: list[object] = []
    backend = store.backend
    original = backend.iter_events

    def counted(query: Any) -> Any:
        reads.append(query)
        return original(query)

    backend.iter_events = counted  # type: ignore[method-assign]
    assert report_from_store(store).overall.runs == 10
    assert reads == []
