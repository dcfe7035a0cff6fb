"""Provider ``anthropic``: Claude through the Messages API (``POST {base}/v1/messages``).

OpenAI chat requests are translated to Anthropic's format and the answers back (plain and
streamed); see :mod:`llmgateway.plugins.translate.anthropic` for the mapping and its choices.

Configuration (``[providers.NAME]`` with ``type = "anthropic"``): ``api_key`` (sent as
``x-api-key``), ``base_url`` (default ``https://api.anthropic.com``; a trailing ``/v1`` is fine),
and the options:

* ``anthropic_version`` — the ``anthropic-version`` header (default ``2023-06-01``);
* ``anthropic_beta`` — a list of beta names sent as ``anthropic-beta``;
* ``default_max_tokens`` — ``max_tokens`` when the request sets neither ``max_completion_tokens``
  nor ``max_tokens`` and the deployment has no ``max_output_tokens`` (default 4096).

OpenAI parameters Anthropic cannot honour (``n`` > 1, ``seed``, ``presence_penalty`` /
``frequency_penalty`` other than 0, ``logit_bias``, ``logprobs``, ``top_logprobs``, audio output,
``temperature`` above 1) are refused with a 400 naming the parameter, or dropped (temperature:
capped at 1) when the provider sets ``drop_unsupported_params = true``.
Anthropic has no embeddings or text completions: those endpoints answer 400.

Extended thinking. The request's Anthropic ``thinking`` object is, in this order: the Anthropic
ingress's (``ctx.state["anthropic.thinking"]``, the ``/v1/messages`` request's ``thinking`` as the
client gave it: budget, ``adaptive`` or ``disabled``), the OpenAI body's own ``thinking`` object
(both verbatim), else ``reasoning_effort``: ``none`` asks for no thinking, ``minimal`` / ``low``
for a budget of 1024 tokens, ``medium`` 4096, ``high`` 16384, ``xhigh`` 32768, ``max`` 65536
(:data:`~llmgateway.plugins.translate.anthropic.THINKING_BUDGETS`). Anthropic wants the budget
below ``max_tokens`` (the request's ``max_completion_tokens`` / ``max_tokens``, else the
default above): a budget that does not fit is lowered to ``max_tokens - 1``, and when that is under
1024 the request is a 400 naming ``reasoning_effort``. With thinking on, Anthropic refuses
``temperature`` other than 1, ``top_k`` and ``top_p`` below 0.95 (400 naming the parameter, or
dropped with ``drop_unsupported_params``) and forced tool calls (``tool_choice`` required or a
function, JSON mode: 400 naming it). Answers carry the thinking text as ``reasoning_content`` and
the blocks themselves, signatures included, as ``thinking_blocks`` (LiteLLM's field; streamed as a
``thinking_blocks`` delta when each block ends); an assistant message that carries
``thinking_blocks`` sends them back first in its turn, unchanged, which multi-turn tool use with
thinking requires (thinking blocks without a signature are dropped).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import orjson

from llmgateway.core.config import ProviderConfig, Section
from llmgateway.core.errors import (
    UnsupportedParameterError,
    UpstreamProtocolError,
    map_upstream_errors,
)
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.http import body_chunks
from llmgateway.core.provider import Provider, UpstreamCall
from llmgateway.core.sse import SSEDecoder, parse_event
from llmgateway.core.types import Deployment
from llmgateway.plugins.translate.anthropic import (
    ANTHROPIC_VERSION,
    THINKING_STATE,
    AnthropicToOpenAIStream,
    JsonMode,
    from_anthropic,
    request_max_tokens,
    resolve_thinking,
    thinking_enabled,
    to_anthropic,
    upstream_stream_error,
)

DEFAULT_MAX_TOKENS = 4096


def _unsupported(body: Mapping[str, Any]) -> list[str]:
    """Parameters in ``body`` whose value would change the answer and that Anthropic cannot honour."""
    found: list[str] = []
    n = body.get("n")
    if n is not None and n != 1:
        found.append("n")
    if body.get("seed") is not None:
        found.append("seed")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            found.append(name)
    if body.get("logit_bias"):
        found.append("logit_bias")
    if body.get("logprobs"):
        found.append("logprobs")
    if body.get("top_logprobs"):
        found.append("top_logprobs")
    if body.get("audio") or "audio" in (body.get("modalities") or ()):
        found.append("audio" if body.get("audio") else "modalities")
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and temperature > 1:
        found.append("temperature")
    return found


def _unsupported_with_thinking(body: Mapping[str, Any]) -> list[str]:
    """Sampling parameters Anthropic refuses when thinking is on."""
    found: list[str] = []
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        found.append("temperature")
    if body.get("top_k") is not None:
        found.append("top_k")
    top_p = body.get("top_p")
    if isinstance(top_p, (int, float)) and top_p < 0.95:
        found.append("top_p")
    return found


class AnthropicProvider(Provider):
    capabilities = frozenset({"chat", "chat_stream"})
    option_keys = frozenset({"anthropic_version", "anthropic_beta", "default_max_tokens"})
    default_base_url = "https://api.anthropic.com"

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        base = self.base_url
        self.messages_url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": str(self.option("anthropic_version", ANTHROPIC_VERSION)),
        }
        if config.api_key:
            headers["x-api-key"] = config.api_key
        beta = self.option("anthropic_beta")
        if beta:
            headers["anthropic-beta"] = ",".join(beta)
        headers.update(config.headers)
        self.headers = headers
        self.default_max_tokens = int(self.option("default_max_tokens", DEFAULT_MAX_TOKENS))

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        super().validate_config(config)
        section = Section(config.options, config.key, "")
        section.string("anthropic_version", ANTHROPIC_VERSION)
        section.strings("anthropic_beta")
        section.integer("default_max_tokens", DEFAULT_MAX_TOKENS, minimum=1)

    # ---- request -----------------------------------------------------------------------------

    def check_params(self, call: UpstreamCall) -> None:
        for name in _unsupported(call.body):
            if not self.config.drop_unsupported_params:
                detail = "a temperature above 1" if name == "temperature" else f"the parameter '{name}'"
                raise UnsupportedParameterError(
                    f"Provider '{self.name}' (Anthropic) does not support {detail} "
                    "(set drop_unsupported_params = true on the provider to drop it instead)",
                    param=name,
                )
            if name == "temperature":
                call.body["temperature"] = 1
            else:
                del call.body[name]

    def check_thinking_params(self, call: UpstreamCall) -> None:
        """Refuse (or drop) what Anthropic does not take together with thinking."""
        for name in _unsupported_with_thinking(call.body):
            if not self.config.drop_unsupported_params:
                detail = {"temperature": "'temperature' other than 1", "top_p": "'top_p' below 0.95"}.get(
                    name, f"'{name}'"
                )
                raise UnsupportedParameterError(
                    f"Provider '{self.name}' (Anthropic) does not support {detail} together with extended "
                    "thinking (leave it out, turn thinking off, or set drop_unsupported_params = true on the "
                    "provider to drop it)",
                    param=name,
                )
            del call.body[name]

    def _request(self, call: UpstreamCall, *, stream: bool) -> tuple[bytes, JsonMode | None]:
        self.check_params(call)
        body = call.body
        if stream:
            body["stream"] = True
        else:
            body.pop("stream", None)
        max_tokens = call.deployment.max_output_tokens or self.default_max_tokens
        thinking = resolve_thinking(body, request_max_tokens(body, max_tokens), call.ctx.state.get(THINKING_STATE))
        if thinking_enabled(thinking):
            self.check_thinking_params(call)
        translated, json_mode = to_anthropic(body, max_tokens=max_tokens, thinking=thinking)
        return orjson.dumps(translated), json_mode

    # ---- plain -------------------------------------------------------------------------------

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        payload, json_mode = self._request(call, stream=False)
        with map_upstream_errors(self.name, self.secrets):
            response = await self.http.post(self.messages_url, content=payload, headers=self.headers)
            raw = await response.aread()
        call.response_headers = self.rate_limit_headers(response.headers)
        self.raise_for_status(response, raw)
        with map_upstream_errors(self.name, self.secrets):
            data = orjson.loads(raw)
            if not isinstance(data, dict) or data.get("type") != "message":
                raise UpstreamProtocolError(
                    f"Provider '{self.name}' sent something other than a message", provider=self.name
                )
            answer, usage, finish = from_anthropic(data, call.alias, json_mode)
        call.usage = usage
        call.finish_reason = finish
        call.upstream_model = data.get("model")
        return answer

    # ---- streamed ----------------------------------------------------------------------------

    async def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        payload, json_mode = self._request(call, stream=True)
        translator: AnthropicToOpenAIStream | None = None
        try:
            async with self.streaming(
                call, self.messages_url, content=payload, headers={**self.headers, "accept": "text/event-stream"}
            ) as response:
                translator = AnthropicToOpenAIStream(call.alias, include_usage=call.include_usage, json_mode=json_mode)
                decoder = SSEDecoder()
                loads = orjson.loads
                with map_upstream_errors(self.name, self.secrets):
                    async for chunk in body_chunks(response):
                        for block in decoder.feed(chunk):
                            # fast path for Anthropic's two-line events: "event: name\ndata: {...}"
                            start = block.find(b"data: ")
                            if start >= 0 and block.find(b"\n", start) == -1:
                                data = block[start + 6 :]
                            else:
                                _, data = parse_event(block)
                            if not data:
                                continue
                            event = loads(data)
                            if event.get("type") == "error":
                                call.usage = translator.usage_so_far()  # what was streamed before the error
                                raise upstream_stream_error(self.name, event, self.secrets)
                            frame = translator.feed(event)
                            if frame is not None:
                                yield frame
                            if translator.stopped:
                                call.usage = translator.usage
                                call.finish_reason = translator.finish_reason
                                call.upstream_model = translator.model
                                for last in translator.finish():
                                    yield last
                                return
                raise UpstreamProtocolError(
                    f"Provider '{self.name}' ended the stream before message_stop", provider=self.name
                )
        finally:
            if call.usage is None and translator is not None:
                call.usage = translator.usage_so_far()  # what was streamed before it broke or the client left

    # ---- token counting ----------------------------------------------------------------------

    async def count_tokens(
        self, body: dict[str, Any], deployment: Deployment, *, thinking: dict[str, Any] | None = None
    ) -> int:
        """Anthropic's exact input token count for an OpenAI chat body (``/v1/messages/count_tokens``);
        ``thinking``: the Anthropic request's, sent along (it changes what the history counts)."""
        translated, _ = to_anthropic({**body, "model": deployment.model}, max_tokens=1, thinking=thinking)
        for key in ("max_tokens", "stream", "stop_sequences", "temperature", "top_p", "top_k", "metadata"):
            translated.pop(key, None)
        with map_upstream_errors(self.name, self.secrets):
            response = await self.http.post(
                f"{self.messages_url}/count_tokens", content=orjson.dumps(translated), headers=self.headers
            )
            raw = await response.aread()
        self.raise_for_status(response, raw)
        with map_upstream_errors(self.name, self.secrets):
            return int(orjson.loads(raw)["input_tokens"])

    def parse_error(self, body: bytes) -> tuple[str, str | None, str | None]:
        """Anthropic errors are ``{"type": "error", "error": {"type", "message"}}``; the type only
        restates the status, so no upstream code is passed on."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body.decode("utf-8", "replace")[:500], None, None
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"], None, None
        return super().parse_error(body)


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {"anthropic": AnthropicProvider}
