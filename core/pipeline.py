"""The request path, readable in one sitting.

    read body → parse JSON → authenticate → validate → resolve alias → prepare → cache lookup
    → classify → route → check limits → call the provider (retries / fallbacks before the first
    byte) → send (JSON, or SSE frame by frame) → cache store → record usage → on_finish callbacks

The endpoints are plain ASGI callables (no Request/Response objects on the hot path). Streams are
forwarded frame by frame as they arrive; a client disconnect cancels the upstream call and usage is
still recorded; an upstream failure after the first byte ends the stream with one error event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from . import rbac
from .errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
    UpstreamError,
    UpstreamTimeoutError,
)
from .ingress import Ingress
from .provider import UpstreamCall
from .sse import DONE, frame
from .types import Attempt, Deployment, Endpoint, ModelGroup, RequestContext, Usage, UsageRecord
from .validation import validate

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("llmgateway.request")

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_KIND = {"chat.completions": "chat", "completions": "completions", "embeddings": "embeddings"}


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes (413) without reading it all."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    raise RequestTooLargeError(f"Request body is larger than the {limit} bytes allowed")
            except ValueError:
                raise InvalidRequestError("Invalid Content-Length header") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                await _drain(receive, limit * 8 - size, message)
                raise RequestTooLargeError(f"Request body is larger than the {limit} bytes allowed")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _drain(receive: Receive, budget: int, message: Message) -> None:
    """Read and drop the rest of an oversized body (up to ``budget`` bytes) so the client, still
    sending, gets to read the 413 instead of a reset connection."""
    while message.get("more_body", False) and budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        budget -= len(message.get("body", b""))


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise InvalidRequestError("The request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object")
    return body


async def send_json(send: Send, status: int, payload: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, *JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def error_headers(request_id: str, error: GatewayError) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-request-id", request_id.encode())]
    headers += [(k.encode(), v.encode()) for k, v in error.headers.items()]
    return headers


class ProxyEndpoint:
    """One OpenAI endpoint (chat completions, completions, embeddings) as a plain ASGI app."""

    #: the RBAC permission every proxy endpoint requires (see core/rbac.py)
    permission = "inference"

    def __init__(self, gateway: Gateway, endpoint: Endpoint, ingress: Ingress | None = None) -> None:
        self.gateway = gateway
        self.endpoint: Endpoint = endpoint
        self.kind = _KIND[endpoint]
        self.ingress = ingress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        request_id: str = scope.get("llmgateway.request_id") or gateway.new_request_id()
        client = scope.get("client")
        ctx = RequestContext(
            request_id=request_id,
            endpoint=self.endpoint,
            body={},
            headers=Headers(scope=scope),
            client_host=client[0] if client else None,
            path=scope["path"],
        )
        try:
            raw = await read_body(receive, scope, gateway.config.server.max_body_bytes)
            body = parse_json_object(raw)
            if self.ingress is not None:
                ctx.state["ingress.body"] = body
                body = self.ingress.to_openai(ctx, body)
            ctx.body = body
            await self.handle(ctx, receive, send)
        except GatewayError as error:
            await self.fail(ctx, send, error)

    async def fail(self, ctx: RequestContext, send: Send, error: GatewayError) -> None:
        body = self.ingress.error_body(error) if self.ingress is not None else error.body()
        await send_json(send, error.status, body, error_headers(ctx.request_id, error))
        gateway = self.gateway
        await gateway.hooks.on_error(ctx, error)
        if ctx.authenticated:  # unauthenticated callers leave no rows (no free writes for strangers)
            await self.finish(ctx, status=error.status, error_code=error.code, streamed=False)
        else:
            await self.run_on_finish(ctx)

    # ---- the chain ---------------------------------------------------------------------------

    async def handle(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        hooks = gateway.hooks
        principal = await hooks.authenticate(ctx)
        if principal is None:
            raise AuthenticationError("Missing or invalid API key; send it as 'Authorization: Bearer <key>'")
        ctx.principal = principal
        ctx.authenticated = True
        if not rbac.allowed(principal, self.permission):
            raise PermissionDeniedError("This key may not call models")
        body = ctx.body
        validate(self.endpoint, body)
        alias: str = body["model"]
        group = gateway.models.get(alias)
        if group is None:
            raise ModelNotFoundError(f"The model '{alias}' does not exist", param="model")
        if not principal.may_use(alias):
            raise PermissionDeniedError(f"This key may not use the model '{alias}'", param="model")
        if self.kind not in group.kinds:
            raise InvalidRequestError(f"The model '{alias}' does not serve {self.endpoint}", param="model")
        ctx.alias = alias
        ctx.model_group = group
        ctx.stream = bool(body.get("stream")) and self.endpoint != "embeddings"

        await hooks.prepare_request(ctx)
        if hooks.has("llmgateway_cache_lookup"):
            cached = await hooks.cache_lookup(ctx)
            if cached is not None:
                await self.send_cached(ctx, send, cached)
                return
        if hooks.has("llmgateway_classify"):
            await hooks.classify(ctx)
        candidates = await hooks.route(ctx, group) if hooks.has("llmgateway_route") else None
        ctx.candidates = candidates if candidates else list(group.deployments)
        await hooks.check_limits(ctx)
        if ctx.stream:
            await self.stream(ctx, receive, send)
        else:
            await self.plain(ctx, send)

    # ---- attempts ----------------------------------------------------------------------------

    def plan(self, ctx: RequestContext, group: ModelGroup) -> list[Deployment]:
        """Deployments to try, in order: the routed candidates, repeated (retries) up to the group's
        ``max_attempts``, then each deployment of the fallback aliases once."""
        own = list(ctx.candidates)
        plan = list(own)
        while own and len(plan) < group.max_attempts:
            plan.append(own[len(plan) % len(own)])
        for fallback in group.fallbacks:
            other = self.gateway.models.get(fallback)
            if other is not None:
                plan.extend(other.deployments)
        return plan

    def deadline(self, ctx: RequestContext) -> float:
        group = ctx.model_group
        timeout = group.timeout if group and group.timeout else self.gateway.config.server.request_timeout
        return ctx.started + timeout

    def make_call(self, ctx: RequestContext, deployment: Deployment, deadline: float) -> UpstreamCall:
        body = dict(ctx.body)
        if deployment.params:
            for key, value in deployment.params.items():
                body.setdefault(key, value)
        body["model"] = deployment.model
        options = ctx.body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        return UpstreamCall(
            ctx=ctx,
            deployment=deployment,
            body=body,
            alias=ctx.alias,
            include_usage=include_usage,
            timeout=max(0.001, deadline - time.perf_counter()),
        )

    async def attempts(self, ctx: RequestContext) -> AsyncIterator[tuple[Attempt, UpstreamCall]]:
        """Yield (attempt, call) pairs; the caller reports failures back through ``attempt.error``."""
        assert ctx.model_group is not None
        group = ctx.model_group
        plan = self.plan(ctx, group)
        deadline = self.deadline(ctx)
        for number, deployment in enumerate(plan):
            if deployment.provider not in self.gateway.providers:
                continue
            call = self.make_call(ctx, deployment, deadline)
            attempt = Attempt(deployment=deployment, started=time.perf_counter())
            ctx.attempts.append(attempt)
            yield attempt, call
            error = attempt.error
            if error is None:
                return
            last = number == len(plan) - 1
            if last or not isinstance(error, GatewayError) or not _worth_another(error, deployment, plan[number + 1 :]):
                raise error
            delay = _backoff(error, group.retry_backoff, number, same=plan[number + 1] is deployment)
            if time.perf_counter() + delay >= deadline:
                raise error
            if delay:
                await asyncio.sleep(delay)

    async def plain(self, ctx: RequestContext, send: Send) -> None:
        gateway = self.gateway
        response: dict[str, Any] | None = None
        call: UpstreamCall | None = None
        async for attempt, call in self.attempts(ctx):
            provider = gateway.providers[attempt.deployment.provider]
            try:
                async with asyncio.timeout(call.timeout):
                    if self.endpoint == "chat.completions":
                        response = await provider.chat(call)
                    elif self.endpoint == "completions":
                        response = await provider.completions(call)
                    else:
                        response = await provider.embeddings(call)
            except TimeoutError:
                attempt.error = UpstreamTimeoutError(
                    f"Provider '{provider.name}' did not answer within the request deadline", provider=provider.name
                )
            except GatewayError as error:
                attempt.error = error
            attempt.finished = attempt.first_byte = time.perf_counter()
            attempt.rate_limit_headers = call.response_headers
            if isinstance(attempt.error, UpstreamError):
                attempt.status = attempt.error.upstream_status
            await gateway.hooks.upstream_done(ctx, attempt)
        assert response is not None
        assert call is not None
        ctx.usage = call.usage or Usage(estimated=True)
        await gateway.hooks.response(ctx, response)
        payload = orjson.dumps(self.ingress.from_openai(ctx, response) if self.ingress is not None else response)
        await send_json(send, 200, payload, self.success_headers(ctx))
        if ctx.cache_status == "miss":
            await gateway.hooks.cache_store(ctx, response, None)
        await self.finish(ctx, status=200, error_code=None, streamed=False, call=call)

    async def stream(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        frames: AsyncIterator[bytes] | None = None
        first = b""
        call: UpstreamCall | None = None
        async for attempt, call in self.attempts(ctx):
            provider = gateway.providers[attempt.deployment.provider]
            try:
                frames = (
                    provider.chat_stream(call)
                    if self.endpoint == "chat.completions"
                    else provider.completions_stream(call)
                )
                async with asyncio.timeout(call.timeout):
                    first = await anext(frames)
            except TimeoutError:
                attempt.error = UpstreamTimeoutError(
                    f"Provider '{provider.name}' sent nothing within the request deadline", provider=provider.name
                )
            except StopAsyncIteration:
                attempt.error = UpstreamError(
                    f"Provider '{provider.name}' sent an empty stream", provider=provider.name
                )
            except GatewayError as error:
                attempt.error = error
            attempt.first_byte = time.perf_counter()
            attempt.rate_limit_headers = call.response_headers
            if attempt.error is not None:
                attempt.finished = attempt.first_byte
                if frames is not None:
                    await _close(frames)
            await gateway.hooks.upstream_done(ctx, attempt)
        assert frames is not None
        assert call is not None
        collect: list[bytes] | None = [] if ctx.state.get("cache.collect") else None
        await send({"type": "http.response.start", "status": 200, "headers": self.success_headers(ctx, sse=True)})
        try:
            outcome = await _pump(frames, first, send, receive, collect, self.ingress, ctx, self.deadline(ctx))
        except asyncio.CancelledError:
            # the server gave up on this stream (shutdown past the drain deadline): still account for it
            ctx.usage = call.usage or _estimated_after_cut(call)
            finishing = self.finish(ctx, status=499, error_code="server_shutdown", streamed=True, call=call)
            await asyncio.shield(finishing)
            raise
        attempt = ctx.attempts[-1]
        attempt.finished = time.perf_counter()
        ctx.usage = call.usage or _estimated_after_cut(call)
        if isinstance(outcome, GatewayError):
            attempt.error = outcome
            await gateway.hooks.on_error(ctx, outcome)
            await self.finish(ctx, status=outcome.status, error_code=outcome.code, streamed=True, call=call)
            return
        if outcome == "disconnected":
            ctx.client_disconnected = True
            await self.finish(ctx, status=499, error_code="client_disconnected", streamed=True, call=call)
            return
        if collect is not None and ctx.cache_status == "miss":
            await gateway.hooks.cache_store(ctx, None, collect)
        await self.finish(ctx, status=200, error_code=None, streamed=True, call=call)

    # ---- cache hits --------------------------------------------------------------------------

    async def send_cached(self, ctx: RequestContext, send: Send, cached: Any) -> None:
        ctx.cache_hit = True
        ctx.cache_status = "hit"
        ctx.usage = cached.usage
        body = dict(cached.body)
        body["model"] = ctx.alias
        if ctx.stream and self.endpoint != "embeddings":
            await send({"type": "http.response.start", "status": 200, "headers": self.success_headers(ctx, sse=True)})
            chunks: AsyncIterator[bytes] = _iterate(replay_as_chunks(body, self.endpoint, ctx))
            if self.ingress is not None:
                chunks = self.ingress.stream(ctx, chunks)
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            payload = self.ingress.from_openai(ctx, body) if self.ingress is not None else body
            await send_json(send, 200, orjson.dumps(payload), self.success_headers(ctx))
        ctx.cost = 0.0
        await self.finish(ctx, status=200, error_code=None, streamed=ctx.stream, saved_cost=cached.saved_cost)

    # ---- the end of every request ------------------------------------------------------------

    def success_headers(self, ctx: RequestContext, sse: bool = False) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", ctx.request_id.encode())]
        deployment = ctx.deployment
        if deployment is not None:
            headers.append((b"x-llmgateway-provider", deployment.provider.encode()))
            headers.append((b"x-llmgateway-deployment", deployment.id.encode()))
            if len(ctx.attempts) > 1:
                headers.append((b"x-llmgateway-attempts", str(len(ctx.attempts)).encode()))
        if ctx.cache_status:
            headers.append((b"x-llmgateway-cache", ctx.cache_status.encode()))
        if self.gateway.config.server.expose_routing_header and ctx.decision is not None:
            headers.append((b"x-llmgateway-route", f"{ctx.decision.strategy}: {ctx.decision.reason}".encode()))
        for key, value in ctx.response_headers.items():
            headers.append((key.encode(), value.encode()))
        if sse:
            headers.extend(SSE_HEADERS)
        return headers

    async def finish(
        self,
        ctx: RequestContext,
        *,
        status: int,
        error_code: str | None,
        streamed: bool,
        call: UpstreamCall | None = None,
        saved_cost: float | None = None,
    ) -> None:
        usage = ctx.usage or Usage()
        deployment = ctx.deployment
        if ctx.cost is None and deployment is not None:
            ctx.cost = cost_of(deployment, usage)
        attempt = ctx.attempts[-1] if ctx.attempts else None
        now = time.perf_counter()
        if ctx.decision is not None:
            ctx.decision.outcome = "success" if status == 200 else (error_code or str(status))
            ctx.decision.fallbacks = [a.deployment.id for a in ctx.attempts[1:]]
        record = UsageRecord(
            request_id=ctx.request_id,
            endpoint=ctx.endpoint,
            alias=ctx.alias or None,
            provider=deployment.provider if deployment else None,
            deployment=deployment.id if deployment else None,
            upstream_model=(call.upstream_model if call else None) or (deployment.model if deployment else None),
            principal=ctx.principal,
            usage=usage,
            cost=ctx.cost,
            status=status,
            error_code=error_code,
            latency_ms=(now - ctx.started) * 1000,
            ttft_ms=((attempt.first_byte - ctx.started) * 1000) if attempt and attempt.first_byte else None,
            streamed=streamed,
            cache_hit=ctx.cache_hit,
            client_disconnected=ctx.client_disconnected,
            started_at=ctx.started_at,
            attempts=len(ctx.attempts),
            saved_cost=saved_cost,
        )
        await self.gateway.hooks.record_usage(ctx, record)
        await self.run_on_finish(ctx)

    async def run_on_finish(self, ctx: RequestContext) -> None:
        for callback in ctx.on_finish:
            try:
                await callback(ctx)
            except Exception:
                log.exception("on_finish callback failed for request %s", ctx.request_id)


def cost_of(deployment: Deployment, usage: Usage) -> float | None:
    """USD for one request from the deployment's per-million prices; None when no price is known."""
    if deployment.input_price is None and deployment.output_price is None:
        return None
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_price = (
        deployment.cached_input_price if deployment.cached_input_price is not None else deployment.input_price
    )
    return (
        (usage.prompt_tokens - cached) * (deployment.input_price or 0.0)
        + cached * (cached_price or 0.0)
        + usage.completion_tokens * (deployment.output_price or 0.0)
    ) / 1_000_000


def _worth_another(error: GatewayError, deployment: Deployment, rest: list[Deployment]) -> bool:
    if error.retryable:
        return True
    if error.error_class in ("context_window", "content_policy"):
        return any(d is not deployment for d in rest)
    return False


def _backoff(error: GatewayError, base: float, number: int, *, same: bool) -> float:
    """Seconds to wait before the next attempt: Retry-After when given, else exponential with jitter.

    A different deployment is tried at once unless the error asked to wait.
    """
    if error.retry_after is not None and same:
        return error.retry_after
    if not same:
        return 0.0
    return float(base * (2**number) * (0.5 + random.random() / 2))


def _estimated_after_cut(call: UpstreamCall) -> Usage:
    from .provider import estimate_prompt_tokens

    return Usage(prompt_tokens=estimate_prompt_tokens(call.body), estimated=True)


async def _close(frames: AsyncIterator[bytes]) -> None:
    aclose = getattr(frames, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.debug("closing a failed upstream stream raised", exc_info=True)


async def _pump(
    frames: AsyncIterator[bytes],
    first: bytes,
    send: Send,
    receive: Receive,
    collect: list[bytes] | None,
    ingress: Ingress | None,
    ctx: RequestContext,
    deadline: float,
) -> GatewayError | str:
    """Forward frames until the upstream ends, fails, the client goes away, or the request's
    deadline (``time.perf_counter()`` time) passes.

    Returns "done", "disconnected", or the error that ended the stream (already sent as an event;
    past the deadline an :class:`UpstreamTimeoutError`).
    Collected chunks (for the cache) are always the OpenAI frames, whatever the ingress.

    Without an ingress the first chunk leaves from this task at once (no task switch before the
    first byte), and a stream whose end came with it needs no forwarding task at all.
    """
    watchers = ctx.stream_watchers

    async def deliver(chunk: bytes) -> bool:
        """Send one chunk; True when it ended the response (the OpenAI stream's last event)."""
        for watcher in watchers:
            try:
                stop = watcher(chunk)
            except Exception:  # a plugin's bug ends this stream cleanly (event, accounting), never silently
                log.exception("a stream watcher failed in request %s", ctx.request_id)
                stop = GatewayError(f"Internal error (request {ctx.request_id})", code="internal_error")
            if stop is not None:
                raise stop
        if chunk.endswith(DONE):
            await send({"type": "http.response.body", "body": chunk, "more_body": False})
            return True
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        return False

    async def fail(error: GatewayError) -> GatewayError:
        event = ingress.error_event(error) if ingress is not None else error.sse_event()
        await send({"type": "http.response.body", "body": event, "more_body": False})
        return error

    out: AsyncIterator[bytes]
    if ingress is None:
        if collect is not None:
            collect.append(first)
        ended: GatewayError | str | None = None
        try:
            if await deliver(first):
                ended = "done"
        except GatewayError as error:
            try:
                ended = await fail(error)
            except OSError:
                ended = "disconnected"
        except OSError:
            ended = "disconnected"
        except BaseException:  # cancelled (shutdown): close the upstream, the caller accounts for it
            await _close(frames)
            raise
        if ended is not None:
            await _close(frames)
            return ended
        out = _prepend(None, frames, collect) if collect is not None else frames
    else:
        out = ingress.stream(ctx, _prepend(first, frames, collect))

    async def forward() -> GatewayError | str:
        try:
            async for chunk in out:
                if await deliver(chunk):
                    return "done"
        except GatewayError as error:
            return await fail(error)
        except OSError:
            return "disconnected"
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return "done"

    async def watch() -> str:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return "disconnected"

    pump = asyncio.create_task(forward())
    watcher = asyncio.create_task(watch())
    late = False
    try:
        remaining = max(0.0, deadline - time.perf_counter())
        done, _ = await asyncio.wait((pump, watcher), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        late = not done
    finally:
        # on a disconnect, or when this task itself is cancelled (shutdown past the drain deadline),
        # stop forwarding and close the upstream before anything else happens
        watcher.cancel()
        if not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        await _close(out)
        await _close(frames)
    if late:  # the whole request has a deadline, not only its wait for the first byte
        timeout = UpstreamTimeoutError("The stream did not finish within the request deadline")
        try:
            return await fail(timeout)
        except OSError:
            return "disconnected"
    if pump.cancelled():
        return "disconnected"
    return pump.result()


async def _prepend(
    first: bytes | None, frames: AsyncIterator[bytes], collect: list[bytes] | None
) -> AsyncIterator[bytes]:
    """``first`` (when given) then the rest of ``frames``, recording them for the cache when asked."""
    try:
        if first is not None:
            if collect is not None:
                collect.append(first)
            yield first
        async for chunk in frames:
            if collect is not None:
                collect.append(chunk)
            yield chunk
    finally:
        await _close(frames)


async def _iterate(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def replay_as_chunks(body: dict[str, Any], endpoint: Endpoint, ctx: RequestContext) -> list[bytes]:
    """A complete answer as SSE frames (for a cached plain answer served to a streaming client)."""
    base = {
        "id": body.get("id", f"chatcmpl-{ctx.request_id}"),
        "created": body.get("created", int(time.time())),
        "model": ctx.alias,
    }
    chunks: list[bytes] = []
    if endpoint == "chat.completions":
        base["object"] = "chat.completion.chunk"
        for choice in body.get("choices", []):
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
            if message.get("tool_calls"):
                delta["tool_calls"] = [{**tc, "index": i} for i, tc in enumerate(message["tool_calls"])]
            chunks.append(
                frame({**base, "choices": [{"index": choice.get("index", 0), "delta": delta, "finish_reason": None}]})
            )
            chunks.append(
                frame(
                    {
                        **base,
                        "choices": [
                            {
                                "index": choice.get("index", 0),
                                "delta": {},
                                "finish_reason": choice.get("finish_reason", "stop"),
                            }
                        ],
                    }
                )
            )
    else:
        base["object"] = "text_completion"
        for choice in body.get("choices", []):
            chunks.append(
                frame(
                    {
                        **base,
                        "choices": [
                            {
                                "index": choice.get("index", 0),
                                "text": choice.get("text", ""),
                                "finish_reason": choice.get("finish_reason", "stop"),
                            }
                        ],
                    }
                )
            )
    options = ctx.body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") and ctx.usage is not None:
        chunks.append(frame({**base, "choices": [], "usage": ctx.usage.as_openai()}))
    chunks.append(DONE)
    return chunks
