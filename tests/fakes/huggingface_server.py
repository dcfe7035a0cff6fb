"""Fake Hugging Face inference servers, in two flavours.

``FakeHuggingFace("router")`` — the Inference Providers router: OpenAI-compatible
``/v1/chat/completions`` (``data: `` frames, usage only with ``stream_options.include_usage``), the
``hf-inference`` feature-extraction pipeline at ``/hf-inference/models/{model}/pipeline/feature-extraction``
(``{"inputs": ...}`` in, nested float lists out), and Hugging Face error bodies
(``{"error": "..."}``; a loading model is a 503 with ``estimated_time``).

``FakeHuggingFace("tgi")`` — a Text Generation Inference server as an Inference Endpoint runs it:
``/v1/chat/completions`` with TGI's quirks (empty ``id``, ``finish_reason: eos_token``, tool call
arguments as JSON objects in answers, streamed tool call deltas with ``name: null``, chunks framed
as ``data:{...}`` without the optional space, usage on the last chunk only when asked), TGI errors
``{"error": "...", "error_type": "..."}`` (422 validation, 424 generation, 429 overloaded, also as
an event inside a stream), and feature extraction at the endpoint's root (``POST /``).

Both require ``Authorization: Bearer hf_...`` and script behaviour by ``model`` (chat) or the model
path segment (embeddings):

* anything unlisted: a normal answer; ``tools``: a get_weather tool call (``tools-object``: TGI's
  older single-object ``tool_calls``); ``no-usage``: never sends usage.
* ``status-<code>``: that status with the flavour's error body (429 carries Retry-After: 3).
* tgi: ``too-long`` (422 token-limit validation error), ``overloaded`` (429), ``generation`` (424),
  ``mid-error`` (an error event after two chunks), ``cut`` (the stream just ends).
* embeddings: ``token-level`` answers per-token vectors (to be pooled); ``loading`` is a 503.

Every request is recorded in ``FakeHuggingFace.requests`` (path, headers, body).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Send

from tests.fakes.asgi import FakeServer, Recorded, Request, end_body, send_event, send_json, start_sse

TOKEN = "hf_testtoken0123456789"
ANSWER = "The quick brown fox jumps over the lazy dog."
UPSTREAM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ARGUMENTS = {"city": "Paris"}


HFRequest = Recorded


@dataclass
class FakeHuggingFace(FakeServer):
    flavour: str = "router"

    @property
    def tgi(self) -> bool:
        return self.flavour == "tgi"

    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        headers = request.headers
        path = request.path
        try:
            body = request.json()
        except orjson.JSONDecodeError:
            await self._error(send, 400, "Failed to deserialize the JSON body", "validation")
            return
        self.record(request, body)
        if headers.get("authorization") != f"Bearer {TOKEN}":
            await self._error(send, 401, "Invalid credentials in Authorization header")
            return
        prefix = "/hf-inference/models/"
        suffix = "/pipeline/feature-extraction"
        if path == "/v1/chat/completions":
            await self._chat(send, body)
        elif not self.tgi and path.startswith(prefix) and path.endswith(suffix):
            await self._features(send, body, path[len(prefix) : -len(suffix)])
        elif self.tgi and path == "/":
            await self._features(send, body, "endpoint")
        else:
            await self._error(send, 404, "Not Found")

    # ---- chat --------------------------------------------------------------------------------

    async def _chat(self, send: Send, body: dict[str, Any]) -> None:
        model = str(body.get("model", ""))
        if model.startswith("status-"):
            status = int(model.split("-")[1])
            extra = [(b"retry-after", b"3")] if status == 429 else []
            await self._error(send, status, f"fake Hugging Face error {status}", None, extra)
            return
        if self.tgi and model == "too-long":
            await self._error(
                send,
                422,
                "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
                "Given: 4000 `inputs` tokens and 500 `max_new_tokens`",
                "validation",
            )
            return
        if self.tgi and model == "overloaded":
            await self._error(send, 429, "Model is overloaded", "overloaded")
            return
        if self.tgi and model == "generation":
            await self._error(send, 424, "Request failed during generation: CUDA out of memory", "generation")
            return
        if body.get("stream"):
            await self._stream(send, body, model)
        else:
            await send_json(send, 200, self._completion(body, model))

    def _completion(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        tools = model.startswith("tools")
        if self.tgi:
            message: dict[str, Any] = {"role": "assistant", "content": ANSWER}
            if tools:
                call = {
                    "id": "0",
                    "type": "function",
                    "function": {"description": None, "name": "get_weather", "arguments": ARGUMENTS},
                }
                message = {"role": "assistant", "tool_calls": call if model == "tools-object" else [call]}
            out: dict[str, Any] = {
                "object": "chat.completion",
                "id": "",
                "created": int(time.time()),
                "model": UPSTREAM_MODEL,
                "system_fingerprint": "3.0.1-native",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "eos_token"}],
            }
        else:
            message = {"role": "assistant", "content": ANSWER}
            if tools:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_router1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": orjson.dumps(ARGUMENTS).decode()},
                        }
                    ],
                }
            out = {
                "id": "chatcmpl-router",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tools else "stop"}],
            }
        if model != "no-usage":
            out["usage"] = {"prompt_tokens": 13, "completion_tokens": 10, "total_tokens": 23}
        return out

    async def _stream(self, send: Send, body: dict[str, Any], model: str) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and model != "no-usage"
        tools = model.startswith("tools")
        base: dict[str, Any] = {
            "object": "chat.completion.chunk",
            "id": "" if self.tgi else "chatcmpl-router",
            "created": int(time.time()),
            "model": UPSTREAM_MODEL if self.tgi else model,
        }
        if self.tgi:
            base["system_fingerprint"] = "3.0.1-native"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        chunks: list[dict[str, Any]] = []
        pieces = ['{"city"', ': "Par', 'is"}']
        if tools and self.tgi:
            first = {"index": 0, "id": "", "type": "function", "function": {"name": "get_weather", "arguments": None}}
            chunks.append(chunk({"role": "assistant", "tool_calls": first if model == "tools-object" else [first]}))
            for piece in pieces:
                delta = {"index": 0, "id": "", "type": "function", "function": {"name": None, "arguments": piece}}
                chunks.append(chunk({"role": "assistant", "tool_calls": delta if model == "tools-object" else [delta]}))
            chunks.append(chunk({"role": "assistant", "content": ""}, "eos_token"))
        elif tools:
            chunks.append(
                chunk(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_router1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ],
                    }
                )
            )
            for piece in pieces:
                chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
            chunks.append(chunk({}, "tool_calls"))
        else:
            chunks.append(chunk({"role": "assistant", "content": ""}))
            for word in ANSWER.split(" "):
                chunks.append(
                    chunk({"role": "assistant", "content": word + " "} if self.tgi else {"content": word + " "})
                )
            chunks.append(
                chunk({"role": "assistant", "content": ""} if self.tgi else {}, "eos_token" if self.tgi else "stop")
            )
        usage = {"prompt_tokens": 13, "completion_tokens": 10, "total_tokens": 23}
        if include_usage:
            if self.tgi:
                chunks[-1]["usage"] = usage  # TGI puts it on the last chunk
            else:
                chunks.append({**base, "choices": [], "usage": usage})
        separator = b"data:" if self.tgi else b"data: "
        await start_sse(send, content_type=b"text/event-stream")
        try:
            for i, item in enumerate(chunks):
                if model == "cut" and i == 2:
                    return
                if model == "mid-error" and i == 2:
                    error = {
                        "error": "Request failed during generation: CUDA out of memory",
                        "error_type": "generation",
                    }
                    await send_event(send, error, prefix=separator)
                    return
                await send_event(send, item, prefix=separator)
            await send_event(send, b"[DONE]")
        finally:
            await end_body(send)

    # ---- feature extraction ------------------------------------------------------------------

    async def _features(self, send: Send, body: dict[str, Any], model: str) -> None:
        if model == "loading":
            await send_json(send, 503, {"error": "Model loading is currently loading", "estimated_time": 12.5})
            return
        inputs = body.get("inputs")
        if isinstance(inputs, str):
            await send_json(send, 200, [0.5, 0.25, 0.125])
            return
        if not isinstance(inputs, list) or not inputs:
            await self._error(send, 400, "`inputs` must be a string or a list of strings", "validation")
            return
        if model == "token-level":
            rows = [[[float(i + 1), 0.0], [float(i + 1) * 3, 2.0]] for i in range(len(inputs))]
            await send_json(send, 200, rows)
            return
        await send_json(send, 200, [[0.5 * (i + 1), 0.25, 0.125] for i in range(len(inputs))])

    # ---- plumbing ----------------------------------------------------------------------------

    async def _error(
        self,
        send: Send,
        status: int,
        message: str,
        error_type: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        payload: dict[str, Any] = {"error": message}
        if self.tgi and error_type is not None:
            payload["error_type"] = error_type
        await send_json(send, status, payload, extra)
