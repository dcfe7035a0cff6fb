"""A fake OpenAI API server speaking the real wire format (bodies, SSE framing, error envelopes,
status codes and headers), scripted per upstream model name so tests can pick a behaviour:

* ``gpt-ok`` (or anything unlisted): a normal answer; usage included (streams: with include_usage).
* ``no-usage``: like gpt-ok but never sends usage (as many OpenAI-compatible servers do).
* ``tools``: answers with a tool call (streamed as OpenAI does: id and name once, then argument pieces).
* ``reasoning``: a reasoning model of the DeepSeek / vLLM kind: the answer carries
  ``reasoning_content`` (:data:`REASONING`) besides the content; streams send it as
  ``reasoning_content`` deltas before the content deltas.
* ``status-<code>``: fails with that status and an OpenAI error body (429 carries Retry-After: 1).
* ``flaky-<code>``: fails with <code> on the first call per test, then answers normally.
* ``cut``: a stream that stops after two chunks without [DONE] (the connection just ends).
* ``mid-error``: a stream that sends an error event after two chunks.
* ``slow-<ms>``: waits <ms> milliseconds before answering; streams wait that long between chunks.
* ``leak``: a 500 whose body echoes the Authorization header it received (a careless upstream).
* ``set-cookie``: a normal answer that also sets a cookie (as Cloudflare in front of an API does).
* ``gated``: a stream that sends two chunks, then waits until the test sets ``FakeOpenAI.gate``.

Every request is recorded in ``FakeOpenAI.requests`` (path, headers, body) for assertions.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Receive, Send

from tests.fakes.asgi import FakeServer, Request, end_body, send_event, send_json, start_sse
from tests.fakes.asgi import Recorded as Recorded

ANSWER = "The quick brown fox jumps over the lazy dog."
REASONING = "A pangram uses every letter; the fox one is the classic."


@dataclass
class FakeOpenAI(FakeServer):
    calls: dict[str, int] = field(default_factory=dict)
    disconnected: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    stream_finished: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        super().reset()
        self.calls.clear()
        self.disconnected = 0
        self.gate = asyncio.Event()
        self.stream_finished = asyncio.Event()

    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        headers = request.headers
        path = request.path
        if request.method == "GET" and path.endswith("/models"):
            await send_json(
                send,
                200,
                {"object": "list", "data": [{"id": "gpt-ok", "object": "model", "created": 0, "owned_by": "fake"}]},
            )
            return
        try:
            body = request.json()
        except orjson.JSONDecodeError:
            await self._error(
                send, 400, "We could not parse the JSON body of your request.", "invalid_request_error", None
            )
            return
        self.record(request, body)
        if headers.get("authorization") != "Bearer sk-upstream-test":
            await self._error(
                send, 401, "Incorrect API key provided: sk-upst***test.", "invalid_request_error", "invalid_api_key"
            )
            return
        model = str(body.get("model", ""))
        count = self.calls[model] = self.calls.get(model, 0) + 1
        if model.startswith("status-"):
            await self._status(send, int(model.split("-")[1]))
            return
        if model.startswith("flaky-") and count == 1:
            await self._status(send, int(model.split("-")[1]))
            return
        if model == "leak":
            await self._error(
                send, 500, f"internal error while handling {headers.get('authorization')}", "server_error", None
            )
            return
        delay = int(model.split("-")[1]) / 1000 if model.startswith("slow-") else 0.0
        if path.endswith("/embeddings"):
            await asyncio.sleep(delay)
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            dims = body.get("dimensions") or 8
            data = [
                {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1)] * dims} for i in range(len(inputs))
            ]
            await send_json(
                send,
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": 5 * len(inputs), "total_tokens": 5 * len(inputs)},
                },
            )
            return
        if body.get("stream"):
            await self._stream(send, receive, path, body, model, delay)
            return
        await asyncio.sleep(delay)
        cookie = [(b"set-cookie", b"__cf_bm=tenant-a-session; path=/; HttpOnly")] if model == "set-cookie" else None
        await send_json(send, 200, self._completion(path, body, model), cookie)

    # ---- bodies ------------------------------------------------------------------------------

    def _completion(self, path: str, body: dict[str, Any], model: str) -> dict[str, Any]:
        usage = {
            "prompt_tokens": 11,
            "completion_tokens": 9,
            "total_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            out: dict[str, Any] = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model + "-2024",
                "choices": [{"index": 0, "text": ANSWER, "logprobs": None, "finish_reason": "stop"}],
            }
        else:
            message: dict[str, Any] = {"role": "assistant", "content": ANSWER, "refusal": None}
            finish = "stop"
            if model == "tools":
                message = {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "call_abc123",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                        }
                    ],
                }
                finish = "tool_calls"
            elif model == "reasoning":
                message["reasoning_content"] = REASONING
            out = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model + "-2024",
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            }
        if model != "no-usage":
            out["usage"] = usage
        return out

    async def _stream(
        self, send: Send, receive: Receive, path: str, body: dict[str, Any], model: str, delay: float
    ) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and model != "no-usage"
        chat = path.endswith("/chat/completions")
        base: dict[str, Any] = {
            "id": "chatcmpl-fake" if chat else "cmpl-fake",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model + "-2024",
        }
        if chat:
            base["system_fingerprint"] = "fp_fake"
        chunks: list[dict[str, Any]] = []
        if chat and model == "tools":
            chunks.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "role": "assistant",
                                "content": None,
                                "tool_calls": [
                                    {
                                        "index": 0,
                                        "id": "call_abc123",
                                        "type": "function",
                                        "function": {"name": "get_weather", "arguments": ""},
                                    }
                                ],
                            },
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
            for piece in ['{"city"', ': "Par', 'is", "unit"', ': "c"}']:
                chunks.append(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            chunks.append(
                {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]}
            )
        elif chat:
            chunks.append(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": "", "refusal": None},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
            if model == "reasoning":
                for i, word in enumerate(REASONING.split(" ")):
                    delta = {"content": None, "reasoning_content": word if i == 0 else " " + word}
                    chunks.append(
                        {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
                    )
            for word in ANSWER.split(" "):
                chunks.append(
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {"content": word + " "}, "logprobs": None, "finish_reason": None}
                        ],
                    }
                )
            chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
        else:
            for word in ANSWER.split(" "):
                chunks.append(
                    {**base, "choices": [{"index": 0, "text": word + " ", "logprobs": None, "finish_reason": None}]}
                )
            chunks.append({**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]})
        if include_usage:
            for chunk in chunks:
                chunk["usage"] = None
            chunks.append(
                {**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}}
            )
        await start_sse(send, [(b"x-ratelimit-remaining-requests", b"99")])
        try:
            for i, chunk in enumerate(chunks):
                if model == "cut" and i == 2:
                    return  # the body just ends: no [DONE]
                if model == "mid-error" and i == 2:
                    error = {
                        "error": {
                            "message": "The server had an error while processing your request.",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                    await send_event(send, error)
                    return
                if model == "gated" and i == 2 and await self._disconnected_before_gate(receive):
                    return
                if delay and i:
                    await asyncio.sleep(delay)
                await send_event(send, chunk)
            await send_event(send, b"[DONE]")
        except (OSError, asyncio.CancelledError):
            self.disconnected += 1
            raise
        finally:
            try:
                await end_body(send)
            except Exception:
                self.disconnected += 1

    async def _disconnected_before_gate(self, receive: Receive) -> bool:
        """Wait for the test to open the gate; True if the client went away first."""
        gate = asyncio.ensure_future(self.gate.wait())
        message = asyncio.ensure_future(receive())
        done, pending = await asyncio.wait({gate, message}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if message in done and message.result()["type"] == "http.disconnect":
            self.disconnected += 1
            return True
        return False

    async def _status(self, send: Send, status: int) -> None:
        kinds = {
            400: ("invalid_request_error", None),
            401: ("invalid_request_error", "invalid_api_key"),
            403: ("invalid_request_error", "unsupported_country_region_territory"),
            404: ("invalid_request_error", "model_not_found"),
            429: ("requests", "rate_limit_exceeded"),
            500: ("server_error", None),
            503: ("server_error", None),
        }
        error_type, code = kinds.get(status, ("server_error", None))
        message = {
            400: "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens.",
            429: "Rate limit reached for requests",
        }.get(status, f"fake upstream error {status}")
        extra = [(b"retry-after", b"1"), (b"x-ratelimit-remaining-requests", b"0")] if status == 429 else []
        await self._error(
            send, status, message, error_type, "context_length_exceeded" if status == 400 else code, extra
        )

    async def _error(
        self,
        send: Send,
        status: int,
        message: str,
        error_type: str,
        code: str | None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        await send_json(
            send, status, {"error": {"message": message, "type": error_type, "param": None, "code": code}}, extra
        )
