"""The Anthropic ingress end to end: the official ``anthropic`` SDK, pointed at a real gateway on
loopback, reaches the demo provider, the fake OpenAI upstream and the fake Anthropic upstream, plain
and streamed, with tools, count_tokens and typed errors."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from tests.conftest import UPSTREAM_KEY, GatewayFactory
from tests.fakes.anthropic_server import ANSWER as CLAUDE_ANSWER
from tests.fakes.anthropic_server import API_KEY as CLAUDE_KEY
from tests.fakes.anthropic_server import REDACTED, TOOL_INPUT, TOOL_THINKING, FakeAnthropic
from tests.fakes.openai_server import ANSWER as GPT_ANSWER
from tests.fakes.openai_server import REASONING, FakeOpenAI
from tests.servers import running

USER: Any = [{"role": "user", "content": "ping"}]
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}},
}
MASTER = "sk-master-123456"


@pytest.fixture(scope="session")
async def anthropic_upstream() -> AsyncIterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic()
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def claude(anthropic_upstream: tuple[FakeAnthropic, str]) -> tuple[FakeAnthropic, str]:
    anthropic_upstream[0].reset()
    return anthropic_upstream


def config(openai_url: str, anthropic_url: str, extra: str = "") -> str:
    models = {
        "demo": ("demo", "demo-1"),
        "gpt": ("local", "gpt-ok"),
        "gpt-tools": ("local", "tools"),
        "gpt-reasoning": ("local", "reasoning"),
        "gpt-429": ("local", "status-429"),
        "gpt-mid-error": ("local", "mid-error"),
        "gpt-cut": ("local", "cut"),
        "claude": ("claude", "claude-ok"),
        "claude-cached": ("claude", "cached"),
        "claude-tools": ("claude", "two-tools"),
        "claude-thinking": ("claude", "thinking-tools"),
        "claude-529": ("claude", "status-529"),
    }
    toml = f"""
[providers.demo]
type = "demo"

[providers.local]
type = "openai"
base_url = "{openai_url}/v1"
api_key = "{UPSTREAM_KEY}"

[providers.claude]
type = "anthropic"
base_url = "{anthropic_url}"
api_key = "{CLAUDE_KEY}"
"""
    for name, (provider, model) in models.items():
        toml += f'\n[[models]]\nname = "{name}"\nmax_attempts = 1\n'
        toml += f'deployments = [{{ provider = "{provider}", model = "{model}" }}]\n'
    return toml + extra


def sdk(url: str, api_key: str = "sk-anything") -> anthropic.AsyncAnthropic:
    """The official Anthropic SDK pointed at the gateway (no SDK retries)."""
    return anthropic.AsyncAnthropic(base_url=url, api_key=api_key, max_retries=0, timeout=30)


def events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every event in a raw SSE body; checks that name and data.type agree."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = orjson.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append((lines["event"], data))
    return out


async def read_stream(client: anthropic.AsyncAnthropic, model: str) -> None:
    async with client.messages.stream(model=model, max_tokens=50, messages=USER) as stream:
        async for _ in stream:
            pass


# ---- to the demo provider --------------------------------------------------------------------


async def test_demo_plain_and_streamed(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        message = await client.messages.create(model="demo", max_tokens=50, messages=USER, system="Be brief.")
        async with client.messages.stream(model="demo", max_tokens=50, messages=USER) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
    assert message.id.startswith("msg_")
    assert message.type == "message"
    assert message.model == "demo"
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert "ping" in message.content[0].text
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0
    assert final.content[0].type == "text"
    assert final.content[0].text == message.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == message.usage.output_tokens
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) <= {"content_block_delta", "text"}


async def test_raw_event_stream_is_anthropic_shaped(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    body = {"model": "gpt", "max_tokens": 50, "messages": USER, "stream": True}
    async with serve_gateway(config(upstream[1], claude[1])) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/messages", json=body, headers={"x-api-key": "sk-anything"})
    assert response.headers["content-type"].startswith("text/event-stream")
    stream = events(response.text)
    names = [name for name, _ in stream]
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = stream[0][1]["message"]
    assert (start["content"], start["role"], start["model"]) == ([], "assistant", "gpt")
    assert stream[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for n, d in stream if n == "content_block_delta")
    assert text == GPT_ANSWER + " "  # the fake OpenAI streams each word with a trailing space
    delta = stream[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 9
    assert delta["usage"]["input_tokens"] == 11
    # the gateway asked the upstream for usage so the final message_delta carries real numbers
    assert upstream[0].requests[-1].body["stream_options"] == {"include_usage": True}


# ---- to an OpenAI upstream ------------------------------------------------------------------


async def test_request_translated_for_an_openai_upstream(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    png = base64.b64encode(b"\x89PNG fake").decode()
    messages: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "text", "text": "And this photo?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            ],
        },
    ]
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        message = await client.messages.create(
            model="gpt",
            max_tokens=77,
            system=[{"type": "text", "text": "Be brief."}],
            messages=messages,
            tools=[WEATHER],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            stop_sequences=["END"],
            metadata={"user_id": "user-7"},
            output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
            extra_body={"temperature": 0.3, "top_p": 0.9},  # this SDK version no longer offers them
        )
    assert message.content[0].type == "text"
    assert message.content[0].text == GPT_ANSWER
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        8,
        3,
        9,
    )
    sent = upstream[0].requests[-1].body
    assert sent == {
        "model": "gpt-ok",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And this photo?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            },
        ],
        "max_tokens": 77,
        "stop": ["END"],
        "temperature": 0.3,
        "top_p": 0.9,
        "user": "user-7",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": WEATHER["input_schema"],
                    "description": "The weather in a city.",
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}},
    }


async def test_tool_results_with_errors_and_images(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    png = base64.b64encode(b"\x89PNG chart").decode()
    messages: Any = [
        {"role": "user", "content": "Plot it."},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_a", "name": "plot", "input": {}},
                {"type": "tool_use", "id": "toolu_b", "name": "plot", "input": {"x": 1}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_a",
                    "content": [
                        {"type": "text", "text": "chart:"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                    ],
                },
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "x out of range", "is_error": True},
            ],
        },
    ]
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        await client.messages.create(model="gpt", max_tokens=10, messages=messages)
    assert upstream[0].requests[-1].body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "toolu_a", "type": "function", "function": {"name": "plot", "arguments": "{}"}},
                {"id": "toolu_b", "type": "function", "function": {"name": "plot", "arguments": '{"x":1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_a", "content": "chart:"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "Error: x out of range"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]},
    ]


async def test_openai_tool_calls_become_tool_use(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        message = await client.messages.create(model="gpt-tools", max_tokens=50, messages=USER, tools=[WEATHER])
        deltas: list[str] = []
        async with client.messages.stream(model="gpt-tools", max_tokens=50, messages=USER, tools=[WEATHER]) as stream:
            async for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                    deltas.append(event.delta.partial_json)
            final = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["tool_use"]
    block = message.content[0]
    assert block.type == "tool_use"
    assert (block.id, block.name, block.input) == ("call_abc123", "get_weather", TOOL_INPUT)
    assert final.stop_reason == "tool_use"
    assert len(deltas) > 1  # arguments arrive as pieces the SDK assembles
    streamed = final.content[0]
    assert streamed.type == "tool_use"
    assert (streamed.id, streamed.name, streamed.input) == ("call_abc123", "get_weather", TOOL_INPUT)


async def sloppy_openai_compatible(scope: Any, receive: Any, send: Any) -> None:
    """An OpenAI-compatible server of the careless kind: streamed tool-call deltas without
    ``index`` and ``finish_reason: "stop"`` after tool calls."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    base = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    deltas: list[Any] = [
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}],
        },
        {"tool_calls": [{"function": {"arguments": '{"a":'}}]},
        {"tool_calls": [{"function": {"arguments": " 1}"}}]},
        {"tool_calls": [{"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
    ]
    frames = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    frames.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = b"".join(b"data: " + orjson.dumps(f) + b"\n\n" for f in frames) + b"data: [DONE]\n\n"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": body})


async def test_tool_calls_from_a_sloppy_openai_compatible_server(serve_gateway: GatewayFactory) -> None:
    async with running(sloppy_openai_compatible) as upstream_url:
        toml = f"""
[providers.sloppy]
type = "openai"
base_url = "{upstream_url}/v1"

[[models]]
name = "sloppy"
deployments = [{{ provider = "sloppy", model = "m" }}]
"""
        async with serve_gateway(toml) as url, sdk(url) as client:
            async with client.messages.stream(model="sloppy", max_tokens=10, messages=USER) as stream:
                final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        ("tool_use", "c1", "f", {"a": 1}),
        ("tool_use", "c2", "g", {}),
    ]


# ---- to an Anthropic upstream (both translations in a row) -----------------------------------


async def test_round_trip_through_the_anthropic_provider(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    tools: Any = [WEATHER, {"name": "get_time", "input_schema": {"type": "object"}}]
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        message = await client.messages.create(model="claude-cached", max_tokens=64, messages=USER, system="Be brief.")
        async with client.messages.stream(model="claude-tools", max_tokens=64, messages=USER, tools=tools) as stream:
            final = await stream.get_final_message()
    assert message.content[0].type == "text"
    assert message.content[0].text == CLAUDE_ANSWER
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.input_tokens == 8 + 2  # cache writes are counted as input on the way back
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        ("tool_use", "toolu_01A", "get_weather", TOOL_INPUT),
        ("tool_use", "toolu_01B", "get_time", {"city": "Paris"}),
    ]
    sent = claude[0].requests[-1].body
    assert sent["max_tokens"] == 64
    assert sent["tools"][0] == WEATHER
    assert claude[0].requests[-2].body["system"] == "Be brief."


async def test_thinking_through_the_anthropic_provider(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    kwargs: Any = {"model": "claude-thinking", "max_tokens": 2048, "thinking": thinking, "tools": [WEATHER]}
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        message = await client.messages.create(messages=USER, **kwargs)
        plain_sent = claude[0].last
        deltas: list[str] = []
        async with client.messages.stream(messages=USER, **kwargs) as stream:
            async for event in stream:
                if event.type == "content_block_delta":
                    deltas.append(event.delta.type)
            final = await stream.get_final_message()
        history: Any = [
            {"role": "user", "content": "Hi"},
            {  # a turn answered by another backend: its unsigned thinking block is dropped for Anthropic
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Greet back.", "signature": ""},
                    {"type": "text", "text": "Hello."},
                ],
            },
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in final.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01T", "content": "18C"}]},
        ]
        await client.messages.create(messages=history, **kwargs)
    assert plain_sent["thinking"] == thinking  # verbatim
    assert plain_sent["max_tokens"] == 2048
    for answer in (message, final):
        assert [block.type for block in answer.content] == ["thinking", "redacted_thinking", "text", "tool_use"]
        assert [block.model_dump() for block in answer.content[:2]] == [TOOL_THINKING, REDACTED]
    assert "thinking_delta" in deltas
    assert deltas.index("signature_delta") > deltas.index("thinking_delta")
    # the fake verifies the signatures and that the turn answered by tool results starts with its thinking
    sent = claude[0].last["messages"]
    assert sent[1] == {"role": "assistant", "content": "Hello."}
    assert sent[3]["content"][:2] == [TOOL_THINKING, REDACTED]
    assert sent[3]["content"][3] == {"type": "tool_use", "id": "toolu_01T", "name": "get_weather", "input": TOOL_INPUT}


async def test_thinking_from_an_openai_compatible_reasoning_model(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    history: Any = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [dict(TOOL_THINKING), dict(REDACTED), {"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "A pangram?"},
    ]
    kwargs: Any = {"model": "gpt-reasoning", "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        message = await client.messages.create(messages=history, **kwargs)
        async with client.messages.stream(messages=history, **kwargs) as stream:
            final = await stream.get_final_message()
    for answer, text in ((message, GPT_ANSWER), (final, GPT_ANSWER + " ")):
        assert [block.model_dump(exclude_none=True) for block in answer.content] == [
            {"type": "thinking", "thinking": REASONING, "signature": ""},
            {"type": "text", "text": text},
        ]
    for request in upstream[0].requests[-2:]:
        assert "thinking" not in request.body
        assert request.body["messages"][1] == {"role": "assistant", "content": "Hello."}
        assert not any("thinking_blocks" in m for m in request.body["messages"])


# ---- count_tokens ----------------------------------------------------------------------------


async def test_count_tokens(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    long_messages: Any = [{"role": "user", "content": "word " * 400}]
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        short = await client.messages.with_raw_response.count_tokens(model="demo", messages=USER)
        long = await client.messages.count_tokens(model="demo", messages=long_messages, tools=[WEATHER])
        exact = await client.messages.with_raw_response.count_tokens(model="claude", messages=USER, system="Hi")
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.count_tokens(model="nope", messages=USER)
        short_count = (await short.parse()).input_tokens
        exact_count = (await exact.parse()).input_tokens
    assert short.headers["x-llmgateway-estimated"] == "true"
    assert 0 < short_count < long.input_tokens
    assert long.input_tokens >= 2000 // 4
    assert exact.headers["x-llmgateway-estimated"] == "false"
    recorded = claude[0].requests[-1]
    assert recorded.path == "/v1/messages/count_tokens"
    assert recorded.body == {"model": "claude-ok", "system": "Hi", "messages": [{"role": "user", "content": "ping"}]}
    assert exact_count == len(orjson.dumps(["Hi", recorded.body["messages"], None])) // 4


# ---- errors ----------------------------------------------------------------------------------


async def test_typed_errors(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    async with serve_gateway(config(upstream[1], claude[1])) as url, sdk(url) as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(model="no-such-model", max_tokens=10, messages=USER)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="gpt-429", max_tokens=10, messages=USER)
        with pytest.raises(anthropic.InternalServerError) as overloaded:
            await client.messages.create(model="claude-529", max_tokens=10, messages=USER)
        with pytest.raises(anthropic.BadRequestError) as server_tool:
            await client.messages.create(
                model="demo",
                max_tokens=10,
                messages=USER,
                tools=[{"type": "web_search_20250305", "name": "web_search"}],
            )
    assert missing.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "The model 'no-such-model' does not exist",
            "param": "model",
            "code": "model_not_found",
        },
    }
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert overloaded.value.status_code == 503
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert server_tool.value.body["error"]["param"] == "tools[0].type"  # type: ignore[index]


async def test_bad_bodies_name_the_param(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    async with serve_gateway(config(upstream[1], claude[1])) as url, httpx.AsyncClient(base_url=url) as http:
        no_max = await http.post("/v1/messages", json={"model": "demo", "messages": USER})
        bad_role = await http.post(
            "/messages", json={"model": "demo", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}
        )
        not_json = await http.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert no_max.status_code == 400
    assert no_max.json()["type"] == "error"
    assert no_max.json()["error"]["type"] == "invalid_request_error"
    assert no_max.json()["error"]["param"] == "max_tokens"
    assert bad_role.status_code == 400
    assert bad_role.json()["error"]["param"] == "messages[0].role"
    assert not_json.status_code == 400
    assert not_json.json()["type"] == "error"


async def test_keys_from_x_api_key(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str]
) -> None:
    toml = config(upstream[1], claude[1], f'\n[auth]\nmaster_key = "{MASTER}"\n')
    body = {"model": "demo", "max_tokens": 10, "messages": USER}
    async with serve_gateway(toml) as url, httpx.AsyncClient(base_url=url) as http:
        accepted = await http.post("/v1/messages", json=body, headers={"x-api-key": MASTER})
        refused = await http.post("/v1/messages", json=body, headers={"x-api-key": "sk-wrong-key"})
        counted = await http.post("/v1/messages/count_tokens", json=body, headers={"x-api-key": MASTER})
        async with sdk(url, api_key="sk-wrong-key") as client:
            with pytest.raises(anthropic.AuthenticationError):
                await client.messages.create(model="demo", max_tokens=10, messages=USER)
    assert accepted.status_code == 200
    assert accepted.json()["type"] == "message"
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"
    assert counted.status_code == 200


@pytest.mark.parametrize("model", ["gpt-mid-error", "gpt-cut"])
async def test_broken_upstream_stream_ends_with_an_error_event(
    serve_gateway: GatewayFactory, upstream: tuple[FakeOpenAI, str], claude: tuple[FakeAnthropic, str], model: str
) -> None:
    body = {"model": model, "max_tokens": 50, "messages": USER, "stream": True}
    async with serve_gateway(config(upstream[1], claude[1])) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post("/v1/messages", json=body)
        async with sdk(url) as client:
            with pytest.raises(anthropic.APIStatusError) as error:
                await read_stream(client, model)
    stream = events(response.text)
    assert stream[0][0] == "message_start"
    assert "content_block_delta" in [name for name, _ in stream]
    assert "message_stop" not in [name for name, _ in stream]
    name, data = stream[-1]
    assert name == "error"
    assert data["error"]["type"] == "api_error"
    assert "error" in str(error.value).lower()
