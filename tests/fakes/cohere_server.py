"""A fake Cohere v2 API speaking its real wire format: ``POST /v2/chat`` (a JSON answer, or with
``"stream": true`` an SSE stream of ``event: <type>`` / ``data: {...}`` frames — message-start,
content-start/delta/end, tool-plan-delta, tool-call-start/delta/end, message-end carrying
finish_reason and usage) and ``POST /v2/embed`` (``embeddings`` by type: float and base64 as
little-endian float32); the key as ``Authorization: Bearer``; errors as ``{"id", "message"}`` with
the status Cohere uses (401 for a bad key); trial-key limit headers on every answer.

Like the real API it rejects unknown request fields, roles other than system / user / assistant /
tool, and embed requests without ``input_type``.

Behaviour is scripted by model name:

* anything unlisted (e.g. ``command-ok``): answers ``ANSWER`` (streams: one word per delta).
* ``tools``: a tool plan, then get_weather {"city": "Paris", "unit": "c"} (arguments streamed in pieces).
* ``tools-parallel``: get_weather Paris and get_time Tokyo.
* ``json``: answers ``{"city": "Paris", "temperature": 21}``.
* ``thinking``: a thinking block (→ reasoning), then the answer; usage with cached_tokens 4.
* ``length``: finish_reason MAX_TOKENS. ``error-end``: finish_reason ERROR with an error message.
* ``status-<code>``: fails with that status (429 carries ``Retry-After: 3``).
* ``cut``: a stream that stops after three events without message-end.
* with ``documents``: citations of the answer's first word, one per document (:func:`citations_for`),
  in ``message.citations`` or as citation-start / citation-end events after the text.
* with ``"logprobs": true``, text answers carry ``logprobs`` (:func:`logprob_item` per streamed
  chunk): top-level in a plain answer, on each content-delta event in a stream.

Every request is recorded in ``FakeCohere.requests`` (method, path, headers, body).
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Send

from tests.fakes.asgi import FakeServer, Request, end_body, send_event, send_json, start_sse
from tests.fakes.asgi import Recorded as Recorded

API_KEY = "co-test-key"
ANSWER = "The quick brown fox jumps over the lazy dog."
JSON_ANSWER = '{"city": "Paris", "temperature": 21}'
TOOL_PLAN = "I will look up the weather in Paris."
THINKING = "Foxes are quick; dogs are lazy."

_MESSAGES = {
    400: "too many tokens: total number of tokens in the prompt cannot exceed 4081 - received 4382. Try using a shorter prompt, or enabling prompt truncating.",
    402: "Please add or update your payment method at https://dashboard.cohere.com/billing?tab=payment to continue",
    403: "You do not have access to this model.",
    404: "model 'status-404' not found, make sure the correct model ID was used and that you have access to the model.",
    413: "request body too large",
    422: "invalid request: unprocessable entity",
    429: "You are using a Trial key, which is limited to 10 API calls / minute. You can continue to use the Trial key for free or upgrade to a Production key with higher rate limits.",
    500: "internal server error, this has been reported to our developers.",
    503: "service unavailable",
}
_CHAT_FIELDS = {
    "model",
    "messages",
    "tools",
    "strict_tools",
    "documents",
    "citation_options",
    "response_format",
    "safety_mode",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "k",
    "p",
    "logprobs",
    "tool_choice",
    "thinking",
    "priority",
    "stream",
}
_EMBED_FIELDS = {
    "model",
    "texts",
    "images",
    "inputs",
    "input_type",
    "embedding_types",
    "output_dimension",
    "truncate",
    "max_tokens",
    "priority",
}
_LIMITS = [(b"x-trial-endpoint-call-limit", b"40"), (b"x-trial-endpoint-call-remaining", b"39")]


class _Invalid(Exception):
    pass


@dataclass
class FakeCohere(FakeServer):
    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        headers = request.headers
        path = request.path
        try:
            body = request.json()
        except orjson.JSONDecodeError:
            await self._error(send, 400, "invalid request: could not parse the request body as JSON")
            return
        self.record(request, body)
        auth = headers.get("authorization", "")
        if not auth:
            await self._error(send, 401, "no api key supplied")
            return
        if auth != f"Bearer {API_KEY}":
            await self._error(send, 401, "invalid api token")
            return
        model = str(body.get("model") or "")
        if model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            extra = [(b"retry-after", b"3")] if status == 429 else []
            await self._error(send, status, _MESSAGES.get(status, f"fake upstream error {status}"), extra)
            return
        try:
            if request.method == "POST" and path == "/v2/chat":
                _validate_chat(body)
                scored = bool(body.get("logprobs"))
                cited = citations_for(body.get("documents"), model)
                if body.get("stream"):
                    await self._stream(send, model, scored, cited)
                else:
                    await self._json(send, 200, _answer(model, scored, cited))
            elif request.method == "POST" and path == "/v2/embed":
                await self._json(send, 200, _embed(body))
            else:
                await self._error(send, 404, f"Not Found: {path}")
        except _Invalid as exc:
            await self._error(send, 400, f"invalid request: {exc}")

    async def _stream(self, send: Send, model: str, scored: bool, cited: list[dict[str, Any]]) -> None:
        await start_sse(send, [(b"cache-control", b"no-cache"), *_LIMITS], content_type=b"text/event-stream")
        try:
            for i, event in enumerate(_events(model, scored, cited)):
                if model == "cut" and i == 3:
                    return
                await send_event(send, event, event=event["type"])
        finally:
            await end_body(send)

    @staticmethod
    async def _json(send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        await send_json(send, status, payload, [*_LIMITS, *(extra or [])])

    async def _error(
        self, send: Send, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await self._json(send, status, {"id": "fake-error-id", "message": message}, extra)


# ---- answers -----------------------------------------------------------------------------------


def _usage(model: str) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "billed_units": {"input_tokens": 11, "output_tokens": 9},
        "tokens": {"input_tokens": 211, "output_tokens": 12},
    }
    if model == "thinking":
        usage["cached_tokens"] = 4
    return usage


def _calls(model: str) -> list[dict[str, Any]]:
    calls = [
        {
            "id": "get_weather_7xk2m9q4",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'},
        }
    ]
    if model == "tools-parallel":
        calls.append(
            {
                "id": "get_time_3hd8s1ab",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"city":"Tokyo"}'},
            }
        )
    return calls


def _finish(model: str) -> str:
    if model.startswith("tools"):
        return "TOOL_CALL"
    return {"length": "MAX_TOKENS", "error-end": "ERROR"}.get(model, "COMPLETE")


def answer_chunks(model: str) -> list[str]:
    """The answer text in the pieces the stream sends (one word each, with its leading space)."""
    words = (JSON_ANSWER if model == "json" else ANSWER).split(" ")
    return [word if n == 0 else " " + word for n, word in enumerate(words)]


def logprob_item(text: str) -> dict[str, Any]:
    """What Cohere sends for a text chunk with ``logprobs``: its token ids and one log probability
    per token (here two tokens a chunk)."""
    return {"text": text, "token_ids": [len(text), 7], "logprobs": [round(-0.01 * len(text), 4), -0.02]}


def citations_for(documents: Any, model: str) -> list[dict[str, Any]]:
    """With ``documents``, the answer cites its first word from each document (Cohere names the
    documents without an id ``doc:<i>``; a string document is ``{"text": ...}``)."""
    if not documents or model.startswith("tools"):
        return []
    word = answer_chunks(model)[0]
    citations = []
    for i, document in enumerate(documents):
        if isinstance(document, str):
            source = {"type": "document", "id": f"doc:{i}", "document": {"id": f"doc:{i}", "text": document}}
        else:
            doc_id = document.get("id") or f"doc:{i}"
            source = {"type": "document", "id": doc_id, "document": {"id": doc_id, **document["data"]}}
        citations.append(
            {
                "start": 0,
                "end": len(word),
                "text": word,
                "sources": [source],
                "content_index": 0,
                "type": "TEXT_CONTENT",
            }
        )
    return citations


def _answer(model: str, scored: bool = False, cited: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant"}
    if model.startswith("tools"):
        message["tool_plan"] = TOOL_PLAN
        message["tool_calls"] = _calls(model)
    else:
        content = [{"type": "text", "text": JSON_ANSWER if model == "json" else ANSWER}]
        if model == "thinking":
            content.insert(0, {"type": "thinking", "thinking": THINKING})
        message["content"] = content
    if cited:
        message["citations"] = cited
    answer = {"id": "fake-chat-id", "message": message, "finish_reason": _finish(model), "usage": _usage(model)}
    if scored and not model.startswith("tools"):
        answer["logprobs"] = [logprob_item(text) for text in answer_chunks(model)]
    return answer


def _events(model: str, scored: bool = False, cited: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {
            "id": "fake-chat-id",
            "type": "message-start",
            "delta": {
                "message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
            },
        }
    ]
    if model.startswith("tools"):
        for word in TOOL_PLAN.split(" "):
            events.append({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": word + " "}}})
        for index, call in enumerate(_calls(model)):
            events.append(
                {
                    "type": "tool-call-start",
                    "index": index,
                    "delta": {
                        "message": {
                            "tool_calls": {
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        }
                    },
                }
            )
            arguments = call["function"]["arguments"]
            for start in range(0, len(arguments), 5):
                events.append(
                    {
                        "type": "tool-call-delta",
                        "index": index,
                        "delta": {"message": {"tool_calls": {"function": {"arguments": arguments[start : start + 5]}}}},
                    }
                )
            events.append({"type": "tool-call-end", "index": index})
    else:
        index = 0
        if model == "thinking":
            events.append(
                {
                    "type": "content-start",
                    "index": 0,
                    "delta": {"message": {"content": {"type": "thinking", "thinking": ""}}},
                }
            )
            for word in THINKING.split(" "):
                events.append(
                    {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"thinking": word + " "}}}}
                )
            events.append({"type": "content-end", "index": 0})
            index = 1
        events.append(
            {"type": "content-start", "index": index, "delta": {"message": {"content": {"type": "text", "text": ""}}}}
        )
        for text in answer_chunks(model):
            delta: dict[str, Any] = {
                "type": "content-delta",
                "index": index,
                "delta": {"message": {"content": {"text": text}}},
            }
            if scored:
                delta["logprobs"] = logprob_item(text)
            events.append(delta)
        for n, citation in enumerate(cited or ()):
            events.append({"type": "citation-start", "index": n, "delta": {"message": {"citations": citation}}})
            events.append({"type": "citation-end", "index": n})
        events.append({"type": "content-end", "index": index})
    end: dict[str, Any] = {"finish_reason": _finish(model), "usage": _usage(model)}
    if model == "error-end":
        end["error"] = "internal error: the generation failed"
    events.append({"type": "message-end", "delta": end})
    return events


def _validate_chat(body: dict[str, Any]) -> None:
    for key in body:
        if key not in _CHAT_FIELDS:
            raise _Invalid(f"unknown field: parameter '{key}' is not a valid field")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("messages must not be empty")
    for message in messages:
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise _Invalid(f"message role must be one of 'system', 'user', 'assistant' or 'tool', got '{role}'")
        if role == "assistant" and not (message.get("content") or message.get("tool_calls")):
            raise _Invalid("assistant message must have either content or tool_calls")
        if role == "tool" and not message.get("tool_call_id"):
            raise _Invalid("tool message must have a tool_call_id")
    for tool in body.get("tools") or ():
        function = tool.get("function") or {}
        if tool.get("type") != "function" or not function.get("name") or "parameters" not in function:
            raise _Invalid("tools must be of type 'function' with a name and parameters")
    if body.get("tool_choice") not in (None, "REQUIRED", "NONE"):
        raise _Invalid("tool_choice must be one of 'REQUIRED' or 'NONE'")


def _embed(body: dict[str, Any]) -> dict[str, Any]:
    for key in body:
        if key not in _EMBED_FIELDS:
            raise _Invalid(f"unknown field: parameter '{key}' is not a valid field")
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts:
        raise _Invalid("texts must not be empty")
    if not body.get("input_type"):
        raise _Invalid("valid input_type must be provided with the provided model")
    size = int(body.get("output_dimension") or 8)
    vectors = [[round(0.1 * (i + 1) + 0.001 * j, 6) for j in range(size)] for i in range(len(texts))]
    embeddings: dict[str, Any] = {}
    for kind in body.get("embedding_types") or ["float"]:
        if kind == "float":
            embeddings["float"] = vectors
        elif kind == "base64":
            embeddings["base64"] = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        else:
            raise _Invalid(f"embedding type '{kind}' is not supported by the fake")
    return {
        "id": "fake-embed-id",
        "embeddings": embeddings,
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 3 * len(texts)}},
        "response_type": "embeddings_by_type",
    }
