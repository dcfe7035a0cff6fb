"""Provider ``gemini``: Google's Gemini API (generativelanguage.googleapis.com), translated both ways.

Requests arrive in OpenAI chat-completions format and leave as ``models/{m}:generateContent`` (or
``:streamGenerateContent?alt=sse``); embeddings use ``:embedContent`` (one text) or
``:batchEmbedContents`` (a list). The key goes in the ``x-goog-api-key`` header.

Translation, OpenAI → Gemini:

* ``system`` / ``developer`` messages → ``systemInstruction``; ``assistant`` → role ``model``;
  ``tool`` results → ``functionResponse`` parts (named after the call they answer, consecutive
  results merged into one turn); consecutive turns of one role are merged.
* content parts: text; ``image_url`` / ``file`` / ``input_audio`` with ``data:`` URLs or base64 →
  ``inlineData``; http(s) / gs:// URLs → ``fileData``.
* ``tools`` → ``functionDeclarations``; ``tool_choice`` → ``toolConfig.functionCallingConfig``
  (auto → AUTO, none → NONE, required → ANY, a named function → ANY + allowedFunctionNames).
* ``response_format`` → ``responseMimeType`` + ``responseSchema``; ``stop``, ``temperature``,
  ``top_p``, ``top_k``, ``max_(completion_)tokens``, ``seed``, ``n`` (candidateCount), presence /
  frequency penalties → ``generationConfig``; ``reasoning_effort`` → ``thinkingConfig.thinkingBudget``;
  ``logprobs`` / ``top_logprobs`` → ``responseLogprobs`` / ``logprobs``, and each candidate's
  ``logprobsResult`` comes back as the choice's ``logprobs`` (plain, and per chunk when streamed).

Gemini → OpenAI: candidates become choices; function calls (which Gemini sends whole) become
``tool_calls`` with the upstream id or a generated one; thought parts (sent when thoughts are
included) become ``reasoning_content``; a function call's ``thoughtSignature`` is
carried inside the tool call id and sent back when the client returns it in history (Gemini 3
requires it). ``usageMetadata`` → usage (cached from ``cachedContentTokenCount``, reasoning from
``thoughtsTokenCount``, which also counts as completion tokens, as OpenAI does).

Context caching: ``cached_content`` (a request field, e.g. the OpenAI SDK's ``extra_body``, or a
deployment's ``params``) names a context cache made with Gemini's ``cachedContents`` API and is sent as
``cachedContent``; the tokens read from it come back as ``prompt_tokens_details.cached_tokens``.

Options (``[providers.NAME]``): ``schema_mode`` — ``"openapi"`` (default: JSON schemas are reduced
to the OpenAPI subset ``responseSchema`` / ``parameters`` accept) or ``"json_schema"`` (sent as they
are in ``responseJsonSchema`` / ``parametersJsonSchema``); ``safety_settings`` — a list of tables
sent as ``safetySettings``; ``embedding_task_type`` — ``taskType`` for embeddings.
"""

from __future__ import annotations

import contextlib
import mimetypes
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import httpx
import orjson

from llmgateway.core.config import ProviderConfig
from llmgateway.core.errors import (
    ConfigError,
    InvalidRequestError,
    UpstreamProtocolError,
    error_from_upstream_status,
    error_message_from_body,
    map_upstream_errors,
)
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.provider import Provider, UpstreamCall, estimate_prompt_tokens, estimate_tokens
from llmgateway.core.sse import DONE, SSEDecoder, parse_event
from llmgateway.core.types import Usage
from llmgateway.plugins.providers._openai_format import (
    ChunkWriter,
    chat_completion,
    embedding_inputs,
    embeddings_response,
    encode_embedding,
    logprob_entry,
    max_output_tokens,
    new_tool_call_id,
    parse_data_url,
    stop_sequences,
    text_of,
)

#: separates a generated tool call id from the function call's thought signature
SIGNATURE_MARK = "~ts~"

_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "LANGUAGE": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
}

_THINKING_BUDGET = {"none": 0, "minimal": 0, "low": 1024, "medium": 8192, "high": 24576}

# keys of the OpenAPI-subset Schema that responseSchema / FunctionDeclaration.parameters accept
_SCHEMA_KEYS = frozenset(
    {
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "default",
        "example",
        "propertyOrdering",
    }
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def finish_reason(reason: str | None, has_tool_calls: bool) -> str:
    """OpenAI's finish_reason for a Gemini finishReason."""
    mapped = _FINISH.get(reason or "STOP", "stop")
    if mapped == "stop" and has_tool_calls:
        return "tool_calls"
    return mapped


def usage_from(meta: Mapping[str, Any] | None) -> Usage | None:
    """OpenAI-style usage from ``usageMetadata`` (None when absent)."""
    if not meta:
        return None
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    return Usage(
        prompt_tokens=int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0),
        completion_tokens=int(meta.get("candidatesTokenCount") or 0) + thoughts,
        cached_tokens=int(meta.get("cachedContentTokenCount") or 0),
        reasoning_tokens=thoughts,
    )


def openapi_schema(schema: Any, defs: Mapping[str, Any] | None = None, depth: int = 0) -> Any:
    """A JSON Schema reduced to the OpenAPI subset Gemini's ``Schema`` accepts.

    ``$ref`` is inlined from ``$defs`` / ``definitions``; ``"type": [X, "null"]`` and ``anyOf`` with
    ``{"type": "null"}`` become ``nullable``; ``const`` becomes a one-value ``enum``; keys Gemini
    rejects (``additionalProperties``, ``$schema``, ``strict``...) are dropped; types are upper-cased.
    """
    if not isinstance(schema, dict):
        return schema
    if depth > 40:
        raise InvalidRequestError("A JSON schema is nested too deeply (or its $ref is recursive)", param="tools")
    if defs is None:
        defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1])
        if not isinstance(target, dict):
            raise InvalidRequestError(f"A JSON schema refers to {ref!r}, which it does not define", param="tools")
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return openapi_schema(merged, defs, depth + 1)
    out: dict[str, Any] = {}
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != len(kind):
            out["nullable"] = True
        if len(kinds) == 1:
            kind = kinds[0]
        else:
            kind = None
            if kinds:
                out["anyOf"] = [{"type": str(k).upper()} for k in kinds]
    if isinstance(kind, str) and kind != "null":
        out["type"] = kind.upper()
    elif kind == "null":
        out["nullable"] = True
    for key, value in schema.items():
        if key in _SCHEMA_KEYS:
            out[key] = value
    if "const" in schema:
        out["enum"] = [schema["const"]]
    if "enum" in out:
        out["enum"] = [str(v) for v in out["enum"] if v is not None]
        out.setdefault("type", "STRING")
    properties = schema.get("properties")
    if isinstance(properties, dict):
        out["properties"] = {name: openapi_schema(sub, defs, depth + 1) for name, sub in properties.items()}
        required = schema.get("required")
        if isinstance(required, list):
            out["required"] = [r for r in required if r in properties]
    items = schema.get("items")
    if isinstance(items, dict):
        out["items"] = openapi_schema(items, defs, depth + 1)
    for key in ("anyOf", "oneOf"):
        variants = schema.get(key)
        if isinstance(variants, list):
            kept = [v for v in variants if not (isinstance(v, dict) and v.get("type") == "null")]
            if len(kept) != len(variants):
                out["nullable"] = True
            if len(kept) == 1:
                out.update({k: v for k, v in openapi_schema(kept[0], defs, depth + 1).items() if k not in out})
            elif kept:
                out["anyOf"] = [openapi_schema(v, defs, depth + 1) for v in kept]
    return out


def openai_logprobs(result: Any) -> dict[str, Any] | None:
    """Gemini's ``logprobsResult`` as OpenAI's choice ``logprobs``: one entry per decoding step
    (``chosenCandidates``), with the step's ``topCandidates`` as ``top_logprobs`` (empty when none
    were asked for) and each token's UTF-8 ``bytes``."""
    if not isinstance(result, Mapping):
        return None
    chosen = result.get("chosenCandidates") or ()
    tops = result.get("topCandidates") or ()

    def entry(candidate: Mapping[str, Any], top: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return logprob_entry(str(candidate.get("token") or ""), float(candidate.get("logProbability") or 0.0), top)

    content = []
    for step, candidate in enumerate(chosen):
        top = tops[step].get("candidates") if step < len(tops) and isinstance(tops[step], Mapping) else None
        content.append(entry(candidate, [entry(c) for c in top or ()]))
    return {"content": content, "refusal": None}


def _retry_delay(details: Any) -> str | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail (``"retryDelay": "37s"``)."""
    if not isinstance(details, list):
        return None
    for detail in details:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return str(max(0, int(float(match.group(1)) + 0.999)))
    return None


def _reasons(details: Any) -> set[str]:
    if not isinstance(details, list):
        return set()
    return {str(d.get("reason")) for d in details if isinstance(d, dict) and d.get("reason")}


class _Stream:
    """Per-stream translation state (one writer and tool-call counter per candidate)."""

    __slots__ = ("blocked", "chars", "created", "finished", "id", "tools", "usage", "writers")

    def __init__(self) -> None:
        self.writers: dict[int, ChunkWriter] = {}
        self.tools: dict[int, int] = {}
        self.finished: dict[int, str] = {}
        self.usage: Mapping[str, Any] | None = None
        self.id = ""
        self.created = 0
        self.chars = 0
        self.blocked = False

    @property
    def complete(self) -> bool:
        if self.blocked:
            return True
        return bool(self.finished) and all(index in self.finished for index in self.writers)


class GeminiProvider(Provider):
    capabilities = frozenset({"chat", "chat_stream", "embeddings"})
    unsupported_params = frozenset({"logit_bias"})
    option_keys = frozenset({"schema_mode", "safety_settings", "embedding_task_type"})
    default_base_url = "https://generativelanguage.googleapis.com/v1beta"

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        headers = {"content-type": "application/json", "accept": "application/json"}
        if config.api_key:
            headers["x-goog-api-key"] = config.api_key
        headers.update(config.headers)
        self.headers = headers
        self.stream_headers = {**headers, "accept": "text/event-stream"}
        self.json_schema = self.option("schema_mode", "openapi") == "json_schema"
        self.safety_settings = self.option("safety_settings")
        self.task_type = self.option("embedding_task_type")

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        super().validate_config(config)
        mode = config.options.get("schema_mode", "openapi")
        if mode not in ("openapi", "json_schema"):
            raise ConfigError(f"must be 'openapi' or 'json_schema', not {mode!r}", key=f"{config.key}.schema_mode")
        settings = config.options.get("safety_settings")
        if settings is not None and not (isinstance(settings, list) and all(isinstance(s, dict) for s in settings)):
            raise ConfigError(
                "must be a list of tables like { category = ..., threshold = ... }",
                key=f"{config.key}.safety_settings",
            )
        task = config.options.get("embedding_task_type")
        if task is not None and not isinstance(task, str):
            raise ConfigError("must be a string", key=f"{config.key}.embedding_task_type")

    # ---- request translation -------------------------------------------------------------------

    @staticmethod
    def model_name(model: str) -> str:
        return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"

    def url(self, model: str, method: str) -> str:
        return f"{self.base_url}/{self.model_name(model)}:{method}"

    def _check(self, call: UpstreamCall) -> None:
        body = call.body
        for name in self.unsupported_params.intersection(body):
            if body[name] in (None, False):
                del body[name]
        self.check_params(call)

    def translate(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Gemini ``GenerateContentRequest`` for an OpenAI chat-completions body."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
        system: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        names: dict[str, str] = {}  # tool call id -> function name

        def add(role: str, parts: list[dict[str, Any]]) -> None:
            if not parts:
                return
            if contents and contents[-1]["role"] == role:
                contents[-1]["parts"].extend(parts)
            else:
                contents.append({"role": role, "parts": parts})

        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
            role = message.get("role")
            content = message.get("content")
            if role in ("system", "developer"):
                text = text_of(content)
                if text:
                    system.append({"text": text})
            elif role == "user":
                add("user", self._parts(content, i))
            elif role == "assistant":
                parts = [{"text": text_of(content)}] if text_of(content) else []
                for call in message.get("tool_calls") or ():
                    function = call.get("function") or {}
                    name = str(function.get("name") or "")
                    call_id = str(call.get("id") or "")
                    names[call_id] = name
                    part: dict[str, Any] = {"functionCall": {"name": name, "args": _arguments(function, i)}}
                    if SIGNATURE_MARK in call_id:
                        part["thoughtSignature"] = call_id.split(SIGNATURE_MARK, 1)[1]
                    parts.append(part)
                add("model", parts)
            elif role in ("tool", "function"):
                call_id = str(message.get("tool_call_id") or "")
                name = str(names.get(call_id) or message.get("name") or "")
                if not name:
                    raise InvalidRequestError(
                        f"messages[{i}] answers tool call {call_id!r}, which no earlier assistant message made",
                        param="messages",
                    )
                add("user", [{"functionResponse": {"name": name, "response": _tool_result(content)}}])
            else:
                raise InvalidRequestError(f"messages[{i}] has an unknown role {role!r}", param="messages")
        if not contents:
            raise InvalidRequestError("'messages' needs at least one user or assistant message", param="messages")

        request: dict[str, Any] = {"contents": contents}
        cached = body.get("cached_content")
        if cached is not None:
            if not isinstance(cached, str) or not cached.startswith("cachedContents/"):
                raise InvalidRequestError(
                    "'cached_content' must be the name of a Gemini context cache, 'cachedContents/...'",
                    param="cached_content",
                )
            request["cachedContent"] = cached
        if system:
            request["systemInstruction"] = {"parts": system}
        tools = body.get("tools")
        if tools:
            request["tools"] = [{"functionDeclarations": [self._declaration(t) for t in tools]}]
        choice = body.get("tool_choice")
        if choice is not None and (tools or choice == "none"):
            request["toolConfig"] = {"functionCallingConfig": _calling_config(choice)}
        config = self._generation_config(body)
        if config:
            request["generationConfig"] = config
        if self.safety_settings:
            request["safetySettings"] = self.safety_settings
        return request

    def _parts(self, content: Any, i: int) -> list[dict[str, Any]]:
        if content is None:
            return []
        if isinstance(content, str):
            return [{"text": content}] if content else []
        if not isinstance(content, list):
            raise InvalidRequestError(f"messages[{i}].content must be a string or an array", param="messages")
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"text": str(part.get("text") or "")})
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                parts.append(_media(str(url or ""), "image/jpeg"))
            elif kind == "input_audio":
                audio = part.get("input_audio") or {}
                fmt = str(audio.get("format") or "wav")
                parts.append({"inlineData": {"mimeType": f"audio/{fmt}", "data": str(audio.get("data") or "")}})
            elif kind == "file":
                file = part.get("file") or {}
                data = file.get("file_data")
                if not data:
                    raise InvalidRequestError(
                        "File parts need 'file_data' (uploaded file ids are not supported)", param="messages"
                    )
                parts.append(_media(str(data), "application/pdf"))
            else:
                raise InvalidRequestError(
                    f"messages[{i}] has a content part of unknown type {kind!r}", param="messages"
                )
        return parts

    def _schema(self, schema: Any) -> Any:
        return schema if self.json_schema else openapi_schema(schema)

    def _declaration(self, tool: Any) -> dict[str, Any]:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError("Only tools of type 'function' are supported", param="tools")
        function = tool.get("function") or {}
        name = function.get("name")
        if not name:
            raise InvalidRequestError("Every tool needs a function name", param="tools")
        out: dict[str, Any] = {"name": name}
        if function.get("description"):
            out["description"] = function["description"]
        parameters = function.get("parameters")
        if isinstance(parameters, dict) and parameters.get("properties"):
            if self.json_schema:
                out["parametersJsonSchema"] = parameters
            else:
                out["parameters"] = openapi_schema(parameters)
        return out

    def _generation_config(self, body: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {}
        stop = stop_sequences(body)
        if stop:
            config["stopSequences"] = stop
        for source, target in (
            ("temperature", "temperature"),
            ("top_p", "topP"),
            ("top_k", "topK"),
            ("seed", "seed"),
            ("presence_penalty", "presencePenalty"),
            ("frequency_penalty", "frequencyPenalty"),
        ):
            if body.get(source) is not None:
                config[target] = body[source]
        limit = max_output_tokens(body)
        if limit is not None:
            config["maxOutputTokens"] = limit
        n = body.get("n")
        if n is not None and n != 1:
            config["candidateCount"] = n
        fmt = body.get("response_format")
        if isinstance(fmt, dict):
            kind = fmt.get("type")
            if kind == "json_object":
                config["responseMimeType"] = "application/json"
            elif kind == "json_schema":
                config["responseMimeType"] = "application/json"
                schema = (fmt.get("json_schema") or {}).get("schema")
                if isinstance(schema, dict):
                    config["responseJsonSchema" if self.json_schema else "responseSchema"] = self._schema(schema)
            elif kind not in (None, "text"):
                raise InvalidRequestError(f"Unknown response_format type {kind!r}", param="response_format")
        if body.get("logprobs"):
            config["responseLogprobs"] = True
            top = body.get("top_logprobs")
            if top:
                config["logprobs"] = top
        elif body.get("top_logprobs"):
            raise InvalidRequestError("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
        effort = body.get("reasoning_effort")
        if effort is not None:
            if effort not in _THINKING_BUDGET:
                raise InvalidRequestError(f"Unknown reasoning_effort {effort!r}", param="reasoning_effort")
            config["thinkingConfig"] = {"thinkingBudget": _THINKING_BUDGET[effort]}
        return config

    # ---- responses -----------------------------------------------------------------------------

    def raise_for_status(self, response: httpx.Response, body: bytes) -> None:
        status = response.status_code
        if status < 400:
            return
        message, code, _ = self.parse_error(body)
        err = _error_object(body)
        details = err.get("details") if err else None
        if status == 400 and "API_KEY_INVALID" in _reasons(details):
            status = 401  # Gemini answers a wrong key with 400 INVALID_ARGUMENT; it means 401
        headers: Mapping[str, str] = response.headers
        delay = _retry_delay(details)
        if delay is not None and "retry-after" not in response.headers:
            headers = {**{k.lower(): v for k, v in response.headers.items()}, "retry-after": delay}
        raise error_from_upstream_status(self.name, status, headers, message, upstream_code=code, secrets=self.secrets)

    def parse_error(self, body: bytes) -> tuple[str, str | None, str | None]:
        """Gemini's ``{"error": {"code", "message", "status", "details"}}`` (also inside a list)."""
        err = _error_object(body)
        if err is None:
            return error_message_from_body(body)
        message = str(err.get("message") or "")
        status = err.get("status")
        code = str(status).lower() if status else None
        lowered = message.lower()
        if "token count" in lowered and "exceeds" in lowered:
            code = "context_length_exceeded"
        return message or (str(status) if status else "error"), code, None

    async def _post(self, url: str, payload: dict[str, Any], call: UpstreamCall) -> dict[str, Any]:
        with map_upstream_errors(self.name, self.secrets):
            response = await self.http.post(url, content=orjson.dumps(payload), headers=self.headers)
            raw = await response.aread()
        call.response_headers = self.rate_limit_headers(response.headers)
        self.raise_for_status(response, raw)
        with map_upstream_errors(self.name, self.secrets):
            data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise UpstreamProtocolError(f"Provider '{self.name}' sent a non-object response", provider=self.name)
        return data

    def _candidate(self, candidate: Mapping[str, Any]) -> tuple[str | None, list[dict[str, Any]], str | None]:
        """(content, tool calls, reasoning) of one candidate; thought parts are the reasoning."""
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in (candidate.get("content") or {}).get("parts") or ():
            if "functionCall" in part:
                call_id, name, arguments = _function_call(part)
                calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
            elif "text" in part:
                (thoughts if part.get("thought") else texts).append(str(part["text"]))
        text = "".join(texts)
        return (text if text or not calls else None), calls, "".join(thoughts) or None

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        self._check(call)
        payload = self.translate(call.body)
        data = await self._post(self.url(call.deployment.model, "generateContent"), payload, call)
        call.upstream_model = str(data.get("modelVersion") or call.deployment.model)
        with map_upstream_errors(self.name, self.secrets):
            candidates = sorted(data.get("candidates") or (), key=lambda c: int(c.get("index") or 0))
            choices: list[tuple[str | None, list[dict[str, Any]], str, str | None]] = []
            logprobs: list[dict[str, Any] | None] = []
            for candidate in candidates:
                text, calls, reasoning = self._candidate(candidate)
                choices.append((text, calls, finish_reason(candidate.get("finishReason"), bool(calls)), reasoning))
                logprobs.append(openai_logprobs(candidate.get("logprobsResult")))
        if not choices:
            blocked = (data.get("promptFeedback") or {}).get("blockReason")
            choices.append((None, [], "content_filter" if blocked else "stop", None))
        usage = usage_from(data.get("usageMetadata"))
        if usage is None:
            chars = sum(
                len(text or "") + sum(len(c["function"]["arguments"]) for c in calls) for text, calls, _, _ in choices
            )
            usage = Usage(
                prompt_tokens=estimate_prompt_tokens(call.body),
                completion_tokens=estimate_tokens(chars),
                estimated=True,
            )
        call.usage = usage
        call.finish_reason = choices[0][2]
        completion_id = "chatcmpl-" + str(data.get("responseId") or call.ctx.request_id)
        text, calls, finish, reasoning = choices[0]
        out = chat_completion(
            completion_id,
            call.alias,
            content=text,
            finish_reason=finish,
            usage=usage,
            tool_calls=calls or None,
            reasoning=reasoning,
        )
        for index, (text, calls, finish, reasoning) in enumerate(choices[1:], start=1):
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if calls:
                message["tool_calls"] = calls
            if reasoning:
                message["reasoning_content"] = reasoning
            out["choices"].append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
        for choice, found in zip(out["choices"], logprobs, strict=False):
            choice["logprobs"] = found
        return out

    # ---- streams -------------------------------------------------------------------------------

    async def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        self._check(call)
        payload = self.translate(call.body)
        async with (
            self.streaming(
                call,
                self.url(call.deployment.model, "streamGenerateContent") + "?alt=sse",
                content=orjson.dumps(payload),
                headers=self.stream_headers,
            ) as response,
            contextlib.aclosing(self._relay(response, call)) as frames,
        ):  # relay closed first (its finally sets call.usage), then the response
            async for frame in frames:
                yield frame

    async def _relay(self, response: httpx.Response, call: UpstreamCall) -> AsyncGenerator[bytes, None]:
        state = _Stream()
        decoder = SSEDecoder()
        try:
            with map_upstream_errors(self.name, self.secrets):
                async for chunk in response.aiter_bytes():
                    for block in decoder.feed(chunk):
                        for frame in self._translate_block(block, state, call):
                            yield frame
                for block in decoder.close():
                    for frame in self._translate_block(block, state, call):
                        yield frame
            if not state.complete:
                raise UpstreamProtocolError(
                    f"Provider '{self.name}' ended the stream before it was complete", provider=self.name
                )
        finally:  # whatever ends the stream (a cut, a client disconnect), usage is known or estimated
            call.usage = usage_from(state.usage) or Usage(
                prompt_tokens=estimate_prompt_tokens(call.body),
                completion_tokens=estimate_tokens(state.chars),
                estimated=True,
            )
        usage = call.usage
        call.finish_reason = state.finished.get(0) or ("content_filter" if state.blocked else None)
        if call.include_usage:
            yield self._writer(state, call, 0).usage(usage)
        yield DONE

    def _writer(self, state: _Stream, call: UpstreamCall, index: int) -> ChunkWriter:
        writer = state.writers.get(index)
        if writer is None:
            if not state.id:
                state.id = "chatcmpl-" + call.ctx.request_id
                state.created = int(time.time())
            writer = state.writers[index] = ChunkWriter(state.id, call.alias, state.created, index=index)
        return writer

    def _translate_block(self, block: bytes, state: _Stream, call: UpstreamCall) -> list[bytes]:
        if block.startswith(b"data: ") and b"\n" not in block:
            data = block[6:]
        elif block.lstrip().startswith((b"{", b"[")):
            data = block  # an error object written as plain (multi-line) JSON, not as an SSE event
        else:
            _, data = parse_event(block)
            if not data:
                return []
        chunk = orjson.loads(data)
        if isinstance(chunk, list):
            chunk = chunk[0] if chunk else {}
        if "error" in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {}
            status = int(err.get("code") or 500)
            message, code, _ = self.parse_error(orjson.dumps(chunk))
            raise error_from_upstream_status(
                self.name, status if status >= 400 else 500, {}, message, upstream_code=code, secrets=self.secrets
            )
        if not state.id:
            state.id = "chatcmpl-" + str(chunk.get("responseId") or call.ctx.request_id)
            state.created = int(time.time())
            call.upstream_model = str(chunk.get("modelVersion") or call.deployment.model)
        meta = chunk.get("usageMetadata")
        if meta:
            state.usage = meta
        frames: list[bytes] = []
        candidates = chunk.get("candidates")
        if not candidates:
            if (chunk.get("promptFeedback") or {}).get("blockReason") and not state.writers:
                first = self._writer(state, call, 0)
                frames.append(first.role())
                frames.append(first.finish("content_filter"))
                state.blocked = True
            return frames
        for candidate in candidates:
            index = int(candidate.get("index") or 0)
            writer = state.writers.get(index)
            if writer is None:
                writer = self._writer(state, call, index)
                frames.append(writer.role())
            content = candidate.get("content")
            logprobs = openai_logprobs(candidate.get("logprobsResult"))
            if content:
                for part in content.get("parts") or ():
                    if "text" in part:
                        if part["text"]:
                            state.chars += len(part["text"])
                            if part.get("thought"):
                                frames.append(writer.reasoning(part["text"]))
                            else:  # this chunk's tokens ride on its (first) answer text
                                frames.append(writer.content(part["text"], logprobs))
                                logprobs = None
                    elif "functionCall" in part:
                        call_id, name, arguments = _function_call(part)
                        tool_index = state.tools.get(index, 0)
                        state.tools[index] = tool_index + 1
                        state.chars += len(arguments)
                        frames.append(writer.tool_call_start(tool_index, call_id, name, arguments))
            if logprobs is not None:  # tokens of a chunk without answer text (e.g. a function call)
                frames.append(writer.content("", logprobs))
            reason = candidate.get("finishReason")
            if reason and index not in state.finished:
                finish = finish_reason(reason, index in state.tools)
                state.finished[index] = finish
                frames.append(writer.finish(finish))
        return frames

    # ---- embeddings ----------------------------------------------------------------------------

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        body = call.body
        texts = embedding_inputs(body)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        model = self.model_name(call.deployment.model)
        dimensions = body.get("dimensions")
        task = body.get("task_type") or self.task_type

        def request(text: str) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
            if dimensions is not None:
                out["outputDimensionality"] = dimensions
            if task:
                out["taskType"] = task
            return out

        if isinstance(body.get("input"), str):
            data = await self._post(self.url(model, "embedContent"), request(texts[0]), call)
            with map_upstream_errors(self.name, self.secrets):
                vectors = [data["embedding"]["values"]]
        else:
            payload = {"requests": [request(text) for text in texts]}
            data = await self._post(self.url(model, "batchEmbedContents"), payload, call)
            with map_upstream_errors(self.name, self.secrets):
                vectors = [item["values"] for item in data["embeddings"]]
        if len(vectors) != len(texts):
            raise UpstreamProtocolError(
                f"Provider '{self.name}' returned {len(vectors)} embeddings for {len(texts)} inputs", provider=self.name
            )
        meta = data.get("usageMetadata") or {}
        if meta.get("promptTokenCount") is not None:
            call.usage = Usage(prompt_tokens=int(meta["promptTokenCount"]))
        else:
            call.usage = Usage(prompt_tokens=estimate_tokens(sum(len(t) for t in texts)), estimated=True)
        call.upstream_model = call.deployment.model
        return embeddings_response([encode_embedding(v, encoding) for v in vectors], call.alias, call.usage)


# ---- helpers -----------------------------------------------------------------------------------


def _error_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return data["error"]  # type: ignore[no-any-return]
    return None


def _arguments(function: Mapping[str, Any], i: int) -> Any:
    raw = function.get("arguments")
    if raw in (None, ""):
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        args = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequestError(
            f"messages[{i}] has a tool call whose arguments are not valid JSON", param="messages"
        ) from None
    return args if isinstance(args, dict) else {"value": args}


def _tool_result(content: Any) -> dict[str, Any]:
    text = text_of(content)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"result": text}
    return value if isinstance(value, dict) else {"result": value}


def _function_call(part: Mapping[str, Any]) -> tuple[str, str, str]:
    """(OpenAI tool call id, name, JSON arguments) of a ``functionCall`` part."""
    function = part["functionCall"]
    call_id = str(function.get("id") or new_tool_call_id())
    signature = part.get("thoughtSignature")
    if signature:
        call_id = f"{call_id}{SIGNATURE_MARK}{signature}"
    return call_id, str(function.get("name") or ""), orjson.dumps(function.get("args") or {}).decode()


def _media(url: str, default_mime: str) -> dict[str, Any]:
    if not url:
        raise InvalidRequestError("An image or file part has no URL or data", param="messages")
    inline = parse_data_url(url)
    if inline is not None:
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    if not url.startswith(("http://", "https://", "gs://")):
        raise InvalidRequestError("Media must be a data: URL or an http(s):// / gs:// URL", param="messages")
    guessed, _ = mimetypes.guess_type(url.split("?", 1)[0])
    return {"fileData": {"mimeType": guessed or default_mime, "fileUri": url}}


def _calling_config(choice: Any) -> dict[str, Any]:
    if choice == "auto":
        return {"mode": "AUTO"}
    if choice == "none":
        return {"mode": "NONE"}
    if choice == "required":
        return {"mode": "ANY"}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name:
            return {"mode": "ANY", "allowedFunctionNames": [name]}
    raise InvalidRequestError(
        "'tool_choice' must be 'auto', 'none', 'required' or a named function", param="tool_choice"
    )


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {"gemini": GeminiProvider}
