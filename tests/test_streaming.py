"""Streaming behaviour a client can observe: unbuffered chunks, disconnects, failures after the first
byte, and fallbacks before it."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest

from tests.conftest import GatewayFactory, Recorder, sdk, upstream_toml
from tests.fakes.openai_server import FakeOpenAI
from tests.test_openai_proxy import models

Upstream = tuple[FakeOpenAI, str]
BODY = {"messages": [{"role": "user", "content": "hi"}], "stream": True}


async def read_events(response: httpx.Response) -> list[bytes]:
    raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return [event for event in raw.split(b"\n\n") if event]


async def test_chunks_reach_the_client_before_the_upstream_finishes(
    upstream: Upstream, serve_gateway: GatewayFactory
) -> None:
    fake, url = upstream
    async with serve_gateway(upstream_toml(url, models(("m", ["gated"])))) as gw:
        async with sdk(gw) as client:
            stream = await client.chat.completions.create(model="m", messages=BODY["messages"], stream=True)  # type: ignore[arg-type]
            iterator = stream.__aiter__()
            first = await iterator.__anext__()
            second = await iterator.__anext__()
            # the upstream is still holding the rest of its answer behind the gate
            assert not fake.stream_finished.is_set()
            fake.gate.set()
            rest = [chunk async for chunk in iterator]
    assert first.choices[0].delta.role == "assistant"
    assert second.choices[0].delta.content
    assert rest[-1].choices[0].finish_reason == "stop"


async def test_client_disconnect_cancels_upstream_and_is_accounted(
    upstream: Upstream, serve_gateway: GatewayFactory
) -> None:
    fake, url = upstream
    recorder = Recorder()
    async with serve_gateway(upstream_toml(url, models(("m", ["gated"]))), plugins={"rec": recorder}) as gw:
        async with httpx.AsyncClient(base_url=gw) as http:
            async with http.stream("POST", "/v1/chat/completions", json={**BODY, "model": "m"}) as response:
                async for _ in response.aiter_raw():
                    break  # the client walks away after the first bytes
        for _ in range(200):
            if fake.disconnected and recorder.records:
                break
            await asyncio.sleep(0.01)
    assert fake.disconnected == 1  # the upstream call was cancelled, not left running
    [record] = recorder.records
    assert record.client_disconnected
    assert record.status == 499
    assert record.usage.estimated  # the upstream never sent its usage: it is estimated, not $0
    assert record.usage.completion_tokens > 0  # the text that reached the client is billed


@pytest.mark.parametrize("upstream_model", ["cut", "mid-error"])
async def test_failure_after_first_byte_ends_with_one_error_event(
    upstream: Upstream, serve_gateway: GatewayFactory, upstream_model: str
) -> None:
    _, url = upstream
    recorder = Recorder()
    toml = upstream_toml(url, models(("m", [upstream_model, "gpt-ok"])))
    async with serve_gateway(toml, plugins={"rec": recorder}) as gw:
        async with httpx.AsyncClient(base_url=gw) as http:
            async with http.stream("POST", "/v1/chat/completions", json={**BODY, "model": "m"}) as response:
                events = await read_events(response)
        async with sdk(gw) as client:
            stream = await client.chat.completions.create(model="m", messages=BODY["messages"], stream=True)  # type: ignore[arg-type]
            with pytest.raises(openai.APIError):
                [chunk async for chunk in stream]
    assert response.status_code == 200
    assert b"data: [DONE]" not in events
    assert events[-1].startswith(b'data: {"error"')
    error = orjson.loads(events[-1][6:])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert sum(e.startswith(b'data: {"error"') for e in events) == 1
    # no fallback after the first byte: the second deployment was never tried
    assert recorder.records[0].attempts == 1
    assert recorder.records[0].status == 502
    # what was streamed before the failure is still billed
    assert recorder.records[0].usage.completion_tokens > 0


async def test_a_stream_past_the_request_deadline_ends_with_a_timeout_event(
    upstream: Upstream, serve_gateway: GatewayFactory
) -> None:
    """The model's ``timeout`` bounds the whole request, not only the wait for the first byte: an
    upstream that stalls mid-stream is cut at the deadline, the client gets one timeout event and no
    [DONE], the upstream call is cancelled and the request is accounted for."""
    fake, url = upstream
    recorder = Recorder()
    async with serve_gateway(
        upstream_toml(url, models(("m", ["gated"]), extra="timeout = 0.5")), plugins={"rec": recorder}
    ) as gw:
        async with httpx.AsyncClient(base_url=gw, timeout=30) as http:
            async with http.stream("POST", "/v1/chat/completions", json={**BODY, "model": "m"}) as response:
                events = await read_events(response)
        for _ in range(200):
            if fake.disconnected and recorder.records:
                break
            await asyncio.sleep(0.01)
    assert response.status_code == 200
    assert events[0].startswith(b"data: {")  # the first chunks came through
    assert b"data: [DONE]" not in events
    error = orjson.loads(events[-1][6:])["error"]
    assert (error["type"], error["code"]) == ("timeout", "upstream_timeout")
    assert "deadline" in error["message"]
    assert fake.disconnected == 1  # the stalled upstream call was cancelled
    [record] = recorder.records
    assert (record.status, record.error_code) == (504, "upstream_timeout")
    assert record.usage.completion_tokens > 0  # what reached the client is billed


async def test_fallback_before_first_byte(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    fake, url = upstream
    recorder = Recorder()
    toml = upstream_toml(url, models(("m", ["status-503", "gpt-ok"])))
    async with serve_gateway(toml, plugins={"rec": recorder}) as gw:
        async with sdk(gw) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="m",
                messages=BODY["messages"],
                stream=True,  # type: ignore[arg-type]
            )
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
            plain = await client.chat.completions.with_raw_response.create(model="m", messages=BODY["messages"])  # type: ignore[arg-type]
    assert text.strip()
    assert raw.headers["x-llmgateway-deployment"] == "m/local/gpt-ok#1"
    assert raw.headers["x-llmgateway-attempts"] == "2"
    assert plain.headers["x-llmgateway-deployment"] == "m/local/gpt-ok#1"
    assert [r.body["model"] for r in fake.requests] == ["status-503", "gpt-ok", "status-503", "gpt-ok"]
    assert [r.attempts for r in recorder.records] == [2, 2]


async def test_retry_same_deployment_then_succeed(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    fake, url = upstream
    toml = upstream_toml(url, models(("m", ["flaky-503"]), extra="max_attempts = 2\nretry_backoff = 0.01"))
    async with serve_gateway(toml) as gw:
        async with sdk(gw) as client:
            answer = await client.chat.completions.create(model="m", messages=BODY["messages"])  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    assert fake.calls["flaky-503"] == 2


async def test_fallback_alias_and_no_retry_on_client_errors(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    fake, url = upstream
    toml = upstream_toml(
        url,
        models(("primary", ["status-429"]), extra='max_attempts = 1\nfallbacks = ["backup"]')
        + models(("backup", ["gpt-ok"]))
        + models(("broken", ["status-404", "gpt-ok"])),
    )
    async with serve_gateway(toml) as gw:
        async with sdk(gw) as client:
            answer = await client.chat.completions.with_raw_response.create(model="primary", messages=BODY["messages"])  # type: ignore[arg-type]
            with pytest.raises(openai.NotFoundError):
                await client.chat.completions.create(model="broken", messages=BODY["messages"])  # type: ignore[arg-type]
    assert answer.headers["x-llmgateway-deployment"] == "backup/local/gpt-ok#0"
    assert answer.parse().model == "primary"
    assert fake.calls.get("gpt-ok", 0) == 1  # a 404 is not retried on another deployment


class OneWriteUpstream:
    """An OpenAI-compatible streaming upstream on a raw socket: each SSE event its own HTTP chunk
    (as OpenAI sends them), the whole answer in one write (``together``) or one write per event with
    a pause between (so the gateway reads them one by one)."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.together = True

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                start = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                chunks = [b"%x\r\n%b\r\n" % (len(event), event) for event in self.events] + [b"0\r\n\r\n"]
                if self.together:
                    writer.write(start + b"".join(chunks))
                else:
                    writer.write(start)
                    for chunk in chunks:
                        writer.write(chunk)
                        await writer.drain()
                        await asyncio.sleep(0.005)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _sse(payload: object) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else orjson.dumps(payload)) + b"\n\n"


@pytest.mark.parametrize(("usage", "tricky"), [("sent", False), ("absent", False), ("sent", True)])
async def test_frames_arriving_together_are_relayed_like_frames_arriving_one_by_one(
    serve_gateway: GatewayFactory, usage: str, tricky: bool
) -> None:
    """A whole answer in one upstream read (each frame its own HTTP chunk, `"usage":null` in every
    chunk as OpenAI sends it) reaches the client exactly as when the frames come one read each: the
    alias in every frame, the text, the finish reason, the usage frame dropped for a client that did
    not ask for it, and the same usage accounted (the upstream's, or estimated from the text)."""
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up-model-1"}
    chunks: list[dict[str, object]] = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    words = ["Hello", ' wor\\"ld', " \u00e9t\u00e9", " end"] + ([' "usage":{"x":1} data: [DONE]'] if tricky else [])
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    if usage == "sent":
        for chunk in chunks:
            chunk["usage"] = None
        chunks.append(
            {**base, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}
        )
    fake = OneWriteUpstream([_sse(c) for c in chunks] + [_sse(b"[DONE]")])
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    recorder = Recorder()
    toml = upstream_toml(f"http://127.0.0.1:{port}", models(("m", ["up-model-1"])))
    seen: list[tuple[list[bytes], tuple[int, int, bool]]] = []
    try:
        async with serve_gateway(toml, plugins={"recorder": recorder}) as gw, httpx.AsyncClient(timeout=10) as http:
            for together in (True, False):
                fake.together = together
                async with http.stream("POST", f"{gw}/v1/chat/completions", json={**BODY, "model": "m"}) as response:
                    events = await read_events(response)
                await asyncio.sleep(0.05)  # accounting runs after the last byte
                record = recorder.records[-1]
                seen.append(
                    (events, (record.usage.prompt_tokens, record.usage.completion_tokens, record.usage.estimated))
                )
    finally:
        server.close()
        await server.wait_closed()
    assert seen[0] == seen[1]
    events, accounted = seen[0]
    assert events[-1] == b"data: [DONE]"
    frames = [orjson.loads(e[6:]) for e in events[:-1]]
    assert len(frames) == len(words) + 2  # role, words, finish: no usage frame for this client
    assert all(f["model"] == "m" for f in frames)
    assert "".join(f["choices"][0]["delta"].get("content", "") for f in frames) == "".join(words)
    assert frames[-1]["choices"][0]["finish_reason"] == "length"
    if usage == "sent":
        assert accounted == (7, 5, False)
    else:  # estimated from the text as sent (JSON-escaped), about four characters per token
        from llmgateway.core.provider import estimate_tokens

        assert accounted[2] is True
        assert accounted[1] == estimate_tokens(sum(len(orjson.dumps(w)) - 2 for w in words))
