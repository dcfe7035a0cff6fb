"""Provider ``cohere``: Cohere's v2 API (``/v2/chat``, ``/v2/embed``), translated both ways.

The key goes in ``Authorization: Bearer``. Cohere v2 messages are close to OpenAI's, so the
translation is mostly renaming:

* roles system / user / assistant / tool map one to one (``developer`` → system); user content
  parts: text and ``image_url``; an assistant message with tool calls carries its text as
  ``tool_plan`` (Cohere's name for the text before tool calls), and Cohere's ``tool_plan`` comes
  back as the message content, so the round trip is lossless.
* ``tools`` keep their shape (``strict`` becomes ``strict_tools``); ``tool_choice`` none → NONE,
  required → REQUIRED, a named function → REQUIRED with only that tool offered, auto → omitted.
* ``response_format`` json_object / json_schema → ``{"type": "json_object", "json_schema"?}``;
  ``stop`` → ``stop_sequences``, ``top_p`` → ``p``, ``top_k`` → ``k``, ``max_(completion_)tokens``
  → ``max_tokens``; ``temperature``, ``seed`` and the penalties keep their names;
  ``reasoning_effort`` → ``thinking`` (none / minimal: disabled, else a token budget).
* ``documents`` (strings, or ``{"id"?, "data": {...}}``) and ``citation_options`` (request fields
  beyond OpenAI's, e.g. the SDK's ``extra_body``) go to Cohere as they are; its citations come back
  as the message's ``citations`` (Cohere's objects: ``start``, ``end``, ``text``, ``sources``), and
  in a stream as a ``citations`` delta when each starts.
* ``logprobs`` → ``logprobs``: Cohere scores text chunks (a few tokens each, with their token ids),
  so each chunk is one entry of the choice's ``logprobs.content``: the chunk's text as ``token``,
  the sum of its tokens' log probabilities (the chunk's own) as ``logprob``, no alternatives.
* ``n`` > 1, ``logit_bias``, ``top_logprobs`` > 0 (Cohere gives no alternatives) are refused (400
  naming the parameter) unless ``drop_unsupported_params``.

Back: finish reasons COMPLETE / STOP_SEQUENCE → stop, MAX_TOKENS → length, TOOL_CALL →
tool_calls, ERROR / TIMEOUT → an upstream error; usage from ``usage.billed_units`` (what is paid
for), else ``usage.tokens``, plus ``usage.cached_tokens``; thinking content → ``reasoning_content``.
Streams translate the v2 events (message-start, content-start/delta/end, tool-plan-delta,
tool-call-start/delta/end, message-end) one by one; a stream without message-end is an error.

Embeddings: ``/v2/embed`` with ``embedding_types`` float or base64 (Cohere's base64 is the
little-endian float32 bytes, as OpenAI's), ``output_dimension`` from ``dimensions`` and
``input_type`` from the request (an extra body field) or the ``embed_input_type`` option
(default ``search_document``).

Options: ``embed_input_type``, ``safety_mode`` (CONTEXTUAL / STRICT / OFF).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import httpx
import orjson

from llmgateway.core.config import ProviderConfig
from llmgateway.core.errors import (
    ConfigError,
    GatewayError,
    InvalidRequestError,
    UpstreamProtocolError,
    error_from_upstream_status,
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
    logprob_entry,
    max_output_tokens,
    stop_sequences,
    text_of,
)

_FINISH = {"COMPLETE": "stop", "STOP_SEQUENCE": "stop", "MAX_TOKENS": "length", "TOOL_CALL": "tool_calls"}
_LIMIT_HEADERS = ("x-trial-endpoint-call-", "x-endpoint-monthly-call-")
_SAFETY_MODES = ("CONTEXTUAL", "STRICT", "OFF")
_THINKING_BUDGET = {"none": 0, "minimal": 0, "low": 1024, "medium": 8192, "high": 24576}


def _documents(documents: Any) -> list[Any]:
    """``documents`` for retrieval-augmented answers, as Cohere takes them: strings, or objects with
    a ``data`` object (and optionally an ``id``)."""
    if not isinstance(documents, list):
        raise InvalidRequestError("'documents' must be an array of strings or objects", param="documents")
    for i, document in enumerate(documents):
        if isinstance(document, str):
            continue
        if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
            raise InvalidRequestError(
                f"'documents[{i}]' must be a string or an object with a 'data' object", param="documents"
            )
    return documents


def openai_logprobs(items: Any) -> dict[str, Any]:
    """Cohere's ``logprobs`` (text chunks, each with its tokens' log probabilities) as OpenAI's
    choice ``logprobs``: one entry per chunk, its log probability the sum of its tokens'."""
    content = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, Mapping):
            continue
        logprob = sum(float(x) for x in item.get("logprobs") or ())
        content.append(logprob_entry(str(item.get("text") or ""), logprob, []))
    return {"content": content, "refusal": None}


def usage_from(usage: Mapping[str, Any] | None) -> Usage | None:
    """OpenAI-style usage from Cohere's ``usage`` (billed units preferred, raw tokens otherwise)."""
    if not usage:
        return None
    billed = usage.get("billed_units") or {}
    tokens = usage.get("tokens") or {}

    def pick(key: str) -> int:
        value = billed.get(key)
        if value is None:
            value = tokens.get(key)
        return int(value or 0)

    return Usage(
        prompt_tokens=pick("input_tokens"),
        completion_tokens=pick("output_tokens"),
        cached_tokens=int(usage.get("cached_tokens") or 0),
    )


class _Stream:
    __slots__ = ("chars", "done", "tools", "writer")

    def __init__(self) -> None:
        self.writer: ChunkWriter | None = None
        self.tools: dict[int, int] = {}  # Cohere's tool call index -> OpenAI tool_calls index
        self.chars = 0
        self.done = False


class CohereProvider(Provider):
    capabilities = frozenset({"chat", "chat_stream", "embeddings"})
    unsupported_params = frozenset({"n", "logit_bias", "top_logprobs"})
    option_keys = frozenset({"embed_input_type", "safety_mode"})
    default_base_url = "https://api.cohere.com"

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        headers = {"content-type": "application/json", "accept": "application/json"}
        if config.api_key:
            headers["authorization"] = f"Bearer {config.api_key}"
        headers.update(config.headers)
        self.headers = headers
        self.stream_headers = {**headers, "accept": "text/event-stream"}
        self.input_type = str(self.option("embed_input_type", "search_document"))
        self.safety_mode: str | None = self.option("safety_mode")

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        super().validate_config(config)
        value = config.options.get("embed_input_type")
        if value is not None and not isinstance(value, str):
            raise ConfigError("must be a string", key=f"{config.key}.embed_input_type")
        mode = config.options.get("safety_mode")
        if mode is not None and mode not in _SAFETY_MODES:
            raise ConfigError(f"must be one of {', '.join(_SAFETY_MODES)}", key=f"{config.key}.safety_mode")

    # ---- request translation -------------------------------------------------------------------

    def _check(self, call: UpstreamCall) -> None:
        body = call.body
        for name in self.unsupported_params.intersection(body):
            value = body[name]
            if value in (None, False) or (name == "n" and value == 1):
                del body[name]
        self.check_params(call)

    def translate(self, body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        """The Cohere v2 chat request for an OpenAI chat-completions body."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
        out_messages = [_message(m, i) for i, m in enumerate(messages)]
        payload: dict[str, Any] = {
            "model": body["model"],
            "messages": [m for m in out_messages if m is not None],
            "stream": stream,
        }
        tools = body.get("tools")
        choice = body.get("tool_choice")
        if tools:
            declared = [_tool(t) for t in tools]
            if isinstance(choice, dict):
                name = (choice.get("function") or {}).get("name")
                declared = [t for t in declared if t["function"]["name"] == name]
                if not declared:
                    raise InvalidRequestError(
                        f"'tool_choice' names {name!r}, which is not in 'tools'", param="tool_choice"
                    )
                payload["tool_choice"] = "REQUIRED"
            elif choice == "required":
                payload["tool_choice"] = "REQUIRED"
            elif choice == "none":
                payload["tool_choice"] = "NONE"
            elif choice not in (None, "auto"):
                raise InvalidRequestError(
                    "'tool_choice' must be 'auto', 'none', 'required' or a named function", param="tool_choice"
                )
            payload["tools"] = declared
            if any(isinstance(t, dict) and (t.get("function") or {}).get("strict") for t in tools):
                payload["strict_tools"] = True
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            kind = fmt.get("type")
            if kind == "json_object":
                payload["response_format"] = {"type": "json_object"}
            elif kind == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                payload["response_format"] = {"type": "json_object", **({"json_schema": schema} if schema else {})}
            else:
                raise InvalidRequestError(f"Unknown response_format type {kind!r}", param="response_format")
        limit = max_output_tokens(body)
        if limit is not None:
            payload["max_tokens"] = limit
        stop = stop_sequences(body)
        if stop:
            payload["stop_sequences"] = stop
        for source, target in (
            ("temperature", "temperature"),
            ("top_p", "p"),
            ("top_k", "k"),
            ("seed", "seed"),
            ("frequency_penalty", "frequency_penalty"),
            ("presence_penalty", "presence_penalty"),
        ):
            if body.get(source) is not None:
                payload[target] = body[source]
        effort = body.get("reasoning_effort")
        if effort is not None:
            if effort not in _THINKING_BUDGET:
                raise InvalidRequestError(f"Unknown reasoning_effort {effort!r}", param="reasoning_effort")
            budget = _THINKING_BUDGET[effort]
            payload["thinking"] = {"type": "enabled", "token_budget": budget} if budget else {"type": "disabled"}
        if body.get("logprobs"):
            payload["logprobs"] = True
        documents = body.get("documents")
        if documents is not None:
            payload["documents"] = _documents(documents)
        options = body.get("citation_options")
        if options is not None:
            if not isinstance(options, dict):
                raise InvalidRequestError("'citation_options' must be an object", param="citation_options")
            payload["citation_options"] = options
        if self.safety_mode:
            payload["safety_mode"] = self.safety_mode
        return payload

    # ---- responses -----------------------------------------------------------------------------

    def raise_for_status(self, response: httpx.Response, body: bytes) -> None:
        status = response.status_code
        if status < 400:
            return
        message, code, param = self.parse_error(body)
        raise error_from_upstream_status(
            self.name,
            401 if status == 498 else status,  # 498: Cohere's "invalid token"
            response.headers,
            message,
            upstream_code=code,
            param=param,
            secrets=self.secrets,
        )

    def captured_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        found = self.rate_limit_headers(headers)
        for key, value in headers.items():
            if key.lower().startswith(_LIMIT_HEADERS):
                found[key.lower()] = value
        return found

    async def _post(self, path: str, payload: dict[str, Any], call: UpstreamCall) -> dict[str, Any]:
        with map_upstream_errors(self.name, self.secrets):
            response = await self.http.post(
                f"{self.base_url}{path}", content=orjson.dumps(payload), headers=self.headers
            )
            raw = await response.aread()
        call.response_headers = self.captured_headers(response.headers)
        self.raise_for_status(response, raw)
        with map_upstream_errors(self.name, self.secrets):
            data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise UpstreamProtocolError(f"Provider '{self.name}' sent a non-object response", provider=self.name)
        return data

    def _finish(self, reason: str | None, error: str | None = None) -> str:
        if reason in ("ERROR", "TIMEOUT") or error:
            raise error_from_upstream_status(
                self.name,
                504 if reason == "TIMEOUT" else 500,
                {},
                error or f"generation ended with {reason}",
                secrets=self.secrets,
            )
        return _FINISH.get(reason or "COMPLETE", "stop")

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        self._check(call)
        payload = self.translate(call.body, stream=False)
        data = await self._post("/v2/chat", payload, call)
        call.upstream_model = call.deployment.model
        with map_upstream_errors(self.name, self.secrets):
            message = data.get("message") or {}
            texts: list[str] = []
            thoughts: list[str] = []
            for part in message.get("content") or ():
                if part.get("type") == "text":
                    texts.append(str(part.get("text") or ""))
                elif part.get("type") == "thinking":
                    thoughts.append(str(part.get("thinking") or ""))
            calls: list[dict[str, Any]] = [
                {
                    "id": str(tc.get("id") or ""),
                    "type": "function",
                    "function": {
                        "name": str((tc.get("function") or {}).get("name") or ""),
                        "arguments": str((tc.get("function") or {}).get("arguments") or "{}"),
                    },
                }
                for tc in message.get("tool_calls") or ()
            ]
        finish = self._finish(data.get("finish_reason"))
        text = "".join(texts)
        if not text and calls:
            text = str(message.get("tool_plan") or "")
        content: str | None = text if text or not calls else None
        usage = usage_from(data.get("usage"))
        if usage is None:
            chars = len(text) + sum(len(c["function"]["arguments"]) for c in calls)
            usage = Usage(
                prompt_tokens=estimate_prompt_tokens(call.body),
                completion_tokens=estimate_tokens(chars),
                estimated=True,
            )
        call.usage = usage
        call.finish_reason = finish
        out = chat_completion(
            "chatcmpl-" + str(data.get("id") or call.ctx.request_id),
            call.alias,
            content=content,
            finish_reason=finish,
            usage=usage,
            tool_calls=calls or None,
            reasoning="".join(thoughts) or None,
        )
        if data.get("logprobs"):
            out["choices"][0]["logprobs"] = openai_logprobs(data["logprobs"])
        citations = message.get("citations")
        if citations:
            out["choices"][0]["message"]["citations"] = citations
        return out

    # ---- streams -------------------------------------------------------------------------------

    async def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        self._check(call)
        payload = self.translate(call.body, stream=True)
        async with (
            self.streaming(
                call, f"{self.base_url}/v2/chat", content=orjson.dumps(payload), headers=self.stream_headers
            ) as response,
            contextlib.aclosing(self._relay(response, call)) as frames,
        ):  # relay closed first (its finally sets call.usage), then the response
            async for frame in frames:
                yield frame

    async def _relay(self, response: httpx.Response, call: UpstreamCall) -> AsyncGenerator[bytes, None]:
        state = _Stream()
        decoder = SSEDecoder()
        call.upstream_model = call.deployment.model
        try:
            with map_upstream_errors(self.name, self.secrets):
                async for chunk in response.aiter_bytes():
                    for block in decoder.feed(chunk):
                        for frame in self._translate(block, state, call):
                            yield frame
                        if state.done:
                            return
                for block in decoder.close():
                    for frame in self._translate(block, state, call):
                        yield frame
                    if state.done:
                        return
            raise UpstreamProtocolError(
                f"Provider '{self.name}' ended the stream before it was complete", provider=self.name
            )
        finally:  # a cut or abandoned stream still bills the text it carried
            if call.usage is None:
                call.usage = Usage(
                    prompt_tokens=estimate_prompt_tokens(call.body),
                    completion_tokens=estimate_tokens(state.chars),
                    estimated=True,
                )

    def _start(self, state: _Stream, call: UpstreamCall, upstream_id: Any) -> ChunkWriter:
        completion_id = "chatcmpl-" + str(upstream_id or call.ctx.request_id)
        state.writer = ChunkWriter(completion_id, call.alias, int(time.time()))
        return state.writer

    def _translate(self, block: bytes, state: _Stream, call: UpstreamCall) -> list[bytes]:
        _, data = parse_event(block)
        if not data:
            return []
        if data == b"[DONE]":
            return []
        event = orjson.loads(data)
        kind = event.get("type")
        writer = state.writer
        if writer is None:
            if kind is None and "message" in event:
                raise self._stream_error(event)
            writer = self._start(state, call, event.get("id") if kind == "message-start" else None)
            if kind == "message-start":
                return [writer.role()]
            frames = [writer.role()]
        else:
            frames = []
        if kind == "content-delta" or kind == "content-start":
            content = ((event.get("delta") or {}).get("message") or {}).get("content") or {}
            text = content.get("text")
            if text:
                state.chars += len(text)
                item = event.get("logprobs")
                frames.append(writer.content(text, openai_logprobs([item]) if item else None))
            elif content.get("thinking"):
                frames.append(writer.reasoning(content["thinking"]))
        elif kind == "citation-start":
            citation = ((event.get("delta") or {}).get("message") or {}).get("citations")
            if citation:
                frames.append(writer.delta({"citations": [citation]}))
        elif kind == "tool-plan-delta":
            plan = ((event.get("delta") or {}).get("message") or {}).get("tool_plan")
            if plan:
                state.chars += len(plan)
                frames.append(writer.content(plan))
        elif kind == "tool-call-start":
            tool = ((event.get("delta") or {}).get("message") or {}).get("tool_calls") or {}
            function = tool.get("function") or {}
            index = len(state.tools)
            state.tools[int(event.get("index") or 0)] = index
            arguments = str(function.get("arguments") or "")
            state.chars += len(arguments)
            frames.append(
                writer.tool_call_start(index, str(tool.get("id") or ""), str(function.get("name") or ""), arguments)
            )
        elif kind == "tool-call-delta":
            tool = ((event.get("delta") or {}).get("message") or {}).get("tool_calls") or {}
            fragment = (tool.get("function") or {}).get("arguments")
            if fragment:
                position = state.tools.get(int(event.get("index") or 0))
                if position is None:
                    raise UpstreamProtocolError(
                        f"Provider '{self.name}' sent tool call arguments before the tool call", provider=self.name
                    )
                state.chars += len(fragment)
                frames.append(writer.tool_call_arguments(position, fragment))
        elif kind == "message-end":
            delta = event.get("delta") or {}
            finish = self._finish(delta.get("finish_reason"), delta.get("error"))
            usage = usage_from(delta.get("usage"))
            if usage is None:
                usage = Usage(
                    prompt_tokens=estimate_prompt_tokens(call.body),
                    completion_tokens=estimate_tokens(state.chars),
                    estimated=True,
                )
            call.usage = usage
            call.finish_reason = finish
            frames.append(writer.finish(finish))
            if call.include_usage:
                frames.append(writer.usage(usage))
            frames.append(DONE)
            state.done = True
        elif kind is None and "message" in event:
            raise self._stream_error(event)
        return frames

    def _stream_error(self, event: Mapping[str, Any]) -> GatewayError:
        return error_from_upstream_status(self.name, 500, {}, str(event.get("message") or ""), secrets=self.secrets)

    # ---- embeddings ----------------------------------------------------------------------------

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        body = call.body
        texts = embedding_inputs(body)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        payload: dict[str, Any] = {
            "model": body["model"],
            "texts": texts,
            "input_type": body.get("input_type") or self.input_type,
            "embedding_types": [encoding],
        }
        if body.get("dimensions") is not None:
            payload["output_dimension"] = body["dimensions"]
        if body.get("truncate") is not None:
            payload["truncate"] = body["truncate"]
        data = await self._post("/v2/embed", payload, call)
        with map_upstream_errors(self.name, self.secrets):
            vectors = data["embeddings"][encoding]
            if not isinstance(vectors, list) or len(vectors) != len(texts):
                raise UpstreamProtocolError(
                    f"Provider '{self.name}' returned a different number of embeddings than inputs", provider=self.name
                )
        billed = ((data.get("meta") or {}).get("billed_units") or {}).get("input_tokens")
        if billed is not None:
            call.usage = Usage(prompt_tokens=int(billed))
        else:
            call.usage = Usage(prompt_tokens=estimate_tokens(sum(len(t) for t in texts)), estimated=True)
        call.upstream_model = call.deployment.model
        return embeddings_response(vectors, call.alias, call.usage)


# ---- helpers -----------------------------------------------------------------------------------


def _message(message: Any, i: int) -> dict[str, Any] | None:
    if not isinstance(message, dict):
        raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
    role = message.get("role")
    content = message.get("content")
    if role in ("system", "developer"):
        return {"role": "system", "content": text_of(content)}
    if role == "user":
        return {"role": "user", "content": _user_content(content, i)}
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant"}
        text = text_of(content)
        calls = message.get("tool_calls")
        if calls:
            out["tool_calls"] = [
                {
                    "id": str(c.get("id") or ""),
                    "type": "function",
                    "function": {
                        "name": str((c.get("function") or {}).get("name") or ""),
                        "arguments": str((c.get("function") or {}).get("arguments") or "{}"),
                    },
                }
                for c in calls
            ]
            if text:
                out["tool_plan"] = text
        elif text:
            out["content"] = text
        else:
            return None  # an empty assistant turn: Cohere refuses it, and it says nothing
        return out
    if role == "tool":
        result: Any = (
            content
            if isinstance(content, str)
            else [{"type": "text", "text": str(p.get("text") or "")} for p in content or () if isinstance(p, dict)]
        )
        return {"role": "tool", "tool_call_id": str(message.get("tool_call_id") or ""), "content": result}
    raise InvalidRequestError(f"messages[{i}] has a role Cohere does not take: {role!r}", param="messages")


def _user_content(content: Any, i: int) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"messages[{i}].content must be a string or an array", param="messages")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "image_url":
            image = part.get("image_url")
            image = image if isinstance(image, dict) else {"url": str(image or "")}
            out = {"url": str(image.get("url") or "")}
            if image.get("detail"):
                out["detail"] = image["detail"]
            parts.append({"type": "image_url", "image_url": out})
        else:
            raise InvalidRequestError(
                f"messages[{i}] has a content part Cohere does not take: {kind!r} (text and image_url are supported)",
                param="messages",
            )
    return parts


def _tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequestError("Only tools of type 'function' are supported", param="tools")
    function = tool.get("function") or {}
    if not function.get("name"):
        raise InvalidRequestError("Every tool needs a function name", param="tools")
    out: dict[str, Any] = {
        "name": function["name"],
        "parameters": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return {"type": "function", "function": out}


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {"cohere": CohereProvider}
