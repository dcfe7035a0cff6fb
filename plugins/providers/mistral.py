"""Provider ``mistral``: Mistral AI's La Plateforme (chat completions and embeddings).

Config (``[providers.NAME]``)::

    type = "mistral"
    api_key = "${MISTRAL_API_KEY}"          # Authorization: Bearer
    # base_url = "https://api.mistral.ai/v1"
    # safe_prompt = true                     # inject Mistral's safety prompt into every request

Mistral's API looks like OpenAI's but refuses fields it does not know (422), so requests and
answers are translated both ways:

* request: ``seed`` → ``random_seed``; ``max_completion_tokens`` → ``max_tokens``;
  ``tool_choice: "required"`` → ``"any"``; role ``developer`` → ``system``; ``stream_options`` is
  dropped (Mistral always sends usage with the last chunk); ``user``, ``store`` and
  ``safety_identifier`` (bookkeeping only) are dropped; tool call ids that are not Mistral's nine
  alphanumerics (ids minted by another provider) are mapped to stable ones; embeddings
  ``dimensions`` → ``output_dimension``. OpenAI parameters Mistral cannot honour (``logit_bias``,
  ``audio``, ``modalities``, ``web_search_options``, the legacy ``functions``) are refused with a 400
  naming them, unless ``drop_unsupported_params`` is set.
* answer: ``finish_reason`` ``model_length`` → ``length`` (``error`` fails the request); content
  given as a list of chunks is flattened to text (thinking chunks go to ``reasoning_content``);
  tool call arguments given as objects become JSON strings.
* streams: every chunk is parsed. Mistral sends each tool call whole in one delta, often several
  with ``index`` 0 — they are renumbered so OpenAI clients do not merge them; usage rides on the
  chunk with ``finish_reason`` and is moved to its own final chunk (sent only when the client asked
  with ``stream_options.include_usage``).
* errors: ``{"object": "error", "message": ..., "code": ...}``, validation errors (``{"detail":
  [...]}``, also nested in ``message``) and plain ``{"message": ...}`` bodies become the gateway's
  errors, naming the offending parameter by its OpenAI name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from llmgateway.core.config import ProviderConfig, Section
from llmgateway.core.errors import (
    InvalidRequestError,
    UpstreamProtocolError,
    error_from_upstream_status,
    error_message_from_body,
)
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.provider import (
    Provider,
    UpstreamCall,
)
from llmgateway.core.sse import frame
from llmgateway.core.types import Usage
from llmgateway.plugins.providers._openai_format import encode_embedding
from llmgateway.plugins.providers.openai import OpenAIProvider, StreamState

#: OpenAI request fields that only label the request for the caller's bookkeeping
_BOOKKEEPING = ("user", "store", "safety_identifier")
#: Mistral parameter name -> the OpenAI name a client sent (to name the param in errors)
_OPENAI_NAME = {"random_seed": "seed", "output_dimension": "dimensions"}
_FINISH = {"model_length": "length"}
_TOOL_ID = re.compile(r"[A-Za-z0-9]{9}")
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mistral_tool_call_id(value: str) -> str:
    """Mistral accepts only nine alphanumerics; map anything else to a stable id of that shape."""
    if _TOOL_ID.fullmatch(value):
        return value
    number = int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        out.append(_ALPHABET[digit])
    return "".join(out)


def _flatten(content: Any, message: dict[str, Any]) -> Any:
    """Mistral content chunks → OpenAI text (thinking chunks → ``reasoning_content``)."""
    if not isinstance(content, list):
        return content
    text: list[str] = []
    thinking: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            text.append(str(part.get("text") or ""))
        elif part.get("type") == "thinking":
            for inner in part.get("thinking") or ():
                if isinstance(inner, dict) and inner.get("type") == "text":
                    thinking.append(str(inner.get("text") or ""))
    if thinking:
        message["reasoning_content"] = message.get("reasoning_content", "") + "".join(thinking)
    return "".join(text)


def _tool_call(tool_call: dict[str, Any]) -> dict[str, Any]:
    function = tool_call.get("function") or {}
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, str):
        function["arguments"] = orjson.dumps(arguments).decode()
    tool_call["type"] = "function"
    return tool_call


@dataclass(slots=True)
class _StreamState(StreamState):
    # per choice: tool call id -> OpenAI index, and upstream index -> OpenAI index
    tool_ids: dict[int, dict[str, int]] = field(default_factory=dict)
    tool_indexes: dict[int, dict[int, int]] = field(default_factory=dict)


class MistralProvider(OpenAIProvider):
    capabilities = frozenset({"chat", "chat_stream", "embeddings"})
    option_keys = frozenset({"safe_prompt"})
    default_base_url = "https://api.mistral.ai/v1"
    unsupported_params = frozenset(
        {"logit_bias", "audio", "modalities", "web_search_options", "functions", "function_call"}
    )

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        section = Section(config.options, config.key, "")
        section.boolean("safe_prompt", False)
        section.check_unknown()

    # ---- request translation -----------------------------------------------------------------

    def _check(self, call: UpstreamCall) -> None:
        for name in self.unsupported_params.intersection(call.body):
            if call.body[name] is None:
                del call.body[name]
        self.check_params(call)
        for name in _BOOKKEEPING:
            call.body.pop(name, None)

    def _chat_body(self, call: UpstreamCall) -> None:
        self._check(call)
        body = call.body
        body.pop("stream_options", None)
        if "seed" in body:
            seed = body.pop("seed")
            body.setdefault("random_seed", seed)
        if "max_completion_tokens" in body:
            limit = body.pop("max_completion_tokens")
            if body.get("max_tokens") is None:
                body["max_tokens"] = limit
        if body.get("tool_choice") == "required":
            body["tool_choice"] = "any"
        if self.option("safe_prompt") and "safe_prompt" not in body:
            body["safe_prompt"] = True
        messages = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                messages.append(message)
                continue
            message = dict(message)
            if message.get("role") == "developer":
                message["role"] = "system"
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    {**tc, "id": mistral_tool_call_id(str(tc.get("id") or ""))} if isinstance(tc, dict) else tc
                    for tc in message["tool_calls"]
                ]
            if isinstance(message.get("tool_call_id"), str):
                message["tool_call_id"] = mistral_tool_call_id(message["tool_call_id"])
            messages.append(message)
        body["messages"] = messages

    # ---- operations --------------------------------------------------------------------------

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        self._chat_body(call)
        data = await self._post_json("/chat/completions", call)
        for choice in data.get("choices") or ():
            self._choice(choice, "message")
        self._account(call, data)
        return data

    def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        self._chat_body(call)
        return self._stream("/chat/completions", call)

    async def completions(self, call: UpstreamCall) -> dict[str, Any]:
        raise InvalidRequestError(
            f"Provider '{self.name}' (Mistral) serves chat completions, not text completions", param="model"
        )

    def completions_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        raise InvalidRequestError(
            f"Provider '{self.name}' (Mistral) serves chat completions, not text completions", param="model"
        )

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        self._check(call)
        body = call.body
        if "dimensions" in body:
            dimensions = body.pop("dimensions")
            if dimensions is not None:
                body["output_dimension"] = dimensions
        if body.get("encoding_format") == "base64":
            # ask for floats and encode them here: the client gets OpenAI's layout (little-endian
            # float32) whatever the model's output dtype
            body.pop("encoding_format")
            data = await super().embeddings(call)
            for item in data.get("data") or ():
                vector = item.get("embedding")
                if isinstance(vector, list):
                    item["embedding"] = encode_embedding(vector, "base64")
            return data
        return await super().embeddings(call)

    def _choice(self, choice: dict[str, Any], key: str) -> None:
        """Translate one choice (``message`` in answers, ``delta`` in chunks) in place."""
        finish = choice.get("finish_reason")
        if finish == "error":
            raise UpstreamProtocolError(f"Provider '{self.name}' stopped generating with an error", provider=self.name)
        if finish in _FINISH:
            choice["finish_reason"] = _FINISH[finish]
        message = choice.get(key)
        if not isinstance(message, dict):
            if key == "delta":
                choice["delta"] = {}
            return
        if "content" in message:
            message["content"] = _flatten(message["content"], message)
        if key == "message" and message.get("tool_calls"):
            message["tool_calls"] = [
                {k: v for k, v in _tool_call(tc).items() if k != "index"}
                for tc in message["tool_calls"]
                if isinstance(tc, dict)
            ]

    # ---- streams -----------------------------------------------------------------------------

    def stream_body(self, call: UpstreamCall) -> dict[str, Any]:
        # no stream_options: Mistral refuses it (and always sends usage)
        call.body["stream"] = True
        return call.body

    def _relay(self, response: httpx.Response, call: UpstreamCall) -> AsyncGenerator[bytes, None]:
        return self._relay_parsed(response, call)

    def _new_state(self) -> _StreamState:
        return _StreamState()

    def _chunk(self, parsed: dict[str, Any], call: UpstreamCall, state: _StreamState) -> list[bytes]:
        out: list[bytes] = []
        if call.upstream_model is None and parsed.get("model"):
            call.upstream_model = str(parsed["model"])
        if not state.id and parsed.get("id"):
            state.id = str(parsed["id"])
            state.created = int(parsed.get("created") or 0)
        usage = parsed.pop("usage", None)
        choices = [c for c in parsed.get("choices") or () if isinstance(c, dict)]
        for choice in choices:
            self._choice(choice, "delta")
            delta = choice["delta"]
            state.text += len(str(delta.get("content") or ""))
            if delta.get("tool_calls"):
                delta["tool_calls"] = self._renumber(choice, delta["tool_calls"], state)
                for tool_call in delta["tool_calls"]:
                    state.text += len((tool_call.get("function") or {}).get("arguments") or "")
            if choice.get("finish_reason"):
                state.finish = str(choice["finish_reason"])
        if choices:
            parsed["choices"] = choices
            parsed["model"] = call.alias
            parsed.setdefault("object", "chat.completion.chunk")
            out.append(frame(parsed))
        if isinstance(usage, dict):
            call.usage = Usage.from_openai(usage)
            if call.include_usage:
                out.append(self._usage_frame(call, state, call.usage.as_openai()))
        return out

    @staticmethod
    def _renumber(choice: dict[str, Any], tool_calls: list[Any], state: _StreamState) -> list[dict[str, Any]]:
        """Give each distinct tool call its own ``index`` (Mistral sends 0 for parallel calls)."""
        number = int(choice.get("index") or 0)
        ids = state.tool_ids.setdefault(number, {})
        indexes = state.tool_indexes.setdefault(number, {})
        out = []
        for tool_call in tool_calls:
            if not isinstance(tool_call, dict):
                continue
            upstream_index = int(tool_call.get("index") or 0)
            call_id = tool_call.get("id")
            if call_id and call_id != "null":
                index = ids.setdefault(str(call_id), len(ids))
                indexes[upstream_index] = index
            else:
                tool_call.pop("id", None)
                index = indexes.get(upstream_index, upstream_index)
            tool_call["index"] = index
            out.append(_tool_call(tool_call))
        return out

    # ---- errors ------------------------------------------------------------------------------

    def parse_error(self, body: bytes) -> tuple[str, str | None, str | None]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error_message_from_body(body)
        if not isinstance(data, dict):
            return error_message_from_body(body)
        message = data.get("message")
        detail = data.get("detail")
        if isinstance(message, dict) and "detail" in message:
            detail, message = message["detail"], None
        if detail is not None:
            return _validation(detail)
        if isinstance(message, str):
            code = data.get("code") or data.get("type")
            param = data.get("param")
            return (
                message,
                str(code) if code is not None else None,
                _OPENAI_NAME.get(str(param), str(param)) if param else None,
            )
        return error_message_from_body(body)

    def _stream_error(self, data: bytes) -> Exception:
        message, code, param = self.parse_error(data)
        status = 429 if code in ("rate_limited", "1300") else 502
        return error_from_upstream_status(
            self.name, status, {}, message, upstream_code=code, param=param, secrets=self.secrets
        )


def _validation(detail: Any) -> tuple[str, str | None, str | None]:
    """A FastAPI/pydantic ``detail`` (a list of ``{loc, msg, type}`` or a string)."""
    if isinstance(detail, str):
        return detail, None, None
    if not isinstance(detail, list):
        return orjson.dumps(detail).decode(), None, None
    parts: list[str] = []
    param: str | None = None
    for item in detail:
        if not isinstance(item, dict):
            continue
        loc = [str(p) for p in item.get("loc") or () if p != "body"]
        if loc:
            loc[0] = _OPENAI_NAME.get(loc[0], loc[0])
        where = ".".join(loc)
        if param is None and where:
            param = where
        parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
    return "; ".join(parts) or "validation error", "validation_error", param


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {"mistral": MistralProvider}
