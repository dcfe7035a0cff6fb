"""Plugin ``anthropic-ingress``: Anthropic's Messages API in front of every backend.

``POST /v1/messages`` (and ``/messages``) takes Anthropic Messages requests, runs them through the
whole request path as OpenAI chat requests (auth, routing, limits, any provider: demo, openai,
anthropic...), and answers in Anthropic's format — streams as Anthropic's named events
(message_start, content_block_start / delta / stop, ping, message_delta, message_stop, error) — so
the official ``anthropic`` SDK and tools built on it work with their base URL set to the gateway.
The key may come as ``x-api-key`` (what the SDK sends) or ``Authorization: Bearer``.

``POST /v1/messages/count_tokens`` (and ``/messages/count_tokens``, permission ``inference``)
answers ``{"input_tokens": N}``: the exact count from Anthropic when the model's first deployment
is an ``anthropic`` provider, otherwise an estimate (about four characters a token). The response
header ``x-llmgateway-estimated`` says which (``true`` / ``false``).

Extended thinking: the request's ``thinking`` object is not put into the OpenAI body (an
OpenAI-compatible upstream would refuse the field); it is kept, as given, in
``ctx.state["anthropic.thinking"]``, which the ``anthropic`` provider sends on verbatim (budget,
``adaptive``, ``disabled``) and other providers ignore: to have an OpenAI-compatible reasoning model
reason, give its deployment ``params = { reasoning_effort = "high" }`` in gateway.toml. Thinking
blocks in the history become the assistant message's ``thinking_blocks`` (signatures intact, for
the anthropic provider; ``ctx.state["anthropic.thinking_blocks"]`` tells OpenAI-format providers to
strip them). Answers carry the provider's ``thinking_blocks`` first, or one thinking block (empty
signature) made from ``reasoning_content``; streams send them as thinking blocks with
``thinking_delta`` and ``signature_delta`` events. (A cache plugin keyed on ``ctx.body`` alone would
not tell requests apart by their ``thinking``: add ``ctx.state.get("anthropic.thinking")`` to the key.)

Errors keep the OpenAI envelope with Anthropic's top-level ``"type": "error"`` and Anthropic's
error type names (``api_error``, ``overloaded_error``, ``not_found_error``...), so the SDK raises
its typed exceptions by status. The translation itself is :mod:`llmgateway.plugins.translate.anthropic`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from llmgateway.core.app import Gateway, GatewayRoute
from llmgateway.core.errors import GatewayError, ModelNotFoundError, UpstreamProtocolError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.ingress import Ingress
from llmgateway.core.pipeline import parse_json_object, read_body
from llmgateway.core.sse import named_frame
from llmgateway.core.types import Endpoint, Principal, RequestContext
from llmgateway.plugins.providers.anthropic import AnthropicProvider
from llmgateway.plugins.translate.anthropic import (
    THINKING_STATE,
    OpenAIToAnthropicStream,
    anthropic_error_payload,
    anthropic_to_openai,
    estimate_input_tokens,
    message_id,
    openai_to_anthropic,
)

PATHS = ("/v1/messages", "/messages")
COUNT_PATHS = ("/v1/messages/count_tokens", "/messages/count_tokens")


class AnthropicIngress(Ingress):
    endpoint: Endpoint = "chat.completions"
    name = "anthropic"

    def to_openai(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        return anthropic_to_openai(body, state=ctx.state)

    def from_openai(self, ctx: RequestContext, response: dict[str, Any]) -> dict[str, Any]:
        return openai_to_anthropic(response, request_id=ctx.request_id, model=ctx.alias or str(response.get("model")))

    async def stream(self, ctx: RequestContext, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        translator: OpenAIToAnthropicStream | None = None
        loads = orjson.loads
        try:
            async for chunk in frames:
                for frame in chunk.split(b"\n\n"):
                    if not frame.startswith(b"data: "):
                        continue  # empty remainder, comments
                    data = frame[6:]
                    if data == b"[DONE]":
                        if translator is None:
                            translator = self._translator(ctx, None)
                            yield translator.start()
                        yield translator.finish()
                        return
                    parsed = loads(data)
                    if translator is None:
                        translator = self._translator(ctx, parsed.get("id"))
                        out = translator.start() + translator.feed(parsed)
                    else:
                        out = translator.feed(parsed)
                    if out:
                        yield out
            raise UpstreamProtocolError("The upstream stream ended before it was complete")
        finally:
            aclose = getattr(frames, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    def _translator(ctx: RequestContext, upstream_id: Any) -> OpenAIToAnthropicStream:
        return OpenAIToAnthropicStream(
            message_id(ctx.request_id, upstream_id), ctx.alias, estimate_input_tokens(ctx.body)
        )

    def error_body(self, error: GatewayError) -> bytes:
        return orjson.dumps(anthropic_error_payload(error))

    def error_event(self, error: GatewayError) -> bytes:
        return named_frame("error", anthropic_error_payload(error))


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json")


def count_tokens_handler(gateway: Gateway) -> Any:
    async def handler(request: Request, principal: Principal) -> Response:
        try:
            raw = await read_body(request.receive, request.scope, gateway.config.server.max_body_bytes)
            state: dict[str, Any] = {}
            body = anthropic_to_openai(parse_json_object(raw), require_max_tokens=False, state=state)
            alias = body["model"]
            group = gateway.models.get(alias)
            if group is None or not principal.may_use(alias):
                raise ModelNotFoundError(f"The model '{alias}' does not exist", param="model")
            estimated = True
            tokens = 0
            deployment = group.deployments[0] if group.deployments else None
            provider = gateway.providers.get(deployment.provider) if deployment else None
            if deployment is not None and isinstance(provider, AnthropicProvider):
                try:
                    tokens = await provider.count_tokens(body, deployment, thinking=state.get(THINKING_STATE))
                    estimated = False
                except GatewayError:
                    pass  # fall back to the estimate
            if estimated:
                tokens = estimate_input_tokens(body)
            return _json({"input_tokens": tokens}, headers={"x-llmgateway-estimated": "true" if estimated else "false"})
        except GatewayError as error:
            return _json(anthropic_error_payload(error), error.status, error.headers)

    return handler


class AnthropicIngressPlugin:
    """Registers the ingress at ``/v1/messages`` and ``/messages`` and the count_tokens routes."""

    @hookimpl
    def llmgateway_register_ingress(self, gateway: Gateway) -> dict[str, Ingress]:
        ingress = AnthropicIngress()
        return {path: ingress for path in PATHS}

    @hookimpl
    def llmgateway_routes(self, gateway: Gateway) -> Sequence[GatewayRoute]:
        handler = count_tokens_handler(gateway)
        return [
            GatewayRoute(path, handler, "inference", methods=("POST",), name=f"anthropic count_tokens {path}")
            for path in COUNT_PATHS
        ]
