"""The ``huggingface`` provider end to end, in its three modes: the official openai SDK against a real
gateway on loopback, in front of fake Hugging Face servers (tests/fakes/huggingface_server.py: the
Inference Providers router, and a TGI Inference Endpoint). The fakes' faithfulness is checked with
``huggingface_hub.AsyncInferenceClient`` at the bottom of this file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import GenerationError, HfHubHTTPError

from llmgateway.core.app import create_app
from llmgateway.core.config import parse_config
from llmgateway.core.errors import ConfigError
from tests.conftest import GatewayFactory, sdk
from tests.fakes.huggingface_server import ANSWER, TOKEN, FakeHuggingFace
from tests.servers import running

ROUTER_MODELS = {
    "llama": "meta-llama/Llama-3.1-8B-Instruct:novita",
    "tools": "tools",
    "no-usage": "no-usage",
    "status-429": "status-429",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "token-level": "token-level",
    "loading": "loading",
}
TGI_MODELS = ("tgi", "tools", "tools-object", "no-usage", "too-long", "overloaded", "generation", "mid-error", "cut")
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

Fake = tuple[FakeHuggingFace, str]


@pytest.fixture(scope="session")
async def router_server() -> AsyncIterator[Fake]:
    fake = FakeHuggingFace("router")
    async with running(fake) as url:
        yield fake, url


@pytest.fixture(scope="session")
async def tgi_server() -> AsyncIterator[Fake]:
    fake = FakeHuggingFace("tgi")
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def router(router_server: Fake) -> Fake:
    router_server[0].reset()
    return router_server


@pytest.fixture
async def tgi(tgi_server: Fake) -> Fake:
    tgi_server[0].reset()
    return tgi_server


def models(provider: str, names: dict[str, str]) -> str:
    return "".join(
        f"""
[[models]]
name = "{alias}"
max_attempts = 1
deployments = [{{ provider = "{provider}", model = "{model}" }}]
"""
        for alias, model in names.items()
    )


def router_config(url: str, token: str = TOKEN, extra: str = "") -> str:
    return f"""
[providers.hf]
type = "huggingface"
base_url = "{url}/v1"
api_key = "{token}"
{extra}
{models("hf", ROUTER_MODELS)}
"""


def tgi_config(url: str, mode: str = "tgi", extra: str = "") -> str:
    return f"""
[providers.tgi]
type = "huggingface"
mode = "{mode}"
base_url = "{url}"
api_key = "{TOKEN}"
{extra}
{models("tgi", {name: name for name in TGI_MODELS})}
"""


async def read_stream(client: openai.AsyncOpenAI, **kwargs: Any) -> list[Any]:
    stream = await client.chat.completions.create(stream=True, **kwargs)
    return [chunk async for chunk in stream]


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def tool_deltas(chunks: list[Any]) -> list[Any]:
    return [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]


# ---- router ----------------------------------------------------------------------------------


async def test_router_chat_passes_through(serve_gateway: GatewayFactory, router: Fake) -> None:
    fake, url = router
    async with serve_gateway(router_config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="llama", messages=HELLO, seed=3)
        chunks = await read_stream(client, model="llama", messages=HELLO, stream_options={"include_usage": True})
    assert answer.model == "llama"
    assert answer.choices[0].message.content == ANSWER
    assert answer.usage is not None
    assert answer.usage.total_tokens == 23
    assert text_of(chunks) == ANSWER
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 23
    assert all(c.model == "llama" for c in chunks)
    plain, streamed = fake.requests
    assert plain.path == streamed.path == "/v1/chat/completions"
    assert plain.headers["authorization"] == f"Bearer {TOKEN}"
    assert plain.body["model"] == "meta-llama/Llama-3.1-8B-Instruct:novita"
    assert plain.body["seed"] == 3


async def test_router_tool_calls(serve_gateway: GatewayFactory, router: Fake) -> None:
    _, url = router
    async with serve_gateway(router_config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="tools", messages=HELLO, tools=TOOLS)  # type: ignore[arg-type]
        chunks = await read_stream(client, model="tools", messages=HELLO, tools=TOOLS)
    (call,) = answer.choices[0].message.tool_calls or []
    assert call.function.arguments == '{"city":"Paris"}'  # type: ignore[union-attr]
    deltas = tool_deltas(chunks)
    assert deltas[0].id == "call_router1"
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_router_embeddings_use_the_feature_extraction_pipeline(
    serve_gateway: GatewayFactory, router: Fake
) -> None:
    fake, url = router
    async with serve_gateway(router_config(url)) as gw, sdk(gw) as client:
        floats = await client.embeddings.create(model="minilm", input=["a", "bb"], encoding_format="float")
        decoded = await client.embeddings.create(model="minilm", input="a")  # the SDK asks for base64
        pooled = await client.embeddings.create(model="token-level", input=["x", "y"], encoding_format="float")
    assert [d.embedding for d in floats.data] == [[0.5, 0.25, 0.125], [1.0, 0.25, 0.125]]
    assert floats.model == "minilm"
    assert floats.usage.prompt_tokens > 0
    assert decoded.data[0].embedding == [0.5, 0.25, 0.125]
    assert [d.embedding for d in pooled.data] == [[2.0, 1.0], [4.0, 1.0]]  # mean over tokens
    first = fake.requests[0]
    assert first.path == "/hf-inference/models/sentence-transformers/all-MiniLM-L6-v2/pipeline/feature-extraction"
    assert first.body == {"inputs": ["a", "bb"]}
    assert fake.requests[1].body == {"inputs": ["a"]}


async def test_router_errors(serve_gateway: GatewayFactory, router: Fake) -> None:
    _, url = router
    async with serve_gateway(router_config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.InternalServerError) as loading:
            await client.embeddings.create(model="loading", input="a")
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="status-429", messages=HELLO)
        with pytest.raises(openai.BadRequestError) as dimensions:
            await client.embeddings.create(model="minilm", input="a", dimensions=2)
    assert loading.value.status_code == 503
    assert loading.value.response.headers["retry-after"] == "13"  # from estimated_time 12.5
    assert "currently loading" in loading.value.message
    assert limited.value.response.headers["retry-after"] == "3"
    assert dimensions.value.param == "dimensions"
    assert dimensions.value.code == "unsupported_parameter"
    async with serve_gateway(router_config(url, token="hf_wrongtoken123456")) as gw, sdk(gw) as client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(model="llama", messages=HELLO)
    assert "Invalid credentials" in denied.value.message
    assert "hf_wrongtoken" not in str(denied.value.body)


# ---- TGI ----------------------------------------------------------------------------------------


async def test_tgi_chat_translates_the_request_and_the_answer(serve_gateway: GatewayFactory, tgi: Fake) -> None:
    fake, url = tgi
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    async with serve_gateway(tgi_config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model="tgi",
            messages=[{"role": "developer", "content": "be brief"}, *HELLO],  # type: ignore[list-item]
            max_completion_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert answer.id
    assert answer.usage is not None
    assert answer.usage.total_tokens == 23
    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.body["max_tokens"] == 64
    assert "max_completion_tokens" not in request.body
    assert request.body["messages"][0] == {"role": "system", "content": "be brief"}
    assert request.body["response_format"] == {"type": "json_object", "value": schema}


async def test_tgi_stream_usage_and_estimates(serve_gateway: GatewayFactory, tgi: Fake) -> None:
    _, url = tgi
    async with serve_gateway(tgi_config(url)) as gw, sdk(gw) as client:
        asked = await read_stream(client, model="tgi", messages=HELLO, stream_options={"include_usage": True})
        plain = await read_stream(client, model="tgi", messages=HELLO)
        estimated = await read_stream(client, model="no-usage", messages=HELLO, stream_options={"include_usage": True})
    *content, last = asked
    assert text_of(asked) == ANSWER
    assert all(c.choices and c.usage is None for c in content)
    assert content[-1].choices[0].finish_reason == "stop"
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == 23
    assert all(c.id and c.model == "tgi" for c in asked)
    assert all(c.choices and c.usage is None for c in plain)
    assert estimated[-1].choices == []
    assert estimated[-1].usage is not None
    assert estimated[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("model", ["tools", "tools-object"])
async def test_tgi_tool_calls_plain_and_streamed(serve_gateway: GatewayFactory, tgi: Fake, model: str) -> None:
    fake, url = tgi
    async with serve_gateway(tgi_config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(
            model=model,
            messages=HELLO,
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
        )
        chunks = await read_stream(client, model=model, messages=HELLO, tools=TOOLS)
    (call,) = answer.choices[0].message.tool_calls or []
    assert call.id
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city":"Paris"}'  # type: ignore[union-attr]
    assert answer.choices[0].finish_reason == "tool_calls"
    deltas = tool_deltas(chunks)
    assert deltas[0].id
    assert deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == '{"city": "Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert fake.requests[0].body["tools"] == TOOLS
    assert fake.requests[0].body["tool_choice"] == "required"


async def test_tgi_refuses_what_it_cannot_honour(serve_gateway: GatewayFactory, tgi: Fake) -> None:
    fake, url = tgi
    async with serve_gateway(tgi_config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as several:
            await client.chat.completions.create(model="tgi", messages=HELLO, n=2)
        with pytest.raises(openai.BadRequestError) as bias:
            await read_stream(client, model="tgi", messages=HELLO, logit_bias={"1": 1})
        with pytest.raises(openai.BadRequestError) as embeddings:
            await client.embeddings.create(model="tgi", input="a")
    assert several.value.param == "n"
    assert bias.value.param == "logit_bias"
    assert "serves no embeddings" in embeddings.value.message
    assert fake.requests == []
    async with serve_gateway(tgi_config(url, extra="drop_unsupported_params = true")) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="tgi", messages=HELLO, n=2, logit_bias={"1": 1})
    assert answer.choices[0].message.content == ANSWER
    assert "n" not in fake.requests[0].body
    assert "logit_bias" not in fake.requests[0].body


async def test_tgi_errors_are_mapped(serve_gateway: GatewayFactory, tgi: Fake) -> None:
    _, url = tgi
    async with serve_gateway(tgi_config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as too_long:
            await client.chat.completions.create(model="too-long", messages=HELLO)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="overloaded", messages=HELLO)
        with pytest.raises(openai.APIStatusError) as generation:
            await read_stream(client, model="generation", messages=HELLO)
        for model, match in (("mid-error", "CUDA out of memory"), ("cut", "ended the stream")):
            stream = await client.chat.completions.create(model=model, messages=HELLO, stream=True)
            received: list[Any] = []

            async def read_all(stream: Any = stream, received: list[Any] = received) -> None:
                async for chunk in stream:
                    received.append(chunk)

            with pytest.raises(openai.APIError, match=match):
                await read_all()
            assert received, model
    assert too_long.value.code == "context_length_exceeded"
    assert generation.value.status_code == 502


async def test_endpoint_mode_embeds_at_the_endpoint_root(serve_gateway: GatewayFactory, tgi: Fake) -> None:
    fake, url = tgi
    toml = tgi_config(url, mode="endpoint", extra="normalize = true")
    async with serve_gateway(toml) as gw, sdk(gw) as client:
        vectors = await client.embeddings.create(model="tgi", input=["a", "b"], encoding_format="float")
        answer = await client.chat.completions.create(model="tgi", messages=HELLO)
    assert [d.embedding for d in vectors.data] == [[0.5, 0.25, 0.125], [1.0, 0.25, 0.125]]
    assert answer.choices[0].finish_reason == "stop"
    assert fake.requests[0].path == "/"
    assert fake.requests[0].body == {"inputs": ["a", "b"], "normalize": True}
    assert fake.requests[1].path == "/v1/chat/completions"


async def test_embeddings_url_template(serve_gateway: GatewayFactory, router: Fake) -> None:
    fake, url = router
    toml = f"""
[providers.hf]
type = "huggingface"
mode = "tgi"
base_url = "http://127.0.0.1:9"
api_key = "{TOKEN}"
embeddings_url = "{url}/hf-inference/models/{{model}}/pipeline/feature-extraction"
{models("hf", {"minilm": "sentence-transformers/all-MiniLM-L6-v2"})}
"""
    async with serve_gateway(toml) as gw, sdk(gw) as client:
        vectors = await client.embeddings.create(model="minilm", input="a", encoding_format="float")
    assert vectors.data[0].embedding == [0.5, 0.25, 0.125]
    assert (
        fake.requests[0].path
        == "/hf-inference/models/sentence-transformers/all-MiniLM-L6-v2/pipeline/feature-extraction"
    )


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[providers.h]\ntype = "huggingface"\nmode = "tgi"\n', "providers.h.base_url"),
        ('[providers.h]\ntype = "huggingface"\nmode = "serverless"\n', "providers.h.mode"),
        ('[providers.h]\ntype = "huggingface"\nembeddings_url = "ftp://x"\n', "providers.h.embeddings_url"),
    ],
)
def test_config_errors_name_the_key(toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        create_app(parse_config(toml))
    assert error.value.key == key


# ---- the fakes are faithful: huggingface_hub's client talks to them --------------------------------


async def test_fakes_are_faithful_to_the_official_inference_client(router: Fake, tgi: Fake) -> None:
    _, router_url = router
    tgi_fake, tgi_url = tgi
    async with AsyncInferenceClient(model=tgi_url, api_key=TOKEN) as client:
        answer = await client.chat_completion(HELLO, model="tgi", max_tokens=20)
        assert answer.choices[0].message.content == ANSWER
        tools = await client.chat_completion(HELLO, model="tools", tools=TOOLS)  # type: ignore[arg-type]
        assert (tools.choices[0].message.tool_calls or [])[0].function.arguments == {"city": "Paris"}
        stream = await client.chat_completion(HELLO, model="tgi", stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        assert text.strip() == ANSWER
        stream = await client.chat_completion(HELLO, model="tools", stream=True)
        pieces = [chunk.choices[0].delta.tool_calls async for chunk in stream]
        assert any(pieces)
        with pytest.raises(HfHubHTTPError) as too_long:
            await client.chat_completion(HELLO, model="too-long")
        assert too_long.value.response.status_code == 422
        assert "must be <= 4096" in str(too_long.value)
        with pytest.raises(HfHubHTTPError) as overloaded:
            await client.chat_completion(HELLO, model="overloaded")
        assert overloaded.value.response.status_code == 429
        broken = await client.chat_completion(HELLO, model="mid-error", stream=True)

        async def drain() -> None:
            async for _ in broken:
                pass

        with pytest.raises(GenerationError):
            await drain()
        endpoint = await client.feature_extraction("one sentence")
        assert endpoint.tolist() == [0.5, 0.25, 0.125]
    assert tgi_fake.requests[0].path == "/v1/chat/completions"
    assert tgi_fake.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert tgi_fake.requests[-1].path == "/"
    pipeline = f"{router_url}/hf-inference/models/sentence-transformers/all-MiniLM-L6-v2/pipeline/feature-extraction"
    async with AsyncInferenceClient(api_key=TOKEN) as client:
        vectors = await client.feature_extraction(["a", "b"], model=pipeline)  # type: ignore[arg-type]
        assert vectors.tolist() == [[0.5, 0.25, 0.125], [1.0, 0.25, 0.125]]
    async with AsyncInferenceClient(base_url=f"{router_url}/v1", api_key=TOKEN) as client:
        routed = await client.chat_completion(HELLO, model="meta-llama/Llama-3.1-8B-Instruct:novita")
        assert routed.choices[0].message.content == ANSWER
