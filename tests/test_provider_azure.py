"""The ``azure`` provider end to end: the official openai SDK against a real gateway on loopback, in
front of a fake Azure OpenAI data plane (tests/fakes/azure_server.py) whose faithfulness is checked
with ``openai.AsyncAzureOpenAI`` at the bottom of this file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from llmgateway.core.app import create_app
from llmgateway.core.config import parse_config
from llmgateway.core.errors import ConfigError
from tests.conftest import GatewayFactory, sdk
from tests.fakes.azure_server import ANSWER, KEY, TOKEN, FakeAzure
from tests.fakes.entra_server import CLIENT_ID, CLIENT_SECRET, TENANT, FakeEntra
from tests.servers import running

DEPLOYMENTS = (
    "gpt4o-prod",
    "tools",
    "filtered",
    "filtered-output",
    "async-filter",
    "no-usage",
    "missing",
    "status-429",
    "status-500",
    "cut",
    "embed-small",
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
async def azure_server() -> AsyncIterator[tuple[FakeAzure, str]]:
    fake = FakeAzure()
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def azure(azure_server: tuple[FakeAzure, str]) -> tuple[FakeAzure, str]:
    fake, url = azure_server
    fake.reset()
    return fake, url


def config(url: str, auth: str = f'api_key = "{KEY}"', extra: str = "") -> str:
    models = "".join(
        f"""
[[models]]
name = "{name}"
max_attempts = 1
deployments = [{{ provider = "az", model = "{name}" }}]
"""
        for name in DEPLOYMENTS
    )
    return f"""
[providers.az]
type = "azure"
base_url = "{url}"
{auth}
{extra}
{models}
"""


async def test_plain_chat_goes_to_the_deployment_with_api_version_and_api_key(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]
) -> None:
    fake, url = azure
    async with serve_gateway(config(url, extra='api_version = "2024-06-01"')) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="gpt4o-prod", messages=HELLO, temperature=0.2)
    assert answer.model == "gpt4o-prod"
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.total_tokens == 20
    (request,) = fake.requests
    assert request.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert request.query == {"api-version": "2024-06-01"}
    assert request.headers["api-key"] == KEY
    assert "authorization" not in request.headers
    assert request.body["messages"] == HELLO
    assert request.body["temperature"] == 0.2


async def test_default_api_version_is_sent(serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]) -> None:
    fake, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
    assert fake.requests[0].query["api-version"] == "2024-10-21"


async def test_entra_token_and_v1_path_style(serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]) -> None:
    fake, url = azure
    toml = config(url + "/openai/v1", auth=f'azure_ad_token = "{TOKEN}"', extra='api_style = "v1"')
    async with serve_gateway(toml) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
        stream = await client.chat.completions.create(model="gpt4o-prod", messages=HELLO, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert answer.choices[0].message.content == ANSWER
    assert text.strip() == ANSWER
    for request in fake.requests:
        assert request.path == "/openai/v1/chat/completions"
        assert request.query == {}
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert "api-key" not in request.headers
        assert request.body["model"] == "gpt4o-prod"


@pytest.fixture(scope="session")
async def entra_server() -> AsyncIterator[tuple[FakeEntra, str]]:
    fake = FakeEntra()
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def entra(entra_server: tuple[FakeEntra, str], azure: tuple[FakeAzure, str]) -> tuple[FakeEntra, str]:
    fake, url = entra_server
    fake.reset()
    fake.accept = azure[0].tokens  # Azure OpenAI accepts the tokens the identity platform issues
    return fake, url


def principal(entra_url: str, secret: str = CLIENT_SECRET) -> str:
    return (
        f'azure_tenant_id = "{TENANT}"\nazure_client_id = "{CLIENT_ID}"\nazure_client_secret = "{secret}"\n'
        f'azure_authority_host = "{entra_url}"'
    )


async def test_a_service_principal_token_is_fetched_once_and_renewed_before_it_expires(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str], entra: tuple[FakeEntra, str]
) -> None:
    fake, url = azure
    identity, entra_url = entra
    identity.expires_in = 4  # renewed after half its lifetime (2 s), sent until 3.6 s
    async with serve_gateway(config(url, auth=principal(entra_url))) as gw, sdk(gw) as client:
        started = time.monotonic()
        answers = await asyncio.gather(
            *[client.chat.completions.create(model="gpt4o-prod", messages=HELLO) for _ in range(5)]
        )
        stream = await client.chat.completions.create(model="gpt4o-prod", messages=HELLO, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert len(identity.issued) == 1  # five concurrent requests and a stream shared one token
        await asyncio.sleep(max(0.0, started + 2.3 - time.monotonic()))
        await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)  # old token, renewal starts
        for _ in range(100):
            if len(identity.issued) == 2:
                break
            await asyncio.sleep(0.02)
        renewed = time.monotonic()
        await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
        await asyncio.sleep(3.7)  # every token has expired: the next request waits for a new one
        assert time.monotonic() - renewed > 3.6
        await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
    assert [a.choices[0].message.content for a in answers] == [ANSWER] * 5
    assert text.strip() == ANSWER
    first, second, third = identity.issued
    bearers = [r.headers["authorization"] for r in fake.requests]
    assert bearers == [f"Bearer {first}"] * 7 + [f"Bearer {second}", f"Bearer {third}"]
    assert all("api-key" not in r.headers for r in fake.requests)
    token_request = identity.requests[0]
    assert token_request.path == f"/{TENANT}/oauth2/v2.0/token"
    assert token_request.body == {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": "https://cognitiveservices.azure.com/.default",
    }


async def test_a_wrong_client_secret_is_a_clear_error_that_never_shows_the_secret(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str], entra: tuple[FakeEntra, str]
) -> None:
    fake, url = azure
    identity, entra_url = entra
    wrong = "wrong-secret~abcdefghijklmnop"
    async with serve_gateway(config(url, auth=principal(entra_url, wrong))) as gw, sdk(gw) as client:
        for _ in range(3):
            with pytest.raises(openai.AuthenticationError) as info:
                await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
            error = info.value.body
            assert isinstance(error, dict)
            assert "Microsoft Entra ID token" in error["message"]
            assert "invalid_client: AADSTS7000215" in error["message"]
            assert wrong not in str(error)
            assert "Trace ID" not in error["message"]  # one line of the description
    assert len(identity.requests) == 1  # the failure is remembered for a while, not retried per request
    assert fake.requests == []  # nothing reached Azure OpenAI without a token


async def test_stream_drops_annotation_chunks_and_forwards_usage_when_asked(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]
) -> None:
    fake, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="gpt4o-prod", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    *content, last = chunks
    assert all(chunk.choices for chunk in content), "annotation-only chunks must not reach the client"
    assert all(chunk.model == "gpt4o-prod" and chunk.id == "chatcmpl-azurefake" for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in content).strip() == ANSWER
    assert content[-1].choices[0].finish_reason == "stop"
    # the prompt filter results ride on the first forwarded chunk
    assert content[0].model_extra is not None
    assert content[0].model_extra["prompt_filter_results"][0]["prompt_index"] == 0
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == 20
    assert fake.requests[0].body["stream_options"] == {"include_usage": True}


async def test_stream_without_include_usage_has_no_empty_chunks(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]
) -> None:
    _, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        for model in ("gpt4o-prod", "async-filter", "no-usage"):
            stream = await client.chat.completions.create(model=model, messages=HELLO, stream=True)
            chunks = [chunk async for chunk in stream]
            assert chunks, model
            assert all(chunk.choices for chunk in chunks), model
            assert all(chunk.usage is None for chunk in chunks)
            assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == ANSWER


async def test_usage_is_estimated_when_azure_sends_none(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]
) -> None:
    _, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="no-usage", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens > 0
    assert usage.prompt_tokens > 0


async def test_output_content_filter_finish_reason_is_passed_on(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]
) -> None:
    _, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="filtered-output", messages=HELLO)
        stream = await client.chat.completions.create(model="filtered-output", messages=HELLO, stream=True)
        chunks = [chunk async for chunk in stream]
    assert answer.choices[0].finish_reason == "content_filter"
    assert chunks[-1].choices[0].finish_reason == "content_filter"


async def test_tool_calls_plain_and_streamed(serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]) -> None:
    fake, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        answer = await client.chat.completions.create(model="tools", messages=HELLO, tools=TOOLS, tool_choice="auto")
        stream = await client.chat.completions.create(model="tools", messages=HELLO, tools=TOOLS, stream=True)
        chunks = [chunk async for chunk in stream]
    (call,) = answer.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris", "unit": "c"}'
    assert answer.choices[0].finish_reason == "tool_calls"
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == "call_azure123"
    assert deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
    assert (
        "".join((d.function.arguments or "") if d.function else "" for d in deltas) == '{"city": "Paris", "unit": "c"}'
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert fake.requests[0].body["tools"] == TOOLS
    assert fake.requests[0].body["tool_choice"] == "auto"


async def test_embeddings_float_and_base64(serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]) -> None:
    fake, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        floats = await client.embeddings.create(
            model="embed-small", input=["a", "b"], encoding_format="float", dimensions=3
        )
        # the SDK asks for base64 by default and decodes it
        decoded = await client.embeddings.create(model="embed-small", input="a")
    assert [d.embedding for d in floats.data] == [[0.25] * 3, [0.5] * 3]
    assert floats.model == "embed-small"
    assert floats.usage.prompt_tokens == 6
    assert decoded.data[0].embedding == [0.25] * 4
    assert [r.path for r in fake.requests] == ["/openai/deployments/embed-small/embeddings"] * 2
    assert fake.requests[0].body["dimensions"] == 3
    assert fake.requests[1].body["encoding_format"] == "base64"


async def test_prompt_content_filter_is_a_content_policy_error(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]
) -> None:
    _, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as plain:
            await client.chat.completions.create(model="filtered", messages=HELLO)
        with pytest.raises(openai.BadRequestError) as streamed:
            await client.chat.completions.create(model="filtered", messages=HELLO, stream=True)
    for error in (plain.value, streamed.value):
        assert error.status_code == 400
        assert error.code == "content_policy_violation"
        assert "content management policy" in error.message


async def test_rate_limit_keeps_retry_after(serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]) -> None:
    _, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="status-429", messages=HELLO)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="missing", messages=HELLO)
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="status-500", messages=HELLO)
    assert limited.value.response.headers["retry-after"] == "7"
    assert "exceeded token rate limit" in limited.value.message
    assert missing.value.code == "DeploymentNotFound"
    assert failed.value.status_code == 502


async def test_a_cut_stream_ends_with_an_error_event(
    serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]
) -> None:
    _, url = azure
    async with serve_gateway(config(url)) as gw, sdk(gw) as client:
        stream = await client.chat.completions.create(model="cut", messages=HELLO, stream=True)
        received: list[Any] = []

        async def read_all() -> None:
            async for chunk in stream:
                received.append(chunk)

        with pytest.raises(openai.APIError, match="ended the stream"):
            await read_all()
    assert received  # some text arrived before the cut


async def test_the_key_never_reaches_the_client(serve_gateway: GatewayFactory, azure: tuple[FakeAzure, str]) -> None:
    _, url = azure
    toml = config(url, auth='api_key = "wrong-key-0123456789"')
    async with serve_gateway(toml) as gw, sdk(gw) as client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
    assert "wrong-key" not in str(denied.value.body)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[providers.az]\ntype = "azure"\napi_key = "k"\n', "providers.az.base_url"),
        (
            '[providers.az]\ntype = "azure"\nbase_url = "https://x.openai.azure.com"\napi_key = "k"\n'
            'azure_ad_token = "t"\n',
            "providers.az.azure_ad_token",
        ),
        ('[providers.az]\ntype = "azure"\nbase_url = "https://x.openai.azure.com"\n', "providers.az.api_key"),
        (
            '[providers.az]\ntype = "azure"\nbase_url = "https://x"\nazure_tenant_id = "t"\nazure_client_secret = "s"\n',
            "providers.az.azure_client_id",
        ),
        (
            '[providers.az]\ntype = "azure"\nbase_url = "https://x"\napi_key = "k"\nazure_tenant_id = "t"\n'
            'azure_client_id = "c"\nazure_client_secret = "s"\n',
            "providers.az.api_key",
        ),
        (
            '[providers.az]\ntype = "azure"\nbase_url = "https://x"\napi_key = "k"\napi_style = "v2"\n',
            "providers.az.api_style",
        ),
    ],
)
def test_config_errors_name_the_key(toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        create_app(parse_config(toml))
    assert error.value.key == key


# ---- the fake is faithful: the official Azure client talks to it ---------------------------------


async def test_fake_is_faithful_to_the_official_azure_client(azure: tuple[FakeAzure, str]) -> None:
    fake, url = azure
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=url, api_key=KEY, api_version="2024-10-21", max_retries=0
    ) as client:
        answer = await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
        assert answer.choices[0].message.content == ANSWER
        stream = await client.chat.completions.create(
            model="gpt4o-prod", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices == []
        assert chunks[0].model_extra is not None
        assert "prompt_filter_results" in chunks[0].model_extra
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.total_tokens == 20
        tools = await client.chat.completions.create(model="tools", messages=HELLO, tools=TOOLS)  # type: ignore[arg-type]
        assert (tools.choices[0].message.tool_calls or [])[0].function.name == "get_weather"  # type: ignore[union-attr]
        vectors = await client.embeddings.create(model="embed-small", input=["x"])
        assert vectors.data[0].embedding == [0.25] * 4
        with pytest.raises(openai.BadRequestError) as filtered:
            await client.chat.completions.create(model="filtered", messages=HELLO)
        assert filtered.value.code == "content_filter"
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="status-429", messages=HELLO)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="missing", messages=HELLO)
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=url, azure_ad_token=TOKEN, api_version="2024-10-21", max_retries=0
    ) as client:
        await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
    async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1/", api_key=KEY, max_retries=0) as client:
        v1 = await client.chat.completions.create(model="gpt4o-prod", messages=HELLO)
        assert v1.choices[0].message.content == ANSWER
    paths = [r.path for r in fake.requests]
    assert paths[0] == "/openai/deployments/gpt4o-prod/chat/completions"
    assert fake.requests[0].query == {"api-version": "2024-10-21"}
    assert fake.requests[0].headers["api-key"] == KEY
    assert "/openai/deployments/embed-small/embeddings" in paths
    assert fake.requests[-2].headers["authorization"] == f"Bearer {TOKEN}"
    assert paths[-1] == "/openai/v1/chat/completions"
