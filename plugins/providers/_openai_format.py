"""Helpers for providers that translate another wire format into OpenAI chat completions.

:class:`ChunkWriter` writes ``chat.completion.chunk`` SSE frames for one stream. The part of every
frame that never changes (id, object, created, model) is encoded once, so a text delta costs one
``orjson.dumps`` of the text and a few byte concatenations. :func:`chat_completion` builds a complete
(non-streamed) answer.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from llmgateway.core.types import Usage

_NULL_FINISH = b'},"finish_reason":null}]}\n\n'


class ChunkWriter:
    """OpenAI chat-completion chunk frames (``b"data: {...}\\n\\n"``) for one streamed answer."""

    __slots__ = ("_head", "_prefix")

    def __init__(self, id: str, model: str, created: int | None = None) -> None:
        created = int(time.time()) if created is None else created
        self._head = (
            b'data: {"id":'
            + orjson.dumps(id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
        )
        self._prefix = self._head + b',"choices":[{"index":0,"delta":'

    def role(self) -> bytes:
        """The first frame: the assistant role with empty content."""
        return self._prefix + b'{"role":"assistant","content":""' + _NULL_FINISH

    def content(self, text: str) -> bytes:
        return self._prefix + b'{"content":' + orjson.dumps(text) + _NULL_FINISH

    def reasoning(self, text: str) -> bytes:
        """Reasoning / thinking text, as ``delta.reasoning_content`` (the de-facto extension)."""
        return self._prefix + b'{"reasoning_content":' + orjson.dumps(text) + _NULL_FINISH

    def tool_call_start(self, index: int, id: str, name: str, arguments: str = "") -> bytes:
        """A tool call's first delta: its id and name (sent once), optionally the first arguments."""
        call = {"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": arguments}}
        return self._prefix + b'{"tool_calls":[' + orjson.dumps(call) + b"]" + _NULL_FINISH

    def tool_call_arguments(self, index: int, fragment: str) -> bytes:
        """A fragment of a tool call's JSON arguments."""
        return (
            self._prefix
            + b'{"tool_calls":[{"index":'
            + str(index).encode()
            + b',"function":{"arguments":'
            + orjson.dumps(fragment)
            + b"}}]"
            + _NULL_FINISH
        )

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        """Any delta object (for fields the other methods do not cover)."""
        return self._prefix + orjson.dumps(delta) + b',"finish_reason":' + orjson.dumps(finish_reason) + b"}]}\n\n"

    def finish(self, reason: str) -> bytes:
        """The frame carrying ``finish_reason`` (empty delta)."""
        return self._prefix + b'{},"finish_reason":' + orjson.dumps(reason) + b"}]}\n\n"

    def usage(self, usage: Usage) -> bytes:
        """The extra final frame with empty ``choices`` sent when ``stream_options.include_usage``."""
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage.as_openai()) + b"}\n\n"


def chat_completion(
    id: str,
    model: str,
    *,
    content: str | None,
    finish_reason: str | None,
    usage: Usage | None,
    tool_calls: list[dict[str, Any]] | None = None,
    reasoning: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A complete OpenAI ``chat.completion`` with one choice.

    ``tool_calls`` are ``{"id", "type": "function", "function": {"name", "arguments"}}`` with
    ``arguments`` a JSON string.
    """
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning:
        message["reasoning_content"] = reasoning
    out: dict[str, Any] = {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        out["usage"] = usage.as_openai()
    return out
