"""OpenAI chat completions <-> Anthropic Messages, both directions, plain and streamed.

Provider direction (an OpenAI client reaching Anthropic):

* :func:`to_anthropic` — an OpenAI chat request as an Anthropic Messages request.
* :func:`from_anthropic` — an Anthropic message as an OpenAI ``chat.completion``.
* :class:`AnthropicToOpenAIStream` — Anthropic's named stream events as OpenAI chunk frames.

Ingress direction (an Anthropic client reaching any backend):

* :func:`anthropic_to_openai` — an Anthropic Messages request as an OpenAI chat request.
* :func:`openai_to_anthropic` — an OpenAI ``chat.completion`` as an Anthropic message.
* :class:`OpenAIToAnthropicStream` — OpenAI chunks as Anthropic's named events.

Choices worth knowing (each is also stated where it is made):

* ``system`` / ``developer`` messages, wherever they are, become the top-level ``system`` (in order).
* Consecutive messages of the same role are merged into one turn; OpenAI ``tool`` messages become
  ``tool_result`` blocks in a user turn (tool results first, as Anthropic requires).
* ``response_format`` (``json_schema`` or ``json_object``) becomes a tool the model is forced to call
  (Anthropic's documented way to get JSON); its input is returned as the message content, and text
  blocks are dropped so the content parses. A non-object schema is wrapped in ``{"value": ...}``
  and unwrapped again (streams then send the JSON in one piece when the block ends).
* Usage: OpenAI's ``prompt_tokens`` includes cached tokens; Anthropic's ``input_tokens`` does not.
  ``prompt_tokens = input_tokens + cache_read_input_tokens + cache_creation_input_tokens`` and
  ``cached_tokens = cache_read_input_tokens`` (and back the other way on ingress).
* Extended thinking, provider direction: Anthropic's ``thinking`` / ``redacted_thinking`` blocks
  become the answer's ``reasoning_content`` (the thinking text) and ``thinking_blocks`` (the blocks
  themselves, signature or ``data`` included, in Anthropic's order: the field LiteLLM uses). Streams
  send the text as ``reasoning_content`` deltas and each complete block as a ``thinking_blocks``
  delta when the block ends (``content_block_stop``), so a client can rebuild the blocks. An
  assistant message's ``thinking_blocks`` are sent back first in its turn, unchanged (what
  multi-turn tool use with thinking needs); thinking blocks without a signature are dropped
  (Anthropic refuses them). The request's thinking is, in this order: the Anthropic ingress's
  ``thinking`` (``ctx.state["anthropic.thinking"]``, verbatim), the OpenAI body's ``thinking``
  object (verbatim), else ``reasoning_effort`` through :data:`THINKING_BUDGETS`, with the budget
  lowered below ``max_tokens`` when it does not fit (400 naming ``reasoning_effort`` when even
  1024 does not). With thinking on, a forced tool (``tool_choice`` required / a function, JSON
  mode) is refused with a 400 naming the param, as Anthropic would refuse it.
* Extended thinking, ingress direction: the request's ``thinking`` is not put into the OpenAI body
  (OpenAI-compatible upstreams refuse unknown fields) but kept, as given, in
  ``ctx.state["anthropic.thinking"]`` for the anthropic provider; other providers ignore it (give
  a deployment ``params = { reasoning_effort = "..." }`` to make a reasoning model reason).
  Thinking blocks in the history become the assistant message's ``thinking_blocks`` (and
  ``ctx.state["anthropic.thinking_blocks"]`` is set, so OpenAI-format providers strip them before
  the upstream sees them, without looking at messages otherwise). Answers: ``thinking_blocks``
  come first in the content, signatures intact; an answer with only ``reasoning_content`` (DeepSeek,
  vLLM, Gemini...) gets one thinking block with an empty signature, which the anthropic provider
  drops again if it comes back in the history. Streams open a thinking block for
  ``reasoning_content`` deltas (``thinking_delta`` events) and send a ``thinking_blocks`` delta's
  signature as ``signature_delta`` before the block's ``content_block_stop``; redacted blocks are
  blocks of their own.
* Ingress: ``output_config.format`` (structured outputs) becomes ``response_format`` json_schema;
  ``output_config.effort`` is dropped; tool results that hold images are followed by a user
  message carrying those images; ``is_error`` on a tool result is prefixed to its text as
  ``"Error: "``; ``cache_control`` and ``top_k`` are passed on (the anthropic provider uses them;
  a strict OpenAI upstream may refuse them).
* Tool calls without a finish reason of their own (or with "stop") end with ``stop_reason: tool_use``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from llmgateway.core.errors import GatewayError, InvalidRequestError, UpstreamStatusError, error_from_upstream_status
from llmgateway.core.provider import estimate_tokens
from llmgateway.core.types import Usage
from llmgateway.plugins.providers._openai_format import THINKING_BLOCKS_STATE, ChunkWriter, chat_completion

ANTHROPIC_VERSION = "2023-06-01"

#: Anthropic stop_reason -> OpenAI finish_reason
FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: OpenAI finish_reason -> Anthropic stop_reason
STOP_REASONS: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

#: Anthropic error type -> the HTTP status Anthropic uses for it (for errors sent inside a stream)
ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

#: HTTP status the gateway answers with -> Anthropic error type name
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

#: ``ctx.state`` key: the Anthropic ingress request's ``thinking`` object, as the client gave it
THINKING_STATE = "anthropic.thinking"

#: OpenAI ``reasoning_effort`` -> Anthropic ``thinking.budget_tokens`` (0: no thinking is asked for).
#: Anthropic wants ``MIN_THINKING_BUDGET <= budget_tokens < max_tokens``: a budget that does not fit
#: under the request's max tokens is lowered to ``max_tokens - 1`` (a 400 when that is below 1024).
THINKING_BUDGETS: dict[str, int] = {
    "none": 0,
    "minimal": 1024,
    "low": 1024,
    "medium": 4096,
    "high": 16384,
    "xhigh": 32768,
    "max": 65536,
}
MIN_THINKING_BUDGET = 1024

JSON_TOOL = "json_response"
_JSON_TOOL_DESCRIPTION = "Answer by calling this tool: its input is the whole answer, as JSON matching the schema."
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def _obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def anthropic_error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_payload(error: GatewayError) -> dict[str, Any]:
    """The OpenAI envelope with Anthropic's top-level ``"type": "error"`` and Anthropic's type name."""
    return {
        "type": "error",
        "error": {
            "type": anthropic_error_type(error.status),
            "message": error.message,
            "param": error.param,
            "code": error.code,
        },
    }


def upstream_stream_error(provider: str, payload: dict[str, Any], secrets: tuple[str, ...]) -> UpstreamStatusError:
    """An ``error`` event inside an Anthropic stream, as the client-facing error."""
    err = payload.get("error") if isinstance(payload.get("error"), dict) else payload
    assert isinstance(err, dict)
    kind = str(err.get("type") or "api_error")
    status = ERROR_STATUS.get(kind, 500)
    return error_from_upstream_status(provider, status, {}, str(err.get("message") or kind), secrets=secrets)


def usage_from_anthropic(usage: dict[str, Any] | None) -> Usage:
    if not usage:
        return Usage()
    read = int(usage.get("cache_read_input_tokens") or 0)
    created = int(usage.get("cache_creation_input_tokens") or 0)
    details = usage.get("output_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("input_tokens") or 0) + read + created,
        completion_tokens=int(usage.get("output_tokens") or 0),
        cached_tokens=read,
        reasoning_tokens=int(details.get("thinking_tokens") or 0) if isinstance(details, dict) else 0,
    )


def usage_to_anthropic(usage: Usage) -> dict[str, Any]:
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    return {
        "input_tokens": usage.prompt_tokens - cached,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


# =============================================================================================
# Provider direction: OpenAI request -> Anthropic request
# =============================================================================================


@dataclass(slots=True)
class JsonMode:
    """How ``response_format`` was expressed: the forced tool's name and whether its schema was wrapped."""

    tool: str
    wrapped: bool


def request_max_tokens(body: dict[str, Any], default: int) -> int:
    """The ``max_tokens`` sent to Anthropic: ``max_completion_tokens``, else ``max_tokens``, else ``default``."""
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or default)


def thinking_enabled(thinking: Any) -> bool:
    """Whether an Anthropic ``thinking`` object turns thinking on (``enabled`` or ``adaptive``)."""
    return isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled")


def resolve_thinking(body: dict[str, Any], max_tokens: int, given: Any = None) -> dict[str, Any] | None:
    """The Anthropic ``thinking`` for an OpenAI body: ``given`` (the Anthropic ingress's object), else
    the body's own ``thinking`` object, both verbatim; else ``reasoning_effort`` through
    :data:`THINKING_BUDGETS`, the budget lowered below ``max_tokens`` (the request's, see
    :func:`request_max_tokens`) when it does not fit. None: no thinking is asked for.
    Raises :class:`InvalidRequestError` naming ``thinking`` or ``reasoning_effort``."""
    thinking = given if given is not None else body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict):
            raise InvalidRequestError("'thinking' must be an object", param="thinking")
        return thinking
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in THINKING_BUDGETS:
        raise InvalidRequestError(
            f"'reasoning_effort' must be one of {', '.join(THINKING_BUDGETS)} (got {effort!r})",
            param="reasoning_effort",
        )
    budget = THINKING_BUDGETS[effort]
    if not budget:
        return None
    if budget >= max_tokens:
        if max_tokens - 1 < MIN_THINKING_BUDGET:
            raise InvalidRequestError(
                f"'reasoning_effort' {effort!r} needs a larger max_tokens: Anthropic's thinking budget is at "
                f"least {MIN_THINKING_BUDGET} tokens and must be below max_tokens, which is {max_tokens} here "
                f"(ask for at least {MIN_THINKING_BUDGET + 1}, or set reasoning_effort to 'none')",
                param="reasoning_effort",
            )
        budget = max_tokens - 1
    return {"type": "enabled", "budget_tokens": budget}


def to_anthropic(
    body: dict[str, Any], *, max_tokens: int, thinking: dict[str, Any] | None = None
) -> tuple[dict[str, Any], JsonMode | None]:
    """An OpenAI chat request as an Anthropic Messages body (``model`` kept as given).

    ``max_tokens`` is used when the request sets neither ``max_completion_tokens`` nor ``max_tokens``.
    ``thinking`` is the Anthropic ``thinking`` object (see :func:`resolve_thinking`); the body's own
    ``thinking`` and ``reasoning_effort`` are not read here.
    Unsupported parameters must already have been refused or dropped by the caller.
    Raises :class:`InvalidRequestError` naming the offending param.
    """
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    messages = body.get("messages") or []
    for i, message in enumerate(messages):
        role = message.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system.extend(_blocks(message.get("content"), where, text_only=True))
        elif role == "user":
            add("user", _blocks(message.get("content"), where))
        elif role == "assistant":
            thinking_blocks = message.get("thinking_blocks")
            blocks = _thinking_blocks(thinking_blocks, where) if thinking_blocks else []
            blocks += _blocks(message.get("content"), where, text_only=True)
            for j, tool_call in enumerate(message.get("tool_calls") or ()):
                blocks.append(_tool_use_block(tool_call, f"{where}.tool_calls[{j}]"))
            add("assistant", blocks)
        elif role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": str(message.get("tool_call_id") or "")}
            if not result["tool_use_id"]:
                raise InvalidRequestError(f"'{where}.tool_call_id' is required", param=f"{where}.tool_call_id")
            content = message.get("content")
            if isinstance(content, str):
                if content:
                    result["content"] = content
            elif content:
                result["content"] = _blocks(content, where, text_only=True)
            add("user", [result])
        else:
            raise InvalidRequestError(
                f"'{where}.role' {role!r} cannot be sent to Anthropic (use 'tool' messages)", param=f"{where}.role"
            )
    if not turns:
        raise InvalidRequestError("'messages' needs at least one user or assistant message", param="messages")
    for turn in turns:
        content = turn["content"]
        if turn["role"] == "user" and len(content) > 1:
            # Anthropic wants a user turn's tool results before anything else in it
            content.sort(key=lambda block: block.get("type") != "tool_result")
        if len(content) == 1 and content[0]["type"] == "text" and len(content[0]) == 2:
            turn["content"] = content[0]["text"]

    out: dict[str, Any] = {"model": body["model"]}
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 and len(system[0]) == 2 else system
    out["messages"] = turns
    out["max_tokens"] = request_max_tokens(body, max_tokens)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    if thinking is not None:
        out["thinking"] = thinking
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream"):
        out["stream"] = True

    tools = [_tool(tool) for tool in body.get("tools") or ()]
    choice = _tool_choice(body.get("tool_choice"), bool(tools))
    json_mode = _json_mode(body.get("response_format"))
    if json_mode is not None:
        mode, schema = json_mode
        tools.append({"name": mode.tool, "description": _JSON_TOOL_DESCRIPTION, "input_schema": schema})
        if choice is None or choice.get("type") == "auto":
            choice = {"type": "tool", "name": mode.tool} if len(tools) == 1 else {"type": "any"}
    if choice is not None and choice["type"] in ("any", "tool") and thinking_enabled(thinking):
        param = "response_format" if json_mode is not None else "tool_choice"
        raise InvalidRequestError(
            f"'{param}' forces a tool call, which Anthropic does not allow with extended thinking "
            "(turn thinking off, or let the model choose its tools)",
            param=param,
        )
    if body.get("parallel_tool_calls") is False and tools:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if tools:
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
    return out, json_mode[0] if json_mode else None


def _thinking_blocks(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``thinking_blocks``, unchanged; thinking blocks without a signature
    (not from Anthropic, e.g. made from another backend's ``reasoning_content``) are dropped."""
    if not isinstance(value, list):
        raise InvalidRequestError(f"'{where}.thinking_blocks' must be an array", param=f"{where}.thinking_blocks")
    blocks: list[dict[str, Any]] = []
    for j, block in enumerate(value):
        param = f"{where}.thinking_blocks[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking":
            assert isinstance(block, dict)
            signature = block.get("signature")
            if not signature:
                continue  # Anthropic refuses a thinking block it cannot verify
            if not isinstance(signature, str) or not isinstance(block.get("thinking"), str):
                raise InvalidRequestError(f"'{param}': 'thinking' and 'signature' must be strings", param=param)
            blocks.append(block)
        elif kind == "redacted_thinking":
            assert isinstance(block, dict)
            if not isinstance(block.get("data"), str) or not block["data"]:
                raise InvalidRequestError(f"'{param}.data' must be a non-empty string", param=f"{param}.data")
            blocks.append(block)
        else:
            raise InvalidRequestError(
                f"'{param}.type' must be 'thinking' or 'redacted_thinking'", param=f"{param}.type"
            )
    return blocks


def _blocks(content: Any, where: str, *, text_only: bool = False) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequestError(f"'{where}.content' must be a string or an array", param=f"{where}.content")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            assert isinstance(part, dict)
            text = part.get(kind)
            if not isinstance(text, str):
                raise InvalidRequestError(f"'{param}.{kind}' must be a string", param=f"{param}.{kind}")
            if not text:
                continue  # Anthropic refuses empty text blocks
            block: dict[str, Any] = {"type": "text", "text": text}
            if part.get("cache_control"):
                block["cache_control"] = part["cache_control"]
            blocks.append(block)
        elif text_only:
            raise InvalidRequestError(f"'{param}' must be a text part for this role", param=param)
        elif kind == "image_url":
            assert isinstance(part, dict)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise InvalidRequestError(f"'{param}.image_url.url' is required", param=f"{param}.image_url.url")
            blocks.append({"type": "image", "source": _image_source(url, param)})
        elif kind == "file":
            assert isinstance(part, dict)
            file = _obj(part.get("file"))
            data = file.get("file_data")
            if not isinstance(data, str) or not data.startswith("data:application/pdf;base64,"):
                raise InvalidRequestError(
                    f"'{param}': Anthropic takes files only as 'file_data' holding a base64 PDF data URL",
                    param=param,
                )
            document: dict[str, Any] = {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": data.partition(",")[2]},
            }
            if isinstance(file.get("filename"), str):
                document["title"] = file["filename"]
            blocks.append(document)
        else:
            raise InvalidRequestError(
                f"'{param}': content part type {kind!r} is not supported by Anthropic", param=param
            )
    return blocks


def _image_source(url: str, param: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, _, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if encoding != "base64" or not data:
            raise InvalidRequestError(f"'{param}': image data URLs must be base64", param=f"{param}.image_url.url")
        if media_type not in _IMAGE_TYPES:
            raise InvalidRequestError(
                f"'{param}': image type {media_type!r} is not supported (jpeg, png, gif, webp)",
                param=f"{param}.image_url.url",
            )
        return {"type": "base64", "media_type": media_type, "data": data}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise InvalidRequestError(f"'{param}': image URLs must be http(s) or data URLs", param=f"{param}.image_url.url")


def _tool_use_block(tool_call: Any, where: str) -> dict[str, Any]:
    function = tool_call.get("function") if isinstance(tool_call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(f"'{where}.function.name' is required", param=f"{where}.function.name")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequestError(
            f"'{where}.function.arguments' must be a JSON object", param=f"{where}.function.arguments"
        )
    return {"type": "tool_use", "id": str(tool_call.get("id") or ""), "name": function["name"], "input": parsed}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    out: dict[str, Any] = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    if tool.get("cache_control"):
        out["cache_control"] = tool["cache_control"]
    return out


def _tool_choice(choice: Any, has_tools: bool) -> dict[str, Any] | None:
    if choice is None or not has_tools:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") == "function" and isinstance(function, dict) and isinstance(function.get("name"), str):
            return {"type": "tool", "name": function["name"]}
    raise InvalidRequestError(
        "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        param="tool_choice",
    )


def _json_mode(response_format: Any) -> tuple[JsonMode, dict[str, Any]] | None:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return JsonMode(JSON_TOOL, False), {"type": "object", "additionalProperties": True}
    if kind != "json_schema":
        if kind in (None, "text"):
            return None
        raise InvalidRequestError(f"'response_format.type' {kind!r} is not supported", param="response_format")
    spec = _obj(response_format.get("json_schema"))
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        name = JSON_TOOL
    schema = _obj(spec.get("schema")) or {"type": "object"}
    if schema.get("type") == "object":
        return JsonMode(name, False), schema
    return JsonMode(name, True), {"type": "object", "properties": {"value": schema}, "required": ["value"]}


# =============================================================================================
# Provider direction: Anthropic answer -> OpenAI
# =============================================================================================


def from_anthropic(
    data: dict[str, Any], alias: str, json_mode: JsonMode | None = None
) -> tuple[dict[str, Any], Usage, str]:
    """An Anthropic message as an OpenAI ``chat.completion``; also returns its usage and finish_reason."""
    texts: list[str] = []
    thinking: list[str] = []
    thinking_blocks: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    json_answer: str | None = None
    for block in data.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            tool_input = block.get("input")
            if json_mode is not None and block.get("name") == json_mode.tool:
                if json_mode.wrapped and isinstance(tool_input, dict):
                    tool_input = tool_input.get("value")
                json_answer = orjson.dumps(tool_input).decode()
                continue
            tool_calls.append(
                {
                    "id": block.get("id") or "",
                    "type": "function",
                    "function": {"name": block.get("name") or "", "arguments": orjson.dumps(tool_input or {}).decode()},
                }
            )
        elif kind == "thinking":
            thinking.append(block.get("thinking") or "")
            thinking_blocks.append(block)
        elif kind == "redacted_thinking":
            thinking_blocks.append(block)
    finish = FINISH_REASONS.get(str(data.get("stop_reason")), "stop")
    if json_answer is not None:
        content: str | None = json_answer
        if not tool_calls and finish == "tool_calls":
            finish = "stop"
    elif json_mode is not None:
        content = "".join(texts)
    else:
        content = "".join(texts) if texts or not tool_calls else None
    usage = usage_from_anthropic(data.get("usage"))
    response = chat_completion(
        str(data.get("id") or "msg"),
        alias,
        content=content,
        finish_reason=finish,
        usage=usage,
        tool_calls=tool_calls or None,
        reasoning="".join(thinking) or None,
        thinking_blocks=thinking_blocks or None,
    )
    return response, usage, finish


class AnthropicToOpenAIStream:
    """Anthropic's stream events (parsed JSON) in, OpenAI chunk frames out, one event at a time.

    ``feed`` returns the frame for one event (or None); after ``message_stop``, ``finish`` returns
    the closing frames (usage chunk when asked, ``[DONE]``). Holds only per-block bookkeeping, and
    the open thinking block's text (sent again, whole, with its signature when the block ends).
    """

    __slots__ = (
        "_chars",
        "_json_block",
        "_json_buffer",
        "_output_counted",
        "_thinking",
        "_thinking_block",
        "_tools",
        "_writer",
        "alias",
        "finish_reason",
        "include_usage",
        "json_mode",
        "model",
        "stopped",
        "usage",
    )

    def __init__(self, alias: str, *, include_usage: bool, json_mode: JsonMode | None = None) -> None:
        self.alias = alias
        self.include_usage = include_usage
        self.json_mode = json_mode
        self._writer: ChunkWriter | None = None
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._json_block = -1
        self._json_buffer: list[str] | None = None
        self._thinking_block = -1  # index of the open thinking / redacted_thinking block
        self._thinking: dict[str, Any] = {}  # that block as it builds up (its text as a list of pieces)
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.model: str | None = None
        self.stopped = False
        self._chars = 0  # text, tool arguments and thinking received, for a stream that ends early
        self._output_counted = False  # message_delta brought the real output count

    def usage_so_far(self) -> Usage:
        """What to bill: the upstream's own count once message_delta brought it; for a stream that
        ended before (cut, client gone, stopped by a watcher), the output estimated from the text
        received (message_start only carries a placeholder output count), marked estimated."""
        usage = self.usage
        if self._output_counted:
            return usage
        return Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=max(usage.completion_tokens, estimate_tokens(self._chars)),
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            estimated=True,
        )

    def feed(self, event: dict[str, Any]) -> bytes | None:
        kind = event.get("type")
        writer = self._writer
        if kind == "content_block_delta" and writer is not None:
            delta = event["delta"]
            dtype = delta.get("type")
            if dtype == "text_delta":
                self._chars += len(delta["text"])
                return None if self.json_mode is not None else writer.content(delta["text"])
            if dtype == "input_json_delta":
                fragment = delta.get("partial_json") or ""
                self._chars += len(fragment)
                index = event["index"]
                if index == self._json_block:
                    if self._json_buffer is not None:
                        self._json_buffer.append(fragment)
                        return None
                    return writer.content(fragment) if fragment else None
                tool = self._tools.get(index)
                if tool is None or not fragment:
                    return None
                return writer.tool_call_arguments(tool, fragment)
            if dtype == "thinking_delta":
                thinking = delta.get("thinking") or ""
                self._chars += len(thinking)
                if event["index"] == self._thinking_block:
                    self._thinking["thinking"].append(thinking)
                return writer.reasoning(thinking)
            if dtype == "signature_delta":
                if event["index"] == self._thinking_block:
                    self._thinking["signature"] = delta.get("signature") or ""
                return None
            return None  # citations_delta
        if kind == "content_block_start" and writer is not None:
            block = event["content_block"]
            btype = block.get("type")
            if btype == "tool_use":
                if self.json_mode is not None and block.get("name") == self.json_mode.tool:
                    self._json_block = event["index"]
                    if self.json_mode.wrapped:
                        self._json_buffer = []
                    return None
                tool = self._tools[event["index"]] = len(self._tools)
                start = writer.tool_call_start(tool, str(block.get("id") or ""), str(block.get("name") or ""))
                initial = block.get("input")
                if initial:  # a block that arrives complete rather than as input_json_delta pieces
                    start += writer.tool_call_arguments(tool, orjson.dumps(initial).decode())
                return start
            if btype == "text" and block.get("text") and self.json_mode is None:
                return writer.content(block["text"])
            if btype == "thinking":
                text = block.get("thinking") or ""
                self._thinking_block = event["index"]
                self._thinking = {**block, "thinking": [text], "signature": block.get("signature") or ""}
                return writer.reasoning(text) if text else None
            if btype == "redacted_thinking":
                self._thinking_block = event["index"]
                self._thinking = block
                return None
            return None
        if kind == "content_block_stop":
            if event.get("index") == self._thinking_block and writer is not None:
                block = self._thinking
                if block.get("type") == "thinking":
                    block = {**block, "thinking": "".join(block["thinking"])}
                self._thinking_block = -1
                self._thinking = {}
                return writer.delta({"thinking_blocks": [block]})
            if event.get("index") == self._json_block and self._json_buffer is not None and writer is not None:
                whole = "".join(self._json_buffer)
                self._json_buffer = None
                try:
                    value = orjson.loads(whole or "{}")
                    whole = orjson.dumps(value.get("value") if isinstance(value, dict) else value).decode()
                except orjson.JSONDecodeError:
                    pass
                return writer.content(whole)
            return None
        if kind == "message_start":
            message = event.get("message") or {}
            self.model = message.get("model")
            self.usage = usage_from_anthropic(message.get("usage"))
            self._writer = ChunkWriter(str(message.get("id") or "msg"), self.alias, int(time.time()))
            return self._writer.role()
        if kind == "message_delta":
            delta = event.get("delta") or {}
            usage = event.get("usage")
            if usage:
                self._update_usage(usage)
            reason = delta.get("stop_reason")
            if reason and writer is not None:
                finish = FINISH_REASONS.get(reason, "stop")
                if finish == "tool_calls" and not self._tools:
                    finish = "stop"  # only the JSON-mode tool was called
                self.finish_reason = finish
                return writer.finish(finish)
            return None
        if kind == "message_stop":
            self.stopped = True
            return None
        if kind == "content_block_delta" or kind == "content_block_start":
            raise ValueError(f"{kind} before message_start")
        return None  # ping and event types added later

    def _update_usage(self, usage: dict[str, Any]) -> None:
        current = self.usage
        if usage.get("output_tokens") is not None:
            current.completion_tokens = int(usage["output_tokens"])
            self._output_counted = True
        if any(usage.get(k) is not None for k in ("input_tokens", "cache_read_input_tokens")):
            fresh = usage_from_anthropic({**usage, "output_tokens": current.completion_tokens})
            current.prompt_tokens, current.cached_tokens = fresh.prompt_tokens, fresh.cached_tokens
        details = usage.get("output_tokens_details")
        if isinstance(details, dict) and details.get("thinking_tokens") is not None:
            current.reasoning_tokens = int(details["thinking_tokens"])

    def finish(self) -> list[bytes]:
        """The closing frames: a finish_reason if message_delta carried none, usage if asked, [DONE]."""
        frames: list[bytes] = []
        if self._writer is not None and self.finish_reason is None:
            self.finish_reason = "stop"
            frames.append(self._writer.finish("stop"))
        if self.include_usage and self._writer is not None:
            frames.append(self._writer.usage(self.usage))
        frames.append(b"data: [DONE]\n\n")
        return frames


# =============================================================================================
# Ingress direction: Anthropic request -> OpenAI request
# =============================================================================================


def anthropic_to_openai(
    body: dict[str, Any], *, require_max_tokens: bool = True, state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request. Raises InvalidRequestError naming the param.

    ``state`` (the request's ``ctx.state``) receives what has no place in an OpenAI body: the
    request's ``thinking`` object under :data:`THINKING_STATE`, and ``True`` under
    :data:`THINKING_BLOCKS_STATE` when an assistant message got ``thinking_blocks``.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model: Field required", param="model")
    max_tokens = body.get("max_tokens")
    if require_max_tokens and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise InvalidRequestError(
            "max_tokens: Field required (an integer of at least 1)"
            if max_tokens is None
            else "max_tokens: must be an integer of at least 1",
            param="max_tokens",
        )
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise InvalidRequestError("messages: Field required (an array)", param="messages")

    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str):
        if system:
            messages.append({"role": "system", "content": system})
    elif isinstance(system, list):
        parts = [_text_part(block, f"system[{i}]") for i, block in enumerate(system)]
        if parts:
            messages.append({"role": "system", "content": parts})
    elif system is not None:
        raise InvalidRequestError("system: must be a string or an array of text blocks", param="system")

    for i, message in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{where}: must be an object", param=where)
        role = message.get("role")
        content = message.get("content")
        if role not in ("user", "assistant"):
            raise InvalidRequestError(f"{where}.role: must be 'user' or 'assistant'", param=f"{where}.role")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(f"{where}.content: must be a string or an array", param=f"{where}.content")
        if role == "assistant":
            assistant = _assistant_message(content, where)
            if state is not None and "thinking_blocks" in assistant:
                state[THINKING_BLOCKS_STATE] = True
            messages.append(assistant)
        else:
            messages.extend(_user_messages(content, where))

    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
            raise InvalidRequestError("thinking: must be an object with a 'type'", param="thinking")
        if state is not None:
            state[THINKING_STATE] = thinking  # not in the OpenAI body: only the anthropic provider reads it

    out: dict[str, Any] = {"model": model, "messages": messages}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    stop = body.get("stop_sequences")
    if stop:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError("stop_sequences: must be an array of strings", param="stop_sequences")
        if len(stop) > 4:
            raise InvalidRequestError(
                "stop_sequences: the gateway passes at most 4 stop sequences", param="stop_sequences"
            )
        out["stop"] = stop
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    output_format = _obj(body.get("output_config")).get("format")
    if output_format is not None:
        schema = _obj(output_format).get("schema")
        if _obj(output_format).get("type") != "json_schema" or not isinstance(schema, dict):
            raise InvalidRequestError(
                'output_config.format: must be {"type": "json_schema", "schema": {...}}',
                param="output_config.format",
            )
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}

    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise InvalidRequestError("tools: must be an array", param="tools")
        out["tools"] = [_openai_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and tools:
        kind = choice.get("type")
        if kind == "auto":
            out["tool_choice"] = "auto"
        elif kind == "any":
            out["tool_choice"] = "required"
        elif kind == "none":
            out["tool_choice"] = "none"
        elif kind == "tool" and isinstance(choice.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            raise InvalidRequestError("tool_choice: must be auto, any, none or tool (with a name)", param="tool_choice")
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    return out


def _text_part(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise InvalidRequestError(f"{where}: must be a text block", param=where)
    part: dict[str, Any] = {"type": "text", "text": block["text"]}
    if block.get("cache_control"):
        part["cache_control"] = block["cache_control"]
    return part


def _openai_image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = _obj(block.get("source"))
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise InvalidRequestError(f"{where}.source: must be a base64 or url source", param=f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _user_messages(content: list[Any], where: str) -> list[dict[str, Any]]:
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    tool_images: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(_text_part(block, param))
        elif kind == "image":
            parts.append(_openai_image(block, param))
        elif kind == "document":
            source = block.get("source") or {}
            if source.get("type") != "base64" or source.get("media_type") != "application/pdf":
                raise InvalidRequestError(f"{param}: only base64 PDF documents are supported", param=param)
            file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{source.get('data')}"}
            if isinstance(block.get("title"), str):
                file["filename"] = block["title"]
            parts.append({"type": "file", "file": file})
        elif kind == "tool_result":
            texts: list[str] = []
            result = block.get("content")
            if isinstance(result, str):
                texts.append(result)
            elif isinstance(result, list):
                for k, item in enumerate(result):
                    if isinstance(item, dict) and item.get("type") == "image":
                        tool_images.append(_openai_image(item, f"{param}.content[{k}]"))
                    else:
                        texts.append(_text_part(item, f"{param}.content[{k}]")["text"])
            text = "\n".join(texts)
            if block.get("is_error"):
                text = f"Error: {text}"
            tool_messages.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""), "content": text})
        else:
            raise InvalidRequestError(f"{param}: block type {kind!r} is not supported here", param=param)
    out = tool_messages
    parts = tool_images + parts
    if parts:
        only_text = all(p["type"] == "text" and len(p) == 2 for p in parts)
        out.append(
            {"role": "user", "content": "".join(p["text"] for p in parts) if only_text and len(parts) == 1 else parts}
        )
    return out


def _assistant_message(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    thinking_blocks: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_part(block, param)["text"])
        elif kind == "tool_use":
            assert isinstance(block, dict)
            tool_calls.append(
                {
                    "id": str(block.get("id") or ""),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name") or ""),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            assert isinstance(block, dict)
            thinking_blocks.append(block)  # for the anthropic provider; stripped for the others
        else:
            raise InvalidRequestError(f"{param}: block type {kind!r} is not supported here", param=param)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    elif message["content"] is None:
        message["content"] = ""
    if thinking_blocks:
        message["thinking_blocks"] = thinking_blocks
    return message


def _openai_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise InvalidRequestError(f"{where}.name: Field required", param=f"{where}.name")
    if tool.get("type") not in (None, "custom"):
        raise InvalidRequestError(
            f"{where}: server tool {tool.get('type')!r} is not supported by the gateway", param=f"{where}.type"
        )
    function: dict[str, Any] = {
        "name": tool["name"],
        "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
    }
    if tool.get("description"):
        function["description"] = tool["description"]
    out: dict[str, Any] = {"type": "function", "function": function}
    if tool.get("cache_control"):
        out["cache_control"] = tool["cache_control"]
    return out


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """A rough count for an OpenAI body: messages plus tool definitions (about four characters a token)."""
    size = len(orjson.dumps(body.get("messages") or []))
    if body.get("tools"):
        size += len(orjson.dumps(body["tools"]))
    return estimate_tokens(size)


# =============================================================================================
# Ingress direction: OpenAI answer -> Anthropic
# =============================================================================================


def message_id(request_id: str, upstream_id: Any) -> str:
    if isinstance(upstream_id, str) and upstream_id.startswith("msg_"):
        return upstream_id
    return f"msg_{request_id}"


def _tool_input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


def openai_to_anthropic(response: dict[str, Any], *, request_id: str, model: str) -> dict[str, Any]:
    """A complete OpenAI ``chat.completion`` as an Anthropic message (first choice)."""
    choices = response.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    thinking_blocks = message.get("thinking_blocks")
    if thinking_blocks and isinstance(thinking_blocks, list):
        content.extend(
            block
            for block in thinking_blocks
            if isinstance(block, dict) and block.get("type") in ("thinking", "redacted_thinking")
        )
    else:
        reasoning = message.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            # no signature: not from Anthropic (the anthropic provider drops it if it comes back)
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for tool_call in message.get("tool_calls") or ():
        function = tool_call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": str(tool_call.get("id") or ""),
                "name": str(function.get("name") or ""),
                "input": _tool_input(function.get("arguments")),
            }
        )
    if not content:
        content.append({"type": "text", "text": ""})
    usage = Usage.from_openai(response.get("usage"))
    return {
        "id": message_id(request_id, response.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(choice.get("finish_reason"), bool(message.get("tool_calls"))),
        "stop_sequence": None,
        "usage": usage_to_anthropic(usage),
    }


def _stop_reason(finish_reason: Any, has_tool_calls: bool) -> str:
    """Anthropic's stop_reason; ``tool_use`` whenever tools were called and nothing else stopped the
    answer (some OpenAI-compatible servers say "stop" there, and agent loops look for tool_use)."""
    reason = STOP_REASONS.get(str(finish_reason), "end_turn")
    return "tool_use" if has_tool_calls and reason == "end_turn" else reason


def _event(name: bytes, payload: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + payload + b"\n\n"


_PING = _event(b"ping", b'{"type":"ping"}')
_MESSAGE_STOP = _event(b"message_stop", b'{"type":"message_stop"}')


class OpenAIToAnthropicStream:
    """OpenAI chunks (parsed JSON) in, Anthropic's named events out.

    Blocks are opened and closed in the order their deltas come (thinking, text, each tool call),
    with ``index`` counting from 0 as Anthropic does: ``reasoning_content`` deltas open a thinking
    block (``thinking_delta`` events); a ``thinking_blocks`` delta (the anthropic provider's, when a
    block ended) sends the thinking block's signature as ``signature_delta`` and closes it, or is a
    ``redacted_thinking`` block of its own. ``[DONE]`` becomes ``message_delta`` (stop reason and
    usage) and ``message_stop``.
    """

    __slots__ = (
        "_block",
        "_block_kind",
        "_delta_head",
        "_last_id",
        "_last_tool",
        "_started",
        "_text_prefix",
        "_thinking_prefix",
        "_tool_blocks",
        "_tool_prefix",
        "estimated_input",
        "finish_reason",
        "message_id",
        "model",
        "text_chars",
        "usage",
    )

    def __init__(self, message_id: str, model: str, estimated_input: int) -> None:
        self.message_id = message_id
        self.model = model
        self.estimated_input = estimated_input
        self._block = -1  # index of the open block, -1 when none is open
        self._block_kind = ""
        self._started = False
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool index -> Anthropic block index
        self._last_tool = -1
        self._last_id: Any = None
        self._delta_head = b""  # a content_block_delta event for the open block, up to the delta's type
        self._text_prefix = b""
        self._tool_prefix = b""
        self._thinking_prefix = b""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.text_chars = 0

    def start(self) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.estimated_input, "output_tokens": 0},
        }
        return _event(b"message_start", orjson.dumps({"type": "message_start", "message": message})) + _PING

    def _open(self, block: dict[str, Any], kind: str) -> bytes:
        out = self._close()
        self._block += 1
        self._block_kind = kind
        head = self._delta_head = (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
            + str(self._block).encode()
            + b',"delta":{"type":'
        )
        if kind == "text":
            self._text_prefix = head + b'"text_delta","text":'
        elif kind == "tool":
            self._tool_prefix = head + b'"input_json_delta","partial_json":'
        elif kind == "thinking":
            self._thinking_prefix = head + b'"thinking_delta","thinking":'
        payload = {"type": "content_block_start", "index": self._block, "content_block": block}
        return out + _event(b"content_block_start", orjson.dumps(payload))

    def _close(self) -> bytes:
        if not self._block_kind:
            return b""
        self._block_kind = ""
        return _event(
            b"content_block_stop", b'{"type":"content_block_stop","index":' + str(self._block).encode() + b"}"
        )

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out = b""
        usage = chunk.get("usage")
        if usage:
            self.usage = Usage.from_openai(usage)
        choices = chunk.get("choices")
        if not choices:
            return out
        choice = choices[0]
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content")
        if reasoning:
            out += self._thinking_text(reasoning)
        thinking_blocks = delta.get("thinking_blocks")
        if thinking_blocks:
            out += self._thinking_blocks(thinking_blocks)
        text = delta.get("content")
        if text:
            if self._block_kind != "text":
                out += self._open({"type": "text", "text": ""}, "text")
            self.text_chars += len(text)
            out += self._text_prefix + orjson.dumps(text) + b"}}\n\n"
        for tool_call in delta.get("tool_calls") or ():
            position = tool_call.get("index")
            call_id = tool_call.get("id")
            if not isinstance(position, int):  # servers that omit the index: a new id starts a new call
                position = self._last_tool + 1 if call_id and call_id != self._last_id else max(self._last_tool, 0)
            function = tool_call.get("function") or {}
            if position not in self._tool_blocks:
                name = str(function.get("name") or "")
                block: dict[str, Any] = {"type": "tool_use", "id": str(call_id or ""), "name": name, "input": {}}
                out += self._open(block, "tool")
                self._tool_blocks[position] = self._block
            self._last_tool = position
            if call_id:
                self._last_id = call_id
            arguments = function.get("arguments")
            if arguments:
                self.text_chars += len(arguments)
                block_index = self._tool_blocks[position]
                prefix = (
                    self._tool_prefix
                    if block_index == self._block
                    else (
                        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                        + str(block_index).encode()
                        + b',"delta":{"type":"input_json_delta","partial_json":'
                    )
                )
                out += prefix + orjson.dumps(arguments) + b"}}\n\n"
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return out

    def _thinking_text(self, text: str) -> bytes:
        out = b""
        if self._block_kind != "thinking":
            out = self._open({"type": "thinking", "thinking": "", "signature": ""}, "thinking")
        self.text_chars += len(text)
        return out + self._thinking_prefix + orjson.dumps(text) + b"}}\n\n"

    def _thinking_blocks(self, blocks: Any) -> bytes:
        """Complete thinking blocks: a thinking block's signature ends the open thinking block (one
        is opened, with the block's text, when its text did not come as ``reasoning_content``)."""
        out = b""
        for block in blocks if isinstance(blocks, list) else ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "thinking":
                if self._block_kind != "thinking":
                    text = block.get("thinking")
                    out += self._open({"type": "thinking", "thinking": "", "signature": ""}, "thinking")
                    if isinstance(text, str) and text:
                        out += self._thinking_text(text)
                signature = block.get("signature")
                if isinstance(signature, str) and signature:
                    out += self._delta_head + b'"signature_delta","signature":' + orjson.dumps(signature) + b"}}\n\n"
                out += self._close()
            elif kind == "redacted_thinking":
                out += self._open({"type": "redacted_thinking", "data": str(block.get("data") or "")}, "redacted")
                out += self._close()
        return out

    def finish(self) -> bytes:
        out = self._close()
        usage = self.usage or Usage(
            prompt_tokens=self.estimated_input, completion_tokens=estimate_tokens(self.text_chars), estimated=True
        )
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(self.finish_reason, bool(self._tool_blocks)), "stop_sequence": None},
            "usage": usage_to_anthropic(usage),
        }
        return out + _event(b"message_delta", orjson.dumps(delta)) + _MESSAGE_STOP
