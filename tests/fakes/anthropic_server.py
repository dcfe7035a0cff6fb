"""A fake Anthropic API server speaking the real wire format of the Messages API: ``POST /v1/messages``
and ``POST /v1/messages/count_tokens``, the ``x-api-key`` and ``anthropic-version`` headers, error
bodies ``{"type": "error", "error": {"type", "message"}, "request_id"}`` with Anthropic's statuses
(529 overloaded included), ``anthropic-ratelimit-*`` and ``request-id`` headers, and streams of
named SSE events exactly as documented (message_start, content_block_start / delta / stop with
text_delta, input_json_delta, thinking_delta and signature_delta, redacted_thinking blocks whole in
their content_block_start, ping, message_delta, message_stop, error).

It also checks what the real API checks and a translator can get wrong: required ``model`` /
``max_tokens`` / ``messages``, roles limited to user / assistant (``system`` is top-level), no empty
text blocks, temperature ≤ 1, ``tool_choice`` only with tools, object ``input_schema``, and that each
``tool_use`` is answered by a ``tool_result`` in the next user turn (and no result without its use).
Extended thinking: a ``thinking`` object of type enabled (``budget_tokens`` ≥ 1024 and below
``max_tokens``), disabled or adaptive; with thinking on, temperature other than 1, ``top_k`` and a
forced ``tool_choice`` are refused, and an assistant turn answered by tool results must start with
its thinking blocks; thinking blocks sent back must carry a signature this fake issued for exactly
that text (:data:`SIGNATURES`), redacted ones data it issued.

Behaviour is scripted by model name:

* ``claude-ok`` (or anything unlisted): a text answer (:data:`ANSWER`), ``end_turn``.
* ``cached``: like claude-ok, with cache reads and writes in the usage.
* ``tools``: a text block, then a ``get_weather`` tool_use (streamed as input_json_delta pieces).
* ``two-tools``: two tool_use blocks (``get_weather`` and ``get_time``).
* a request whose ``tool_choice`` is ``{"type": "tool", "name": X}``: a tool_use of X with
  :data:`FORCED_INPUT` (or ``{"value": [...]}`` when the schema has only a ``value`` property).
* ``max-tokens``: a cut answer with ``max_tokens``; ``stop-seq``: ``stop_sequence`` (the first one sent).
* ``thinking``: a thinking block (with signature) before the text.
* ``thinking-tools``: a thinking block, a redacted_thinking block, a text block and a
  ``get_weather`` tool_use (:data:`THINKING_TOOL_BLOCKS`).
* ``status-<code>``: that status with Anthropic's error body (429 carries ``retry-after: 7``; 529 is
  ``overloaded_error``).
* ``mid-error``: a stream that sends an ``overloaded_error`` event after its first text delta.
* ``cut``: a stream that ends after its first text delta, without message_stop.

Every request is recorded in ``FakeAnthropic.requests`` (path, headers, body).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Send

from tests.fakes.asgi import FakeServer, Request, end_body, send_event, send_json, start_sse
from tests.fakes.asgi import Recorded as Recorded

API_KEY = "sk-ant-upstream-test"
ANSWER = "The quick brown fox jumps over the lazy dog."
TOOL_INPUT = {"city": "Paris", "unit": "c"}
TOOL_INPUT_PIECES = ["", '{"city"', ': "Par', 'is", "unit"', ': "c"}']
FORCED_INPUT = {"city": "Paris", "population": 2102650}
THINKING = {"type": "thinking", "thinking": "The user wants a pangram.", "signature": "sig_fake"}
TOOL_THINKING = {
    "type": "thinking",
    "thinking": "The user asks for the weather in Paris: get_weather answers that.",
    "signature": "EqQBCkgIARABGAIiQFake+Signature/For+The/Weather==",
}
REDACTED = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aFakeRedactedThinking=="}
THINKING_TOOL_BLOCKS: list[dict[str, Any]] = [
    TOOL_THINKING,
    REDACTED,
    {"type": "text", "text": "Let me check the weather."},
    {"type": "tool_use", "id": "toolu_01T", "name": "get_weather", "input": TOOL_INPUT},
]
#: signature -> the thinking text it was issued for (what the real API verifies cryptographically)
SIGNATURES = {block["signature"]: block["thinking"] for block in (THINKING, TOOL_THINKING)}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ERROR_MESSAGES = {
    400: "prompt is too long: 210000 tokens > 200000 maximum",
    401: "invalid x-api-key",
    403: "Your API key does not have permission to use the specified resource.",
    404: "model: not-a-model",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "Number of request tokens has exceeded your per-minute rate limit",
    500: "Internal server error",
    529: "Overloaded",
}


class Invalid(Exception):
    pass


@dataclass
class FakeAnthropic(FakeServer):
    counter: int = 0

    @property
    def last(self) -> dict[str, Any]:
        body: dict[str, Any] = self.requests[-1].body
        return body

    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        self.counter += 1
        headers = request.headers
        path = request.path
        if request.method != "POST" or path not in ("/v1/messages", "/v1/messages/count_tokens"):
            await self._error(send, 404, "not_found_error", f"Not found: {request.method} {path}")
            return
        try:
            body = request.json() if request.raw else None  # an empty body is invalid here, not {}
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            await self._error(
                send, 400, "invalid_request_error", "There was an issue with the request body: invalid JSON"
            )
            return
        self.record(request, body)
        if headers.get("x-api-key") != API_KEY and headers.get("authorization") != f"Bearer {API_KEY}":
            await self._error(send, 401, "authentication_error", "invalid x-api-key")
            return
        if not headers.get("anthropic-version"):
            await self._error(send, 400, "invalid_request_error", "anthropic-version: header is required")
            return
        try:
            _validate(body, count_tokens=path.endswith("/count_tokens"))
        except Invalid as exc:
            await self._error(send, 400, "invalid_request_error", str(exc))
            return
        if path.endswith("/count_tokens"):
            size = len(orjson.dumps([body.get("system"), body["messages"], body.get("tools")]))
            await self._json(send, 200, {"input_tokens": max(1, size // 4)})
            return
        model = str(body["model"])
        if model.startswith("status-"):
            status = int(model.split("-")[1])
            extra: list[tuple[bytes, bytes]] = []
            if status == 429:
                extra = [
                    (b"retry-after", b"7"),
                    (b"anthropic-ratelimit-requests-limit", b"50"),
                    (b"anthropic-ratelimit-requests-remaining", b"0"),
                    (b"anthropic-ratelimit-requests-reset", b"2030-01-01T00:00:07Z"),
                ]
            await self._error(
                send,
                status,
                ERROR_TYPES.get(status, "api_error"),
                ERROR_MESSAGES.get(status, f"fake error {status}"),
                extra,
            )
            return
        blocks, stop_reason, stop_sequence, usage = self._answer(model, body)
        if body.get("stream"):
            await self._stream(send, model, blocks, stop_reason, stop_sequence, usage)
            return
        message = {
            "id": f"msg_fake{self.counter:04d}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }
        await self._json(send, 200, message)

    # ---- answers -----------------------------------------------------------------------------

    def _answer(self, model: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None, dict[str, Any]]:
        usage: dict[str, Any] = {
            "input_tokens": 11,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 9,
        }
        choice = body.get("tool_choice") or {}
        if choice.get("type") == "tool":
            tool = next(t for t in body["tools"] if t["name"] == choice["name"])
            properties = tool["input_schema"].get("properties") or {}
            tool_input: Any = {"value": ["Paris", "Lyon"]} if list(properties) == ["value"] else FORCED_INPUT
            block = {"type": "tool_use", "id": "toolu_forced01", "name": choice["name"], "input": tool_input}
            return [block], "tool_use", None, usage
        if model == "tools":
            return (
                [
                    {"type": "text", "text": "Let me check the weather."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": TOOL_INPUT},
                ],
                "tool_use",
                None,
                usage,
            )
        if model == "thinking-tools":
            return [dict(block) for block in THINKING_TOOL_BLOCKS], "tool_use", None, usage
        if model == "two-tools":
            return (
                [
                    {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": TOOL_INPUT},
                    {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {"city": "Paris"}},
                ],
                "tool_use",
                None,
                usage,
            )
        if model == "max-tokens":
            return [{"type": "text", "text": "The quick brown"}], "max_tokens", None, usage
        if model == "stop-seq":
            stop = (body.get("stop_sequences") or ["END"])[0]
            return [{"type": "text", "text": "The quick brown fox"}], "stop_sequence", stop, usage
        if model == "cached":
            usage = {**usage, "input_tokens": 8, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}
        blocks: list[dict[str, Any]] = [{"type": "text", "text": ANSWER}]
        if model == "thinking":
            blocks.insert(0, dict(THINKING))
        return blocks, "end_turn", None, usage

    async def _stream(
        self,
        send: Send,
        model: str,
        blocks: list[dict[str, Any]],
        stop_reason: str,
        stop_sequence: str | None,
        usage: dict[str, Any],
    ) -> None:
        await start_sse(send, [(b"cache-control", b"no-cache"), *self._headers()])

        async def event(name: str, payload: dict[str, Any]) -> None:
            await send_event(send, payload, event=name)

        start_usage = {**usage, "output_tokens": 1}
        message = {
            "id": f"msg_fake{self.counter:04d}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        try:
            await event("message_start", {"type": "message_start", "message": message})
            for index, block in enumerate(blocks):
                kind = block["type"]
                if kind == "text":
                    start: dict[str, Any] = {"type": "text", "text": ""}
                elif kind == "thinking":
                    start = {"type": "thinking", "thinking": "", "signature": ""}
                elif kind == "redacted_thinking":
                    start = block  # arrives whole, without deltas
                else:
                    start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                await event(
                    "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
                )
                if index == 0:
                    await event("ping", {"type": "ping"})
                if kind == "text":
                    words = block["text"].split(" ")
                    for i, word in enumerate(words):
                        text = word if i == 0 else " " + word
                        delta = {"type": "text_delta", "text": text}
                        await event(
                            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                        )
                        if model in ("mid-error", "cut") and i == 0:
                            if model == "mid-error":
                                error = {"type": "overloaded_error", "message": "Overloaded"}
                                await event("error", {"type": "error", "error": error})
                            return
                elif kind == "thinking":
                    delta = {"type": "thinking_delta", "thinking": block["thinking"]}
                    await event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
                    delta = {"type": "signature_delta", "signature": block["signature"]}
                    await event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
                elif kind == "redacted_thinking":
                    pass
                else:
                    pieces = (
                        TOOL_INPUT_PIECES
                        if block["input"] == TOOL_INPUT
                        else ["", orjson.dumps(block["input"]).decode()]
                    )
                    for piece in pieces:
                        delta = {"type": "input_json_delta", "partial_json": piece}
                        await event(
                            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                        )
                await event("content_block_stop", {"type": "content_block_stop", "index": index})
            await event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            )
            await event("message_stop", {"type": "message_stop"})
        finally:
            try:
                await end_body(send)
            except Exception:
                pass

    # ---- plumbing ----------------------------------------------------------------------------

    def _headers(self) -> list[tuple[bytes, bytes]]:
        """The request id and rate limit headers every answer carries."""
        return [
            (b"request-id", f"req_fake{self.counter:04d}".encode()),
            (b"anthropic-ratelimit-requests-limit", b"50"),
            (b"anthropic-ratelimit-requests-remaining", b"49"),
        ]

    async def _json(
        self, send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        headers = dict(self._headers()) | dict(extra or [])  # extra replaces a default in place
        await send_json(send, status, payload, headers.items())

    async def _error(
        self, send: Send, status: int, kind: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        payload = {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": f"req_fake{self.counter:04d}",
        }
        await self._json(send, status, payload, extra)


def _validate(body: dict[str, Any], *, count_tokens: bool) -> None:
    """The checks the real Messages API makes that a translator can trip over."""
    if not isinstance(body.get("model"), str):
        raise Invalid("model: Field required")
    if not count_tokens and not isinstance(body.get("max_tokens"), int):
        raise Invalid("max_tokens: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: Field required")
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        raise Invalid("temperature: Input should be less than or equal to 1")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise Invalid("system: Input should be a valid string or list")
    tools = body.get("tools") or []
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("name"), str) or (tool.get("input_schema") or {}).get("type") != "object":
            raise Invalid(f"tools.{i}.input_schema: Input should be an object schema with a name")
    if body.get("tool_choice") is not None and not tools:
        raise Invalid("tool_choice may only be specified while providing tools.")
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "tool" and choice.get("name") not in {t["name"] for t in tools}:
        raise Invalid(f"tool_choice.name: tool {choice.get('name')!r} not found in tools")
    thinking = _validate_thinking(body, count_tokens=count_tokens)
    if thinking and choice.get("type") in ("any", "tool"):
        raise Invalid("Thinking may not be enabled when tool_choice forces tool use.")
    pending: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise Invalid(
                f'messages.{i}.role: Unexpected role "{role}". The Messages API accepts a top-level `system` '
                'parameter, not "system" as an input message role.'
            )
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise Invalid(f"messages.{i}.content: Input should be a valid list")
        results = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if pending and results != pending:
            raise Invalid(
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                + ", ".join(sorted(pending - results))
            )
        if results - pending:
            raise Invalid(
                f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                + ", ".join(sorted(str(r) for r in results - pending))
                + ". Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
            )
        if thinking and results and i > 0 and i == len(messages) - 1:
            first = messages[i - 1]["content"][0] if isinstance(messages[i - 1]["content"], list) else {}
            if first.get("type") not in ("thinking", "redacted_thinking"):
                raise Invalid(
                    f"messages.{i - 1}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                    f"`{first.get('type', 'text')}`. When `thinking` is enabled, a final `assistant` message must "
                    "start with a thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
                )
        pending = set()
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "thinking" and SIGNATURES.get(block.get("signature")) != block.get("thinking"):
                raise Invalid(f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block")
            if kind == "redacted_thinking" and block.get("data") != REDACTED["data"]:
                raise Invalid(f"messages.{i}.content.{j}: Invalid `data` in `redacted_thinking` block")
            if kind == "text" and not block.get("text"):
                raise Invalid(f"messages.{i}.content.{j}.text: text content blocks must be non-empty")
            if kind == "tool_use":
                if role != "assistant":
                    raise Invalid(f"messages.{i}.content.{j}: tool_use blocks belong to assistant turns")
                if not isinstance(block.get("input"), dict):
                    raise Invalid(f"messages.{i}.content.{j}.input: Input should be a valid dictionary")
                pending.add(block.get("id"))
            if kind == "image":
                source = block.get("source") or {}
                if source.get("type") not in ("base64", "url"):
                    raise Invalid(f"messages.{i}.content.{j}.source: Input tag does not match 'base64' or 'url'")
    if pending:
        raise Invalid("messages: the last assistant turn has tool_use blocks without results")


def _validate_thinking(body: dict[str, Any], *, count_tokens: bool) -> bool:
    """The checks on ``thinking``; whether thinking is on."""
    thinking = body.get("thinking")
    if thinking is None:
        return False
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return False
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or budget < 1024:
            raise Invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if not count_tokens and budget >= body["max_tokens"]:
            raise Invalid("`max_tokens` must be greater than `thinking.budget_tokens`.")
    elif kind != "adaptive":
        raise Invalid("thinking: Input tag does not match any of the expected tags: 'enabled', 'disabled', 'adaptive'")
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise Invalid("`temperature` may only be set to 1 when thinking is enabled.")
    if body.get("top_k") is not None:
        raise Invalid("`top_k` must be unset when thinking is enabled.")
    return True
