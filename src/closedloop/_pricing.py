"""What a model call cost, in US dollars, from its tokens, model and provider.

A step's ``cost_usd`` is filled when its model calls were recorded with a model (the OpenAI
and Anthropic integrations do it; so does :meth:`~closedloop.Attempt.record_usage` with
``model=``) and no one set a cost: each call is priced by :class:`Prices`, the runtime's price
table (:attr:`closedloop.Runtime.prices`):

1. the user's own prices first (negotiated rates, private models): ``configure(prices=...)``
   with a mapping, or a JSON or TOML file (``configure(prices="prices.toml")`` or
   ``$CLOSEDLOOP_PRICES``). Keys are ``"provider:model"`` or ``"model"``, exact or with
   shell wildcards (``"gpt-4o*"``); values are US dollars per million tokens::

       {"openai:gpt-4o": {"input": 2.0, "output": 8.0, "cached_input": 1.0},
        "my-finetune-*": {"input": 0.5, "output": 1.5}}

   ``cached_input`` (tokens read from a prompt cache) and ``cache_write`` (tokens written to
   one, Anthropic) default to ``input``.
2. else the maintained table of the ``genai-prices`` package (the ``prices`` extra), which
   knows each provider's models, their dated snapshots and their price history; its bundled
   data is used, it never fetches anything.
3. else the call is **unpriced**: the step's ``cost_usd`` stays ``None`` (never a guess,
   never a partial sum), and the model is logged once.

``prices=False`` (or ``CLOSEDLOOP_PRICES=off``) turns pricing off. Token counts follow the
event: ``input_tokens`` counts every input token, cached ones included.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import closedloop._redact  # noqa: F401 - puts the redacting filter on closedloop's loggers
from closedloop._errors import ConfigError

log = logging.getLogger("closedloop")

PRICES_ENV = "CLOSEDLOOP_PRICES"
_MILLION = 1_000_000.0
_FIELDS = ("input", "output", "cached_input", "cache_write")


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million tokens of one model (``None``: as ``input``)."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
             cache_write_tokens: int = 0) -> float:
        """The price of a call; cached and cache-written tokens are among ``input_tokens``."""
        cached = min(max(cached_input_tokens, 0), input_tokens)
        written = min(max(cache_write_tokens, 0), input_tokens - cached)
        fresh = input_tokens - cached - written
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write is None else self.cache_write
        return (fresh * self.input + cached * cached_rate + written * write_rate
                + output_tokens * self.output) / _MILLION


def _price(key: str, value: object) -> Price:
    if isinstance(value, Price):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"price of {key!r} must be a mapping like {{'input': 2.5, "
                          f"'output': 10.0}} (USD per million tokens), got {value!r:.80}")
    unknown = set(value) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"price of {key!r}: unknown field {sorted(map(str, unknown))[0]!r}; "
                          f"use {', '.join(_FIELDS)} (USD per million tokens)")
    rates: dict[str, float | None] = {}
    for name in _FIELDS:
        rate = value.get(name)
        if rate is None and name in ("input", "output"):
            raise ConfigError(f"price of {key!r} needs {name!r} (USD per million tokens)")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                                 or not math.isfinite(rate) or rate < 0):
            raise ConfigError(f"price of {key!r}: {name} must be a number ≥ 0, got {rate!r:.40}")
        rates[name] = None if rate is None else float(rate)
    return Price(input=rates["input"] or 0.0, output=rates["output"] or 0.0,
                 cached_input=rates["cached_input"], cache_write=rates["cache_write"])


def load_prices(path: str | os.PathLike[str]) -> dict[str, Price]:
    """The prices in a JSON (``.json``) or TOML (any other name) file; a
    :class:`~closedloop.ConfigError` (one line) when it cannot be read or is malformed."""
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read prices file {file}: {exc.strerror or exc}") from None
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"prices file {file} is malformed: {str(exc).splitlines()[0]}") \
            from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"prices file {file} must hold a table of models")
    return check_prices(data)


def check_prices(prices: Mapping[str, Any]) -> dict[str, Price]:
    """``prices`` checked, each value a :class:`Price`."""
    if not isinstance(prices, Mapping):
        raise ConfigError(f"prices must be a mapping of model names to prices, got "
                          f"{type(prices).__name__}")
    out: dict[str, Price] = {}
    for key, value in prices.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"a price's key must be 'provider:model' or 'model', got {key!r}")
        out[key.strip().lower()] = _price(key, value)
    return out


class Prices:
    """The price table: the user's ``overrides`` first, then ``genai-prices`` (when
    ``table`` and installed). Thread-safe; lookups of a model are cached."""

    def __init__(self, overrides: Mapping[str, Any] | None = None, *, table: bool = True,
                 enabled: bool = True) -> None:
        self.overrides = check_prices(overrides or {})
        self.table = table
        self.enabled = enabled
        self._exact = {k: v for k, v in self.overrides.items() if not _is_pattern(k)}
        self._patterns = [(k, v) for k, v in self.overrides.items() if _is_pattern(k)]
        self._cache: dict[tuple[str | None, str], Price | None] = {}
        self._unknown: set[tuple[str | None, str]] = set()
        self._lock = threading.Lock()

    def override(self, model: str, provider: str | None) -> Price | None:
        """The user's price for ``model`` (of ``provider``), if one applies."""
        key = (provider, model)
        if key in self._cache:
            return self._cache[key]
        m = model.lower()
        names = (f"{provider.lower()}:{m}", m) if provider else (m,)
        found = next((self._exact[n] for n in names if n in self._exact), None)
        if found is None:
            found = next((p for n in names for k, p in self._patterns
                          if fnmatch.fnmatchcase(n, k)), None)
        self._cache[key] = found
        return found

    def cost(self, model: str | None, provider: str | None, input_tokens: int,
             output_tokens: int, *, cached_input_tokens: int = 0,
             cache_write_tokens: int = 0) -> float | None:
        """USD of one call, or ``None`` when the model has no known price (or pricing is
        off, or no model was named)."""
        if not self.enabled or not model:
            return None
        price = self.override(model, provider)
        if price is not None:
            return price.cost(input_tokens, output_tokens, cached_input_tokens,
                              cache_write_tokens)
        cost = self._from_table(model, provider, input_tokens, output_tokens,
                                cached=cached_input_tokens,
                                written=cache_write_tokens) if self.table else None
        if cost is None:
            key = (provider, model)
            if key not in self._unknown:
                with self._lock:
                    first = key not in self._unknown
                    self._unknown.add(key)
                if first:
                    log.warning("closedloop: no price for model %r of provider %r; its steps "
                                "have no cost_usd (give one with closedloop.configure(prices="
                                "{...}) or %s=FILE)", model[:80], (provider or "")[:40],
                                PRICES_ENV)
        return cost

    def _from_table(self, model: str, provider: str | None, input_tokens: int,
                    output_tokens: int, *, cached: int, written: int) -> float | None:
        calc = _genai_prices()
        if calc is None:
            return None
        calc_price, usage = calc
        cached = min(max(cached, 0), input_tokens)
        written = min(max(written, 0), input_tokens - cached)
        try:
            found = calc_price(usage(input_tokens=input_tokens, output_tokens=output_tokens,
                                     cache_read_tokens=cached or None,
                                     cache_write_tokens=written or None),
                               model, provider_id=provider)
            return float(found.total_price)
        except LookupError:
            return None
        except Exception:
            log.debug("closedloop: genai-prices could not price %r", model, exc_info=True)
            return None

    def __repr__(self) -> str:
        return (f"Prices({len(self.overrides)} overrides, table="
                f"{'genai-prices' if self.table and _genai_prices() else 'none'}, "
                f"enabled={self.enabled})")


def _is_pattern(key: str) -> bool:
    return any(c in key for c in "*?[")


@functools.cache
def _genai_prices() -> tuple[Any, Any] | None:
    """``(calc_price, Usage)`` of genai-prices, or None when it is not installed."""
    try:
        from genai_prices import Usage, calc_price
    except ImportError:
        return None
    return calc_price, Usage


def warm_up() -> None:
    """Load the price table in a daemon thread, so that the first priced call of an agent
    does not wait for it (the integrations call this when they instrument a client)."""
    if not _genai_prices.cache_info().currsize:
        threading.Thread(target=_prime, name="closedloop-prices", daemon=True).start()


def _prime() -> None:
    found = _genai_prices()
    if found is not None:  # the first lookup builds genai-prices' own indexes
        Prices().cost("gpt-4o", "openai", 1, 1)


def prices_from(value: object) -> Prices:
    """A :class:`Prices` from what :func:`closedloop.configure` accepts: a :class:`Prices`,
    a mapping of overrides, a file path, ``False``/``"off"`` (pricing off), or ``None``
    (the table alone)."""
    if isinstance(value, Prices):
        return value
    if value is None or value is True:
        return Prices()
    if value is False:
        return Prices(enabled=False)
    if isinstance(value, str) and value.strip().lower() in ("off", "0", "false", "no", "none"):
        return Prices(enabled=False)
    if isinstance(value, str | os.PathLike):
        return Prices(load_prices(value))
    if isinstance(value, Mapping):
        return Prices(value)
    raise ConfigError(f"prices must be a mapping, a file path, False or None, got "
                      f"{type(value).__name__}")


def prices_from_env() -> Prices:
    """The price table ``$CLOSEDLOOP_PRICES`` names (a file, or ``off``), else the table."""
    env = os.environ.get(PRICES_ENV, "").strip()
    return prices_from(env or None)
