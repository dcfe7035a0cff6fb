"""Provider ``openai``: OpenAI itself and any server that speaks its API (vLLM, Ollama, llama.cpp
server, Groq, Together, LM Studio...).

Requests go through as they are (``model`` set to the deployment's upstream model), except for
``thinking_blocks`` in messages (Anthropic's signed thinking blocks, which the Anthropic ingress
carries for the ``anthropic`` provider): they are stripped, for this provider and the ones built
on it (azure, mistral, huggingface), when the ingress flagged the request as carrying them
(``ctx.state["anthropic.thinking_blocks"]``), so other requests pay nothing for it. Streamed frames
are forwarded without being parsed: the ``model`` field is rewritten to the alias with a byte-level
substitution, and only the one frame that carries usage is parsed. When the upstream sends no
usage, it is estimated from the streamed text and marked estimated.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from llmgateway.core.errors import UpstreamProtocolError, error_from_upstream_status, map_upstream_errors
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.http import body_chunks, post_bytes
from llmgateway.core.provider import (
    MODEL_FIELD,
    Provider,
    UpstreamCall,
    estimate_prompt_tokens,
    estimate_tokens,
    model_field,
    rewrite_model,
)
from llmgateway.core.sse import DONE, SSEDecoder, frame, parse_event
from llmgateway.core.types import Usage
from llmgateway.plugins.providers._openai_format import THINKING_BLOCKS_STATE, strip_thinking_blocks

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_TEXT = re.compile(rb'"(?:content|arguments|text)"\s*:\s*"((?:[^"\\]|\\.)*)"')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]+)"')


def _names_finish(frames: bytes) -> bool:
    """Whether the frames name a finish reason (a string: the `"finish_reason":null` of every other
    frame does not count), before the regex looks for it."""
    return b'"finish_reason":"' in frames or b'"finish_reason": "' in frames


def _text_length(frames: list[bytes]) -> int:
    """The length of the text (content, tool-call arguments) the frames carry, as sent (JSON-escaped)."""
    return sum(map(len, _TEXT.findall(b"\n\n".join(frames)))) if frames else 0


def _plain_run(blocks: list[bytes], start: int, model_bytes: bytes) -> tuple[int, bytes]:
    """The end of the run of frames from ``start`` that need only their model name replaced: each one
    ``data:`` line naming the model once, none carrying a usage object or an error, the ``[DONE]``
    excluded.
    Checked on the run as a whole (C-speed counts, no Python loop over frames); a trailing ``[DONE]``
    and a trailing usage frame are left out of it. Returns the end and the run's frames joined, or
    ``start`` when the rest is not such a run (the caller goes frame by frame)."""
    end = len(blocks)
    if end > start and blocks[end - 1] == b"data: [DONE]":
        end -= 1
    if end > start and b'"usage"' in blocks[end - 1]:
        end -= 1
    size = end - start
    if size < 2:
        return start, b""
    joined = b"\n\n".join(blocks[start:end])
    if (
        joined.count(b"\n") != 2 * (size - 1)
        or joined.count(b"data: ") != size
        or not joined.startswith(b"data: ")
        or joined.count(model_bytes) != size
        or (b'"usage"' in joined and _USAGE.search(joined))  # "usage":null is fine, an object is not
        or b'data: {"error"' in joined
        or b"[DONE]" in joined
    ):
        return start, b""
    return end, joined


@dataclass(slots=True)
class StreamState:
    """What a relay that parses every chunk (Azure annotations, Mistral, TGI) keeps about one stream.

    Subclasses add their own fields; :meth:`OpenAIProvider._usage_frame` and
    :meth:`OpenAIProvider._finish` use these.
    """

    text: int = 0  # characters of text and tool arguments seen, for an estimate
    finish: str | None = None
    usage_sent: bool = False
    id: str = ""
    created: int = 0
    object: str = "chat.completion.chunk"


class OpenAIProvider(Provider):
    capabilities = frozenset({"chat", "chat_stream", "completions", "completions_stream", "embeddings"})
    option_keys = frozenset({"organization", "project", "query_params"})
    default_base_url = "https://api.openai.com/v1"

    def __init__(self, config: Any, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        headers = {"content-type": "application/json", "accept": "application/json"}
        if config.api_key:
            headers["authorization"] = f"Bearer {config.api_key}"
        if self.option("organization"):
            headers["openai-organization"] = str(self.option("organization"))
        if self.option("project"):
            headers["openai-project"] = str(self.option("project"))
        headers.update(config.headers)
        self.headers = headers
        self.params: dict[str, str] = dict(self.option("query_params") or {})

    def url(self, path: str, deployment_model: str) -> str:
        """Where an operation goes. Subclasses (Azure, Mistral...) override."""
        return f"{self.base_url}{path}"

    def request_headers(self, call: UpstreamCall) -> Mapping[str, str]:
        return self.headers

    #: whether :meth:`refresh_auth` must run before each upstream request (credentials that expire)
    refreshes_auth = False

    async def refresh_auth(self) -> None:
        """Renew expiring credentials before an upstream request (only when ``refreshes_auth``); what
        :meth:`request_headers` returns afterwards carries them. The ``azure`` provider's service
        principal tokens renew here."""

    async def _post_json(self, path: str, call: UpstreamCall) -> dict[str, Any]:
        self.check_params(call)
        if THINKING_BLOCKS_STATE in call.ctx.state:
            strip_thinking_blocks(call.body)
        if self.refreshes_auth:
            await self.refresh_auth()
        with map_upstream_errors(self.name, self.secrets):
            response = await post_bytes(
                self.http,
                self.url(path, call.deployment.model),
                content=orjson.dumps(call.body),
                headers=self.request_headers(call),
                params=self.params or None,
            )
            body = response.content
        call.response_headers = self.rate_limit_headers(response.headers)
        self.raise_for_status(response, body)
        with map_upstream_errors(self.name, self.secrets):
            data = orjson.loads(body)
            if not isinstance(data, dict):
                raise UpstreamProtocolError(f"Provider '{self.name}' sent a non-object response", provider=self.name)
        call.upstream_model = data.get("model")
        data["model"] = call.alias
        return data

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        data = await self._post_json("/chat/completions", call)
        self._account(call, data)
        return data

    async def completions(self, call: UpstreamCall) -> dict[str, Any]:
        data = await self._post_json("/completions", call)
        self._account(call, data)
        return data

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        data = await self._post_json("/embeddings", call)
        usage = data.get("usage")
        if usage:
            call.usage = Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0))
        else:
            call.usage = Usage(prompt_tokens=estimate_prompt_tokens(call.body), estimated=True)
        return data

    def _account(self, call: UpstreamCall, data: dict[str, Any]) -> None:
        usage = data.get("usage")
        choices = data.get("choices") or []
        if choices and isinstance(choices[0], dict):
            call.finish_reason = choices[0].get("finish_reason")
        if usage:
            call.usage = Usage.from_openai(usage)
            return
        text = 0
        for choice in choices:
            message = choice.get("message") or {}
            text += len(message.get("content") or choice.get("text") or "")
            for tool_call in message.get("tool_calls") or ():
                text += len((tool_call.get("function") or {}).get("arguments") or "")
        call.usage = Usage(
            prompt_tokens=estimate_prompt_tokens(call.body), completion_tokens=estimate_tokens(text), estimated=True
        )

    def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        return self._stream("/chat/completions", call)

    def completions_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        return self._stream("/completions", call)

    def stream_body(self, call: UpstreamCall) -> dict[str, Any]:
        """The upstream body of a streamed call: usage always asked for (accounting needs it even
        when the client did not ask; the relay drops it again then). Subclasses adapt."""
        self.check_params(call)
        body = call.body
        body["stream"] = True
        options = body.get("stream_options")
        body["stream_options"] = (
            {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
        )
        return body

    async def _stream(self, path: str, call: UpstreamCall) -> AsyncIterator[bytes]:
        body = self.stream_body(call)
        if THINKING_BLOCKS_STATE in call.ctx.state:
            strip_thinking_blocks(body)
        if self.refreshes_auth:
            await self.refresh_auth()
        async with (
            self.streaming(
                call,
                self.url(path, call.deployment.model),
                content=orjson.dumps(body),
                headers={**self.request_headers(call), "accept": "text/event-stream"},
                params=self.params or None,
            ) as response,
            contextlib.aclosing(self._relay(response, call)) as frames,
        ):  # relay closed first (its finally sets call.usage), then the response
            async for frame in frames:
                yield frame

    async def _relay(self, response: httpx.Response, call: UpstreamCall) -> AsyncGenerator[bytes, None]:
        """Forward the upstream's frames; the frames of one upstream read go out as one item (one
        write to the client; sending a read's first frame alone was tried: 10-30 µs sooner to the
        first token when a whole answer came in one read, 14 % fewer streams per second).

        Only the frame that carries usage is parsed. Frames after the first that need nothing but
        the model name replaced (no usage, no error, no ``[DONE]``, one ``data:`` line each: the
        usual case) are handled a run at a time (:func:`_plain_run`): one replace, one text count
        and one finish-reason search for the run instead of one each per frame. Whatever ends the
        stream (``[DONE]``, a cut, a client disconnect closing this generator), ``call.usage`` is
        set: estimated from the text seen so far when the upstream sent none.
        """
        decoder = SSEDecoder()
        replacement = model_field(call.alias)
        include_usage = call.include_usage
        model_bytes: bytes | None = None  # the upstream's exact `"model":"..."`, learned from the first frame
        # frames not yet counted for the text estimate: counted only when no usage comes (or past 64 KB)
        uncounted: list[bytes] = []
        uncounted_size = 0
        text = 0
        finish: bytes | None = None
        try:
            with map_upstream_errors(self.name, self.secrets):
                async for chunk in body_chunks(response):
                    blocks = decoder.feed(chunk)
                    out: list[bytes] = []
                    start, count = 0, len(blocks)
                    runs = True  # until a run check fails in this read (then frame by frame)
                    while start < count:
                        stop = start + 1
                        if model_bytes and runs:
                            end, joined = _plain_run(blocks, start, model_bytes)
                            if end > start:
                                if call.usage is None:
                                    uncounted.append(joined)
                                    uncounted_size += len(joined)
                                if _names_finish(joined):
                                    found = _FINISH.findall(joined)
                                    if found:
                                        finish = found[-1]
                                out.append(joined.replace(model_bytes, replacement) + b"\n\n")
                                start = end
                                continue
                            runs = False
                        for block in blocks[start:stop]:  # one frame (a loop for its `continue`)
                            if block.startswith(b"data: ") and b"\n" not in block:
                                data = block[6:]
                            else:
                                _, data = parse_event(block)
                                if not data:
                                    continue
                            if data == b"[DONE]":
                                if finish:
                                    call.finish_reason = finish.decode()
                                out.append(DONE)
                                yield b"".join(out)
                                return
                            if data.startswith(b'{"error"'):
                                if out:
                                    yield b"".join(out)
                                raise self._stream_error(data)
                            if model_bytes is None:
                                found_model = MODEL_FIELD.search(data)
                                model_bytes = found_model.group(0) if found_model else b""
                                call.upstream_model = (
                                    str(orjson.loads(b"{%b}" % model_bytes)["model"]) if model_bytes else ""
                                )
                            if _USAGE.search(data):
                                parsed = orjson.loads(data)
                                call.usage = Usage.from_openai(parsed.get("usage"))
                                if not include_usage:
                                    if not parsed.get("choices"):
                                        continue
                                    parsed.pop("usage", None)
                                    parsed["model"] = call.alias
                                    out.append(b"data: " + orjson.dumps(parsed) + b"\n\n")
                                    continue
                            else:
                                if call.usage is None:
                                    uncounted.append(data)
                                    uncounted_size += len(data)
                                if _names_finish(data):
                                    found_finish = _FINISH.search(data)
                                    if found_finish:
                                        finish = found_finish.group(1)
                            if model_bytes and model_bytes in data:
                                data = data.replace(model_bytes, replacement, 1)
                            else:
                                data = rewrite_model(data, replacement)
                            out.append(b"data: " + data + b"\n\n")
                        start = stop
                    if uncounted_size > 65_536:
                        text += _text_length(uncounted)
                        uncounted.clear()
                        uncounted_size = 0
                    if out:
                        yield b"".join(out)
            raise UpstreamProtocolError(
                f"Provider '{self.name}' ended the stream before it was complete", provider=self.name
            )
        finally:
            if call.usage is None:
                self._finish_usage(call, text + _text_length(uncounted))

    async def _relay_parsed(self, response: httpx.Response, call: UpstreamCall) -> AsyncGenerator[bytes, None]:
        """The relay for OpenAI-like servers whose chunks need changing (Mistral, TGI): every chunk is
        parsed and handed to :meth:`_chunk` with the stream's state from :meth:`_new_state`."""
        decoder = SSEDecoder()
        state = self._new_state()
        try:
            with map_upstream_errors(self.name, self.secrets):
                async for chunk in body_chunks(response):
                    for block in decoder.feed(chunk):
                        _, data = parse_event(block)
                        if not data:
                            continue
                        if data == b"[DONE]":
                            for out in self._finish(call, state):
                                yield out
                            return
                        parsed = orjson.loads(data)
                        if not isinstance(parsed, dict):
                            raise UpstreamProtocolError(
                                f"Provider '{self.name}' sent a non-object chunk", provider=self.name
                            )
                        if "choices" not in parsed and ("error" in parsed or parsed.get("object") == "error"):
                            raise self._stream_error(data)
                        for out in self._chunk(parsed, call, state):
                            yield out
            raise UpstreamProtocolError(
                f"Provider '{self.name}' ended the stream before it was complete", provider=self.name
            )
        finally:
            self._finish_usage(call, state.text)  # a cut or abandoned stream still bills its text

    def _new_state(self) -> StreamState:
        return StreamState()

    def _chunk(self, parsed: dict[str, Any], call: UpstreamCall, state: Any) -> list[bytes]:
        """One parsed chunk in, the OpenAI frames to send out (for :meth:`_relay_parsed`)."""
        raise NotImplementedError

    def _usage_frame(self, call: UpstreamCall, state: StreamState, usage: dict[str, Any]) -> bytes:
        """The usage-only chunk (empty ``choices``) of a translated stream."""
        state.usage_sent = True
        return frame(
            {
                "id": state.id,
                "object": state.object,
                "created": state.created,
                "model": call.alias,
                "choices": [],
                "usage": usage,
            }
        )

    def _finish(self, call: UpstreamCall, state: StreamState) -> list[bytes]:
        """The frames that end a translated stream: usage (estimated if upstream sent none and the
        client asked for it), then ``[DONE]``."""
        out: list[bytes] = []
        if state.finish:
            call.finish_reason = state.finish
        if call.usage is None:
            self._finish_usage(call, state.text)
            assert call.usage is not None
            if call.include_usage and not state.usage_sent:
                out.append(self._usage_frame(call, state, call.usage.as_openai()))
        out.append(DONE)
        return out

    def _finish_usage(self, call: UpstreamCall, text: int) -> None:
        if call.usage is None:
            call.usage = Usage(
                prompt_tokens=estimate_prompt_tokens(call.body),
                completion_tokens=estimate_tokens(text),
                estimated=True,
            )

    def _stream_error(self, data: bytes) -> Exception:
        message, code, param = self.parse_error(data)
        status = 429 if code in ("rate_limit_exceeded", "429") else 502
        return error_from_upstream_status(
            self.name, status, {}, message, upstream_code=code, param=param, secrets=self.secrets
        )


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {"openai": OpenAIProvider}
