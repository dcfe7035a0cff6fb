"""The core path end to end: the official openai SDK → a real gateway on loopback → a fake OpenAI upstream."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, GatewayFactory, Recorder, sdk, upstream_toml
from tests.fakes.openai_server import ANSWER, FakeOpenAI

Upstream = tuple[FakeOpenAI, str]


def models(*entries: tuple[str, list[str]], extra: str = "") -> str:
    out = ""
    for name, upstream_models in entries:
        deployments = ", ".join(f'{{ provider = "local", model = "{m}" }}' for m in upstream_models)
        out += f'\n[[models]]\nname = "{name}"\ndeployments = [{deployments}]\n{extra}\n'
    return out


async def test_chat_plain_rewrites_model_and_reports_usage(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    fake, url = upstream
    recorder = Recorder()
    async with serve_gateway(upstream_toml(url, models(("fast", ["gpt-ok"]))), plugins={"rec": recorder}) as gw:
        async with sdk(gw) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="fast",
                messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
                temperature=0,
            )
            answer = raw.parse()
    assert answer.model == "fast"
    assert answer.choices[0].message.content == ANSWER
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (11, 9)
    assert raw.headers["x-llmgateway-provider"] == "local"
    assert raw.headers["x-llmgateway-deployment"] == "fast/local/gpt-ok#0"
    assert raw.headers["x-request-id"].startswith("req_")
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.body["model"] == "gpt-ok"
    assert sent.body["temperature"] == 0
    [record] = recorder.records
    assert record.alias == "fast"
    assert record.upstream_model == "gpt-ok-2024"
    assert (record.usage.prompt_tokens, record.usage.completion_tokens, record.usage.cached_tokens) == (11, 9, 3)
    assert record.status == 200
    assert not record.streamed


async def test_chat_stream_forwards_chunks_and_usage_only_when_asked(
    upstream: Upstream, serve_gateway: GatewayFactory
) -> None:
    fake, url = upstream
    recorder = Recorder()
    async with serve_gateway(upstream_toml(url, models(("fast", ["gpt-ok"]))), plugins={"rec": recorder}) as gw:
        async with sdk(gw) as client:
            stream = await client.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            chunks = [chunk async for chunk in stream]
            with_usage = await client.chat.completions.create(
                model="fast",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            usage_chunks = [chunk async for chunk in with_usage]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == ANSWER
    assert all(c.model == "fast" for c in chunks)
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert usage_chunks[-1].choices == []
    assert usage_chunks[-1].usage is not None
    assert usage_chunks[-1].usage.total_tokens == 20
    # usage is captured for accounting either way: the gateway always asks upstream for it
    assert all(r.body["stream_options"] == {"include_usage": True} for r in fake.requests)
    assert [r.usage.completion_tokens for r in recorder.records] == [9, 9]
    assert all(r.streamed and not r.usage.estimated for r in recorder.records)


async def test_stream_usage_estimated_when_upstream_sends_none(
    upstream: Upstream, serve_gateway: GatewayFactory
) -> None:
    _, url = upstream
    recorder = Recorder()
    async with serve_gateway(upstream_toml(url, models(("m", ["no-usage"]))), plugins={"rec": recorder}) as gw:
        async with sdk(gw) as client:
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            [chunk async for chunk in stream]
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    streamed, plain = recorder.records
    for record in (streamed, plain):
        assert record.usage.estimated
        assert record.usage.completion_tokens > 0
        assert record.usage.prompt_tokens > 0


async def test_streamed_tool_calls_assemble(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    _, url = upstream
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    async with serve_gateway(upstream_toml(url, models(("t", ["tools"])))) as gw:
        async with sdk(gw) as client:
            plain = await client.chat.completions.create(
                model="t", messages=[{"role": "user", "content": "weather?"}], tools=tools
            )
            stream = await client.chat.completions.create(
                model="t", messages=[{"role": "user", "content": "weather?"}], tools=tools, stream=True
            )
            arguments = ""
            names = []
            finish = None
            async for chunk in stream:
                if not chunk.choices:
                    continue
                for delta in chunk.choices[0].delta.tool_calls or []:
                    if delta.function and delta.function.name:
                        names.append(delta.function.name)
                    if delta.function and delta.function.arguments:
                        arguments += delta.function.arguments
                finish = chunk.choices[0].finish_reason or finish
    call = plain.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}  # type: ignore[union-attr]
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Paris", "unit": "c"}
    assert finish == "tool_calls"


async def test_completions_and_embeddings(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    fake, url = upstream
    async with serve_gateway(upstream_toml(url, models(("m", ["gpt-ok"])))) as gw:
        async with sdk(gw) as client:
            text = await client.completions.create(model="m", prompt="Say this")
            stream = await client.completions.create(model="m", prompt="Say this", stream=True)
            pieces = [c.choices[0].text async for c in stream if c.choices]
            vectors = await client.embeddings.create(model="m", input=["a", "b"], dimensions=4)
    assert text.model == "m"
    assert text.choices[0].text == ANSWER
    assert "".join(pieces).strip() == ANSWER
    assert vectors.model == "m"
    assert [len(d.embedding) for d in vectors.data] == [4, 4]
    assert vectors.usage.prompt_tokens == 10
    assert fake.requests[-1].path == "/v1/embeddings"


async def test_models_endpoints_and_paths_without_v1(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    _, url = upstream
    async with serve_gateway(upstream_toml(url, models(("a", ["gpt-ok"]), ("b", ["gpt-ok"])))) as gw:
        async with sdk(gw) as client:
            listed = [m.id async for m in client.models.list()]
            one = await client.models.retrieve("b")
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("nope")
        async with httpx.AsyncClient(base_url=gw) as http:
            bare = await http.post(
                "/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "x"}]}
            )
    assert listed == ["a", "b"]
    assert one.id == "b"
    assert bare.status_code == 200
    assert bare.json()["model"] == "a"


@pytest.mark.parametrize(
    ("upstream_model", "error_class", "status"),
    [
        ("status-401", openai.AuthenticationError, 401),
        ("status-403", openai.PermissionDeniedError, 403),
        ("status-404", openai.NotFoundError, 404),
        ("status-400", openai.BadRequestError, 400),
        ("status-500", openai.InternalServerError, 502),
        ("status-503", openai.InternalServerError, 503),
    ],
)
async def test_upstream_errors_keep_their_meaning(
    upstream: Upstream, serve_gateway: GatewayFactory, upstream_model: str, error_class: type[Exception], status: int
) -> None:
    _, url = upstream
    toml = upstream_toml(url, models(("m", [upstream_model]), extra="max_attempts = 1"))
    async with serve_gateway(toml) as gw:
        async with sdk(gw) as client:
            with pytest.raises(error_class) as caught:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    error = caught.value
    assert isinstance(error, openai.APIStatusError)
    assert error.status_code == status
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "local" in body["error"]["message"]
    if upstream_model == "status-400":
        assert body["error"]["code"] == "context_length_exceeded"


async def test_rate_limit_keeps_retry_after(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    _, url = upstream
    async with serve_gateway(upstream_toml(url, models(("m", ["status-429"]), extra="max_attempts = 1"))) as gw:
        async with sdk(gw) as client:
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.response.json()["error"]["type"] == "rate_limit_error"


async def test_upstream_key_never_reaches_the_client(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    _, url = upstream
    async with serve_gateway(upstream_toml(url, models(("m", ["leak"]), extra="max_attempts = 1"))) as gw:
        async with httpx.AsyncClient(base_url=gw) as http:
            response = await http.post(
                "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
            )
    assert response.status_code == 502
    assert UPSTREAM_KEY not in response.text
    assert "[REDACTED]" in response.json()["error"]["message"]


async def test_unreachable_upstream_is_a_502(serve_gateway: GatewayFactory) -> None:
    from tests.servers import free_port

    toml = upstream_toml(f"http://127.0.0.1:{free_port()}", models(("m", ["gpt-ok"]), extra="max_attempts = 1"))
    async with serve_gateway(toml) as gw:
        async with sdk(gw) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502
    assert caught.value.response.json()["error"]["code"] == "upstream_connection_error"


async def test_upstream_timeout_is_a_504(upstream: Upstream, serve_gateway: GatewayFactory) -> None:
    _, url = upstream
    toml = upstream_toml(url, models(("m", ["slow-2000"]), extra="max_attempts = 1\ntimeout = 0.2"))
    async with serve_gateway(toml) as gw:
        async with sdk(gw) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 504
    assert caught.value.response.json()["error"]["type"] == "timeout"


async def test_upstream_client_keeps_no_state_between_tenants(
    upstream: Upstream, serve_gateway: GatewayFactory
) -> None:
    """A cookie set on one tenant's answer must never ride along on another tenant's request, and
    streams are asked for uncompressed (they are read frame by frame)."""
    fake, url = upstream
    async with serve_gateway(upstream_toml(url, models(("c", ["set-cookie"]), ("m", ["gpt-ok"])))) as gw:
        async with sdk(gw) as client:
            await client.chat.completions.create(model="c", messages=[{"role": "user", "content": "tenant A"}])
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "tenant B"}])
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "tenant B"}], stream=True
            )
            [chunk async for chunk in stream]
    assert [r.headers.get("cookie") for r in fake.requests] == [None, None, None]
    assert fake.requests[-1].headers["accept-encoding"] == "identity"
