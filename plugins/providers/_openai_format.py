"""Helpers for providers that translate another wire format into OpenAI chat completions.

:class:`ChunkWriter` writes ``chat.completion.chunk`` SSE frames for one stream. The part of every
frame that never changes (id, object, created, model) is encoded once, so a text delta costs one
``orjson.dumps`` of the text and a few byte concatenations. :func:`chat_completion` builds a complete
(non-streamed) answer.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from llmgateway.core.errors import InvalidRequestError
from llmgateway.core.types import Usage

_NULL_FINISH = b'},"finish_reason":null}]}\n\n'

#: ``ctx.state`` key an ingress sets (True) when its OpenAI body carries ``thinking_blocks`` in
#: assistant messages (the Anthropic ingress, from thinking blocks in the history). Only the
#: ``anthropic`` provider reads that field; OpenAI-format providers strip it when this key is set
#: (:func:`strip_thinking_blocks`), so no request pays for looking through its messages otherwise.
THINKING_BLOCKS_STATE = "anthropic.thinking_blocks"


class ChunkWriter:
    """OpenAI chat-completion chunk frames (``b"data: {...}\\n\\n"``) for one streamed answer."""

    __slots__ = ("_head", "_prefix")

    def __init__(self, id: str, model: str, created: int | None = None, *, index: int = 0) -> None:
        created = int(time.time()) if created is None else created
        self._head = (
            b'data: {"id":'
            + orjson.dumps(id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
        )
        # ``index``: the choice these frames belong to (one writer per choice when n > 1)
        self._prefix = self._head + b',"choices":[{"index":' + str(index).encode() + b',"delta":'

    def role(self) -> bytes:
        """The first frame: the assistant role with empty content."""
        return self._prefix + b'{"role":"assistant","content":""' + _NULL_FINISH

    def content(self, text: str, logprobs: dict[str, Any] | None = None) -> bytes:
        """A piece of the answer; ``logprobs`` (OpenAI's choice ``logprobs``, ``{"content": [...]}``)
        for the tokens of this piece when the client asked for them."""
        if logprobs is not None:
            return (
                self._prefix
                + b'{"content":'
                + orjson.dumps(text)
                + b'},"logprobs":'
                + orjson.dumps(logprobs)
                + b',"finish_reason":null}]}\n\n'
            )
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
    thinking_blocks: list[dict[str, Any]] | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A complete OpenAI ``chat.completion`` with one choice.

    ``tool_calls`` are ``{"id", "type": "function", "function": {"name", "arguments"}}`` with
    ``arguments`` a JSON string. ``reasoning`` goes out as ``reasoning_content``; ``thinking_blocks``
    (Anthropic's thinking blocks with their signatures, the field LiteLLM uses) as they are.
    """
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning:
        message["reasoning_content"] = reasoning
    if thinking_blocks:
        message["thinking_blocks"] = thinking_blocks
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


def logprob_entry(token: str, logprob: float, top: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One entry of OpenAI's ``logprobs.content``: the token, its log probability, its UTF-8 bytes and,
    when given, its ``top_logprobs`` (an entry of ``top_logprobs`` itself has none)."""
    entry: dict[str, Any] = {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    if top is not None:
        entry["top_logprobs"] = top
    return entry


def strip_thinking_blocks(body: dict[str, Any]) -> None:
    """Remove ``thinking_blocks`` from the body's messages (for upstreams that would refuse the
    field). The messages list is replaced, not edited: it is shared with the request's own body,
    which a fallback to an ``anthropic`` deployment still needs whole."""
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [
            {k: v for k, v in m.items() if k != "thinking_blocks"}
            if isinstance(m, dict) and "thinking_blocks" in m
            else m
            for m in messages
        ]


# ---- reading OpenAI requests, writing embeddings (added for the gemini / cohere providers) ------


def new_tool_call_id() -> str:
    """``call_`` plus 24 hex characters: an id for a tool call the upstream did not name."""
    return "call_" + uuid.uuid4().hex[:24]


def text_of(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string, or the joined text of its text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(mime type, base64 data) of a ``data:<mime>;base64,<data>`` URL; None for any other URL."""
    if not url.startswith("data:"):
        return None
    header, sep, data = url[5:].partition(",")
    mime, _, encoding = header.partition(";")
    if not sep or encoding.lower() != "base64":
        raise InvalidRequestError("Only base64 data: URLs are supported (data:<mime>;base64,<data>)", param="messages")
    return (mime or "application/octet-stream"), data


def stop_sequences(body: dict[str, Any]) -> list[str] | None:
    """``stop`` as a list (OpenAI accepts a string or a list)."""
    stop = body.get("stop")
    if stop is None:
        return None
    return [stop] if isinstance(stop, str) else [str(s) for s in stop]


def max_output_tokens(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` (the current name), else ``max_tokens``."""
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    return int(value) if value is not None else None


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    """The texts of an embeddings request; token-id inputs are refused (400 naming ``input``)."""
    raw = body.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        return list(raw)
    if isinstance(raw, list) and raw:
        raise InvalidRequestError("This provider takes 'input' as text, not token ids", param="input")
    raise InvalidRequestError("'input' must be a non-empty string or list of strings", param="input")


def encode_embedding(vector: Sequence[float], encoding_format: str | None) -> list[float] | str:
    """``float``: the list; ``base64``: little-endian float32 bytes, base64-encoded (as OpenAI sends)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)


def embeddings_response(embeddings: Sequence[list[float] | str], model: str, usage: Usage) -> dict[str, Any]:
    """An OpenAI ``list`` of ``embedding`` objects, in input order."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(embeddings)],
        "model": model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    }
