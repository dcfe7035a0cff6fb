"""The ``cohere`` provider end to end: the official OpenAI SDK talks to a real gateway on loopback,
which talks to a fake Cohere v2 API (``tests/fakes/cohere_server.py``) that the official cohere SDK
accepts as the real thing."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import cohere
import httpx
import openai
import orjson
import pytest

from llmgateway.core.app import create_app
from llmgateway.core.config import parse_config
from llmgateway.core.errors import ConfigError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import Attempt, RequestContext, Usage, UsageRecord
from tests.conftest import GatewayFactory, sdk
from tests.fakes.cohere_server import (
    ANSWER,
    API_KEY,
    JSON_ANSWER,
    THINKING,
    TOOL_PLAN,
    FakeCohere,
    Recorded,
    answer_chunks,
    citations_for,
    logprob_item,
)
from tests.servers import running

DOCUMENTS: Any = [
    "Paris is the capital of France.",
    {"id": "wiki-paris", "data": {"title": "Paris", "snippet": "On the Seine."}},
]

MODELS = [
    "command-ok",
    "tools",
    "tools-parallel",
    "json",
    "thinking",
    "length",
    "error-end",
    "cut",
    "status-400",
    "status-403",
    "status-404",
    "status-413",
    "status-429",
    "status-500",
    "status-503",
    "embed",
]


@pytest.fixture(scope="session")
async def cohere_server() -> AsyncIterator[tuple[FakeCohere, str]]:
    fake = FakeCohere()
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def fake_cohere(cohere_server: tuple[FakeCohere, str]) -> tuple[FakeCohere, str]:
    fake, url = cohere_server
    fake.reset()
    return fake, url


def config(url: str, *, key: str = API_KEY, options: str = "") -> str:
    models = "".join(
        f'\n[[models]]\nname = "{m}"\nmax_attempts = 1\ndeployments = [{{ provider = "co", model = "{m}" }}]\n'
        for m in MODELS
    )
    return f'[providers.co]\ntype = "cohere"\nbase_url = "{url}"\napi_key = "{key}"\n{options}\n{models}'


class Capture:
    """A test plugin keeping what plugins observe: attempts and usage records."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.records: list[UsageRecord] = []

    @hookimpl
    def llmgateway_upstream_done(self, ctx: RequestContext, attempt: Attempt) -> None:
        self.attempts.append(attempt)

    @hookimpl
    def llmgateway_record_usage(self, ctx: RequestContext, record: UsageRecord) -> None:
        self.records.append(record)


def last(fake: FakeCohere) -> Recorded:
    assert fake.requests, "the fake Cohere received nothing"
    return fake.requests[-1]


async def collect_text(stream: Any, into: list[str]) -> None:
    async for chunk in stream:
        if chunk.choices:
            into.append(chunk.choices[0].delta.content or "")


async def assemble_tool_calls(stream: Any) -> tuple[dict[int, dict[str, str]], list[str], str]:
    """Tool calls rebuilt from streamed deltas (by index), the finish reasons seen, and the text."""
    calls: dict[int, dict[str, str]] = {}
    finishes: list[str] = []
    text = ""
    async for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for piece in delta.tool_calls or ():
            entry = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            if piece.id:
                assert not entry["id"], "a tool call id is sent once"
                entry["id"] = piece.id
            if piece.function and piece.function.name:
                entry["name"] += piece.function.name
            if piece.function and piece.function.arguments:
                entry["arguments"] += piece.function.arguments
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    return calls, finishes, text


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


# ---- the fake is faithful: the official cohere SDK accepts it ------------------------------------


async def test_cohere_sdk_accepts_the_fake(fake_cohere: tuple[FakeCohere, str]) -> None:
    fake, url = fake_cohere
    async with httpx.AsyncClient() as http:
        client = cohere.AsyncClientV2(api_key=API_KEY, base_url=url, httpx_client=http)
        answer = await client.chat(model="command-ok", messages=[{"role": "user", "content": "Hi"}])
        assert answer.finish_reason == "COMPLETE"
        assert answer.message.content is not None
        assert answer.message.content[0].text == ANSWER  # type: ignore[union-attr]
        assert answer.usage is not None
        assert answer.usage.billed_units is not None
        assert answer.usage.billed_units.output_tokens == 9

        text = ""
        kinds = []
        async for event in client.chat_stream(model="command-ok", messages=[{"role": "user", "content": "Hi"}]):
            kinds.append(event.type)
            if event.type == "content-delta":
                text += event.delta.message.content.text  # type: ignore[union-attr]
        assert text == ANSWER
        assert kinds[0] == "message-start"
        assert kinds[-1] == "message-end"

        scored = await client.chat(model="command-ok", messages=[{"role": "user", "content": "Hi"}], logprobs=True)
        assert scored.logprobs is not None
        assert "".join(item.text or "" for item in scored.logprobs) == ANSWER
        assert all(len(item.token_ids) == len(item.logprobs or ()) for item in scored.logprobs)
        pieces = [
            event.logprobs.text or ""
            async for event in client.chat_stream(
                model="command-ok", messages=[{"role": "user", "content": "Hi"}], logprobs=True
            )
            if event.type == "content-delta" and event.logprobs is not None
        ]
        assert "".join(pieces) == ANSWER

        grounded = await client.chat(
            model="command-ok", messages=[{"role": "user", "content": "Hi"}], documents=DOCUMENTS
        )
        assert grounded.message.citations is not None
        assert [c.sources[0].id for c in grounded.message.citations if c.sources] == ["doc:0", "wiki-paris"]
        starts = [
            event.delta.message.citations  # type: ignore[union-attr]
            async for event in client.chat_stream(
                model="command-ok", messages=[{"role": "user", "content": "Hi"}], documents=DOCUMENTS
            )
            if event.type == "citation-start"
        ]
        assert [c.text for c in starts] == [answer_chunks("command-ok")[0]] * 2

        tools = await client.chat(
            model="tools",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
        assert tools.finish_reason == "TOOL_CALL"
        assert tools.message.tool_plan == TOOL_PLAN
        assert tools.message.tool_calls is not None
        assert tools.message.tool_calls[0].function is not None
        assert tools.message.tool_calls[0].function.name == "get_weather"

        arguments = ""
        async for event in client.chat_stream(
            model="tools",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        ):
            if event.type == "tool-call-delta":
                arguments += event.delta.message.tool_calls.function.arguments  # type: ignore[union-attr]
        assert orjson.loads(arguments) == {"city": "Paris", "unit": "c"}

        embedded = await client.embed(
            model="embed", texts=["a", "b"], input_type="search_document", embedding_types=["float"]
        )
        assert embedded.embeddings.float_ is not None
        assert len(embedded.embeddings.float_) == 2

        with pytest.raises(cohere.errors.TooManyRequestsError) as caught:
            await client.chat(
                model="status-429",
                messages=[{"role": "user", "content": "Hi"}],
                request_options={"max_retries": 0},
            )
        assert caught.value.status_code == 429
        with pytest.raises(cohere.errors.UnauthorizedError):
            await cohere.AsyncClientV2(api_key="wrong", base_url=url, httpx_client=http).chat(
                model="command-ok", messages=[{"role": "user", "content": "Hi"}]
            )
    assert fake.requests[0].headers["authorization"] == f"Bearer {API_KEY}"


# ---- chat --------------------------------------------------------------------------------------


async def test_plain_chat_translates_messages_and_parameters(
    fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = fake_cohere
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    async with serve_gateway(config(url, options='safety_mode = "STRICT"')) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="command-ok",
            messages=[
                {"role": "developer", "content": "Be terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                    ],
                },
            ],
            temperature=0.2,
            top_p=0.9,
            max_tokens=50,
            stop="END",
            seed=7,
            frequency_penalty=0.1,
            n=1,
            reasoning_effort="none",
            extra_body={"top_k": 5},
        )
    assert answer.model == "command-ok"
    assert answer.id == "chatcmpl-fake-chat-id"
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (11, 9)  # billed units
    sent = last(fake)
    assert sent.path == "/v2/chat"
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.body == {
        "model": "command-ok",
        "stream": False,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                ],
            },
        ],
        "temperature": 0.2,
        "p": 0.9,
        "max_tokens": 50,
        "stop_sequences": ["END"],
        "seed": 7,
        "frequency_penalty": 0.1,
        "k": 5,
        "thinking": {"type": "disabled"},
        "safety_mode": "STRICT",
    }


async def test_streamed_chat_with_and_without_usage(
    fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = fake_cohere
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="command-ok",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        plain = await client.chat.completions.create(
            model="command-ok", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        without = [chunk async for chunk in plain]
    assert last(fake).body["stream"] is True
    assert all(chunk.model == "command-ok" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 9)
    assert all(c.choices and c.usage is None for c in without)
    assert "".join(c.choices[0].delta.content or "" for c in without) == ANSWER


async def test_tool_calls_and_results_round_trip(
    fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory
) -> None:
    fake, url = fake_cohere
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="tools",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL, TIME_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        sent = last(fake).body
        message = answer.choices[0].message
        assert answer.choices[0].finish_reason == "tool_calls"
        assert message.content == TOOL_PLAN
        assert message.tool_calls is not None
        call = message.tool_calls[0]
        assert call.id == "get_weather_7xk2m9q4"
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert orjson.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}  # type: ignore[union-attr]
        await client.chat.completions.create(
            model="command-ok",
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                message.model_dump(exclude_none=True),  # type: ignore[list-item]
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
            ],
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice="none",
        )
        history = last(fake).body
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER_TOOL["function"]["parameters"],
                "description": "Current weather in a city",
            },
        }
    ]
    assert sent["tool_choice"] == "REQUIRED"
    assert sent["strict_tools"] is True
    assert history["messages"][1:] == [
        {
            "role": "assistant",
            "tool_plan": TOOL_PLAN,
            "tool_calls": [
                {
                    "id": "get_weather_7xk2m9q4",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "get_weather_7xk2m9q4", "content": '{"temp": 21}'},
    ]
    assert history["tool_choice"] == "NONE"


async def test_streamed_parallel_tool_calls(fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory) -> None:
    _, url = fake_cohere
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="tools-parallel",
            messages=[{"role": "user", "content": "Weather in Paris and time in Tokyo?"}],
            tools=[WEATHER_TOOL, TIME_TOOL],  # type: ignore[list-item]
            tool_choice="required",
            stream=True,
        )
        calls, finishes, text = await assemble_tool_calls(stream)
    assert finishes == ["tool_calls"]
    assert text.strip() == TOOL_PLAN
    assert sorted(calls) == [0, 1]
    assert calls[0] == {"id": "get_weather_7xk2m9q4", "name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'}
    assert calls[1]["name"] == "get_time"
    assert orjson.loads(calls[1]["arguments"]) == {"city": "Tokyo"}


async def test_json_mode_and_reasoning(fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory) -> None:
    fake, url = fake_cohere
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="json",
            messages=[{"role": "user", "content": "Weather as JSON"}],
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
        )
        fmt = last(fake).body["response_format"]
        await client.chat.completions.create(
            model="json", messages=[{"role": "user", "content": "JSON"}], response_format={"type": "json_object"}
        )
        plain_fmt = last(fake).body["response_format"]
        thought = await client.chat.completions.create(model="thinking", messages=[{"role": "user", "content": "Hi"}])
        stream = await client.chat.completions.create(
            model="thinking",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert orjson.loads(answer.choices[0].message.content or "") == orjson.loads(JSON_ANSWER)
    assert fmt == {"type": "json_object", "json_schema": schema}
    assert plain_fmt == {"type": "json_object"}
    assert thought.choices[0].message.content == ANSWER
    assert thought.choices[0].message.model_extra == {"reasoning_content": THINKING}
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert reasoning.strip() == THINKING
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    for usage in (thought.usage, chunks[-1].usage):
        assert usage is not None
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 4


async def test_max_tokens_finish_reason(fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory) -> None:
    _, url = fake_cohere
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="length", messages=[{"role": "user", "content": "Hi"}])
        stream = await client.chat.completions.create(
            model="length", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        finishes = [c.choices[0].finish_reason async for c in stream if c.choices[0].finish_reason]
    assert answer.choices[0].finish_reason == "length"
    assert finishes == ["length"]


async def test_usage_and_limit_headers_reach_accounting(
    fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory
) -> None:
    _, url = fake_cohere
    capture = Capture()
    async with serve_gateway(config(url), plugins={"capture": capture}) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="command-ok", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        chunks = [c async for c in stream]
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="status-429", messages=[{"role": "user", "content": "Hi"}])
    assert all(c.usage is None for c in chunks)  # not asked for: not sent ...
    record = capture.records[0]
    assert record.usage == Usage(prompt_tokens=11, completion_tokens=9)  # ... but accounted, not estimated
    assert record.streamed
    assert record.upstream_model == "command-ok"
    assert capture.attempts[0].rate_limit_headers["x-trial-endpoint-call-remaining"] == "39"
    assert capture.attempts[1].rate_limit_headers["retry-after"] == "3"
    assert capture.attempts[1].status == 429


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "error", "status"),
    [
        ("status-400", openai.BadRequestError, 400),
        ("status-403", openai.PermissionDeniedError, 403),
        ("status-404", openai.NotFoundError, 404),
        ("status-413", openai.APIStatusError, 413),
        ("status-429", openai.RateLimitError, 429),
        ("status-500", openai.InternalServerError, 502),
        ("status-503", openai.InternalServerError, 503),
    ],
)
async def test_upstream_errors_keep_their_meaning(
    fake_cohere: tuple[FakeCohere, str],
    serve_gateway: GatewayFactory,
    model: str,
    error: type[openai.APIStatusError],
    status: int,
) -> None:
    _, url = fake_cohere
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        for stream in (False, True):
            with pytest.raises(error) as caught:
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hi"}], stream=stream
                )
            assert caught.value.status_code == status
            assert "'co'" in caught.value.message
            if status == 429:
                assert caught.value.response.headers["retry-after"] == "3"
            if status == 400:
                assert caught.value.code == "context_length_exceeded"


async def test_wrong_key_is_an_authentication_error(
    fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory
) -> None:
    _, url = fake_cohere
    async with serve_gateway(config(url, key="co-wrong-key-123456")) as gw, sdk(gw) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="command-ok", messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(openai.AuthenticationError):
            await client.embeddings.create(model="embed", input="x")
    assert "invalid api token" in caught.value.message
    assert "co-wrong-key" not in caught.value.message


@pytest.mark.parametrize(("model", "says"), [("cut", "ended the stream"), ("error-end", "the generation failed")])
async def test_a_stream_that_fails_midway_is_an_error(
    fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory, model: str, says: str
) -> None:
    _, url = fake_cohere
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        pieces: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            await collect_text(stream, pieces)
    assert "".join(pieces)  # the first words arrived before the error
    assert says in caught.value.message


async def test_logprobs_plain_and_streamed(fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory) -> None:
    """``logprobs`` reaches Cohere; each text chunk it scores comes back as one OpenAI logprobs
    entry (its text, the sum of its tokens' log probabilities, its bytes), plain and per streamed
    chunk. ``top_logprobs`` asks for alternatives Cohere does not give: a 400 naming it."""
    fake, url = fake_cohere
    hi: Any = [{"role": "user", "content": "Hi"}]
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="command-ok", messages=hi, logprobs=True)
        assert last(fake).body["logprobs"] is True
        entries: list[Any] = []
        stream = await client.chat.completions.create(model="command-ok", messages=hi, logprobs=True, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs is not None:
                entries.extend(chunk.choices[0].logprobs.content or [])
        with pytest.raises(openai.BadRequestError) as alternatives:
            await client.chat.completions.create(model="command-ok", messages=hi, logprobs=True, top_logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    expected = [(item["text"], sum(item["logprobs"])) for item in map(logprob_item, answer_chunks("command-ok"))]
    assert [(e.token, e.logprob) for e in logprobs.content] == expected
    assert [(e.token, e.logprob) for e in entries] == expected
    assert all(e.bytes == list(e.token.encode()) and e.top_logprobs == [] for e in logprobs.content)
    assert alternatives.value.param == "top_logprobs"


async def test_documents_and_their_citations(
    fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory
) -> None:
    """``documents`` (through the OpenAI SDK's ``extra_body``) reach Cohere as they are; the
    citations Cohere makes come back as the message's ``citations``, and streamed as ``citations``
    deltas. Malformed documents are refused before reaching Cohere."""
    fake, url = fake_cohere
    hi: Any = [{"role": "user", "content": "Where is Paris?"}]
    extra: Any = {"documents": DOCUMENTS, "citation_options": {"mode": "FAST"}}
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="command-ok", messages=hi, extra_body=extra)
        sent = last(fake).body
        streamed: list[Any] = []
        stream = await client.chat.completions.create(model="command-ok", messages=hi, stream=True, extra_body=extra)
        async for chunk in stream:
            if chunk.choices and (chunk.choices[0].delta.model_extra or {}).get("citations"):
                streamed.extend(chunk.choices[0].delta.model_extra["citations"])  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as malformed:
            await client.chat.completions.create(
                model="command-ok", messages=hi, extra_body={"documents": [{"title": "no data"}]}
            )
    assert sent["documents"] == DOCUMENTS
    assert sent["citation_options"] == {"mode": "FAST"}
    expected = citations_for(DOCUMENTS, "command-ok")
    assert (answer.choices[0].message.model_extra or {}).get("citations") == expected
    assert streamed == expected
    assert malformed.value.param == "documents"
    assert len(fake.requests) == 2


async def test_n_is_refused_unless_dropped(fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory) -> None:
    fake, url = fake_cohere
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="command-ok", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert caught.value.param == "n"
    assert "'n'" in caught.value.message
    assert not fake.requests
    async with serve_gateway(config(url, options="drop_unsupported_params = true")) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="command-ok", messages=[{"role": "user", "content": "Hi"}], n=2
        )
    assert answer.choices[0].message.content == ANSWER
    assert "n" not in last(fake).body


def test_config_errors_name_the_key() -> None:
    base = '[providers.co]\ntype = "cohere"\napi_key = "k"\n'
    with pytest.raises(ConfigError) as bad_mode:
        create_app(parse_config(base + 'safety_mode = "LAX"\n'))
    with pytest.raises(ConfigError) as unknown:
        create_app(parse_config(base + 'embed_input = "search_query"\n'))
    assert bad_mode.value.key == "providers.co.safety_mode"
    assert unknown.value.key == "providers.co.embed_input"


# ---- embeddings --------------------------------------------------------------------------------


async def test_embeddings_float_and_base64(fake_cohere: tuple[FakeCohere, str], serve_gateway: GatewayFactory) -> None:
    fake, url = fake_cohere
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        floats = await client.embeddings.create(model="embed", input=["a", "b"], encoding_format="float", dimensions=4)
        sent_float = last(fake).body
        raw = await client.embeddings.with_raw_response.create(
            model="embed",
            input="hello",
            encoding_format="base64",
            extra_body={"input_type": "search_query"},
        )
        sent_base64 = last(fake).body
        encoded = orjson.loads(raw.content)
    assert last(fake).path == "/v2/embed"
    assert sent_float == {
        "model": "embed",
        "texts": ["a", "b"],
        "input_type": "search_document",
        "embedding_types": ["float"],
        "output_dimension": 4,
    }
    assert sent_base64["embedding_types"] == ["base64"]
    assert sent_base64["input_type"] == "search_query"
    assert floats.model == "embed"
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.data[0].embedding == [0.1, 0.101, 0.102, 0.103]
    assert floats.usage.prompt_tokens == 6
    assert encoded["model"] == "embed"
    vector = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert list(vector) == pytest.approx([0.1 + 0.001 * j for j in range(8)], rel=1e-6)
