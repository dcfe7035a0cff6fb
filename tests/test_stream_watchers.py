"""The core's stream watchers (``RequestContext.stream_watchers``): a plugin sees every chunk about to
reach a streaming client, and one that returns an error ends the stream with that error as the last
event (no ``[DONE]``), accounted with the error's status."""

from __future__ import annotations

import httpx
import orjson
import pytest

from llmgateway.core.errors import GatewayError, RateLimitError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import RequestContext
from tests.conftest import GatewayFactory, Recorder, upstream_toml
from tests.fakes.openai_server import FakeOpenAI
from tests.test_openai_proxy import models

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


class ChunkWatcher:
    """A tiny plugin: watches every stream, and ends it with a 429 after ``stop_after`` chunks."""

    def __init__(self, stop_after: int | None) -> None:
        self.stop_after = stop_after
        self.seen: list[bytes] = []

    @hookimpl
    def llmgateway_prepare_request(self, ctx: RequestContext) -> None:
        ctx.stream_watchers.append(self.watch)

    def watch(self, chunk: bytes) -> GatewayError | None:
        self.seen.append(chunk)
        if self.stop_after is not None and len(self.seen) > self.stop_after:
            return RateLimitError("Stopped by a watcher", code="watcher_stop")
        return None


async def stream(url: str) -> tuple[int, bytes]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=BODY) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response.status_code, raw


async def stream_through(
    serve_gateway: GatewayFactory, upstream_url: str, **plugins: object
) -> tuple[int, bytes, Recorder]:
    """One streamed request through a gateway with ``plugins`` (and a usage recorder) in front of
    the fake upstream's slow five-word stream."""
    recorder = Recorder()
    toml = upstream_toml(upstream_url, models(("m", ["slow-5"])))
    async with serve_gateway(toml, plugins={**plugins, "rec": recorder}) as gw:
        status, raw = await stream(gw)
    return status, raw, recorder


async def test_a_watcher_sees_every_chunk_the_client_gets(
    upstream: tuple[FakeOpenAI, str], serve_gateway: GatewayFactory
) -> None:
    watcher = ChunkWatcher(stop_after=None)
    status, raw, _ = await stream_through(serve_gateway, upstream[1], watch=watcher)
    assert status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"".join(watcher.seen) == raw


async def test_a_watcher_returning_an_error_ends_the_stream_with_that_error(
    upstream: tuple[FakeOpenAI, str], serve_gateway: GatewayFactory
) -> None:
    watcher = ChunkWatcher(stop_after=3)
    status, raw, recorder = await stream_through(serve_gateway, upstream[1], watch=watcher)
    assert status == 200  # the stream had started
    # the three chunks let through, then the error event; the refused chunk is not sent
    sent = b"".join(watcher.seen[:3])
    assert raw.startswith(sent)
    assert raw[len(sent) :].startswith(b"data: {")
    assert raw.endswith(b"}\n\n")
    assert b"[DONE]" not in raw
    error = orjson.loads(raw[len(sent) :].removeprefix(b"data: "))["error"]
    assert error == {
        "message": "Stopped by a watcher",
        "type": "rate_limit_error",
        "param": None,
        "code": "watcher_stop",
    }
    assert len(watcher.seen) == 4  # nothing more was read from the upstream after the stop
    [record] = recorder.records
    assert record.status == 429
    assert record.error_code == "watcher_stop"
    assert record.streamed
    # the output forwarded before the stop is counted (estimated from the streamed text), not lost
    assert record.usage.completion_tokens > 0
    assert record.usage.estimated


async def test_a_watcher_can_refuse_the_very_first_chunk(
    upstream: tuple[FakeOpenAI, str], serve_gateway: GatewayFactory
) -> None:
    watcher = ChunkWatcher(stop_after=0)
    status, raw, recorder = await stream_through(serve_gateway, upstream[1], watch=watcher)
    assert status == 200
    assert raw.startswith(b"data: {")
    assert orjson.loads(raw.removeprefix(b"data: "))["error"]["code"] == "watcher_stop"
    assert len(watcher.seen) == 1
    [record] = recorder.records
    assert (record.status, record.error_code) == (429, "watcher_stop")


class BrokenWatcher:
    """A plugin whose watcher has a bug: it raises on the second chunk."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def llmgateway_prepare_request(self, ctx: RequestContext) -> None:
        ctx.stream_watchers.append(self.watch)

    def watch(self, chunk: bytes) -> GatewayError | None:
        self.calls += 1
        if self.calls == 2:
            raise TypeError("a bug in the plugin")
        return None


async def test_a_watcher_that_raises_ends_the_stream_with_an_internal_error_and_it_is_accounted(
    upstream: tuple[FakeOpenAI, str], serve_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    status, raw, recorder = await stream_through(serve_gateway, upstream[1], broken=BrokenWatcher())
    assert status == 200
    assert b"[DONE]" not in raw
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    error = orjson.loads(last.removeprefix(b"data: "))["error"]
    assert error["code"] == "internal_error"
    assert "TypeError" not in raw.decode()  # no traceback or exception text reaches the client
    [record] = recorder.records
    assert (record.status, record.error_code) == (500, "internal_error")
    assert "a stream watcher failed" in caplog.text
