"""The ``mistral`` provider end to end: the official openai SDK against a real gateway on loopback, in
front of a fake Mistral API (tests/fakes/mistral_server.py) that refuses what real Mistral refuses.
The fake's faithfulness is checked with the official ``mistralai`` SDK at the bottom of this file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import MistralError

from tests.conftest import GatewayFactory, sdk
from tests.fakes.mistral_server import ANSWER, KEY, THOUGHT, FakeMistral
from tests.servers import running

MODELS = (
    "mistral-small-latest",
    "tools",
    "magistral",
    "model-length",
    "context",
    "detail-422",
    "status-429",
    "status-500",
    "cut",
    "mistral-embed",
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="session")
async def mistral_server() -> AsyncIterator[tuple[FakeMistral, str]]:
    fake = FakeMistral()
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def mistral(mistral_server: tuple[FakeMistral, str]) -> tuple[FakeMistral, str]:
    fake, url = mistral_server
    fake.reset()
    return fake, url


def config(url: str, key: str = KEY, extra: str = "") -> str:
    models = "".join(
        f"""
[[models]]
name = "{name}"
max_attempts = 1
deployments = [{{ provider = "mistral", model = "{name}" }}]
"""
        for name in MODELS
    )
    return f"""
[providers.mistral]
type = "mistral"
base_url = "{url}/v1"
api_key = "{key}"
{extra}
{models}
"""


async def test_plain_chat_translates_the_request(
    serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]
) -> None:
    fake, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="mistral-small-latest",
            messages=[{"role": "developer", "content": "be brief"}, *HELLO],  # type: ignore[list-item]
            seed=7,
            max_completion_tokens=50,
            user="end-user-1",
            temperature=0.3,
        )
    assert answer.model == "mistral-small-latest"
    assert answer.choices[0].message.content == ANSWER
    assert answer.usage is not None
    assert answer.usage.total_tokens == 22
    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["random_seed"] == 7
    assert request.body["max_tokens"] == 50
    assert request.body["temperature"] == 0.3
    assert request.body["messages"][0] == {"role": "system", "content": "be brief"}
    for name in ("seed", "max_completion_tokens", "user"):
        assert name not in request.body


async def test_safe_prompt_option(serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]) -> None:
    fake, url = mistral
    async with serve_gateway(config(url, extra="safe_prompt = true")) as gw, sdk(gw) as client:
        await client.chat.completions.create(model="mistral-small-latest", messages=HELLO)
    assert fake.requests[0].body["safe_prompt"] is True


async def test_stream_moves_usage_to_its_own_chunk_when_asked(
    serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]
) -> None:
    fake, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="mistral-small-latest", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        with_usage = [chunk async for chunk in stream]
        stream = await client.chat.completions.create(model="mistral-small-latest", messages=HELLO, stream=True)
        without = [chunk async for chunk in stream]
    *content, last = with_usage
    assert all(chunk.choices and chunk.usage is None for chunk in content)
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == 22
    assert "".join(c.choices[0].delta.content or "" for c in content).strip() == ANSWER
    assert content[-1].choices[0].finish_reason == "stop"
    assert all(chunk.choices and chunk.usage is None for chunk in without)
    assert all(chunk.model == "mistral-small-latest" for chunk in with_usage + without)
    assert all("stream_options" not in r.body and r.body["stream"] is True for r in fake.requests)


async def test_tool_calls_plain(serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]) -> None:
    fake, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="tools",
            messages=HELLO,
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            parallel_tool_calls=True,
        )
    calls = answer.choices[0].message.tool_calls or []
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("D681PevKs", "function", "get_weather", '{"city": "Paris"}'),
        ("K2ab3Cd4E", "function", "get_weather", '{"city": "Lyon"}'),
    ]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert fake.requests[0].body["tool_choice"] == "any"
    assert fake.requests[0].body["tools"] == TOOLS


async def test_streamed_parallel_tool_calls_get_their_own_index(
    serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]
) -> None:
    _, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(model="tools", messages=HELLO, tools=TOOLS, stream=True)  # type: ignore[arg-type]
        chunks = [chunk async for chunk in stream]
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.id, d.type) for d in deltas] == [(0, "D681PevKs", "function"), (1, "K2ab3Cd4E", "function")]
    assert [d.function.arguments for d in deltas if d.function] == ['{"city": "Paris"}', '{"city": "Lyon"}']
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_results_with_foreign_ids_are_accepted(
    serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]
) -> None:
    fake, url = mistral
    history: list[Any] = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_abc123xyz", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123xyz", "content": "sunny"},
    ]
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="mistral-small-latest", messages=history, tools=TOOLS)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == ANSWER
    sent = fake.requests[0].body["messages"]
    mapped = sent[1]["tool_calls"][0]["id"]
    assert len(mapped) == 9
    assert mapped.isalnum()
    assert sent[2]["tool_call_id"] == mapped


async def test_content_chunks_and_finish_reasons_are_translated(
    serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]
) -> None:
    _, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="magistral", messages=HELLO)
        stream = await client.chat.completions.create(model="magistral", messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
        long = await client.chat.completions.create(model="model-length", messages=HELLO)
        stream = await client.chat.completions.create(model="model-length", messages=HELLO, stream=True)
        long_chunks = [chunk async for chunk in stream]
    assert answer.choices[0].message.content == ANSWER
    assert (answer.choices[0].message.model_extra or {}).get("reasoning_content") == THOUGHT
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == ANSWER
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks)
    assert reasoning == THOUGHT
    assert long.choices[0].finish_reason == "length"
    assert long_chunks[-1].choices[0].finish_reason == "length"


async def test_embeddings_float_and_base64(serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]) -> None:
    fake, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        floats = await client.embeddings.create(
            model="mistral-embed", input=["a", "b"], encoding_format="float", dimensions=2, user="u1"
        )
        decoded = await client.embeddings.create(model="mistral-embed", input="a")  # the SDK asks for base64
    assert [d.embedding for d in floats.data] == [[-0.5, -0.5], [-1.0, -1.0]]
    assert floats.model == "mistral-embed"
    assert floats.usage.prompt_tokens == 8
    assert decoded.data[0].embedding == [-0.5] * 4
    first, second = (r.body for r in fake.requests)
    assert first == {"model": "mistral-embed", "input": ["a", "b"], "encoding_format": "float", "output_dimension": 2}
    assert "encoding_format" not in second
    assert all(r.path == "/v1/embeddings" for r in fake.requests)


async def test_unsupported_parameters_are_refused_or_dropped(
    serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]
) -> None:
    fake, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="mistral-small-latest", messages=HELLO, logit_bias={"1": 5})
    assert refused.value.code == "unsupported_parameter"
    assert refused.value.param == "logit_bias"
    assert fake.requests == []
    async with serve_gateway(config(url, extra="drop_unsupported_params = true")) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="mistral-small-latest", messages=HELLO, logit_bias={"1": 5})
    assert answer.choices[0].message.content == ANSWER
    assert "logit_bias" not in fake.requests[0].body


async def test_errors_are_mapped(serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]) -> None:
    _, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as context:
            await client.chat.completions.create(model="context", messages=HELLO)
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.chat.completions.create(
                model="mistral-small-latest", messages=HELLO, extra_body={"frobnicate": True}
            )
        with pytest.raises(openai.BadRequestError) as detail:
            await client.chat.completions.create(model="detail-422", messages=HELLO, seed=1)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="status-429", messages=HELLO, stream=True)
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="status-500", messages=HELLO)
        with pytest.raises(openai.BadRequestError) as completions:
            await client.completions.create(model="mistral-small-latest", prompt="hi")
    assert context.value.code == "context_length_exceeded"
    assert unknown.value.param == "frobnicate"
    assert "Extra inputs are not permitted" in unknown.value.message
    assert detail.value.param == "seed"  # Mistral's random_seed, named as the client sent it
    assert "Input should be a valid integer" in detail.value.message
    assert limited.value.response.headers["retry-after"] == "2"
    assert failed.value.status_code == 502
    assert "not text completions" in completions.value.message
    async with serve_gateway(config(url, key="wrong-key-0123456789")) as gw, sdk(gw) as client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(model="mistral-small-latest", messages=HELLO)
    assert "wrong-key" not in str(denied.value.body)


async def test_a_cut_stream_ends_with_an_error_event(
    serve_gateway: GatewayFactory, mistral: tuple[FakeMistral, str]
) -> None:
    _, url = mistral
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(model="cut", messages=HELLO, stream=True)
        received: list[Any] = []

        async def read_all() -> None:
            async for chunk in stream:
                received.append(chunk)

        with pytest.raises(openai.APIError, match="ended the stream"):
            await read_all()
    assert received


# ---- the fake is faithful: the official mistralai SDK talks to it ---------------------------------


async def test_fake_is_faithful_to_the_official_mistral_sdk(mistral: tuple[FakeMistral, str]) -> None:
    fake, url = mistral
    async with Mistral(api_key=KEY, server_url=url) as client:
        answer = await client.chat.complete_async(model="mistral-small-latest", messages=HELLO, random_seed=1)  # type: ignore[arg-type]
        assert answer.choices[0].message is not None
        assert answer.choices[0].message.content == ANSWER
        assert answer.usage.total_tokens == 22
        tools = await client.chat.complete_async(model="tools", messages=HELLO, tools=TOOLS, tool_choice="any")  # type: ignore[arg-type]
        assert tools.choices[0].message is not None
        assert [c.id for c in tools.choices[0].message.tool_calls or []] == ["D681PevKs", "K2ab3Cd4E"]
        events = [event async for event in await client.chat.stream_async(model="mistral-small-latest", messages=HELLO)]  # type: ignore[arg-type]
        text = "".join(str(e.data.choices[0].delta.content or "") for e in events)
        assert text.strip() == ANSWER
        assert events[-1].data.usage is not None
        assert events[-1].data.usage.total_tokens == 22
        tool_events = [e async for e in await client.chat.stream_async(model="tools", messages=HELLO, tools=TOOLS)]  # type: ignore[arg-type]
        streamed_calls = [tc for e in tool_events for tc in e.data.choices[0].delta.tool_calls or []]
        assert [tc.index for tc in streamed_calls] == [0, 0]  # what Mistral sends; the gateway renumbers
        vectors = await client.embeddings.create_async(model="mistral-embed", inputs=["x", "y"])
        assert [d.embedding for d in vectors.data] == [[-0.5] * 4, [-1.0] * 4]
        with pytest.raises(MistralError) as limited:
            await client.chat.complete_async(model="status-429", messages=HELLO)  # type: ignore[arg-type]
        assert limited.value.status_code == 429
    async with Mistral(api_key="wrong", server_url=url) as client:
        with pytest.raises(MistralError) as denied:
            await client.chat.complete_async(model="mistral-small-latest", messages=HELLO)  # type: ignore[arg-type]
        assert denied.value.status_code == 401
    assert fake.requests[0].path == "/v1/chat/completions"
    assert fake.requests[0].body["random_seed"] == 1
    assert fake.requests[0].headers["authorization"] == f"Bearer {KEY}"
