"""A fake Mistral La Plateforme API (``/v1/chat/completions``, ``/v1/embeddings``) speaking its wire
format: bearer auth (401 ``{"message": "Unauthorized"}``), strict request validation (a field Mistral
does not know is a 422 ``extra_forbidden``, wrapped in its ``{"object": "error"}`` envelope; tool
call ids must be nine alphanumerics), ``{"object": "error", ...}`` error bodies, streamed tool calls
sent whole in one delta (parallel calls all with ``index`` 0), and usage on the last stream chunk
(there is no ``stream_options``).

Behaviour is scripted by ``model``:

* anything unlisted: a normal answer.
* ``tools``: two parallel tool calls (get_weather for Paris and for Lyon).
* ``magistral``: content as a list of chunks (a thinking chunk, then text).
* ``model-length``: stops with ``finish_reason: model_length``.
* ``detail-422``: a bare ``{"detail": [...]}`` validation error about ``random_seed``.
* ``context``: 400 "too large for model with 32768 maximum context length".
* ``status-<code>``: that status with a Mistral error body (429 carries Retry-After: 2).
* ``cut``: a stream that ends after two chunks without [DONE].

Every request is recorded in ``FakeMistral.requests`` (path, headers, body).
"""

from __future__ import annotations

import base64
import re
import struct
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Send

from tests.fakes.asgi import FakeServer, Recorded, Request, end_body, send_event, send_json, start_sse

KEY = "mistral-key-test-0123456789"
ANSWER = "The quick brown fox jumps over the lazy dog."
THOUGHT = "The user greets me; I greet back."

CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "stream",
        "stop",
        "random_seed",
        "metadata",
        "response_format",
        "tools",
        "tool_choice",
        "presence_penalty",
        "frequency_penalty",
        "min_tokens",
        "repetition_penalty",
        "top_k",
        "logprobs",
        "top_logprobs",
        "prompt_logprobs",
        "top_prompt_logprobs",
        "n",
        "prediction",
        "parallel_tool_calls",
        "reasoning_effort",
        "prompt_mode",
        "guardrails",
        "prompt_cache_key",
        "service_tier",
        "safe_prompt",
    }
)
EMBEDDING_FIELDS = frozenset({"model", "input", "metadata", "output_dimension", "output_dtype", "encoding_format"})
TOOL_CHOICES = frozenset({"auto", "none", "any", "required"})
ROLES = frozenset({"system", "user", "assistant", "tool"})
_TOOL_ID = re.compile(r"[A-Za-z0-9]{9}")
TOOL_CALLS = [
    {"id": "D681PevKs", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}, "index": 0},
    {"id": "K2ab3Cd4E", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}, "index": 0},
]


MistralRequest = Recorded


@dataclass
class FakeMistral(FakeServer):
    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        headers = request.headers
        path = request.path
        body = request.json()
        self.record(request, body)
        if headers.get("authorization") != f"Bearer {KEY}":
            await send_json(send, 401, {"message": "Unauthorized", "request_id": "fake-request-id"})
            return
        if path == "/v1/chat/completions":
            problems = self._check_chat(body)
        elif path == "/v1/embeddings":
            problems = self._extra(body, EMBEDDING_FIELDS)
        else:
            await send_json(send, 404, {"detail": "Not Found"})
            return
        if problems:
            await send_json(
                send,
                422,
                {
                    "object": "error",
                    "message": {"detail": problems},
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                },
            )
            return
        bad_id = self._bad_tool_call_id(body)
        if bad_id is not None:
            await self._error(
                send, 400, f"Tool call id was {bad_id} but must be a-z, A-Z, 0-9, with a length of 9.", "3280"
            )
            return
        model = str(body.get("model", ""))
        if model.startswith("status-"):
            await self._status(send, int(model.split("-")[1]))
            return
        if model == "detail-422":  # the bare FastAPI validation body some Mistral endpoints send
            await send_json(
                send,
                422,
                {
                    "detail": [
                        {
                            "type": "int_parsing",
                            "loc": ["body", "random_seed"],
                            "msg": "Input should be a valid integer",
                            "input": "x",
                        }
                    ]
                },
            )
            return
        if model == "context":
            await self._error(
                send,
                400,
                "Prompt contains 40000 tokens and 0 draft tokens, too large for model with 32768 maximum context length",
                "3051",
            )
            return
        if path == "/v1/embeddings":
            await self._embeddings(send, body, model)
        elif body.get("stream"):
            await self._stream(send, model)
        else:
            await send_json(send, 200, self._completion(model))

    # ---- validation --------------------------------------------------------------------------

    @staticmethod
    def _extra(body: dict[str, Any], allowed: frozenset[str]) -> list[dict[str, Any]]:
        return [
            {
                "type": "extra_forbidden",
                "loc": ["body", name],
                "msg": "Extra inputs are not permitted",
                "input": value,
            }
            for name, value in body.items()
            if name not in allowed
        ]

    def _check_chat(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        problems = self._extra(body, CHAT_FIELDS)
        choice = body.get("tool_choice")
        if isinstance(choice, str) and choice not in TOOL_CHOICES:
            problems.append(
                {
                    "type": "enum",
                    "loc": ["body", "tool_choice"],
                    "msg": "Input should be 'auto', 'none', 'any' or 'required'",
                    "input": choice,
                }
            )
        for i, message in enumerate(body.get("messages") or ()):
            if message.get("role") not in ROLES:
                problems.append(
                    {
                        "type": "union_tag_invalid",
                        "loc": ["body", "messages", i],
                        "msg": f"Input tag '{message.get('role')}' found using 'role' does not match any of the "
                        "expected tags: 'system', 'user', 'assistant', 'tool'",
                        "input": message,
                    }
                )
        return problems

    @staticmethod
    def _bad_tool_call_id(body: dict[str, Any]) -> str | None:
        for message in body.get("messages") or ():
            ids = [str(tc.get("id")) for tc in message.get("tool_calls") or ()]
            if message.get("tool_call_id") is not None:
                ids.append(str(message["tool_call_id"]))
            for value in ids:
                if not _TOOL_ID.fullmatch(value):
                    return value
        return None

    # ---- bodies ------------------------------------------------------------------------------

    def _completion(self, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": ANSWER, "tool_calls": None, "prefix": False}
        finish = "stop"
        if model == "tools":
            message["content"] = ""
            message["tool_calls"] = [{**tc, "type": "function"} for tc in TOOL_CALLS]
            finish = "tool_calls"
        elif model == "magistral":
            message["content"] = [
                {"type": "thinking", "thinking": [{"type": "text", "text": THOUGHT}]},
                {"type": "text", "text": ANSWER},
            ]
        elif model == "model-length":
            finish = "model_length"
        return {
            "id": "cmpl-e5cc70bb28c444948073e77776eb30ef",
            "object": "chat.completion",
            "model": model,
            "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
            "created": int(time.time()),
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        }

    async def _stream(self, send: Send, model: str) -> None:
        base = {
            "id": "cmpl-stream-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        usage = {"prompt_tokens": 12, "total_tokens": 22, "completion_tokens": 10}
        chunks = [chunk({"role": "assistant", "content": ""})]
        if model == "tools":
            chunks.append({**chunk({"tool_calls": TOOL_CALLS}, "tool_calls"), "usage": usage})
        else:
            if model == "magistral":
                chunks.append(
                    chunk({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": THOUGHT}]}]})
                )
            for word in ANSWER.split(" "):
                text = word + " "
                chunks.append(chunk({"content": [{"type": "text", "text": text}] if model == "magistral" else text}))
            finish = "model_length" if model == "model-length" else "stop"
            chunks.append({**chunk({"content": ""}, finish), "usage": usage})
        await start_sse(send, [(b"ratelimitbysize-remaining", b"499978")])
        try:
            for i, item in enumerate(chunks):
                if model == "cut" and i == 2:
                    return
                await send_event(send, item)
            await send_event(send, b"[DONE]")
        finally:
            await end_body(send)

    async def _embeddings(self, send: Send, body: dict[str, Any], model: str) -> None:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dims = body.get("output_dimension") or 4
        data = []
        for i in range(len(inputs)):
            vector = [round(-0.5 * (i + 1), 2)] * dims
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": embedding, "index": i})
        tokens = 4 * len(inputs)
        await send_json(
            send,
            200,
            {
                "id": "embd-fake",
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
            },
        )

    async def _status(self, send: Send, status: int) -> None:
        if status == 429:
            await self._error(
                send, 429, "Requests rate limit exceeded", "1300", "rate_limited", [(b"retry-after", b"2")]
            )
        elif status >= 500:
            await self._error(send, status, "Internal server error", "1000", "internal_server_error")
        else:
            await self._error(send, status, f"fake Mistral error {status}", str(status))

    async def _error(
        self,
        send: Send,
        status: int,
        message: str,
        code: str,
        error_type: str = "invalid_request_error",
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        await send_json(
            send,
            status,
            {"object": "error", "message": message, "type": error_type, "param": None, "code": code},
            extra,
        )
