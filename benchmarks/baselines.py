"""Reference rows for ``python -m benchmarks run --baselines``: what the server and the upstream client
cost with no gateway logic at all, measured in the same run as the gateway.

* ``static``: an ASGI app that answers every POST with a canned chat completion (or a canned SSE
  stream when the body asks for one) without calling any upstream — the server alone.
* ``proxy``: an ASGI app that posts the body to the upstream through one shared
  :class:`llmgateway.core.h1.H1Pool` (the gateway's own upstream client) and hands the answer back
  (streams forwarded piece by piece) — the server plus the upstream client, the floor under any
  proxy written on the same two pieces. (Before 2026-11-27 16:00 UTC this row used aiohttp, then
  the gateway's client.)

Both run under ``hypercorn -k uvloop``, one worker, like the gateway's default. The upstream URL comes
from ``$BASELINE_UPSTREAM``.
"""

from __future__ import annotations

import os
from typing import Any

from llmgateway.core.h1 import H1Pool

_ANSWER = (
    b'{"id":"chatcmpl-static","object":"chat.completion","created":0,"model":"bench","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"Foxes are quick."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}}'
)
_STREAM = (
    b'data: {"id":"chatcmpl-static","object":"chat.completion.chunk","created":0,"model":"bench","choices":'
    b'[{"index":0,"delta":{"role":"assistant","content":"Foxes are quick."},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-static","object":"chat.completion.chunk","created":0,"model":"bench","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream")]


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def static(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = await _body(receive)
    streamed = b'"stream":true' in body
    payload = _STREAM if streamed else _ANSWER
    headers = _SSE if streamed else [*_JSON, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


_pool: H1Pool | None = None
_HEADERS = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench-upstream")]


async def proxy(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _pool
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        if _pool is not None:
            await _pool.aclose()
        return
    if _pool is None:
        _pool = H1Pool(max_connections=256)
    body = await _body(receive)
    url = os.environ["BASELINE_UPSTREAM"] + "/v1/chat/completions"
    target = _pool.target(url)
    upstream = await _pool.request(
        b"POST", target, [(b"host", target.host_header), *_HEADERS], body, connect_timeout=5, read_timeout=60
    )
    if b'"stream":true' in body:
        await send({"type": "http.response.start", "status": upstream.status, "headers": _SSE})
        async for chunk in upstream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    payload = await upstream.read()
    headers = [*_JSON, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
