"""A fake Azure OpenAI data plane speaking its wire format: deployment paths with ``api-version``,
the ``/openai/v1/`` paths, ``api-key`` / Entra ID bearer auth, Azure's error bodies (``code``
strings, content filter errors with ``innererror``), ``prompt_filter_results`` /
``content_filter_results`` annotations, alphabetically ordered JSON keys, and streams that start
with an empty-choices annotation chunk.

Behaviour is scripted by the deployment name (the path segment, or ``model`` on /openai/v1/):

* anything unlisted: a normal answer (streams send usage when ``stream_options.include_usage``).
* ``tools``: a tool call (streamed as OpenAI does: id and name once, then argument pieces).
* ``filtered``: the prompt trips the content filter (400, ``code: content_filter``).
* ``filtered-output``: the answer is cut by the filter (``finish_reason: content_filter``).
* ``async-filter``: a stream with annotation-only choices after the text (asynchronous filtering).
* ``no-usage``: never sends usage (older API versions).
* ``missing``: 404 DeploymentNotFound.
* ``status-<code>``: that status with an Azure error body (429 carries Retry-After / retry-after-ms).
* ``cut``: a stream that ends after two chunks without [DONE].

Every request is recorded in ``FakeAzure.requests`` (path, query, headers, body).
"""

from __future__ import annotations

import base64
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.types import Receive, Send

from tests.fakes.asgi import FakeServer, Recorded, Request, end_body, send_event, send_json, start_sse

KEY = "azure-key-test-0123456789"
TOKEN = "entra-token-test-abcdefghij"
ANSWER = "The quick brown fox jumps over the lazy dog."
UPSTREAM_MODEL = "gpt-4o-2024-08-06"

_SAFE = {"filtered": False, "severity": "safe"}
_CATEGORIES = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
PROMPT_FILTERS = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            **_CATEGORIES,
            "jailbreak": {"filtered": False, "detected": False},
        },
    }
]
FILTER_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry. To learn more about our content filtering policies please read "
    "our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)
_APIM_REQUEST_ID = (b"apim-request-id", b"00000000-0000-0000-0000-000000000000")


def _dumps(payload: Any) -> bytes:
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


AzureRequest = Recorded  # its query keeps the first value of each parameter


@dataclass
class FakeAzure(FakeServer):
    #: bearer tokens accepted besides TOKEN (an identity platform fake adds the ones it issues)
    tokens: set[str] = field(default_factory=set)

    def reset(self) -> None:
        super().reset()
        self.tokens.clear()

    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        headers = request.headers
        query = {k: v[0] for k, v in request.query.items()}
        path = request.path
        body = request.json()
        self.record(request, body, query)

        parts = path.strip("/").split("/")
        v1 = parts[:2] == ["openai", "v1"]
        if v1:
            deployment, operation = str(body.get("model", "")), "/".join(parts[2:])
        elif len(parts) >= 4 and parts[:2] == ["openai", "deployments"]:
            deployment, operation = parts[2], "/".join(parts[3:])
            if "api-version" not in query:
                await self._error(send, 404, "404", "Resource not found")
                return
        else:
            await self._error(send, 404, "404", "Resource not found")
            return
        if not self._authorized(headers, v1):
            await self._error(
                send,
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
                "key for an active subscription and use a correct regional API endpoint for your resource.",
            )
            return
        if deployment == "missing":
            await self._error(
                send,
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the deployment within the "
                "last 5 minutes, please wait a moment and try again.",
            )
            return
        if deployment.startswith("status-"):
            await self._status(send, int(deployment.split("-")[1]))
            return
        if deployment == "filtered":
            await self._json(
                send,
                400,
                {
                    "error": {
                        "message": FILTER_MESSAGE,
                        "type": None,
                        "param": "prompt",
                        "code": "content_filter",
                        "status": 400,
                        "innererror": {
                            "code": "ResponsibleAIPolicyViolation",
                            "content_filter_result": {
                                **_CATEGORIES,
                                "violence": {"filtered": True, "severity": "medium"},
                            },
                        },
                    }
                },
            )
            return
        if operation == "embeddings":
            await self._embeddings(send, body)
        elif operation == "chat/completions":
            if body.get("stream"):
                await self._stream(send, body, deployment)
            else:
                await self._json(send, 200, self._completion(deployment))
        else:
            await self._error(send, 404, "404", "Resource not found")

    def _authorized(self, headers: dict[str, str], v1: bool) -> bool:
        if headers.get("api-key") == KEY:
            return True
        bearer = headers.get("authorization", "")
        return bearer in (f"Bearer {TOKEN}", *(f"Bearer {t}" for t in self.tokens)) or (
            v1 and bearer == f"Bearer {KEY}"
        )

    # ---- bodies ------------------------------------------------------------------------------

    def _message(self, deployment: str) -> tuple[dict[str, Any], str]:
        if deployment == "tools":
            return {
                "content": None,
                "refusal": None,
                "role": "assistant",
                "tool_calls": [
                    {
                        "function": {"arguments": '{"city": "Paris", "unit": "c"}', "name": "get_weather"},
                        "id": "call_azure123",
                        "type": "function",
                    }
                ],
            }, "tool_calls"
        if deployment == "filtered-output":
            return {"content": None, "refusal": None, "role": "assistant"}, "content_filter"
        return {"content": ANSWER, "refusal": None, "role": "assistant"}, "stop"

    def _completion(self, deployment: str) -> dict[str, Any]:
        message, finish = self._message(deployment)
        out: dict[str, Any] = {
            "choices": [
                {
                    "content_filter_results": {} if deployment == "tools" else _CATEGORIES,
                    "finish_reason": finish,
                    "index": 0,
                    "logprobs": None,
                    "message": message,
                }
            ],
            "created": int(time.time()),
            "id": "chatcmpl-azurefake",
            "model": UPSTREAM_MODEL,
            "object": "chat.completion",
            "prompt_filter_results": PROMPT_FILTERS,
            "system_fingerprint": "fp_azure",
        }
        if deployment != "no-usage":
            out["usage"] = {
                "completion_tokens": 9,
                "completion_tokens_details": {"reasoning_tokens": 0},
                "prompt_tokens": 11,
                "prompt_tokens_details": {"cached_tokens": 0},
                "total_tokens": 20,
            }
        return out

    async def _stream(self, send: Send, body: dict[str, Any], deployment: str) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and deployment != "no-usage"
        base: dict[str, Any] = {
            "created": int(time.time()),
            "id": "chatcmpl-azurefake",
            "model": UPSTREAM_MODEL,
            "object": "chat.completion.chunk",
            "system_fingerprint": "fp_azure",
        }
        if include_usage:
            base["usage"] = None

        def choice(delta: dict[str, Any], finish: str | None = None, filters: Any = None) -> dict[str, Any]:
            return {
                "content_filter_results": _CATEGORIES if filters is None else filters,
                "delta": delta,
                "finish_reason": finish,
                "index": 0,
                "logprobs": None,
            }

        chunks: list[dict[str, Any]] = [
            {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": PROMPT_FILTERS},
            {**base, "choices": [choice({"content": "", "refusal": None, "role": "assistant"}, filters={})]},
        ]
        if deployment == "tools":
            chunks[1] = {
                **base,
                "choices": [
                    choice(
                        {
                            "content": None,
                            "role": "assistant",
                            "tool_calls": [
                                {
                                    "function": {"arguments": "", "name": "get_weather"},
                                    "id": "call_azure123",
                                    "index": 0,
                                    "type": "function",
                                }
                            ],
                        },
                        filters={},
                    )
                ],
            }
            for piece in ['{"city"', ': "Par', 'is", "unit"', ': "c"}']:
                chunks.append(
                    {
                        **base,
                        "choices": [
                            choice({"tool_calls": [{"function": {"arguments": piece}, "index": 0}]}, filters={})
                        ],
                    }
                )
            chunks.append({**base, "choices": [choice({}, "tool_calls", filters={})]})
        else:
            words = ANSWER.split(" ")
            if deployment == "filtered-output":
                words = words[:3]
            for word in words:
                chunks.append({**base, "choices": [choice({"content": word + " "})]})
            finish = "content_filter" if deployment == "filtered-output" else "stop"
            chunks.append({**base, "choices": [choice({}, finish, filters={})]})
            if deployment == "async-filter":
                for offset in (0, 20):
                    chunks.append(
                        {
                            **base,
                            "choices": [
                                {
                                    "content_filter_offsets": {
                                        "check_offset": offset,
                                        "start_offset": offset,
                                        "end_offset": offset + 20,
                                    },
                                    "content_filter_results": _CATEGORIES,
                                    "finish_reason": None,
                                    "index": 0,
                                }
                            ],
                        }
                    )
        if include_usage:
            chunks.append(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "completion_tokens": 9,
                        "completion_tokens_details": {"reasoning_tokens": 0},
                        "prompt_tokens": 11,
                        "prompt_tokens_details": {"cached_tokens": 0},
                        "total_tokens": 20,
                    },
                }
            )
        await start_sse(
            send,
            [
                _APIM_REQUEST_ID,
                (b"x-ratelimit-remaining-requests", b"99"),
                (b"x-ratelimit-remaining-tokens", b"99980"),
            ],
        )
        try:
            for i, chunk in enumerate(chunks):
                if deployment == "cut" and i == 3:
                    return
                await send_event(send, chunk, dumps=_dumps)
            await send_event(send, b"[DONE]")
        finally:
            await end_body(send)

    async def _embeddings(self, send: Send, body: dict[str, Any]) -> None:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dims = body.get("dimensions") or 4
        data = []
        for i in range(len(inputs)):
            vector = [round(0.25 * (i + 1), 2)] * dims
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"embedding": embedding, "index": i, "object": "embedding"})
        await self._json(
            send,
            200,
            {
                "data": data,
                "model": "text-embedding-3-small",
                "object": "list",
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
            },
        )

    async def _status(self, send: Send, status: int) -> None:
        if status == 429:
            await self._error(
                send,
                429,
                "429",
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
                "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 7 seconds.",
                [(b"retry-after", b"7"), (b"retry-after-ms", b"7000"), (b"x-ratelimit-remaining-tokens", b"0")],
            )
        elif status >= 500:
            await self._error(
                send,
                status,
                "InternalServerError",
                "The server had an error while processing your request. Sorry about that!",
            )
        else:
            await self._error(send, status, str(status), f"fake Azure error {status}")

    @staticmethod
    async def _json(send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        await send_json(send, status, payload, [_APIM_REQUEST_ID, *(extra or [])], dumps=_dumps)

    async def _error(
        self, send: Send, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await self._json(send, status, {"error": {"code": code, "message": message}}, extra)
