"""The conformance matrix: ingress {OpenAI chat, Anthropic messages} x egress {7 providers} x
{plain, stream, tools, stream + tools, upstream error}.

Each cell sends one request with an official SDK (``openai`` or ``anthropic``) to a real gateway on
loopback, whose provider talks to a local fake of that provider's API (tests/fakes/), and checks
what the client gets: the fake's answer text, the ``get_weather`` tool call with its arguments
intact (streamed deltas assembled by the SDK), or the typed 429 error with ``Retry-After``.

``tests/test_conformance.py`` runs every cell under pytest; ``scripts/conformance`` runs them all
and writes ``docs/conformance.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest

from llmgateway.core.app import create_app
from llmgateway.core.config import parse_config
from tests.fakes import anthropic_server, azure_server, cohere_server, gemini_server, huggingface_server, mistral_server
from tests.fakes.openai_server import ANSWER, FakeOpenAI
from tests.servers import running

INGRESSES = ("openai", "anthropic")
SCENARIOS = ("plain", "stream", "tools", "stream+tools", "error")
TOOLS_OPENAI: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOLS_ANTHROPIC: Any = [
    {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    }
]
QUESTION = "What is the weather in Paris?"


@dataclass(frozen=True)
class Egress:
    """One provider: its fake server, and the provider section pointing at it."""

    name: str
    fake: Callable[[], Any]
    provider: Callable[[str], str]  # base URL of the fake -> [providers.p] TOML


EGRESSES: dict[str, Egress] = {
    "openai": Egress(
        "openai", FakeOpenAI, lambda url: f'type = "openai"\nbase_url = "{url}/v1"\napi_key = "sk-upstream-test"'
    ),
    "azure": Egress(
        "azure",
        azure_server.FakeAzure,
        lambda url: f'type = "azure"\nbase_url = "{url}"\napi_key = "{azure_server.KEY}"',
    ),
    "anthropic": Egress(
        "anthropic",
        anthropic_server.FakeAnthropic,
        lambda url: f'type = "anthropic"\nbase_url = "{url}"\napi_key = "{anthropic_server.API_KEY}"',
    ),
    "cohere": Egress(
        "cohere",
        cohere_server.FakeCohere,
        lambda url: f'type = "cohere"\nbase_url = "{url}"\napi_key = "{cohere_server.API_KEY}"',
    ),
    "huggingface": Egress(
        "huggingface",
        lambda: huggingface_server.FakeHuggingFace("router"),
        lambda url: f'type = "huggingface"\nbase_url = "{url}/v1"\napi_key = "{huggingface_server.TOKEN}"',
    ),
    "gemini": Egress(
        "gemini",
        gemini_server.FakeGemini,
        lambda url: f'type = "gemini"\nbase_url = "{url}/v1beta"\napi_key = "{gemini_server.API_KEY}"',
    ),
    "mistral": Egress(
        "mistral",
        mistral_server.FakeMistral,
        lambda url: f'type = "mistral"\nbase_url = "{url}/v1"\napi_key = "{mistral_server.KEY}"',
    ),
}

# the aliases every gateway in the matrix serves, and the upstream model each maps to on the fakes
ALIASES = {"ok": "ok-model", "tools": "tools", "limited": "status-429"}


def gateway_toml(egress: Egress, fake_url: str) -> str:
    out = f"[providers.p]\n{egress.provider(fake_url)}\n"
    for alias, upstream in ALIASES.items():
        out += f'\n[[models]]\nname = "{alias}"\nmax_attempts = 1\ndeployments = [{{ provider = "p", model = "{upstream}" }}]\n'
    return out


@contextlib.asynccontextmanager
async def egress_gateway(name: str) -> AsyncIterator[str]:
    """A fake of provider ``name`` and a gateway in front of it; yields the gateway's URL."""
    egress = EGRESSES[name]
    async with running(egress.fake()) as fake_url:
        config = parse_config(gateway_toml(egress, fake_url), file=f"<conformance {name}>", env=dict(os.environ))
        async with running(create_app(config)) as url:
            yield url


async def run_cell(ingress: str, scenario: str, url: str) -> None:
    """One cell; raises AssertionError (or the client's exception) when the client sees something wrong."""
    if ingress == "openai":
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-client", max_retries=0, timeout=30) as client:
            await _openai_cell(client, scenario)
    else:
        async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-client", max_retries=0, timeout=30) as client:
            await _anthropic_cell(client, scenario)


def _check_weather(name: str | None, arguments: str | dict[str, Any]) -> None:
    assert name == "get_weather", f"tool name {name!r}"
    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert parsed.get("city") == "Paris", f"tool arguments {arguments!r}"


async def _openai_cell(client: openai.AsyncOpenAI, scenario: str) -> None:
    messages: Any = [{"role": "user", "content": QUESTION}]
    if scenario == "plain":
        answer = await client.chat.completions.create(model="ok", messages=messages, max_tokens=100)
        assert answer.model == "ok"
        assert (answer.choices[0].message.content or "").strip() == ANSWER
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None
        assert answer.usage.total_tokens > 0
    elif scenario == "stream":
        stream = await client.chat.completions.create(
            model="ok", messages=messages, max_tokens=100, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() == ANSWER
        assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.total_tokens > 0
    elif scenario == "tools":
        answer = await client.chat.completions.create(
            model="tools", messages=messages, tools=TOOLS_OPENAI, max_tokens=100
        )
        calls = answer.choices[0].message.tool_calls or []
        assert calls, "no tool call"
        call = calls[0]
        assert call.id
        assert call.type == "function"
        _check_weather(call.function.name, call.function.arguments)  # type: ignore[union-attr]
        assert answer.choices[0].finish_reason == "tool_calls"
    elif scenario == "stream+tools":
        stream = await client.chat.completions.create(
            model="tools", messages=messages, tools=TOOLS_OPENAI, max_tokens=100, stream=True
        )
        calls: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in stream:
            if not chunk.choices:
                continue
            finish = chunk.choices[0].finish_reason or finish
            for delta in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
        assert calls, "no tool call deltas"
        first = calls[min(calls)]
        assert first["id"]
        _check_weather(first["name"], first["arguments"])
        assert finish == "tool_calls"
    elif scenario == "error":
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="limited", messages=messages, max_tokens=100)
        assert caught.value.response.headers.get("retry-after"), "Retry-After was dropped"
        assert set(caught.value.response.json()["error"]) >= {"message", "type", "param", "code"}


async def _anthropic_cell(client: anthropic.AsyncAnthropic, scenario: str) -> None:
    messages: Any = [{"role": "user", "content": QUESTION}]
    if scenario == "plain":
        message = await client.messages.create(model="ok", max_tokens=100, messages=messages)
        assert message.model == "ok"
        text = "".join(block.text for block in message.content if block.type == "text")
        assert text.strip() == ANSWER
        assert message.stop_reason == "end_turn"
        assert message.usage.output_tokens > 0
    elif scenario == "stream":
        async with client.messages.stream(model="ok", max_tokens=100, messages=messages) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert text.strip() == ANSWER
        assert final.stop_reason == "end_turn"
        assert final.usage.output_tokens > 0
    elif scenario in ("tools", "stream+tools"):
        if scenario == "tools":
            message = await client.messages.create(
                model="tools", max_tokens=100, messages=messages, tools=TOOLS_ANTHROPIC
            )
        else:
            async with client.messages.stream(
                model="tools", max_tokens=100, messages=messages, tools=TOOLS_ANTHROPIC
            ) as stream:
                message = await stream.get_final_message()
        uses = [block for block in message.content if block.type == "tool_use"]
        assert uses, f"no tool_use block in {message.content!r}"
        assert uses[0].id
        _check_weather(uses[0].name, uses[0].input)  # type: ignore[arg-type]
        assert message.stop_reason == "tool_use"
    elif scenario == "error":
        with pytest.raises(anthropic.RateLimitError) as caught_anthropic:
            await client.messages.create(model="limited", max_tokens=100, messages=messages)
        assert caught_anthropic.value.response.headers.get("retry-after"), "Retry-After was dropped"


def cells() -> list[tuple[str, str, str]]:
    return [(i, e, s) for i in INGRESSES for e in EGRESSES for s in SCENARIOS]


def render(results: dict[tuple[str, str, str], str | None]) -> str:
    """docs/conformance.md from {cell: None (passed) or the failure}."""
    lines = [
        "# Conformance matrix",
        "",
        "Generated by `scripts/conformance` (the same cells run in `tests/test_conformance.py`).",
        "Each cell: an official SDK → a gateway on loopback → the provider's local fake speaking its",
        "documented wire format (`tests/fakes/`). ✅ the client got the right answer; ❌ it did not.",
        "",
        "- **plain**: the answer text, finish reason and usage.",
        "- **stream**: the text assembled from the stream, the finish reason and usage.",
        "- **tools**: a `get_weather` tool call with its arguments intact.",
        "- **stream + tools**: the same, assembled from streamed tool-call deltas.",
        "- **error**: an upstream 429 reaches the client as the SDK's typed RateLimitError with `Retry-After`.",
        "",
    ]
    for ingress in INGRESSES:
        title = (
            "OpenAI chat completions (`openai` SDK)" if ingress == "openai" else "Anthropic messages (`anthropic` SDK)"
        )
        lines += [
            f"## Ingress: {title}",
            "",
            "| egress | " + " | ".join(SCENARIOS) + " |",
            "|---|" + "---|" * len(SCENARIOS),
        ]
        for egress in EGRESSES:
            marks = ["✅" if results.get((ingress, egress, s), "missing") is None else "❌" for s in SCENARIOS]
            lines.append(f"| {egress} | " + " | ".join(marks) + " |")
        lines.append("")
    failures = [(cell, why) for cell, why in results.items() if why is not None]
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- {' / '.join(cell)}: {why}" for cell, why in failures]
        lines.append("")
    return "\n".join(lines)
