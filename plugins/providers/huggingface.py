"""Provider ``huggingface``: Hugging Face Inference Providers (the router), Text Generation
Inference (TGI) servers, and Inference Endpoints — chat completions and feature-extraction embeddings.

Config (``[providers.NAME]``)::

    type = "huggingface"
    api_key = "${HF_TOKEN}"          # Authorization: Bearer
    mode = "router"                  # "router" (default), "tgi" or "endpoint"
    # base_url = ...                 # router: https://router.huggingface.co/v1 (default);
    #                                # tgi / endpoint: the server, e.g. https://xyz.endpoints.huggingface.cloud
    # embeddings_url = "https://router.huggingface.co/hf-inference/models/{model}/pipeline/feature-extraction"
    # normalize = true               # feature extraction: ask the server to normalize vectors
    # truncate = true                # feature extraction: truncate over-long inputs instead of failing

Modes:

* ``router`` — the OpenAI-compatible Inference Providers router (``{base_url}/chat/completions``,
  ``model`` such as ``meta-llama/Llama-3.1-8B-Instruct:novita``). Requests and streamed chunks go
  through as they are (the ``openai`` provider's relay). Embeddings use the ``hf-inference``
  feature-extraction pipeline: ``{router}/hf-inference/models/{model}/pipeline/feature-extraction``.
* ``tgi`` — a Text Generation Inference server (``{base_url}/v1/chat/completions``). TGI's
  differences are translated: ``max_completion_tokens`` → ``max_tokens``; role ``developer`` →
  ``system``; ``response_format`` ``json_schema`` / ``json_object`` → TGI's grammar
  (``{"type": "json_object", "value": <schema>}``); ``n`` > 1, ``logit_bias``, ``audio``,
  ``modalities``, ``web_search_options`` and the legacy ``functions`` are refused (400 naming them)
  unless ``drop_unsupported_params``. Answers: finish reasons ``eos_token`` / ``stop_sequence`` →
  ``stop`` (``tool_calls`` when the answer is a tool call); tool call arguments sent as JSON objects
  become strings, ``tool_calls`` sent as one object becomes a list, missing ids are minted, null
  names are dropped; empty chunk ids are filled. Usage: TGI versions that send none get an estimate
  (marked estimated; streamed to the client when it asked for usage). Errors
  ``{"error": "...", "error_type": "..."}`` — also as an event inside a stream — are mapped: a
  token-limit ``validation`` error is a context-window error, ``overloaded`` is a 429, a
  ``generation`` failure (424) is a 502. There are no embeddings unless ``embeddings_url`` is set.
* ``endpoint`` — a dedicated Inference Endpoint: chat as ``tgi`` (endpoints serve TGI's API), and
  embeddings posted to the endpoint itself (``POST {base_url}`` with ``{"inputs": [...]}``, what
  Text Embeddings Inference and the feature-extraction pipeline accept).

Feature extraction answers nested float lists; they become OpenAI embeddings (``float`` or
``base64``), token-level outputs are mean-pooled, usage is estimated. ``dimensions`` cannot be
honoured (400 unless ``drop_unsupported_params``); token-id inputs are refused. A 503 "model is
loading" with ``estimated_time`` keeps that as the client's Retry-After.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from llmgateway.core.config import ProviderConfig, Section
from llmgateway.core.errors import (
    ConfigError,
    InvalidRequestError,
    UnsupportedParameterError,
    UpstreamProtocolError,
    error_from_upstream_status,
    error_message_from_body,
    map_upstream_errors,
)
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.provider import (
    Provider,
    UpstreamCall,
    estimate_tokens,
)
from llmgateway.core.sse import frame
from llmgateway.core.types import Usage
from llmgateway.plugins.providers._openai_format import (
    embedding_inputs,
    embeddings_response,
    encode_embedding,
    new_tool_call_id,
)
from llmgateway.plugins.providers.openai import OpenAIProvider, StreamState

ROUTER_URL = "https://router.huggingface.co/v1"
MODES = ("router", "tgi", "endpoint")
#: OpenAI parameters TGI cannot honour
TGI_UNSUPPORTED = frozenset({"logit_bias", "audio", "modalities", "web_search_options", "functions", "function_call"})
_TGI_FINISH = {"eos_token": "stop", "stop_sequence": "stop"}
_TOKEN_LIMIT = re.compile(r"must be <= \d+|must have less than \d+ tokens|tokens \+ `max_new_tokens`")


@dataclass(slots=True)
class _StreamState(StreamState):
    tools: bool = False
    tool_ids: dict[tuple[int, int], str] = field(default_factory=dict)


class HuggingFaceProvider(OpenAIProvider):
    capabilities = frozenset({"chat", "chat_stream", "embeddings"})
    option_keys = frozenset({"mode", "embeddings_url", "normalize", "truncate"})
    default_base_url = ROUTER_URL

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        section = Section(config.options, config.key, "")
        mode = section.choice("mode", MODES, "router")
        template = section.opt_string("embeddings_url")
        section.boolean("normalize", False)
        section.boolean("truncate", False)
        section.check_unknown()
        if mode != "router" and not config.base_url:
            raise ConfigError(
                f"is required with mode = {mode!r}: the server's URL, e.g. https://xyz.endpoints.huggingface.cloud",
                key=f"{config.key}.base_url",
            )
        if template is not None and not template.startswith(("http://", "https://")):
            raise ConfigError("must be an http(s) URL (may contain {model})", key=f"{config.key}.embeddings_url")

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        self.mode = str(self.option("mode", "router"))
        self.tgi = self.mode != "router"
        self.root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    # ---- where things go ---------------------------------------------------------------------

    def url(self, path: str, deployment_model: str) -> str:
        if self.tgi:
            return f"{self.root}/v1{path}"
        return f"{self.base_url}{path}"

    def embeddings_url(self, model: str) -> str | None:
        template = self.option("embeddings_url")
        quoted = quote(model, safe="/:")
        if template:
            return str(template).replace("{model}", quoted)
        if self.mode == "router":
            return f"{self.root}/hf-inference/models/{quoted}/pipeline/feature-extraction"
        if self.mode == "endpoint":
            return self.root
        return None

    # ---- parameters --------------------------------------------------------------------------

    def _refuse(self, call: UpstreamCall, names: Iterable[str]) -> None:
        for name in names:
            if name not in call.body:
                continue
            if call.body[name] is None or self.config.drop_unsupported_params:
                del call.body[name]
                continue
            raise UnsupportedParameterError(
                f"Provider '{self.name}' ({self.mode}) does not support the parameter '{name}' "
                "(set drop_unsupported_params = true on the provider to drop it instead)",
                param=name,
            )

    def _tgi_body(self, call: UpstreamCall) -> None:
        body = call.body
        self._refuse(call, sorted(TGI_UNSUPPORTED))
        n = body.get("n")
        if n is not None and n != 1:
            self._refuse(call, ["n"])
        body.pop("n", None)
        if "max_completion_tokens" in body:
            limit = body.pop("max_completion_tokens")
            if body.get("max_tokens") is None:
                body["max_tokens"] = limit
        fmt = body.get("response_format")
        if isinstance(fmt, dict):
            kind = fmt.get("type")
            if kind == "text":
                del body["response_format"]
            elif kind == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
                body["response_format"] = {"type": "json_object", "value": schema}
            elif kind == "json_object" and "value" not in fmt:
                body["response_format"] = {"type": "json_object", "value": {"type": "object"}}
        body["messages"] = [
            {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
            for m in body.get("messages") or ()
        ]

    # ---- chat --------------------------------------------------------------------------------

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        if not self.tgi:
            return await super().chat(call)
        self._tgi_body(call)
        data = await self._post_json("/chat/completions", call)
        if not data.get("id"):
            data["id"] = f"chatcmpl-{call.ctx.request_id}"
        for number, choice in enumerate(data.get("choices") or ()):
            if not isinstance(choice, dict):
                continue
            message = choice.get("message") or {}
            tool_calls = message.get("tool_calls")
            if isinstance(tool_calls, dict):
                tool_calls = [tool_calls]
            if tool_calls:
                message["tool_calls"] = [
                    _tool_call(tc, fallback_id=new_tool_call_id(), first=True)
                    for tc in tool_calls
                    if isinstance(tc, dict)
                ]
                message.setdefault("content", None)
            elif "tool_calls" in message:
                del message["tool_calls"]
            choice["finish_reason"] = _finish(choice.get("finish_reason"), bool(tool_calls))
            choice.setdefault("index", number)
        self._account(call, data)
        return data

    def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        if self.tgi:
            self._tgi_body(call)
        return self._stream("/chat/completions", call)

    async def completions(self, call: UpstreamCall) -> dict[str, Any]:
        raise InvalidRequestError(f"Provider '{self.name}' (Hugging Face) serves chat completions only", param="model")

    def completions_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        raise InvalidRequestError(f"Provider '{self.name}' (Hugging Face) serves chat completions only", param="model")

    async def _relay(self, response: httpx.Response, call: UpstreamCall) -> AsyncGenerator[bytes, None]:
        relay = super()._relay(response, call) if not self.tgi else self._relay_parsed(response, call)
        async with contextlib.aclosing(relay) as frames:
            async for out in frames:
                yield out

    def _new_state(self) -> _StreamState:
        return _StreamState()

    def _chunk(self, parsed: dict[str, Any], call: UpstreamCall, state: _StreamState) -> list[bytes]:
        out: list[bytes] = []
        if call.upstream_model is None and parsed.get("model"):
            call.upstream_model = str(parsed["model"])
        if not state.id:
            state.id = str(parsed.get("id") or f"chatcmpl-{call.ctx.request_id}")
            state.created = int(parsed.get("created") or 0)
        usage = parsed.pop("usage", None)
        choices = [c for c in parsed.get("choices") or () if isinstance(c, dict)]
        for choice in choices:
            number = int(choice.get("index") or 0)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            state.text += len(str(delta.get("content") or ""))
            tool_calls = delta.get("tool_calls")
            if isinstance(tool_calls, dict):
                tool_calls = [tool_calls]
            if tool_calls:
                state.tools = True
                fixed = []
                for tc in tool_calls:
                    if not isinstance(tc, dict):
                        continue
                    key = (number, int(tc.get("index") or 0))
                    first = key not in state.tool_ids
                    if first:
                        state.tool_ids[key] = str(tc.get("id") or "") or new_tool_call_id()
                    fixed.append(_tool_call(tc, fallback_id=state.tool_ids[key], first=first))
                    state.text += len((tc.get("function") or {}).get("arguments") or "")
                delta["tool_calls"] = fixed
            elif "tool_calls" in delta:
                del delta["tool_calls"]
            if choice.get("finish_reason"):
                choice["finish_reason"] = _finish(choice["finish_reason"], state.tools)
                state.finish = choice["finish_reason"]
        if choices:
            parsed["choices"] = choices
            parsed["id"] = state.id
            parsed["model"] = call.alias
            out.append(frame(parsed))
        if isinstance(usage, dict):
            call.usage = Usage.from_openai(usage)
            if call.include_usage:
                out.append(self._usage_frame(call, state, call.usage.as_openai()))
        return out

    # ---- embeddings --------------------------------------------------------------------------

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        url = self.embeddings_url(call.deployment.model)
        if url is None:
            raise InvalidRequestError(
                f"Provider '{self.name}' is a TGI server, which serves no embeddings (set embeddings_url)",
                param="model",
            )
        self._refuse(call, ["dimensions"])
        texts = embedding_inputs(call.body)
        payload: dict[str, Any] = {"inputs": texts}
        if self.option("normalize"):
            payload["normalize"] = True
        if self.option("truncate"):
            payload["truncate"] = True
        with map_upstream_errors(self.name, self.secrets):
            response = await self.http.post(url, content=orjson.dumps(payload), headers=self.request_headers(call))
            body = await response.aread()
        call.response_headers = self.rate_limit_headers(response.headers)
        self.raise_for_status(response, body)
        with map_upstream_errors(self.name, self.secrets):
            vectors = _pooled(orjson.loads(body), len(texts))
        if vectors is None:
            raise UpstreamProtocolError(
                f"Provider '{self.name}' answered feature extraction with an unexpected shape", provider=self.name
            )
        encoding = call.body.get("encoding_format")
        call.upstream_model = call.deployment.model
        call.usage = Usage(prompt_tokens=sum(estimate_tokens(len(t)) for t in texts), estimated=True)
        return embeddings_response([encode_embedding(v, encoding) for v in vectors], call.alias, call.usage)

    # ---- errors ------------------------------------------------------------------------------

    def parse_error(self, body: bytes) -> tuple[str, str | None, str | None]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error_message_from_body(body)
        if isinstance(data, dict):
            error = data.get("error")
            kind = data.get("error_type")
            if isinstance(error, list):
                error = "; ".join(str(e) for e in error)
            if isinstance(error, str):
                return error, str(kind) if kind else None, None
        return error_message_from_body(body)

    def raise_for_status(self, response: httpx.Response, body: bytes) -> None:
        if response.status_code < 400:
            return
        message, code, param = self.parse_error(body)
        status = response.status_code
        headers: Mapping[str, str] = response.headers
        if status == 503 and "retry-after" not in headers:
            wait = _estimated_time(body)
            if wait is not None:
                headers = {**dict(headers), "retry-after": str(math.ceil(wait))}
        if status == 424:  # TGI: the model failed while generating; the request was fine
            status = 502
        elif status == 422 and _TOKEN_LIMIT.search(message):
            status, code = 400, "context_length_exceeded"
        raise error_from_upstream_status(
            self.name, status, headers, message, upstream_code=code, param=param, secrets=self.secrets
        )

    def _stream_error(self, data: bytes) -> Exception:
        message, code, param = self.parse_error(data)
        if code == "overloaded" or code == "rate_limit_exceeded":
            status = 429
        elif code == "validation":
            status = 422
        else:
            status = 502
        if status == 422 and _TOKEN_LIMIT.search(message):
            status, code = 400, "context_length_exceeded"
        return error_from_upstream_status(
            self.name, status, {}, message, upstream_code=code, param=param, secrets=self.secrets
        )


def _finish(reason: Any, tools: bool) -> str | None:
    if reason is None:
        return None
    reason = _TGI_FINISH.get(str(reason), str(reason))
    return "tool_calls" if tools and reason == "stop" else reason


def _tool_call(tool_call: dict[str, Any], *, fallback_id: str, first: bool) -> dict[str, Any]:
    """One TGI tool call (or tool call delta) in OpenAI's shape."""
    function = dict(tool_call.get("function") or {})
    function.pop("description", None)
    if function.get("name") is None:
        function.pop("name", None)
    arguments = function.get("arguments")
    if arguments is None:
        function["arguments"] = ""
    elif not isinstance(arguments, str):
        function["arguments"] = orjson.dumps(arguments).decode()
    out: dict[str, Any] = {"function": function}
    if "index" in tool_call:
        out["index"] = tool_call["index"]
    if first:
        out["id"] = str(tool_call.get("id") or "") or fallback_id
        out["type"] = "function"
    return out


def _pooled(data: Any, count: int) -> list[list[float]] | None:
    """One vector per input from a feature-extraction answer (token-level outputs mean-pooled)."""
    if count == 1 and isinstance(data, list) and data and all(_is_number(x) for x in data):
        data = [data]  # a single flat vector
    if not isinstance(data, list) or len(data) != count:
        return None
    vectors: list[list[float]] = []
    for item in data:
        if isinstance(item, list) and item and all(_is_number(x) for x in item):
            vectors.append([float(x) for x in item])
        elif isinstance(item, list) and item and all(isinstance(row, list) and row for row in item):
            if isinstance(item[0][0], list):  # [1][tokens][dim] per input
                item = item[0]
            width = len(item[0])
            if not all(len(row) == width and all(_is_number(x) for x in row) for row in item):
                return None
            vectors.append([sum(row[i] for row in item) / len(item) for i in range(width)])
        else:
            return None
    return vectors


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _estimated_time(body: bytes) -> float | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = data.get("estimated_time") if isinstance(data, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {"huggingface": HuggingFaceProvider}
