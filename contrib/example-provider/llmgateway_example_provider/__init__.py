"""An example third-party llmgateway plugin — copy it to start your own.

It shows the three things most plugins do:

1. **Offer a provider type** (``llmgateway_register_providers``): :class:`EchoProvider`, used in
   gateway.toml as ``[providers.NAME] type = "example-echo"``. A real provider would call its
   upstream through ``self.http`` (an ``httpx.AsyncClient`` the gateway gives it); this one echoes
   the last user message so the example needs no network.
2. **Take part in the request chain** (``llmgateway_prepare_request``): adds the response header
   ``x-example-plugin`` to every proxied answer.
3. **Read its own config section** (``llmgateway_configure``): ``[example] header_value``.

Everything here uses only the public interfaces: ``llmgateway.hookimpl``, ``llmgateway.core.provider``
(the Provider contract is in that module's docstring), ``llmgateway.core.config`` and the types in
``llmgateway.core.types``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from llmgateway import hookimpl
from llmgateway.core.config import GatewayConfig, ProviderConfig, Section
from llmgateway.core.provider import Provider, UpstreamCall, estimate_prompt_tokens, estimate_tokens
from llmgateway.core.sse import DONE, frame
from llmgateway.core.types import RequestContext, Usage

__all__ = ["EchoProvider", "ExamplePlugin"]


class EchoProvider(Provider):
    """Provider type ``example-echo``: answers with the last user message, after ``prefix``."""

    # What it can do; the base class refuses every other operation with a clear 400.
    capabilities = frozenset({"chat", "chat_stream"})
    # Keys it accepts in [providers.NAME] besides the common ones (base_url, api_key, timeout...).
    option_keys = frozenset({"prefix"})
    # OpenAI parameters it cannot honour: a 400 naming the parameter, unless the provider is
    # configured with drop_unsupported_params = true (then they are removed). See check_params.
    unsupported_params = frozenset({"tools", "tool_choice", "logit_bias"})

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        # Runs at startup: unknown keys and wrong types stop the gateway with the file and key.
        section = Section(config.options, config.key, "")
        section.string("prefix", "")
        section.check_unknown()

    def _answer(self, call: UpstreamCall) -> str:
        prompt = ""
        for message in call.body.get("messages") or ():
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                prompt = message["content"]
        return str(self.option("prefix", "")) + prompt

    def _usage(self, call: UpstreamCall, answer: str) -> Usage:
        # No real tokenizer here: estimate, and say so (accounting shows estimated usage as such).
        return Usage(
            prompt_tokens=estimate_prompt_tokens(call.body),
            completion_tokens=estimate_tokens(len(answer)),
            estimated=True,
        )

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        self.check_params(call)
        answer = self._answer(call)
        # Fill the result fields the gateway records: usage, finish reason, upstream model.
        call.usage = self._usage(call, answer)
        call.finish_reason = "stop"
        call.upstream_model = call.deployment.model
        return {
            "id": f"chatcmpl-{call.ctx.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.alias,  # clients see the alias they asked for, never the upstream name
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": call.usage.as_openai(),
        }

    async def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        # The stream contract: complete SSE frames (b"data: {...}\n\n"), a usage chunk only when
        # the client asked (call.include_usage), b"data: [DONE]\n\n" last. A real provider must
        # *raise* an UpstreamError if its upstream stream breaks, never just stop.
        self.check_params(call)
        answer = self._answer(call)
        call.upstream_model = call.deployment.model
        base = {
            "id": f"chatcmpl-{call.ctx.request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.alias,
        }
        yield frame(
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        )
        for i, word in enumerate(answer.split(" ")):
            piece = word if i == 0 else " " + word
            yield frame({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        yield frame({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        call.usage = self._usage(call, answer)
        call.finish_reason = "stop"
        if call.include_usage:
            yield frame({**base, "choices": [], "usage": call.usage.as_openai()})
        yield DONE


class ExamplePlugin:
    """The plugin object. A class entry point is instantiated once per gateway, so per-gateway state
    (like the configured header value) lives on the instance, never in module globals."""

    def __init__(self) -> None:
        self.header_value = "seen"

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        # Claim the [example] section (absent is fine: the defaults apply) and refuse typos.
        section = config.section("example")
        self.header_value = section.string("header_value", "seen")
        section.check_unknown()

    @hookimpl
    def llmgateway_register_providers(self) -> dict[str, type[Provider]]:
        # The key is the `type` used in [providers.NAME].
        return {"example-echo": EchoProvider}

    @hookimpl
    async def llmgateway_prepare_request(self, ctx: RequestContext) -> None:
        # A fan-out request hook: runs for every proxied request after authentication, in the
        # order `llmgateway plugins` prints. It may edit ctx.body, set response headers, or raise
        # a GatewayError to refuse the request. `async def` is allowed on request hooks.
        ctx.response_headers["x-example-plugin"] = self.header_value
