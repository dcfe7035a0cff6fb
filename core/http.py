"""Upstream HTTP: the httpx API over :mod:`llmgateway.core.h1`'s connection pool.

Providers get an ``httpx.AsyncClient`` (:class:`GatewayClient`) whose transport is
:class:`~llmgateway.core.h1.H1Transport`; tests can swap in any httpx transport
(``httpx.MockTransport``). httpx's own pool slows down sharply under concurrency (measured: ~516 req/s
against ~2,560 over aiohttp at 32 connections), and aiohttp in turn spent a quarter of the served
gateway's CPU: hence the purpose-built pool beneath the httpx API.

The two calls on the request path, :func:`post_bytes` and :func:`open_stream`, go straight to the pool
when the client allows it (no query parameters, auth or event hooks): the same bytes on the wire,
the same timeouts and the same httpx exceptions as ``client.post`` / ``client.send(stream=True)``,
without building httpx's request and client machinery. Response bodies stream: a piece reaches the
reader as soon as the socket has it. Closing a response before its end closes its connection, which
is how a client disconnect cancels the upstream call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from .config import ProviderConfig
from .h1 import HOP_HEADERS, H1Body, H1Pool, H1Response, H1Transport, to_httpx

_httpx_log = logging.getLogger("httpx")

_HOP_HEADERS = frozenset(name.decode("ascii") for name in HOP_HEADERS)


class GatewayClient(httpx.AsyncClient):
    """The ``httpx.AsyncClient`` providers get; :func:`post_bytes` has a short path through it."""

    def __init__(self, *, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout) -> None:
        super().__init__(
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            # one client serves every tenant: it must never keep state between requests
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            # streamed bodies are read raw (frame by frame): ask upstreams not to compress them
            headers={"accept-encoding": "identity"},
        )
        self.pool = transport.pool if isinstance(transport, H1Transport) else None
        self._defaults: tuple[list[tuple[bytes, bytes]], list[tuple[str, bytes, bytes]]] | None = None

    def default_headers(self) -> list[tuple[str, bytes, bytes]]:
        """The client's own headers as (lower-case name, raw name, raw value), cached while they
        stay the same (replaced or changed in place)."""
        raw = self.headers.raw
        cached = self._defaults
        if cached is None or cached[0] != raw:
            wire = [
                (name.decode("ascii").lower(), name.lower(), value)
                for name, value in raw
                if name.decode("ascii").lower() not in _HOP_HEADERS
            ]
            cached = self._defaults = (raw, wire)
        return cached[1]


def _direct(client: httpx.AsyncClient, params: Mapping[str, str] | None) -> H1Pool | None:
    """The pool to use directly, or None when httpx's own path is needed."""
    if (
        isinstance(client, GatewayClient)
        and client.pool is not None
        and not params
        and not client.is_closed
        and client.auth is None
        and not client.event_hooks["request"]
        and not client.event_hooks["response"]
    ):
        return client.pool
    return None


def _wire_headers(client: GatewayClient, host: bytes, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """What httpx would send: Host, the client's defaults not overridden, then ``headers``
    (lower-cased names; values in ASCII like httpx, else ``httpx.LocalProtocolError``)."""
    try:
        own = [(key.lower(), key.lower().encode("ascii"), value.encode("ascii")) for key, value in headers.items()]
    except UnicodeEncodeError:
        raise httpx.LocalProtocolError("a request header is not ASCII") from None
    names = {key for key, _, _ in own}
    wire = [] if "host" in names else [(b"host", host)]
    wire += [(raw, value) for name, raw, value in client.default_headers() if name not in names]
    wire += [(raw, value) for key, raw, value in own if key not in _HOP_HEADERS]
    return wire


def _logged(url: str, response: httpx.Response) -> httpx.Response:
    """The log line httpx's client writes for a request (the short paths skip the client)."""
    if _httpx_log.isEnabledFor(logging.INFO):
        _httpx_log.info('HTTP Request: POST %s "HTTP/1.1 %d %s"', url, response.status_code, response.reason_phrase)
    return response


async def _post(
    pool: H1Pool, client: GatewayClient, url: str, content: bytes, headers: Mapping[str, str]
) -> H1Response:
    """The short paths' request: what httpx would send, with the client's timeouts."""
    target = pool.target(url)
    t = client.timeout
    return await pool.request(
        b"POST",
        target,
        _wire_headers(client, target.host_header, headers),
        content,
        connect_timeout=t.connect,
        read_timeout=t.read,
        pool_timeout=t.pool,
    )


async def post_bytes(
    client: httpx.AsyncClient,
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    params: Mapping[str, str] | None = None,
) -> httpx.Response:
    """``POST`` and read the whole answer: ``client.post(...)`` then ``aread()``, in one call.

    The non-streamed hot path. On a :class:`GatewayClient` over :class:`H1Transport` (and without
    query parameters, auth or event hooks) it goes straight to the pool: the same headers on the wire
    (Host, the client's defaults, then ``headers``), the same timeouts, the same httpx exceptions and a
    read ``httpx.Response`` (body decoded, no ``.request``). Any other client takes httpx's path.
    """
    pool = _direct(client, params)
    if pool is None:
        response = await client.post(url, content=content, headers=headers, params=params)
        await response.aread()
        return response
    assert isinstance(client, GatewayClient)
    upstream = await _post(pool, client, url, content, headers)
    raw = await upstream.read()
    response = to_httpx(upstream, httpx.ByteStream(raw))
    if "content-encoding" in response.headers:
        response.read()  # decodes Content-Encoding exactly as aread() would
    else:
        # what read() ends with for an unencoded body, without its decoder and chunker machinery
        response._content = raw
        response.is_stream_consumed = response.is_closed = True
    return _logged(url, response)


async def open_stream(
    client: httpx.AsyncClient,
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    params: Mapping[str, str] | None = None,
) -> httpx.Response:
    """``POST`` and return the response unread: ``client.send(client.build_request(...), stream=True)``.

    The streamed hot path, with the same short cut and the same guarantees as :func:`post_bytes`;
    the caller reads it (:func:`body_chunks`, ``aread``) and must ``aclose()`` it.
    """
    pool = _direct(client, params)
    if pool is None:
        request = client.build_request("POST", url, content=content, headers=headers, params=params)
        return await client.send(request, stream=True)
    assert isinstance(client, GatewayClient)
    return _logged(url, to_httpx(await _post(pool, client, url, content, headers)))


def body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """A streamed response's body as it arrives, exactly what ``response.aiter_raw()`` yields: read
    straight from our own connection when the response came from one (without httpx's chunker and
    request-context generator: one async generator less per stream, each costing its creation,
    the event loop's bookkeeping and its close), else through ``aiter_raw``."""
    stream = response.stream
    if isinstance(stream, H1Body):
        response.is_stream_consumed = True
        return aiter(stream)
    return response.aiter_raw()


def make_client(config: ProviderConfig, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The client one provider uses: its base URL, headers, timeouts and the fast transport."""
    timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
    if transport is None:
        transport = H1Transport(
            connect_timeout=config.connect_timeout,
            read_timeout=config.timeout,
            max_connections=config.max_connections,
        )
    return GatewayClient(transport=transport, timeout=timeout)
