"""Checks on incoming OpenAI-format bodies: every wrong or missing field is a 400 naming its ``param``.

Only the shape is checked here (types, required fields, ranges OpenAI documents); whether a
provider can honour a parameter is the provider's call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import InvalidRequestError
from .types import Endpoint


def _number(lo: float | None = None, hi: float | None = None) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(f"'{name}' must be a number, not {_kind(value)}", param=name)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise InvalidRequestError(f"'{name}' must be between {lo} and {hi}, not {value}", param=name)

    return check


def _integer(lo: int | None = None) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(f"'{name}' must be an integer, not {_kind(value)}", param=name)
        if lo is not None and value < lo:
            raise InvalidRequestError(f"'{name}' must be at least {lo}, not {value}", param=name)

    return check


def _of(*types: type, what: str) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) and bool not in types:
            raise InvalidRequestError(f"'{name}' must be {what}, not a boolean", param=name)
        if not isinstance(value, types):
            raise InvalidRequestError(f"'{name}' must be {what}, not {_kind(value)}", param=name)

    return check


def _stop(name: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and len(value) <= 4:
        return
    raise InvalidRequestError(f"'{name}' must be a string or a list of up to 4 strings", param=name)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


_COMMON: dict[str, Callable[[str, Any], None]] = {
    "stream": _of(bool, what="a boolean"),
    "stream_options": _of(dict, type(None), what="an object"),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "n": _integer(1),
    "max_tokens": _integer(1),
    "max_completion_tokens": _integer(1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "seed": _integer(),
    "stop": _stop,
    "user": _of(str, what="a string"),
    "logit_bias": _of(dict, type(None), what="an object"),
    "metadata": _of(dict, type(None), what="an object"),
}

_CHAT: dict[str, Callable[[str, Any], None]] = {
    **_COMMON,
    "tools": _of(list, type(None), what="an array"),
    "tool_choice": _of(str, dict, type(None), what="a string or an object"),
    "parallel_tool_calls": _of(bool, type(None), what="a boolean"),
    "response_format": _of(dict, type(None), what="an object"),
    "logprobs": _of(bool, type(None), what="a boolean"),
    "top_logprobs": _integer(0),
}

_EMBEDDINGS: dict[str, Callable[[str, Any], None]] = {
    "encoding_format": _of(str, what="a string"),
    "dimensions": _integer(1),
    "user": _of(str, what="a string"),
}

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def validate(endpoint: Endpoint, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' must be a non-empty string", param="model")
    if endpoint == "chat.completions":
        _messages(body.get("messages"))
        checks = _CHAT
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise InvalidRequestError("'prompt' is required", param="prompt")
        if not isinstance(prompt, (str, list)):
            raise InvalidRequestError("'prompt' must be a string or an array", param="prompt")
        checks = _COMMON
    else:
        value = body.get("input")
        if value is None:
            raise InvalidRequestError("'input' is required", param="input")
        if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
            raise InvalidRequestError("'input' must be a string or a non-empty array", param="input")
        if body.get("encoding_format", "float") not in ("float", "base64"):
            raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        checks = _EMBEDDINGS
    for name, value in body.items():  # bodies carry a few fields; the tables list many
        if value is not None:
            check = checks.get(name)
            if check is not None:
                check(name, value)
    tools = body.get("tools")
    if tools:
        for i, tool in enumerate(tools):
            if (
                not isinstance(tool, dict)
                or tool.get("type") != "function"
                or not isinstance(tool.get("function"), dict)
            ):
                raise InvalidRequestError(
                    'each tool must be {"type": "function", "function": {...}}', param=f"tools[{i}]"
                )
            if not isinstance(tool["function"].get("name"), str):
                raise InvalidRequestError("a tool's function needs a 'name'", param=f"tools[{i}].function.name")


def _messages(messages: Any) -> None:
    if messages is None:
        raise InvalidRequestError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequestError(
                f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}", param=f"messages[{i}].role"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequestError(
                f"'messages[{i}].content' must be a string or an array of content parts",
                param=f"messages[{i}].content",
            )
        if content is None and role in ("user", "system", "developer"):
            raise InvalidRequestError(f"'messages[{i}].content' is required", param=f"messages[{i}].content")
