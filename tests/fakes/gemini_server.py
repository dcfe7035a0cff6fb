"""A fake Gemini API (generativelanguage.googleapis.com/v1beta) speaking its real wire format:
``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent?alt=sse`` (frames
separated by CRLF CRLF, usage only on the last chunk, no terminal event: the last chunk carries
``finishReason``), ``:embedContent`` and ``:batchEmbedContents``; the key in ``x-goog-api-key`` (or
``?key=``); errors as ``{"error": {"code", "message", "status", "details"}}``, a wrong key as Gemini
answers it (400 INVALID_ARGUMENT with reason API_KEY_INVALID), a missing key as 403.

Like the real API it rejects what it does not know: unknown top-level or generationConfig fields,
roles other than user / model, empty parts, and JSON-Schema-only keys (``additionalProperties``,
``$schema``...) inside ``responseSchema`` or a function's ``parameters``.

Behaviour is scripted by model name:

* anything unlisted (e.g. ``gemini-ok``): answers ``ANSWER`` (streams: a few words per chunk);
  with ``candidateCount`` n, n candidates (``ANSWER`` + `` (i)`` for i > 0).
* ``tools``: one ``functionCall`` get_weather {"city": "Paris", "unit": "c"} with a thoughtSignature.
* ``tools-parallel``: two calls, get_weather Paris and get_time Tokyo.
* ``json``: answers ``{"city": "Paris", "temperature": 21}``.
* ``thinking``: a thought part (reasoning, not content) then the answer; usage with
  thoughtsTokenCount 7 and cachedContentTokenCount 4.
* ``length`` / ``safety``: finishReason MAX_TOKENS / SAFETY.
* ``blocked``: no candidates, ``promptFeedback.blockReason = SAFETY``.
* with ``cachedContent``: 600 more prompt tokens, all of them ``cachedContentTokenCount``; a name
  that is not ``cachedContents/...`` is a 400.
* with ``responseLogprobs`` (any text answer): each candidate carries ``logprobsResult`` for its
  answer text, one step per token (:func:`tokens_of`, :func:`token_logprob`), ``logprobs`` (0-20)
  alternatives per step in ``topCandidates``.
* ``status-<code>``: fails with that status (429 carries a RetryInfo detail ``retryDelay: "7s"``).
* ``cut``: a stream that ends after two chunks without a finishReason.
* ``mid-error``: a stream that sends an error object after two chunks.

Every request is recorded in ``FakeGemini.requests`` (method, path, query, headers, body).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Send

from tests.fakes.asgi import FakeServer, Request, end_body, send_event, send_json, start_sse
from tests.fakes.asgi import Recorded as Recorded

API_KEY = "gemini-test-key"
ANSWER = "The quick brown fox jumps over the lazy dog."
SIGNATURE = "c2lnbmF0dXJlLW9mLWEtdGhvdWdodA=="
JSON_ANSWER = '{"city": "Paris", "temperature": 21}'
THOUGHT = "Let me think about foxes."

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MESSAGES = {
    400: "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576).",
    404: "models/status-404 is not found for API version v1beta, or is not supported for generateContent.",
    413: "Request payload size exceeds the limit: 20971520 bytes.",
    429: "You exceeded your current quota, please check your plan and billing details.",
    500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}
_TOP_LEVEL = {
    "contents",
    "systemInstruction",
    "system_instruction",
    "tools",
    "toolConfig",
    "tool_config",
    "generationConfig",
    "generation_config",
    "safetySettings",
    "safety_settings",
    "cachedContent",
    "cached_content",
    "labels",
}
_GENERATION = {
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
    "mediaResolution",
    "speechConfig",
}
_NOT_OPENAPI = {"additionalProperties", "$schema", "$defs", "$ref", "definitions", "const", "strict", "examples"}


class _Invalid(Exception):
    pass


@dataclass
class FakeGemini(FakeServer):
    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        headers = request.headers
        query = request.query
        path = request.path
        try:
            body = request.json()
        except orjson.JSONDecodeError:
            await self._error(send, 400, "Invalid JSON payload received. Unexpected token.")
            return
        self.record(request, body)
        key = headers.get("x-goog-api-key") or (query.get("key") or [""])[0]
        if not key:
            await self._error(
                send,
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
            return
        if key != API_KEY:
            await self._error(
                send,
                400,
                "API key not valid. Please pass a valid API key.",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )
            return
        prefix = "/v1beta/models/"
        if request.method != "POST" or not path.startswith(prefix) or ":" not in path:
            await self._error(send, 404, f"Method not found: {path}")
            return
        model, _, method = path[len(prefix) :].partition(":")
        if model.startswith("status-"):
            status = int(model.split("-", 1)[1])
            details = None
            if status == 429:
                details = [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests"}],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"},
                ]
            await self._error(send, status, _MESSAGES.get(status, f"fake upstream error {status}"), details=details)
            return
        try:
            if method == "generateContent":
                _validate(body)
                await self._json(send, 200, self._response(model, body, streamed=False)[-1])
            elif method == "streamGenerateContent":
                _validate(body)
                if (query.get("alt") or [""])[0] != "sse":
                    await self._json(send, 200, self._response(model, body, streamed=True))  # a JSON array
                    return
                await self._stream(send, model, body)
            elif method == "embedContent":
                await self._json(send, 200, {"embedding": {"values": _vector(0, body.get("outputDimensionality"))}})
            elif method == "batchEmbedContents":
                requests = body.get("requests")
                if not isinstance(requests, list) or not requests:
                    raise _Invalid("* BatchEmbedContentsRequest.requests: must not be empty")
                for i, entry in enumerate(requests):
                    if entry.get("model") != f"models/{model}":
                        raise _Invalid(f"* BatchEmbedContentsRequest.requests[{i}].model: model must be models/{model}")
                vectors = [{"values": _vector(i, r.get("outputDimensionality"))} for i, r in enumerate(requests)]
                await self._json(send, 200, {"embeddings": vectors})
            else:
                await self._error(send, 404, f"Method not found: {method}")
        except _Invalid as exc:
            await self._error(send, 400, str(exc))

    # ---- bodies --------------------------------------------------------------------------------

    def _response(self, model: str, body: dict[str, Any], *, streamed: bool) -> list[dict[str, Any]]:
        """The chunks of an answer (a plain answer is the merge, returned as the last element)."""
        config = body.get("generationConfig") or {}
        count = int(config.get("candidateCount") or 1)
        usage: dict[str, Any] = {"promptTokenCount": 11, "candidatesTokenCount": 9, "totalTokenCount": 20}
        finish = {"length": "MAX_TOKENS", "safety": "SAFETY"}.get(model, "STOP")
        base: dict[str, Any] = {"modelVersion": model + "-001", "responseId": "fake-response-id"}
        if model == "blocked":
            return [{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage, **base}]
        if model == "thinking":
            usage = {**usage, "thoughtsTokenCount": 7, "cachedContentTokenCount": 4, "totalTokenCount": 27}
        cached = body.get("cachedContent")
        if cached:  # the cache's tokens count as prompt tokens, and as cached ones
            usage = {**usage, "promptTokenCount": usage["promptTokenCount"] + 600, "cachedContentTokenCount": 600}
            usage["totalTokenCount"] = usage["promptTokenCount"] + usage["candidatesTokenCount"]
        pieces: list[list[dict[str, Any]]]  # per chunk, the parts of candidate 0
        if model == "tools":
            pieces = [
                [
                    {
                        "functionCall": {"name": "get_weather", "args": {"city": "Paris", "unit": "c"}},
                        "thoughtSignature": SIGNATURE,
                    }
                ]
            ]
        elif model == "tools-parallel":
            pieces = [
                [{"functionCall": {"name": "get_weather", "args": {"city": "Paris", "unit": "c"}}}],
                [{"functionCall": {"name": "get_time", "args": {"city": "Tokyo"}}}],
            ]
        else:
            text = JSON_ANSWER if model == "json" else ANSWER
            words = text.split(" ")
            pieces = [
                [{"text": " ".join(words[i : i + 3]) + (" " if i + 3 < len(words) else "")}]
                for i in range(0, len(words), 3)
            ]
            if model == "thinking":
                pieces.insert(0, [{"text": THOUGHT, "thought": True}])
        if not streamed:
            pieces = [_merged([part for chunk in pieces for part in chunk])]
        chunks: list[dict[str, Any]] = []
        for n, parts in enumerate(pieces):
            last = n == len(pieces) - 1
            candidates = []
            for index in range(count):
                candidate_parts = parts
                if index and last:
                    candidate_parts = (
                        [*parts[:-1], {**parts[-1], "text": parts[-1].get("text", "") + f" ({index})"}]
                        if "text" in parts[-1]
                        else parts
                    )
                candidate: dict[str, Any] = {"content": {"parts": candidate_parts, "role": "model"}, "index": index}
                if config.get("responseLogprobs"):
                    candidate["logprobsResult"] = _logprobs(candidate_parts, int(config.get("logprobs") or 0))
                if last:
                    candidate["finishReason"] = finish
                    if finish == "SAFETY":
                        candidate["safetyRatings"] = [
                            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
                        ]
                candidates.append(candidate)
            chunk: dict[str, Any] = {"candidates": candidates, **base}
            if last:
                chunk["usageMetadata"] = usage
            chunks.append(chunk)
        return chunks

    async def _stream(self, send: Send, model: str, body: dict[str, Any]) -> None:
        chunks = self._response(model, body, streamed=True)
        await start_sse(send, [(b"x-content-type-options", b"nosniff")], content_type=b"text/event-stream")
        try:
            for i, chunk in enumerate(chunks):
                if model in ("cut", "mid-error") and i == 2:
                    if model == "mid-error":
                        error = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
                        await send_event(send, error, end=b"\r\n\r\n")
                    return
                if model in ("cut", "mid-error"):
                    chunk = {k: v for k, v in chunk.items() if k != "usageMetadata"}
                    for candidate in chunk.get("candidates", []):
                        candidate.pop("finishReason", None)
                await send_event(send, chunk, end=b"\r\n\r\n")
        finally:
            await end_body(send)

    @staticmethod
    async def _json(send: Send, status: int, payload: Any) -> None:
        await send_json(send, status, payload, content_type=b"application/json; charset=UTF-8")

    async def _error(self, send: Send, status: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
        if details:
            error["details"] = details
        await self._json(send, status, {"error": error})


def _merged(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent plain text parts joined into one (as a non-streamed answer has them)."""
    out: list[dict[str, Any]] = []
    for part in parts:
        if out and "text" in part and "text" in out[-1] and not part.get("thought") and not out[-1].get("thought"):
            out[-1] = {**out[-1], "text": out[-1]["text"] + part["text"]}
        else:
            out.append(dict(part))
    return out


def tokens_of(text: str) -> list[str]:
    """How this fake splits answer text into tokens: each word with the spaces after it."""
    return re.findall(r"\S+\s*|\s+", text)


def token_logprob(token: str) -> float:
    return round(-0.01 * (len(token) + 1), 4)


def _logprobs(parts: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """``logprobsResult`` for the answer text of ``parts`` (thought parts have none here): one
    decoding step per token, ``top`` alternatives per step (the chosen one first)."""
    chosen: list[dict[str, Any]] = []
    tops: list[dict[str, Any]] = []
    for part in parts:
        if "text" not in part or part.get("thought"):
            continue
        for token in tokens_of(part["text"]):
            pick = {"token": token, "logProbability": token_logprob(token)}
            chosen.append(pick)
            others = [
                {"token": f"{token.strip()}~{j}", "logProbability": pick["logProbability"] - j} for j in range(1, top)
            ]
            tops.append({"candidates": [pick, *others][:top]})
    result: dict[str, Any] = {
        "chosenCandidates": chosen,
        "logProbabilitySum": round(sum(c["logProbability"] for c in chosen), 4),
    }
    if top:
        result["topCandidates"] = tops
    return result


def _vector(index: int, dimensions: Any) -> list[float]:
    size = int(dimensions or 8)
    return [round(0.1 * (index + 1) + 0.001 * j, 6) for j in range(size)]


def _validate(body: dict[str, Any]) -> None:
    for key in body:
        if key not in _TOP_LEVEL:
            raise _Invalid(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
    cached = body.get("cachedContent")
    if cached is not None and not str(cached).startswith("cachedContents/"):
        raise _Invalid("* GenerateContentRequest.cached_content: invalid cached content name")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _Invalid("* GenerateContentRequest.contents: contents is not specified")
    for i, content in enumerate(contents):
        if content.get("role") not in ("user", "model"):
            raise _Invalid("Please use a valid role: user, model.")
        if not content.get("parts"):
            raise _Invalid(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.")
    config = body.get("generationConfig") or {}
    if "logprobs" in config and not config.get("responseLogprobs"):
        raise _Invalid("logprobs is only valid if response_logprobs is true")
    top = config.get("logprobs")
    if top is not None and not (isinstance(top, int) and 0 <= top <= 20):
        raise _Invalid("logprobs must be in the range [0, 20]")
    for key in config:
        if key not in _GENERATION:
            raise _Invalid(
                f"Invalid JSON payload received. Unknown name \"{key}\" at 'generation_config': Cannot find field."
            )
    if "responseSchema" in config:
        _openapi_only(config["responseSchema"], "generation_config.response_schema")
    for tool in body.get("tools") or ():
        for declaration in tool.get("functionDeclarations") or ():
            if "parameters" in declaration:
                _openapi_only(declaration["parameters"], "tools[0].function_declarations.parameters")


def _openapi_only(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in _NOT_OPENAPI:
            raise _Invalid(f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field.")
        if key == "type" and not isinstance(value, str):
            raise _Invalid(
                f"Invalid JSON payload received. Proto field is not repeating, cannot start list at '{where}.type'."
            )
    for sub in (schema.get("properties") or {}).values():
        _openapi_only(sub, where)
    if isinstance(schema.get("items"), dict):
        _openapi_only(schema["items"], where)
    for sub in schema.get("anyOf") or ():
        _openapi_only(sub, where)
