"""Cost per step: the user's prices, then genai-prices' table, else no cost (never a guess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import closedloop as cl
from closedloop._pricing import Price, Prices, load_prices
from closedloop.telemetry import Metrics, Telemetry

GPT4O = "gpt-4o-2024-08-06"  # a dated snapshot: $2.50 in, $1.25 cached in, $10 out per MTok


def _step(*calls: dict[str, object], **loop: object) -> cl.StepEvent:
    def agent(x: int, attempt: cl.Attempt) -> int:
        for call in calls:
            attempt.record_usage(**call)  # type: ignore[arg-type]
        return x

    event = cl.Loop(agent, task_type="t", store=None, **loop).run(1).event  # type: ignore[arg-type]
    assert event is not None
    return event


def test_an_own_price_is_used_for_fresh_cached_written_and_output_tokens() -> None:
    price = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    # 1000 input = 600 fresh + 300 cache reads + 100 cache writes; 500 output
    assert price.cost(1000, 500, 300, 100) == pytest.approx(
        (600 * 3.0 + 300 * 0.3 + 100 * 3.75 + 500 * 15.0) / 1e6)
    assert Price(input=2.0, output=4.0).cost(1000, 10, 400) == pytest.approx(
        (1000 * 2.0 + 10 * 4.0) / 1e6)  # no cached rate: cached input at the input rate


def test_own_prices_win_over_the_table_provider_qualified_first_then_patterns() -> None:
    prices = Prices({"openai:gpt-4o*": {"input": 1.0, "output": 2.0},
                     "gpt-4o-2024-08-06": {"input": 5.0, "output": 5.0},
                     "my-*": {"input": 0.5, "output": 0.5}})
    # an exact name beats a pattern; a provider-qualified exact name would beat both
    assert prices.cost(GPT4O, "openai", 1_000_000, 0) == 5.0
    assert prices.cost("gpt-4o-mini", "openai", 1_000_000, 0) == 1.0
    assert prices.override("gpt-4o-mini", "azure") is None  # another provider's model
    assert prices.cost("MY-finetune", None, 2_000_000, 0) == 1.0  # names are case-blind


def test_the_table_prices_known_models_and_knows_no_unknown_one() -> None:
    prices = Prices()
    assert prices.cost(GPT4O, "openai", 1000, 500, cached_input_tokens=200) == pytest.approx(
        (800 * 2.5 + 200 * 1.25 + 500 * 10) / 1e6)
    assert prices.cost("no-such-model-xyz", "openai", 1000, 500) is None
    assert prices.cost(GPT4O, "no-such-provider", 1000, 500) is None
    assert Prices(table=False).cost(GPT4O, "openai", 1000, 500) is None
    assert Prices(enabled=False, overrides={GPT4O: {"input": 1, "output": 1}}).cost(
        GPT4O, "openai", 1000, 500) is None


def test_a_step_recorded_with_a_model_gets_its_cost() -> None:
    event = _step({"input_tokens": 1000, "output_tokens": 500, "cached_input_tokens": 200,
                   "model": GPT4O, "provider": "openai"},
                  {"input_tokens": 100, "output_tokens": 10, "model": GPT4O,
                   "provider": "openai"})
    assert event.cost_usd == pytest.approx(
        ((800 * 2.5 + 200 * 1.25 + 500 * 10) + (100 * 2.5 + 10 * 10)) / 1e6)


def test_one_unpriced_call_leaves_the_step_without_a_cost(
        caplog: pytest.LogCaptureFixture) -> None:
    event = _step({"input_tokens": 1000, "output_tokens": 5, "model": GPT4O,
                   "provider": "openai"},
                  {"input_tokens": 10, "output_tokens": 5, "model": "secret-model-7"})
    assert event.cost_usd is None  # never a partial sum
    assert event.model == "secret-model-7"
    assert "no price for model 'secret-model-7'" in caplog.text


def test_a_cost_the_user_sets_is_kept_and_steps_without_a_model_have_none() -> None:
    assert _step({"input_tokens": 1000, "output_tokens": 5, "model": GPT4O,
                  "provider": "openai", "cost_usd": 0.5}).cost_usd == 0.5
    assert _step({"input_tokens": 1000, "output_tokens": 5}).cost_usd is None
    assert _step({"cost_usd": 0.25}).cost_usd == 0.25


def test_configure_installs_own_prices_or_turns_pricing_off(tmp_path: Path) -> None:
    cl.configure(store="memory://", prices={"secret-model-7": {"input": 1.0, "output": 3.0}})
    assert _step({"input_tokens": 1_000_000, "output_tokens": 1_000_000,
                  "model": "secret-model-7"}).cost_usd == 4.0
    cl.configure(store="memory://", prices=False)
    assert _step({"input_tokens": 1000, "output_tokens": 5, "model": GPT4O,
                  "provider": "openai"}).cost_usd is None


def test_prices_come_from_a_json_or_toml_file_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    as_json = tmp_path / "prices.json"
    as_json.write_text(json.dumps({"m1": {"input": 1, "output": 2, "cached_input": 0.1}}))
    as_toml = tmp_path / "prices.toml"
    as_toml.write_text('["openai:m2"]\ninput = 3\noutput = 4\n')
    assert load_prices(as_json) == {"m1": Price(1.0, 2.0, 0.1)}
    assert load_prices(as_toml) == {"openai:m2": Price(3.0, 4.0)}
    monkeypatch.setenv("CLOSEDLOOP_PRICES", str(as_toml))
    cl.reset()
    assert _step({"input_tokens": 1_000_000, "output_tokens": 0, "model": "m2",
                  "provider": "openai"}).cost_usd == 3.0
    monkeypatch.setenv("CLOSEDLOOP_PRICES", "off")
    cl.reset()
    assert _step({"input_tokens": 1_000_000, "output_tokens": 0, "model": GPT4O,
                  "provider": "openai"}).cost_usd is None


@pytest.mark.parametrize(("prices", "message"), [
    ({"m": {"input": 1}}, "needs 'output'"),
    ({"m": {"input": 1, "output": -2}}, "must be a number ≥ 0"),
    ({"m": {"input": 1, "output": 2, "cache_reads": 1}}, "unknown field 'cache_reads'"),
    ({"m": 3}, "must be a mapping"),
    ({"": {"input": 1, "output": 1}}, "'provider:model' or 'model'"),
    ([1, 2], "must be a mapping, a file path"),
])
def test_bad_prices_are_one_line_config_errors(prices: object, message: str) -> None:
    with pytest.raises(cl.ConfigError) as err:
        cl.configure(prices=prices)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_prices_file_is_a_one_line_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("[m\ninput=")
    for path, message in ((bad, "is malformed"), (tmp_path / "none.json", "cannot read")):
        with pytest.raises(cl.ConfigError, match=message) as err:
            cl.configure(prices=str(path))
        assert "\n" not in str(err.value)


def test_cost_is_a_prometheus_counter_per_task_type() -> None:
    registry = CollectorRegistry()
    pipeline = Telemetry([Metrics(registry)], flush_interval=60)
    cl.configure(store="memory://", telemetry=pipeline,
                 prices={"m": {"input": 1.0, "output": 1.0}})

    def agent(x: int, attempt: cl.Attempt) -> int:
        attempt.record_usage(250_000, 0, model="m")
        return x

    for task, steps in (("plan", 4), ("apply", 2)):
        loop = cl.Loop(agent, task_type=task)
        for i in range(steps):
            loop.run(i)
    assert pipeline.flush(10)
    value = registry.get_sample_value
    assert value("closedloop_cost_usd_total", {"task_type": "plan"}) == pytest.approx(1.0)
    assert value("closedloop_cost_usd_total", {"task_type": "apply"}) == pytest.approx(0.5)
