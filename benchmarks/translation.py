"""Cost of translating a provider's stream into OpenAI SSE, per chunk.

    .venv/bin/python -m benchmarks.translation [--chunks 500] [--repeat 30]

Each provider's real ``chat_stream`` runs against an in-process upstream (an httpx transport)
that answers with a recorded-shape stream of ``--chunks`` text events in that provider's wire format
(Anthropic named events; Gemini ``alt=sse`` frames separated by CRLF CRLF). The time per chunk
includes SSE splitting, JSON decoding, translation and frame encoding — everything but the network.
The ``openai`` passthrough is measured the same way as the baseline. Target (issue 3): ≤ 10 µs per
chunk for Anthropic and Gemini.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import httpx
import orjson
from starlette.datastructures import Headers

from llmgateway.core.config import ProviderConfig
from llmgateway.core.http import make_client
from llmgateway.core.provider import Provider, UpstreamCall
from llmgateway.core.types import Deployment, RequestContext
from llmgateway.plugins.providers.anthropic import AnthropicProvider
from llmgateway.plugins.providers.gemini import GeminiProvider
from llmgateway.plugins.providers.openai import OpenAIProvider

WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


def anthropic_body(chunks: int) -> bytes:
    def event(name: str, payload: object) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    out = [
        event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude",
                    "content": [],
                    "stop_reason": None,
                    "usage": {"input_tokens": 10, "output_tokens": 1},
                },
            },
        ),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
    ]
    for i in range(chunks):
        out.append(
            event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": WORDS[i % len(WORDS)] + " "},
                },
            )
        )
    out += [
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": chunks},
            },
        ),
        event("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(out)


def gemini_body(chunks: int) -> bytes:
    out = []
    for i in range(chunks):
        candidate: dict[str, object] = {
            "content": {"role": "model", "parts": [{"text": WORDS[i % len(WORDS)] + " "}]},
            "index": 0,
        }
        payload: dict[str, object] = {"candidates": [candidate], "modelVersion": "gemini-2.0-flash"}
        if i == chunks - 1:
            candidate["finishReason"] = "STOP"
            payload["usageMetadata"] = {
                "promptTokenCount": 10,
                "candidatesTokenCount": chunks,
                "totalTokenCount": chunks + 10,
            }
        out.append(b"data: " + orjson.dumps(payload) + b"\r\n\r\n")
    return b"".join(out)


def openai_body(chunks: int) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini"}
    out = []
    for i in range(chunks):
        out.append(
            b"data: "
            + orjson.dumps(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"content": WORDS[i % len(WORDS)] + " "}, "finish_reason": None}],
                }
            )
            + b"\n\n"
        )
    out.append(
        b"data: "
        + orjson.dumps(
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": chunks + 10},
            }
        )
        + b"\n\n"
    )
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


class _Pieces(httpx.AsyncByteStream):
    """The body in 4 KiB pieces, as a socket would hand it over."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self):  # type: ignore[override]
        for start in range(0, len(self.body), 4096):
            yield self.body[start : start + 4096]


class _Canned(httpx.AsyncBaseTransport):
    """An in-process upstream answering every request with the same streamed body."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Pieces(self.body), headers={"content-type": "text/event-stream"})


CASES: dict[str, tuple[type[Provider], str, Callable[[int], bytes]]] = {
    "openai (passthrough baseline)": (OpenAIProvider, "http://upstream/v1", openai_body),
    "anthropic": (AnthropicProvider, "http://upstream", anthropic_body),
    "gemini": (GeminiProvider, "http://upstream/v1beta", gemini_body),
}


async def measure(name: str, chunks: int, repeat: int) -> tuple[float, int]:
    cls, base_url, make_body = CASES[name]
    body = make_body(chunks)
    transport = _Canned(body)
    config = ProviderConfig(name="p", type=name, base_url=base_url, api_key="k")
    client = make_client(config, transport)
    provider = cls(config, client)
    samples = []
    frames = 0
    for _ in range(repeat):
        ctx = RequestContext(
            request_id="r", endpoint="chat.completions", body={}, headers=Headers(), client_host=None, path="/"
        )
        deployment = Deployment(alias="a", provider="p", model="m", max_output_tokens=1024)
        call = UpstreamCall(
            ctx=ctx,
            deployment=deployment,
            body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
            alias="a",
        )
        started = time.perf_counter()
        frames = 0
        async for _ in provider.chat_stream(call):
            frames += 1
        samples.append((time.perf_counter() - started) / chunks)
    await client.aclose()
    return statistics.median(samples), frames


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    print(f"{'provider':32} {'µs per chunk (median)':>22} {'frames out':>11}")
    for name in CASES:
        per_chunk, frames = await measure(name, args.chunks, args.repeat)
        print(f"{name:32} {per_chunk * 1e6:22.2f} {frames:11d}")


if __name__ == "__main__":
    asyncio.run(main())
