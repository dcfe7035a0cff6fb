"""The ``anthropic`` provider end to end: the official OpenAI SDK talks to a real gateway on loopback,
which talks to a fake Anthropic API (``tests/fakes/anthropic_server.py``). The first tests show that
the official ``anthropic`` SDK accepts the fake as the real thing (plain, stream, tools, errors)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import orjson
import pytest

from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.provider import estimate_tokens
from llmgateway.core.types import Attempt, RequestContext, Usage, UsageRecord
from tests.conftest import GatewayFactory, sdk
from tests.fakes.anthropic_server import (
    ANSWER,
    API_KEY,
    FORCED_INPUT,
    REDACTED,
    TOOL_INPUT,
    TOOL_THINKING,
    FakeAnthropic,
)
from tests.servers import running

MODELS = [
    "claude-ok",
    "cached",
    "tools",
    "two-tools",
    "max-tokens",
    "stop-seq",
    "thinking",
    "thinking-tools",
    "mid-error",
    "cut",
    "status-400",
    "status-401",
    "status-403",
    "status-404",
    "status-413",
    "status-429",
    "status-500",
    "status-529",
]

USER: Any = [{"role": "user", "content": "Say a pangram."}]

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.fixture(scope="session")
async def anthropic_server() -> AsyncIterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic()
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def fake(anthropic_server: tuple[FakeAnthropic, str]) -> FakeAnthropic:
    anthropic_server[0].reset()
    return anthropic_server[0]


@pytest.fixture
def fake_url(anthropic_server: tuple[FakeAnthropic, str]) -> str:
    return anthropic_server[1]


def config(url: str, *, key: str = API_KEY, options: str = "", deployment: str = "") -> str:
    models = "".join(
        f'\n[[models]]\nname = "{m}"\nmax_attempts = 1\n'
        f'deployments = [{{ provider = "claude", model = "{m}"{deployment} }}]\n'
        for m in MODELS
    )
    return f'[providers.claude]\ntype = "anthropic"\nbase_url = "{url}"\napi_key = "{key}"\n{options}\n{models}'


def client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0, timeout=30)


async def read_stream(claude: anthropic.AsyncAnthropic, model: str) -> None:
    async with claude.messages.stream(model=model, max_tokens=10, messages=USER) as stream:
        async for _ in stream:
            pass


async def collect_text(stream: Any, into: list[str]) -> None:
    async for chunk in stream:
        into.append(chunk.choices[0].delta.content or "")


# ---- the fake is faithful: the official anthropic SDK reads it -------------------------------


async def test_fake_plain_with_anthropic_sdk(fake: FakeAnthropic, fake_url: str) -> None:
    async with client(fake_url) as claude:
        raw = await claude.messages.with_raw_response.create(model="cached", max_tokens=100, messages=USER)
        message = await raw.parse()
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert message.type == "message"
    assert message.content[0].type == "text"
    assert message.content[0].text == ANSWER
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 8
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.output_tokens == 9
    assert fake.requests[-1].headers["anthropic-version"]  # the SDK sends its own version


async def test_fake_stream_with_anthropic_sdk(fake: FakeAnthropic, fake_url: str) -> None:
    async with client(fake_url) as claude:
        async with claude.messages.stream(model="thinking", max_tokens=100, messages=USER) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            message = await stream.get_final_message()
    assert text == ANSWER
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].type == "thinking"
    assert message.content[0].signature == "sig_fake"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 9


async def test_fake_tool_use_with_anthropic_sdk(fake: FakeAnthropic, fake_url: str) -> None:
    tools: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    async with client(fake_url) as claude:
        plain = await claude.messages.create(model="tools", max_tokens=100, messages=USER, tools=tools)
        async with claude.messages.stream(model="two-tools", max_tokens=100, messages=USER, tools=tools) as stream:
            streamed = await stream.get_final_message()
    assert plain.stop_reason == "tool_use"
    assert plain.content[1].type == "tool_use"
    assert plain.content[1].input == TOOL_INPUT
    assert [(b.type, getattr(b, "input", None)) for b in streamed.content] == [
        ("tool_use", TOOL_INPUT),
        ("tool_use", {"city": "Paris"}),
    ]


async def test_fake_errors_with_anthropic_sdk(fake: FakeAnthropic, fake_url: str) -> None:
    async with client(fake_url) as claude:
        with pytest.raises(anthropic.RateLimitError) as limited:
            await claude.messages.create(model="status-429", max_tokens=10, messages=USER)
        with pytest.raises(anthropic.OverloadedError):
            await claude.messages.create(model="status-529", max_tokens=10, messages=USER)
        with pytest.raises(anthropic.NotFoundError):
            await claude.messages.create(model="status-404", max_tokens=10, messages=USER)
        with pytest.raises(anthropic.BadRequestError) as bad:
            await claude.messages.create(model="x", max_tokens=10, messages=[{"role": "system", "content": "hi"}])  # type: ignore[list-item]
        with pytest.raises(anthropic.APIStatusError) as mid:
            await read_stream(claude, "mid-error")
    async with anthropic.AsyncAnthropic(base_url=fake_url, api_key="sk-ant-wrong", max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError):
            await wrong.messages.create(model="claude-ok", max_tokens=10, messages=USER)
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": limited.value.body["error"]["message"]},  # type: ignore[index]
        "request_id": limited.value.body["request_id"],  # type: ignore[index]
    }
    assert "top-level `system`" in bad.value.message
    assert "overloaded_error" in str(mid.value)


# ---- plain -----------------------------------------------------------------------------------


async def test_plain_answer_through_the_gateway(
    serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str
) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        answer = await oa.chat.completions.create(model="claude-ok", messages=USER)
    assert answer.model == "claude-ok"
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (11, 9, 20)
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body == {
        "model": "claude-ok",
        "messages": [{"role": "user", "content": "Say a pangram."}],
        "max_tokens": 4096,
    }


async def test_translated_request_body(serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str) -> None:
    png = base64.b64encode(b"\x89PNG fake image").decode()
    messages: Any = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here is a photo."},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "toolu_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C and sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "14:00"}]},
        {"role": "user", "content": "Thanks, summarise."},
    ]
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        await oa.chat.completions.create(
            model="claude-ok",
            messages=messages,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
            stop="END",
            temperature=0.5,
            top_p=0.9,
            max_completion_tokens=321,
            user="user-42",
        )
        await oa.chat.completions.create(
            model="claude-ok",
            messages=USER,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stop=["a", "b"],
            max_tokens=50,
        )
    first, second = fake.requests[-2].body, fake.requests[-1].body
    assert first == {
        "model": "claude-ok",
        "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Use metric units."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris and the time?"},
                    {"type": "text", "text": "Here is a photo."},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C and sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "14:00"}]},
                    {"type": "text", "text": "Thanks, summarise."},
                ],
            },
        ],
        "max_tokens": 321,
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "metadata": {"user_id": "user-42"},
        "tools": [
            {
                "name": "get_weather",
                "description": "The weather in a city.",
                "input_schema": WEATHER_TOOL["function"]["parameters"],
            },
            {"name": "get_time", "input_schema": TIME_TOOL["function"]["parameters"]},
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }
    assert second["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert second["stop_sequences"] == ["a", "b"]
    assert second["max_tokens"] == 50


async def test_max_tokens_from_deployment_and_option(
    serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str
) -> None:
    async with serve_gateway(config(fake_url, deployment=", max_output_tokens = 777")) as url, sdk(url) as oa:
        await oa.chat.completions.create(model="claude-ok", messages=USER)
    assert fake.last["max_tokens"] == 777
    async with serve_gateway(config(fake_url, options="default_max_tokens = 99")) as url, sdk(url) as oa:
        await oa.chat.completions.create(model="claude-ok", messages=USER)
    assert fake.last["max_tokens"] == 99


async def test_usage_stop_reasons_and_thinking(
    serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str
) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        cached = await oa.chat.completions.create(model="cached", messages=USER)
        cut = await oa.chat.completions.create(model="max-tokens", messages=USER)
        stopped = await oa.chat.completions.create(model="stop-seq", messages=USER, stop=["jumps"])
        thought = await oa.chat.completions.create(model="thinking", messages=USER)
    assert cached.usage is not None
    assert cached.usage.prompt_tokens == 8 + 3 + 2  # input + cache reads + cache writes
    assert cached.usage.prompt_tokens_details is not None
    assert cached.usage.prompt_tokens_details.cached_tokens == 3
    assert cut.choices[0].finish_reason == "length"
    assert stopped.choices[0].finish_reason == "stop"
    assert thought.choices[0].message.content == ANSWER
    assert (thought.choices[0].message.model_extra or {})["reasoning_content"] == "The user wants a pangram."


async def test_reasoning_effort_becomes_a_thinking_budget(
    serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str
) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        await oa.chat.completions.create(model="thinking", messages=USER, reasoning_effort="low")
        low = fake.last
        await oa.chat.completions.create(
            model="thinking", messages=USER, reasoning_effort="high", max_completion_tokens=2000
        )
        lowered = fake.last
        await oa.chat.completions.create(model="thinking", messages=USER, reasoning_effort="none")
        none = fake.last
        await oa.chat.completions.create(
            model="thinking", messages=USER, reasoning_effort="high", extra_body={"thinking": {"type": "adaptive"}}
        )
        explicit = fake.last
        sent = len(fake.requests)
        with pytest.raises(openai.BadRequestError) as too_small:
            await oa.chat.completions.create(model="thinking", messages=USER, reasoning_effort="low", max_tokens=1024)
        with pytest.raises(openai.BadRequestError) as temperature:
            await oa.chat.completions.create(model="thinking", messages=USER, reasoning_effort="low", temperature=0.2)
        with pytest.raises(openai.BadRequestError) as forced:
            await oa.chat.completions.create(
                model="thinking", messages=USER, reasoning_effort="low", tools=[WEATHER_TOOL], tool_choice="required"
            )
    assert (low["thinking"], low["max_tokens"]) == ({"type": "enabled", "budget_tokens": 1024}, 4096)
    assert (lowered["thinking"], lowered["max_tokens"]) == ({"type": "enabled", "budget_tokens": 1999}, 2000)
    assert "thinking" not in none
    assert "reasoning_effort" not in none
    assert explicit["thinking"] == {"type": "adaptive"}  # an explicit thinking object wins
    assert len(fake.requests) == sent  # the refused requests never reached Anthropic
    assert too_small.value.param == "reasoning_effort"
    assert too_small.value.type == "invalid_request_error"
    assert "1024" in too_small.value.message
    assert temperature.value.param == "temperature"
    assert "thinking" in temperature.value.message
    assert forced.value.param == "tool_choice"


async def test_thinking_blocks_round_trip(serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        answer = await oa.chat.completions.create(
            model="thinking-tools", messages=USER, tools=[WEATHER_TOOL], reasoning_effort="medium"
        )
        streamed_blocks: list[Any] = []
        reasoning: list[str] = []
        stream = await oa.chat.completions.create(
            model="thinking-tools", messages=USER, tools=[WEATHER_TOOL], reasoning_effort="medium", stream=True
        )
        async for chunk in stream:
            extra = (chunk.choices[0].delta.model_extra or {}) if chunk.choices else {}
            streamed_blocks += extra.get("thinking_blocks") or []
            reasoning.append(extra.get("reasoning_content") or "")
        assistant = answer.choices[0].message.model_dump(exclude_none=True)
        unsigned = {"type": "thinking", "thinking": "From another model.", "signature": ""}
        assistant["thinking_blocks"] = [unsigned, *assistant["thinking_blocks"]]
        turns: Any = [*USER, assistant, {"role": "tool", "tool_call_id": "toolu_01T", "content": "18C"}]
        await oa.chat.completions.create(
            model="thinking-tools", messages=turns, tools=[WEATHER_TOOL], reasoning_effort="medium"
        )
    message = answer.choices[0].message
    assert (message.model_extra or {})["thinking_blocks"] == [TOOL_THINKING, REDACTED]
    assert (message.model_extra or {})["reasoning_content"] == TOOL_THINKING["thinking"]
    assert message.tool_calls is not None
    assert message.tool_calls[0].id == "toolu_01T"
    assert streamed_blocks == [TOOL_THINKING, REDACTED]
    assert "".join(reasoning) == TOOL_THINKING["thinking"]
    # the fake checks signatures and that the turn answered by tool results starts with its thinking
    assert fake.last["messages"][1] == {
        "role": "assistant",
        "content": [
            TOOL_THINKING,
            REDACTED,
            {"type": "text", "text": "Let me check the weather."},
            {"type": "tool_use", "id": "toolu_01T", "name": "get_weather", "input": TOOL_INPUT},
        ],
    }
    assert fake.last["messages"][2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_01T", "content": "18C"}],
    }


async def test_rate_limit_headers_are_captured(serve_gateway: GatewayFactory, fake_url: str) -> None:
    seen: list[dict[str, str]] = []

    class Watch:
        @hookimpl
        def llmgateway_upstream_done(self, ctx: RequestContext, attempt: Attempt) -> None:
            seen.append(attempt.rate_limit_headers)

    async with serve_gateway(config(fake_url), plugins={"watch": Watch()}) as url, sdk(url) as oa:
        await oa.chat.completions.create(model="claude-ok", messages=USER)
        with pytest.raises(openai.RateLimitError):
            await oa.chat.completions.create(model="status-429", messages=USER)
    assert seen[0]["anthropic-ratelimit-requests-remaining"] == "49"
    assert seen[1]["anthropic-ratelimit-requests-remaining"] == "0"
    assert seen[1]["retry-after"] == "7"


async def test_usage_reaches_accounting_for_every_stream(serve_gateway: GatewayFactory, fake_url: str) -> None:
    records: list[UsageRecord] = []

    class Accounting:
        @hookimpl
        def llmgateway_record_usage(self, ctx: RequestContext, record: UsageRecord) -> None:
            records.append(record)

    async with serve_gateway(config(fake_url), plugins={"accounting": Accounting()}) as url, sdk(url) as oa:
        stream = await oa.chat.completions.create(model="cached", messages=USER, stream=True)
        await collect_text(stream, [])
        broken = await oa.chat.completions.create(model="cut", messages=USER, stream=True)
        with pytest.raises(openai.APIError):
            await collect_text(broken, [])
    assert records[0].usage == Usage(prompt_tokens=13, completion_tokens=9, cached_tokens=3)
    assert records[0].upstream_model == "cached"
    assert records[0].streamed
    assert records[1].status == 502
    assert records[1].usage.prompt_tokens == 11  # counted from message_start before the cut
    # message_start's output count is a placeholder: the output is estimated from the text received
    assert records[1].usage.estimated
    assert records[1].usage.completion_tokens == max(1, estimate_tokens(len(ANSWER.split(" ")[0])))


# ---- tools -----------------------------------------------------------------------------------


async def test_tool_calls(serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        answer = await oa.chat.completions.create(model="tools", messages=USER, tools=[WEATHER_TOOL])
        both = await oa.chat.completions.create(model="two-tools", messages=USER, tools=[WEATHER_TOOL, TIME_TOOL])
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check the weather."
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.type == "function"
    assert (call.id, call.function.name) == ("toolu_01A", "get_weather")
    assert orjson.loads(call.function.arguments) == TOOL_INPUT
    assert both.choices[0].message.content is None
    assert [
        (c.id, c.function.name, orjson.loads(c.function.arguments)) for c in both.choices[0].message.tool_calls or []
    ] == [  # type: ignore[union-attr]
        ("toolu_01A", "get_weather", TOOL_INPUT),
        ("toolu_01B", "get_time", {"city": "Paris"}),
    ]


async def test_streamed_tool_calls(serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        results = {}
        for model in ("tools", "two-tools"):
            stream = await oa.chat.completions.create(
                model=model, messages=USER, tools=[WEATHER_TOOL, TIME_TOOL], stream=True
            )
            calls: dict[int, dict[str, str]] = {}
            text: list[str] = []
            finish = []
            starts = 0
            async for chunk in stream:
                choice = chunk.choices[0]
                text.append(choice.delta.content or "")
                finish.append(choice.finish_reason)
                for delta in choice.delta.tool_calls or ():
                    entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    if delta.id:
                        starts += 1
                        entry["id"] = delta.id
                    if delta.function and delta.function.name:
                        entry["name"] = delta.function.name
                    if delta.function and delta.function.arguments:
                        entry["arguments"] += delta.function.arguments
            results[model] = (calls, "".join(text), [f for f in finish if f], starts)
    calls, text, finish, starts = results["tools"]
    assert text == "Let me check the weather."
    assert finish == ["tool_calls"]
    assert starts == 1  # id and name sent once
    assert calls[0]["id"] == "toolu_01A"
    assert calls[0]["name"] == "get_weather"
    assert orjson.loads(calls[0]["arguments"]) == TOOL_INPUT
    calls, text, finish, starts = results["two-tools"]
    assert sorted(calls) == [0, 1]
    assert [(c["id"], c["name"], orjson.loads(c["arguments"])) for c in calls.values()] == [
        ("toolu_01A", "get_weather", TOOL_INPUT),
        ("toolu_01B", "get_time", {"city": "Paris"}),
    ]


async def test_json_mode_is_a_forced_tool(serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str) -> None:
    city_schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}}
    list_schema = {"type": "array", "items": {"type": "string"}}
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        plain = await oa.chat.completions.create(
            model="claude-ok",
            messages=USER,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": city_schema}},
        )
        sent = fake.last
        wrapped = await oa.chat.completions.create(
            model="claude-ok",
            messages=USER,
            response_format={"type": "json_schema", "json_schema": {"name": "cities", "schema": list_schema}},
        )
        json_object = await oa.chat.completions.create(
            model="claude-ok", messages=USER, response_format={"type": "json_object"}
        )
        texts = {}
        for name, schema in (("city", city_schema), ("cities", list_schema)):
            stream = await oa.chat.completions.create(
                model="claude-ok",
                messages=USER,
                response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
                stream=True,
            )
            texts[name] = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert sent["tools"] == [
        {"name": "city", "description": sent["tools"][0]["description"], "input_schema": city_schema}
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": "city"}
    assert plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.tool_calls is None
    assert orjson.loads(plain.choices[0].message.content or "") == FORCED_INPUT
    assert orjson.loads(wrapped.choices[0].message.content or "") == ["Paris", "Lyon"]
    assert orjson.loads(json_object.choices[0].message.content or "") == FORCED_INPUT
    assert orjson.loads(texts["city"]) == FORCED_INPUT
    assert orjson.loads(texts["cities"]) == ["Paris", "Lyon"]


# ---- streams ---------------------------------------------------------------------------------


async def test_streamed_text_and_usage(serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        with_usage = await oa.chat.completions.create(
            model="cached", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in with_usage]
        without = await oa.chat.completions.create(model="claude-ok", messages=USER, stream=True)
        plain_chunks = [chunk async for chunk in without]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert all(c.model == "cached" for c in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (13, 9)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 3
    assert all(c.usage is None and c.choices for c in plain_chunks)
    assert "".join(c.choices[0].delta.content or "" for c in plain_chunks) == ANSWER
    assert fake.last["stream"] is True


@pytest.mark.parametrize("model", ["mid-error", "cut"])
async def test_broken_stream_ends_with_an_error(
    serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str, model: str
) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        stream = await oa.chat.completions.create(model=model, messages=USER, stream=True)
        text: list[str] = []
        with pytest.raises(openai.APIError) as error:
            await collect_text(stream, text)
    assert "".join(text) == "The"
    expected = "Overloaded" if model == "mid-error" else "before message_stop"
    assert expected in str(error.value.message)


# ---- errors ----------------------------------------------------------------------------------


async def test_typed_errors(serve_gateway: GatewayFactory, fake_url: str) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        with pytest.raises(openai.RateLimitError) as limited:
            await oa.chat.completions.create(model="status-429", messages=USER)
        with pytest.raises(openai.InternalServerError) as overloaded:
            await oa.chat.completions.create(model="status-529", messages=USER)
        with pytest.raises(openai.BadRequestError) as too_long:
            await oa.chat.completions.create(model="status-400", messages=USER)
        with pytest.raises(openai.NotFoundError):
            await oa.chat.completions.create(model="status-404", messages=USER)
        with pytest.raises(openai.PermissionDeniedError):
            await oa.chat.completions.create(model="status-403", messages=USER)
        with pytest.raises(openai.InternalServerError) as failed:
            await oa.chat.completions.create(model="status-500", messages=USER)
        with pytest.raises(openai.APIStatusError) as large:
            await oa.chat.completions.create(model="status-413", messages=USER, stream=True)
    assert limited.value.response.headers["retry-after"] == "7"
    assert overloaded.value.status_code == 503
    assert overloaded.value.code == "overloaded"
    assert "Overloaded" in overloaded.value.message
    assert too_long.value.code == "context_length_exceeded"
    assert failed.value.status_code == 502
    assert large.value.status_code == 413
    async with serve_gateway(config(fake_url, key="sk-ant-wrong")) as url, sdk(url) as oa:
        with pytest.raises(openai.AuthenticationError) as auth:
            await oa.chat.completions.create(model="claude-ok", messages=USER)
    assert "sk-ant-wrong" not in auth.value.message


async def test_unsupported_parameters(serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str) -> None:
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        for kwargs in ({"n": 2}, {"seed": 7}, {"presence_penalty": 0.5}, {"logprobs": True}, {"temperature": 1.5}):
            with pytest.raises(openai.BadRequestError) as refused:
                await oa.chat.completions.create(model="claude-ok", messages=USER, **kwargs)  # type: ignore[call-overload]
            assert refused.value.param == next(iter(kwargs))
            assert refused.value.code == "unsupported_parameter"
        await oa.chat.completions.create(model="claude-ok", messages=USER, n=1, presence_penalty=0, logprobs=False)
        with pytest.raises(openai.BadRequestError) as embeddings:
            await oa.embeddings.create(model="claude-ok", input="hi")
    assert "embeddings" in embeddings.value.message
    options = "drop_unsupported_params = true"
    async with serve_gateway(config(fake_url).replace("api_key", f"{options}\napi_key")) as url, sdk(url) as oa:
        await oa.chat.completions.create(model="claude-ok", messages=USER, n=2, seed=7, temperature=1.5)
    assert "seed" not in fake.last
    assert "n" not in fake.last
    assert fake.last["temperature"] == 1


async def test_bad_requests_name_the_param(serve_gateway: GatewayFactory, fake: FakeAnthropic, fake_url: str) -> None:
    bad_tool_args: Any = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}],
        },
    ]
    bad_image: Any = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA"}}]}
    ]
    async with serve_gateway(config(fake_url)) as url, sdk(url) as oa:
        with pytest.raises(openai.BadRequestError) as args:
            await oa.chat.completions.create(model="claude-ok", messages=bad_tool_args)
        with pytest.raises(openai.BadRequestError) as image:
            await oa.chat.completions.create(model="claude-ok", messages=bad_image)
        with pytest.raises(openai.BadRequestError) as only_system:
            await oa.chat.completions.create(model="claude-ok", messages=[{"role": "system", "content": "x"}])
    assert args.value.param == "messages[1].tool_calls[0].function.arguments"
    assert image.value.param == "messages[0].content[0].image_url.url"
    assert only_system.value.param == "messages"
    assert fake.requests == []
