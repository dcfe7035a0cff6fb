"""The ``gemini`` provider end to end: the official OpenAI SDK talks to a real gateway on loopback,
which talks to a fake Gemini API (``tests/fakes/gemini_server.py``) that the official google-genai
SDK accepts as the real thing."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from llmgateway.core.app import create_app
from llmgateway.core.config import parse_config
from llmgateway.core.errors import ConfigError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import RequestContext, Usage, UsageRecord
from tests.conftest import GatewayFactory, sdk
from tests.fakes.gemini_server import (
    ANSWER,
    API_KEY,
    JSON_ANSWER,
    SIGNATURE,
    THOUGHT,
    FakeGemini,
    Recorded,
    token_logprob,
)
from tests.servers import running

MODELS = [
    "gemini-ok",
    "tools",
    "tools-parallel",
    "json",
    "thinking",
    "length",
    "safety",
    "blocked",
    "cut",
    "mid-error",
    "status-400",
    "status-401",
    "status-403",
    "status-404",
    "status-413",
    "status-429",
    "status-500",
    "status-503",
    "embed",
]


@pytest.fixture(scope="session")
async def gemini_server() -> AsyncIterator[tuple[FakeGemini, str]]:
    fake = FakeGemini()
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def gemini(gemini_server: tuple[FakeGemini, str]) -> tuple[FakeGemini, str]:
    fake, url = gemini_server
    fake.reset()
    return fake, url


def config(url: str, *, key: str = API_KEY, options: str = "") -> str:
    models = "".join(
        f'\n[[models]]\nname = "{m}"\nmax_attempts = 1\ndeployments = [{{ provider = "gem", model = "{m}" }}]\n'
        for m in MODELS
    )
    return f'[providers.gem]\ntype = "gemini"\nbase_url = "{url}/v1beta"\napi_key = "{key}"\n{options}\n{models}'


async def collect_text(stream: Any, into: list[str]) -> None:
    async for chunk in stream:
        into.append(chunk.choices[0].delta.content or "")


class Records:
    """A test plugin keeping the usage records accounting receives."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    @hookimpl
    def llmgateway_record_usage(self, ctx: RequestContext, record: UsageRecord) -> None:
        self.records.append(record)


def last(fake: FakeGemini) -> Recorded:
    assert fake.requests, "the fake Gemini received nothing"
    return fake.requests[-1]


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": ["string", "null"], "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


# ---- the fake is faithful: the official google-genai SDK accepts it --------------------------------


async def test_google_genai_sdk_accepts_the_fake(gemini: tuple[FakeGemini, str]) -> None:
    fake, url = gemini
    http = httpx.AsyncClient()  # the SDK's own aiohttp session subclass warns (DeprecationWarning)
    options = genai_types.HttpOptions(base_url=url, api_version="v1beta", httpx_async_client=http)
    client = genai.Client(api_key=API_KEY, http_options=options)
    try:
        aio = client.aio
        answer = await aio.models.generate_content(model="gemini-ok", contents="Hello")
        assert answer.text == ANSWER
        assert answer.usage_metadata is not None
        assert answer.usage_metadata.prompt_token_count == 11
        assert answer.candidates is not None
        assert answer.candidates[0].finish_reason == genai_types.FinishReason.STOP

        pieces = [
            chunk.text or ""
            async for chunk in await aio.models.generate_content_stream(model="gemini-ok", contents="Hi")
        ]
        assert len(pieces) > 1
        assert "".join(pieces) == ANSWER

        scored = await aio.models.generate_content(
            model="gemini-ok",
            contents="Hello",
            config=genai_types.GenerateContentConfig(response_logprobs=True, logprobs=2),
        )
        assert scored.candidates is not None
        result = scored.candidates[0].logprobs_result
        assert result is not None
        assert result.chosen_candidates is not None
        assert "".join(c.token or "" for c in result.chosen_candidates) == ANSWER
        assert result.top_candidates is not None
        assert all(len(step.candidates or []) == 2 for step in result.top_candidates)

        tool = await aio.models.generate_content(model="tools", contents="Weather in Paris?")
        assert tool.function_calls is not None
        assert tool.function_calls[0].name == "get_weather"
        assert tool.function_calls[0].args == {"city": "Paris", "unit": "c"}

        embedded = await aio.models.embed_content(
            model="embed", contents=["a", "b"], config=genai_types.EmbedContentConfig(output_dimensionality=4)
        )
        assert embedded.embeddings is not None
        assert [len(e.values or []) for e in embedded.embeddings] == [4, 4]

        with pytest.raises(genai_errors.ClientError) as caught:
            await aio.models.generate_content(model="status-429", contents="Hello")
        assert caught.value.code == 429
        assert caught.value.status == "RESOURCE_EXHAUSTED"
        await aio.aclose()
    finally:
        client.close()
        await http.aclose()
    assert fake.requests[0].headers["x-goog-api-key"] == API_KEY
    assert fake.requests[1].path.endswith(":streamGenerateContent")
    assert fake.requests[1].query["alt"] == ["sse"]


# ---- chat --------------------------------------------------------------------------------------


async def test_plain_chat_translates_system_history_and_parameters(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="gemini-ok",
            messages=[
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Say the "}, {"type": "text", "text": "fox line"}],
                },
            ],
            temperature=0.2,
            top_p=0.9,
            max_completion_tokens=50,
            stop=["END"],
            seed=7,
            presence_penalty=0.5,
            reasoning_effort="low",
            extra_body={"top_k": 40},
        )
    assert answer.model == "gemini-ok"
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (11, 9, 20)
    sent = last(fake)
    assert sent.path == "/v1beta/models/gemini-ok:generateContent"
    assert sent.headers["x-goog-api-key"] == API_KEY
    assert "authorization" not in sent.headers
    assert sent.body["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    assert sent.body["contents"] == [
        {"role": "user", "parts": [{"text": "Hi"}]},
        {"role": "model", "parts": [{"text": "Hello!"}]},
        {"role": "user", "parts": [{"text": "Say the "}, {"text": "fox line"}]},
    ]
    assert sent.body["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "maxOutputTokens": 50,
        "stopSequences": ["END"],
        "seed": 7,
        "presencePenalty": 0.5,
        "topK": 40,
        "thinkingConfig": {"thinkingBudget": 1024},
    }


async def test_streamed_chat_with_and_without_usage(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="gemini-ok",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        plain = await client.chat.completions.create(
            model="gemini-ok", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        without = [chunk async for chunk in plain]
    assert last(fake).path == "/v1beta/models/gemini-ok:streamGenerateContent"
    assert last(fake).query == {"alt": ["sse"]}
    assert all(chunk.model == "gemini-ok" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # not buffered into one
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 9)
    assert all(c.choices for c in without)
    assert all(c.usage is None for c in without)
    assert "".join(c.choices[0].delta.content or "" for c in without) == ANSWER


async def test_tool_call_and_tool_results_round_trip(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="tools",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice="required",
        )
        sent = last(fake).body
        message = answer.choices[0].message
        assert answer.choices[0].finish_reason == "tool_calls"
        assert message.tool_calls is not None
        call = message.tool_calls[0]
        assert call.type == "function"
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert orjson.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}  # type: ignore[union-attr]
        await client.chat.completions.create(
            model="gemini-ok",
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
                {"role": "tool", "tool_call_id": call.id, "content": "plain text result"},
            ],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
        history = last(fake).body
    assert sent["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather in a city",
                    "parameters": {
                        "type": "OBJECT",
                        "properties": {
                            "city": {"type": "STRING", "description": "City name"},
                            "unit": {"type": "STRING", "nullable": True, "enum": ["c", "f"]},
                        },
                        "required": ["city", "unit"],
                    },
                }
            ]
        }
    ]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert history["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris", "unit": "c"}},
                    "thoughtSignature": SIGNATURE,
                }
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "get_weather", "response": {"result": "plain text result"}}},
            ],
        },
    ]
    assert "toolConfig" not in history


async def test_streamed_parallel_tool_calls(gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory) -> None:
    _, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="tools-parallel",
            messages=[{"role": "user", "content": "Weather in Paris and time in Tokyo?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
        calls: dict[int, dict[str, str]] = {}
        finishes = []
        async for chunk in stream:
            if not chunk.choices:
                continue
            for delta in chunk.choices[0].delta.tool_calls or ():
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    assert not entry["id"], "a tool call id is sent once"
                    entry["id"] = delta.id
                if delta.function and delta.function.name:
                    entry["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    entry["arguments"] += delta.function.arguments
            if chunk.choices[0].finish_reason:
                finishes.append(chunk.choices[0].finish_reason)
    assert finishes == ["tool_calls"]
    assert sorted(calls) == [0, 1]
    assert calls[0]["name"] == "get_weather"
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert calls[1]["name"] == "get_time"
    assert orjson.loads(calls[1]["arguments"]) == {"city": "Tokyo"}
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["id"] != calls[1]["id"]


async def test_json_schema_response_format_and_n(gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory) -> None:
    fake, url = gemini
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "temperature": {"type": "integer"}},
        "required": ["city", "temperature"],
        "additionalProperties": False,
    }
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="json",
            messages=[{"role": "user", "content": "Weather as JSON"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "weather", "schema": schema, "strict": True},
            },
        )
        config_sent = last(fake).body["generationConfig"]
        several = await client.chat.completions.create(
            model="gemini-ok",
            messages=[{"role": "user", "content": "Hi"}],
            n=2,
            response_format={"type": "json_object"},
        )
        config_n = last(fake).body["generationConfig"]
        stream = await client.chat.completions.create(
            model="gemini-ok", messages=[{"role": "user", "content": "Hi"}], n=2, stream=True
        )
        streamed: dict[int, str] = {}
        async for chunk in stream:
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert orjson.loads(answer.choices[0].message.content or "") == orjson.loads(JSON_ANSWER)
    assert config_sent == {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "OBJECT",
            "properties": {"city": {"type": "STRING"}, "temperature": {"type": "INTEGER"}},
            "required": ["city", "temperature"],
        },
    }
    assert config_n == {"candidateCount": 2, "responseMimeType": "application/json"}
    assert [c.message.content for c in several.choices] == [ANSWER, ANSWER + " (1)"]
    assert [c.index for c in several.choices] == [0, 1]
    assert streamed == {0: ANSWER, 1: ANSWER + " (1)"}


async def test_json_schema_mode_sends_schemas_as_they_are(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = gemini
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}
    options = 'schema_mode = "json_schema"\nsafety_settings = [{ category = "HARM_CATEGORY_HARASSMENT", threshold = "BLOCK_NONE" }]'
    async with serve_gateway(config(url, options=options)) as gw, sdk(gw) as client:
        await client.chat.completions.create(
            model="json",
            messages=[{"role": "user", "content": "x"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        )
    body = last(fake).body
    assert body["generationConfig"]["responseJsonSchema"] == schema
    declaration = body["tools"][0]["functionDeclarations"][0]
    assert declaration["parametersJsonSchema"] == WEATHER_TOOL["function"]["parameters"]
    assert "parameters" not in declaration
    assert body["safetySettings"] == [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]


async def test_images_become_inline_and_file_data(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = gemini
    png = base64.b64encode(b"\x89PNG fake").decode()
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        await client.chat.completions.create(
            model="gemini-ok",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
                    ],
                }
            ],
        )
    assert last(fake).body["contents"][0]["parts"] == [
        {"text": "Compare"},
        {"inlineData": {"mimeType": "image/png", "data": png}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp"}},
    ]


async def test_usage_counts_cached_and_reasoning_tokens(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    _, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="thinking", messages=[{"role": "user", "content": "Hi"}])
        stream = await client.chat.completions.create(
            model="thinking",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert answer.choices[0].message.content == ANSWER  # the thought part is not part of the answer ...
    assert answer.choices[0].message.model_extra == {"reasoning_content": THOUGHT}  # ... it is the reasoning
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert reasoning == THOUGHT
    for usage in (answer.usage, chunks[-1].usage):
        assert usage is not None
        assert usage.prompt_tokens == 11
        assert usage.completion_tokens == 16  # 9 answer + 7 thinking
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 4
        assert usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens == 7
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER


async def test_streamed_usage_is_accounted_even_when_not_sent(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    _, url = gemini
    records = Records()
    async with serve_gateway(config(url), plugins={"records": records}) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="thinking", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    (record,) = records.records
    assert record.streamed
    assert record.usage == Usage(prompt_tokens=11, completion_tokens=16, cached_tokens=4, reasoning_tokens=7)
    assert record.upstream_model == "thinking-001"


@pytest.mark.parametrize(
    ("model", "finish", "content"),
    [("length", "length", ANSWER), ("safety", "content_filter", ANSWER), ("blocked", "content_filter", None)],
)
async def test_finish_reasons(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory, model: str, finish: str, content: str | None
) -> None:
    _, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        chunks = [c async for c in stream]
    assert answer.choices[0].finish_reason == finish
    assert answer.choices[0].message.content == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [finish]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (content or "")


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "error", "status"),
    [
        ("status-400", openai.BadRequestError, 400),
        ("status-401", openai.AuthenticationError, 401),
        ("status-403", openai.PermissionDeniedError, 403),
        ("status-404", openai.NotFoundError, 404),
        ("status-413", openai.APIStatusError, 413),
        ("status-429", openai.RateLimitError, 429),
        ("status-500", openai.InternalServerError, 502),
        ("status-503", openai.InternalServerError, 503),
    ],
)
async def test_upstream_errors_keep_their_meaning(
    gemini: tuple[FakeGemini, str],
    serve_gateway: GatewayFactory,
    model: str,
    error: type[openai.APIStatusError],
    status: int,
) -> None:
    _, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        for stream in (False, True):
            with pytest.raises(error) as caught:
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hi"}], stream=stream
                )
            assert caught.value.status_code == status
            assert "gem" in caught.value.message
            if status == 429:
                assert caught.value.response.headers["retry-after"] == "7"
            if status == 400:
                assert caught.value.code == "context_length_exceeded"


async def test_wrong_key_is_an_authentication_error(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    _, url = gemini
    async with serve_gateway(config(url, key="AIzaWrongKey1234567890")) as gw, sdk(gw) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="gemini-ok", messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(openai.AuthenticationError):
            await client.embeddings.create(model="embed", input="x")
    assert "AIzaWrongKey" not in caught.value.message
    assert "API key not valid" in caught.value.message


@pytest.mark.parametrize("model", ["cut", "mid-error"])
async def test_a_stream_that_ends_early_is_an_error(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory, model: str
) -> None:
    _, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        pieces: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            await collect_text(stream, pieces)
    assert pieces  # the first chunks arrived before the error
    assert ("ended the stream" if model == "cut" else "overloaded") in caught.value.message


async def test_cached_content_names_a_context_cache(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    """``cached_content`` (OpenAI SDK ``extra_body``) is sent as Gemini's ``cachedContent``; the
    tokens read from the cache are the answer's cached prompt tokens. A name that is not a cache's
    is refused before reaching Gemini."""
    fake, url = gemini
    hi: Any = [{"role": "user", "content": "Summarise the cached report."}]
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="gemini-ok", messages=hi, extra_body={"cached_content": "cachedContents/report-1"}
        )
        with pytest.raises(openai.BadRequestError) as wrong:
            await client.chat.completions.create(
                model="gemini-ok", messages=hi, extra_body={"cached_content": "report-1"}
            )
    assert fake.requests[0].body["cachedContent"] == "cachedContents/report-1"
    assert len(fake.requests) == 1
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 611
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 600
    assert wrong.value.param == "cached_content"


async def test_logprobs_plain_and_streamed(gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory) -> None:
    """``logprobs`` / ``top_logprobs`` reach Gemini as ``responseLogprobs`` / ``logprobs``; its
    ``logprobsResult`` comes back as OpenAI's: one entry per token with its UTF-8 bytes and the
    alternatives asked for, in the answer and in every streamed chunk; ``top_logprobs`` alone is a 400."""
    fake, url = gemini
    hi: Any = [{"role": "user", "content": "Hi"}]
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="gemini-ok", messages=hi, logprobs=True, top_logprobs=2)
        plain_sent = fake.requests[-1].body["generationConfig"]
        tokens: list[Any] = []
        text: list[str] = []
        stream = await client.chat.completions.create(model="gemini-ok", messages=hi, logprobs=True, stream=True)
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                if chunk.choices[0].logprobs is not None:
                    tokens.extend(chunk.choices[0].logprobs.content or [])
        streamed_sent = fake.requests[-1].body["generationConfig"]
        with pytest.raises(openai.BadRequestError) as alone:
            await client.chat.completions.create(model="gemini-ok", messages=hi, top_logprobs=2)
    assert plain_sent["responseLogprobs"] is True
    assert plain_sent["logprobs"] == 2
    assert streamed_sent["responseLogprobs"] is True
    assert "logprobs" not in streamed_sent
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert "".join(t.token for t in logprobs.content) == ANSWER == answer.choices[0].message.content
    for entry in logprobs.content:
        assert entry.logprob == token_logprob(entry.token)
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].token == entry.token
        assert len(entry.top_logprobs) == 2
    assert "".join(t.token for t in tokens) == "".join(text) == ANSWER
    assert all(t.top_logprobs == [] for t in tokens)
    assert alone.value.param == "top_logprobs"
    assert len(fake.requests) == 2


async def test_unsupported_parameter_is_refused_unless_dropped(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="gemini-ok", messages=[{"role": "user", "content": "Hi"}], logit_bias={"42": 1}
            )
    assert caught.value.param == "logit_bias"
    assert not fake.requests
    async with serve_gateway(config(url, options="drop_unsupported_params = true")) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="gemini-ok", messages=[{"role": "user", "content": "Hi"}], logit_bias={"42": 1}
        )
    assert answer.choices[0].message.content == ANSWER


async def test_bad_requests_are_refused_before_reaching_gemini(
    gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as orphan:
            await client.chat.completions.create(
                model="gemini-ok",
                messages=[{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "nope", "content": "x"}],
            )
        with pytest.raises(openai.BadRequestError) as media:
            await client.chat.completions.create(
                model="gemini-ok",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}],
            )
    assert orphan.value.param == "messages"
    assert "nope" in orphan.value.message
    assert media.value.param == "messages"
    assert not fake.requests


def test_config_errors_name_the_key() -> None:
    base = '[providers.gem]\ntype = "gemini"\napi_key = "k"\n'
    with pytest.raises(ConfigError) as bad_mode:
        create_app(parse_config(base + 'schema_mode = "yaml"\n'))
    with pytest.raises(ConfigError) as unknown:
        create_app(parse_config(base + 'shcema_mode = "openapi"\n'))
    assert bad_mode.value.key == "providers.gem.schema_mode"
    assert unknown.value.key == "providers.gem.shcema_mode"
    assert "schema_mode" in str(unknown.value)  # the suggestion


# ---- embeddings --------------------------------------------------------------------------------


async def test_embeddings_float_and_base64(gemini: tuple[FakeGemini, str], serve_gateway: GatewayFactory) -> None:
    fake, url = gemini
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        one = await client.embeddings.create(model="embed", input="hello", dimensions=3)
        single = last(fake)
        many = await client.embeddings.create(model="embed", input=["a", "b"], encoding_format="float")
        batch = last(fake)
        raw = await client.embeddings.with_raw_response.create(
            model="embed", input=["a", "b"], encoding_format="base64"
        )
        encoded = orjson.loads(raw.content)
    assert single.path == "/v1beta/models/embed:embedContent"
    assert single.body == {
        "model": "models/embed",
        "content": {"parts": [{"text": "hello"}]},
        "outputDimensionality": 3,
    }
    assert batch.path == "/v1beta/models/embed:batchEmbedContents"
    assert [r["content"] for r in batch.body["requests"]] == [{"parts": [{"text": "a"}]}, {"parts": [{"text": "b"}]}]
    assert one.model == "embed"
    assert one.data[0].embedding == pytest.approx([0.1, 0.101, 0.102], rel=1e-6)  # the SDK asks for base64
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[1].embedding[:2] == [0.2, 0.201]
    assert many.usage.prompt_tokens > 0
    assert encoded["object"] == "list"
    decoded = [list(struct.unpack("<8f", base64.b64decode(d["embedding"]))) for d in encoded["data"]]
    for got, want in zip(decoded, [d.embedding for d in many.data], strict=True):
        assert got == pytest.approx(want, rel=1e-6)
