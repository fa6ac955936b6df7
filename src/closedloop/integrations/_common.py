"""What the OpenAI and Anthropic instrumentations share: the model-call span, the wrappers for
sync, async and streaming calls, and the 429 hook on the SDK's HTTP client.

Provider modules only say how to read a response or a stream chunk (:class:`Provider`); the
bookkeeping — GenAI span attributes, usage into :func:`closedloop.current_attempt`, latency,
errors — is written once here.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from opentelemetry.trace import SpanKind

from closedloop import _runtime
from closedloop._pricing import warm_up
from closedloop.loop import current_attempt
from closedloop.runs import current_run
from closedloop.telemetry import SpanRecord, Telemetry, active_telemetry

log = logging.getLogger("closedloop.integrations")

RateLimitHook = Callable[[str, "float | None"], object]
"""``on_rate_limited(key, retry_after_s)``: told of every HTTP 429 a provider returns.

``key`` is ``"<provider>:<model>"`` (or the provider alone when the model is unknown);
``retry_after_s`` is the provider's ``Retry-After`` in seconds, or None. The backpressure
layer (or :meth:`closedloop.telemetry.Metrics.rate_limited`) plugs in here.
"""


class Provider(Protocol):
    """How one SDK's responses and stream events are read."""

    name: str

    def on_response(self, call: ModelCall, response: Any) -> None:
        """Record usage, model, finish reasons (and output content) of a full response."""

    def on_chunk(self, call: ModelCall, chunk: Any) -> None:
        """Record whatever one stream event carries."""

    def request_content(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The request's messages (and system instructions), for content capture."""


_REQUEST_PARAMS = (("temperature", "gen_ai.request.temperature"),
                   ("top_p", "gen_ai.request.top_p"),
                   ("max_tokens", "gen_ai.request.max_tokens"),
                   ("max_completion_tokens", "gen_ai.request.max_tokens"),
                   ("max_output_tokens", "gen_ai.request.max_tokens"))


def given(value: Any) -> bool:
    """A request argument the caller gave: not None, nor the SDKs' ``NotGiven``/``Omit``
    placeholders (their helpers pass every parameter, most as a placeholder)."""
    return value is not None and type(value).__name__ not in ("NotGiven", "Omit")


class ModelCall:
    """One model call: its GenAI span (when a pipeline is active) and its usage."""

    __slots__ = (
        "_done",
        "cache_read_tokens",
        "cache_write_tokens",
        "finish_reasons",
        "input_tokens",
        "output_parts",
        "output_tokens",
        "provider",
        "request_model",
        "response_id",
        "response_model",
        "span",
        "started",
        "telemetry",
    )

    def __init__(self, provider: Provider, operation: str, kwargs: dict[str, Any],
                 telemetry: Telemetry | None, capture_content: bool) -> None:
        self.provider = provider
        self.started = time.perf_counter()
        self.input_tokens = self.output_tokens = self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.finish_reasons: list[str] = []
        self.response_model: str | None = None
        self.response_id: str | None = None
        model = kwargs.get("model")
        model = model if given(model) else None
        self.request_model = str(model) if model is not None else None
        self.output_parts: list[str] | None = [] if capture_content else None
        self._done = False
        self.telemetry = telemetry or active_telemetry()
        self.span: SpanRecord | None = None
        if self.telemetry is not None:
            attrs: dict[str, Any] = {"gen_ai.operation.name": operation,
                                     "gen_ai.provider.name": provider.name}
            if model is not None:
                attrs["gen_ai.request.model"] = str(model)
            for param, key in _REQUEST_PARAMS:
                if given(kwargs.get(param)):
                    attrs[key] = kwargs[param]
            self.span = self.telemetry.start_span(
                f"{operation} {model}" if model else operation, attrs, kind=SpanKind.CLIENT.value)
            if capture_content:
                self.span.content = provider.request_content(kwargs)

    def add_usage(self, input_tokens: int = 0, output_tokens: int = 0,
                  cache_read_tokens: int = 0, cache_write_tokens: int = 0) -> None:
        """Add token counts reported by a response or a stream event (cache reads and
        writes are among ``input_tokens``)."""
        self.input_tokens += input_tokens or 0
        self.output_tokens += output_tokens or 0
        self.cache_read_tokens += cache_read_tokens or 0
        self.cache_write_tokens += cache_write_tokens or 0

    def done(self) -> None:
        """Finish: usage, model and provider to the current attempt (the step's event) or,
        outside any attempt, the usage to the current run (:class:`closedloop.Run`, whose
        token budget counts it); attributes and end time to the span."""
        if self._done:
            return
        self._done = True
        attempt = current_attempt()
        if attempt is not None:
            # the model that answered (a dated snapshot) rather than the alias asked for;
            # priced there from the runtime's price table (cache writes cost more)
            attempt.record_usage(self.input_tokens, self.output_tokens,
                                 cached_input_tokens=self.cache_read_tokens,
                                 cache_write_tokens=self.cache_write_tokens,
                                 model=self.response_model or self.request_model,
                                 provider=self.provider.name)
        else:  # the agent's own model call, outside any agent step: the run's budget counts it
            run = current_run()
            if run is not None:
                model = self.response_model or self.request_model
                cost = _runtime.current_runtime().prices.cost(
                    model, self.provider.name, self.input_tokens, self.output_tokens,
                    cached_input_tokens=self.cache_read_tokens,
                    cache_write_tokens=self.cache_write_tokens) if (
                    model and (self.input_tokens or self.output_tokens)) else None
                run.record_usage(self.input_tokens, self.output_tokens, cost_usd=cost)
        span = self.span
        if span is None or self.telemetry is None:
            return
        a = span.attributes
        a["gen_ai.usage.input_tokens"] = self.input_tokens
        a["gen_ai.usage.output_tokens"] = self.output_tokens
        if self.cache_read_tokens:
            a["gen_ai.usage.cache_read.input_tokens"] = self.cache_read_tokens
        if self.response_model:
            a["gen_ai.response.model"] = self.response_model
        if self.response_id:
            a["gen_ai.response.id"] = self.response_id
        if self.finish_reasons:
            a["gen_ai.response.finish_reasons"] = tuple(self.finish_reasons)
        if self.output_parts and span.content is not None:
            span.content["gen_ai.output.messages"] = "".join(self.output_parts)
        self.telemetry.end_span(span)

    def fail(self, exc: BaseException) -> None:
        """Finish as an error: ``error.type`` is the HTTP status, else the exception type."""
        if self.span is not None:
            status = getattr(exc, "status_code", None)
            self.span.attributes["error.type"] = (str(status) if status is not None
                                                  else type(exc).__qualname__)
            self.span.fail(f"{type(exc).__name__}: {exc}")  # redacted, then capped, on export
        self.done()


def _safe(fn: Callable[..., None], *args: Any) -> None:
    """Telemetry bookkeeping never raises into the user's call."""
    try:
        fn(*args)
    except Exception:
        log.exception("closedloop: recording a model call failed")


class _SyncStream:
    """Wraps an SDK stream: events pass through unchanged, usage is recorded as they go."""

    def __init__(self, stream: Any, call: ModelCall) -> None:
        self._stream = stream
        self._call = call
        self._iter: Iterator[Any] | None = None

    def _events(self) -> Iterator[Any]:
        call, on_chunk = self._call, self._call.provider.on_chunk
        try:
            for chunk in self._stream:
                _safe(on_chunk, call, chunk)
                yield chunk
        except Exception as exc:
            _safe(call.fail, exc)
            raise
        finally:
            _safe(call.done)

    def __iter__(self) -> Iterator[Any]:
        if self._iter is None:
            self._iter = self._events()
        return self._iter

    def __next__(self) -> Any:
        return next(iter(self))

    def __enter__(self) -> _SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying stream and finish the call."""
        try:
            self._stream.close()
        finally:
            _safe(self._call.done)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _AsyncStream:
    """The async twin of :class:`_SyncStream`."""

    def __init__(self, stream: Any, call: ModelCall) -> None:
        self._stream = stream
        self._call = call
        self._iter: AsyncIterator[Any] | None = None

    async def _events(self) -> AsyncIterator[Any]:
        call, on_chunk = self._call, self._call.provider.on_chunk
        try:
            async for chunk in self._stream:
                _safe(on_chunk, call, chunk)
                yield chunk
        except Exception as exc:
            _safe(call.fail, exc)
            raise
        finally:
            _safe(call.done)

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._iter is None:
            self._iter = self._events()
        return self._iter

    async def __anext__(self) -> Any:
        return await self.__aiter__().__anext__()

    async def __aenter__(self) -> _AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the underlying stream and finish the call."""
        try:
            await self._stream.close()
        finally:
            _safe(self._call.done)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def wrap_create(original: Callable[..., Any], provider: Provider, operation: str,
                telemetry: Telemetry | None, capture_content: bool) -> Callable[..., Any]:
    """Wrap an SDK ``create`` method (sync or async, streaming or not)."""
    if getattr(original, "__closedloop_wrapped__", False):
        return original
    warm_up()  # load the price table now, not in the agent's first model call

    def begin(kwargs: dict[str, Any]) -> ModelCall | None:
        try:
            return ModelCall(provider, operation, kwargs, telemetry, capture_content)
        except Exception:
            log.exception("closedloop: starting a model-call span failed")
            return None

    def finish(call: ModelCall | None, result: Any, kwargs: dict[str, Any], aio: bool) -> Any:
        if call is None:
            return result
        if _raw(kwargs):
            return _RawResponse(result, call, stream=kwargs.get("stream") is True)
        if kwargs.get("stream") is True:
            return _AsyncStream(result, call) if aio else _SyncStream(result, call)
        _safe(provider.on_response, call, result)
        _safe(call.done)
        return result

    async def settle(call: ModelCall | None, pending: Any, kwargs: dict[str, Any]) -> Any:
        try:
            result = await pending
        except Exception as exc:
            if call is not None:
                _safe(call.fail, exc)
            raise
        return finish(call, result, kwargs, True)

    # one wrapper for sync and async clients: an async client's create returns an awaitable
    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        call = begin(kwargs)
        try:
            result = original(*args, **kwargs)
        except Exception as exc:
            if call is not None:
                _safe(call.fail, exc)
            raise
        if inspect.isawaitable(result):
            return settle(call, result, kwargs)
        return finish(call, result, kwargs, False)

    wrapped.__closedloop_wrapped__ = True  # type: ignore[attr-defined]
    return wrapped


_RAW_HEADER = "x-stainless-raw-response"


def _raw(kwargs: dict[str, Any]) -> bool:
    """The call is made through the SDK's ``with_streaming_response`` / ``with_raw_response``
    (which mark it with a header): it returns the raw HTTP response, parsed later."""
    headers = kwargs.get("extra_headers")
    return isinstance(headers, dict) and any(
        isinstance(k, str) and k.lower() == _RAW_HEADER for k in headers)


class _RawResponse:
    """Wraps the raw response of ``with_streaming_response.create(...)`` (the OpenAI Agents
    SDK streams so) or ``with_raw_response``: what ``parse()`` gives is read like the
    result of ``create`` (a stream through :class:`_SyncStream`/:class:`_AsyncStream`, a
    response at once); closing it finishes the call at the latest."""

    def __init__(self, raw: Any, call: ModelCall, *, stream: bool) -> None:
        self._raw = raw
        self._call = call
        self._stream = stream

    def _took(self, parsed: Any) -> Any:
        call = self._call
        if self._stream:
            return _AsyncStream(parsed, call) if hasattr(parsed, "__aiter__") \
                else _SyncStream(parsed, call)
        _safe(call.provider.on_response, call, parsed)
        _safe(call.done)
        return parsed

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        try:
            parsed = self._raw.parse(*args, **kwargs)
        except Exception as exc:
            _safe(self._call.fail, exc)
            raise
        if inspect.isawaitable(parsed):
            return self._aparse(parsed)
        return self._took(parsed)

    async def _aparse(self, pending: Any) -> Any:
        try:
            parsed = await pending
        except Exception as exc:
            _safe(self._call.fail, exc)
            raise
        return self._took(parsed)

    def close(self) -> Any:
        result = self._raw.close()
        if inspect.isawaitable(result):
            return self._aclose(result)
        _safe(self._call.done)
        return result

    async def _aclose(self, pending: Any) -> Any:
        try:
            return await pending
        finally:
            _safe(self._call.done)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _StreamManager:
    """Wraps a stream helper's manager (Anthropic's ``messages.stream()``): entering it makes
    the request; the helper's raw event stream is read through a :class:`_SyncStream` /
    :class:`_AsyncStream`, so usage is recorded as the events arrive and the call finishes
    when the stream ends (or, at the latest, when the block exits)."""

    def __init__(self, manager: Any, begin: Callable[[], ModelCall | None]) -> None:
        self._manager = manager
        self._begin = begin
        self._call: ModelCall | None = None

    def _attach(self, stream: Any, aio: bool) -> Any:
        call = self._call
        raw = getattr(stream, "_raw_stream", None)
        if call is not None and raw is not None:
            stream._raw_stream = _AsyncStream(raw, call) if aio else _SyncStream(raw, call)
        elif call is not None:  # an SDK whose helper we cannot see into: no usage, still a span
            log.warning("closedloop: cannot read this stream helper's events; "
                        "its usage is not recorded")
        return stream

    def _failed(self, exc: BaseException) -> None:
        if self._call is not None:
            _safe(self._call.fail, exc)

    def _finish(self, exc: BaseException | None) -> None:
        call = self._call
        if call is None:
            return
        if exc is not None and not call._done:
            _safe(call.fail, exc)
        _safe(call.done)

    def __enter__(self) -> Any:
        self._call = self._begin()
        try:
            stream = self._manager.__enter__()
        except Exception as exc:
            self._failed(exc)
            raise
        return self._attach(stream, False)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Any:
        try:
            return self._manager.__exit__(exc_type, exc, tb)
        finally:
            self._finish(exc)

    async def __aenter__(self) -> Any:
        self._call = self._begin()
        try:
            stream = await self._manager.__aenter__()
        except Exception as exc:
            self._failed(exc)
            raise
        return self._attach(stream, True)

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Any:
        try:
            return await self._manager.__aexit__(exc_type, exc, tb)
        finally:
            self._finish(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)


def wrap_stream_helper(original: Callable[..., Any], provider: Provider, operation: str,
                       telemetry: Telemetry | None, capture_content: bool) -> Callable[..., Any]:
    """Wrap an SDK stream helper (``messages.stream(...)``, a context manager, sync or async)."""
    if getattr(original, "__closedloop_wrapped__", False):
        return original
    warm_up()

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        manager = original(*args, **kwargs)

        def begin() -> ModelCall | None:
            try:
                return ModelCall(provider, operation, kwargs, telemetry, capture_content)
            except Exception:
                log.exception("closedloop: starting a model-call span failed")
                return None

        return _StreamManager(manager, begin)

    wrapped.__closedloop_wrapped__ = True  # type: ignore[attr-defined]
    return wrapped


def retry_after_seconds(headers: Any, now: Callable[[], float] = time.time) -> float | None:
    """A response's ``retry-after-ms`` or ``retry-after`` (seconds or HTTP date), in seconds.

    The same parser as flow control's (:func:`closedloop.control.retry_after_from_headers`):
    an unreadable, negative or non-finite value is None.
    """
    # imported on use: an instrumented SDK call that never sees a 429 needs no flow control
    from closedloop.control import retry_after_from_headers

    return retry_after_from_headers(headers, now=now)


def _rate_limit_key(provider: str, request: Any) -> str:
    try:
        model = json.loads(request.content or b"{}").get("model")
    except (ValueError, AttributeError):
        model = None
    return f"{provider}:{model}" if model else provider


def install_rate_limit_hook(client: Any, provider: str, hook: RateLimitHook) -> None:
    """Tell ``hook`` of every 429 the SDK's HTTP client receives (retried ones included)."""
    http = getattr(client, "_client", None)
    hooks = getattr(http, "event_hooks", None)
    if hooks is None:
        log.warning("closedloop: cannot see %s's HTTP client; 429s will not be reported",
                    provider)
        return

    def report(response: Any) -> None:
        if response.status_code != 429:
            return
        try:
            hook(_rate_limit_key(provider, response.request),
                 retry_after_seconds(response.headers))
        except Exception:
            log.exception("closedloop: the rate-limit hook failed")

    async def areport(response: Any) -> None:
        report(response)

    is_async = inspect.iscoroutinefunction(getattr(http, "send", None))
    hooks.setdefault("response", []).append(areport if is_async else report)
    http.event_hooks = hooks  # type: ignore[union-attr]
