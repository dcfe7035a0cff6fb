"""HTTP/1.1 to the upstreams: a keep-alive connection pool on plain asyncio protocols.

Every provider call crosses this module, so it is built for the one thing it does: send a request
whose body is already in memory, and hand back the answer, whole or as it arrives. A connection is
an :class:`asyncio.Protocol` that parses the response in ``data_received`` and wakes its reader
once per event that matters (the head, a body chunk for a streaming reader, the end for a reader
that wants the whole body); there is no stream reader, no per-read timer and no task in between.
General-purpose clients spend several times this (measured on the gateway's request path: aiohttp
was a quarter of the served process's CPU).

What it speaks: HTTP/1.1 (and 1.0 answers) over TCP or TLS; bodies framed by Content-Length,
chunked transfer coding or the end of the connection; informational (1xx) answers skipped; no
pipelining (one request per connection at a time); no redirects, cookies, proxies or decompression
(httpx decodes Content-Encoding above it). Keep-alive: a connection whose answer was read to the end
and that neither side asked to close goes back to its origin's idle list (newest first) and is
reused; idle longer than ``keepalive_timeout``, or closed by the server meanwhile, it is dropped.
A request is never re-sent on a new connection once its bytes were written (POST is not
idempotent); a reused connection found closed before writing is replaced.

Timeouts: ``connect`` bounds connecting (TCP and TLS); ``read`` bounds every wait of the reader:
for the answer's head after the request is written, then for each next piece of the body (like a
socket read: time the reader spends elsewhere, its socket paused, does not count); ``pool`` bounds the
wait for a free connection when ``max_connections`` are busy.

Errors are httpx's, so callers see the same exceptions whatever the transport:
``ConnectTimeout``, ``ConnectError`` (refused, DNS, TLS), ``PoolTimeout``, ``ReadTimeout``,
``ReadError`` (connection reset), ``RemoteProtocolError`` (malformed or cut-short answer),
``LocalProtocolError`` (a header that would break the request line).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Final

import httpx

__all__ = ["HOP_HEADERS", "H1Pool", "H1Response", "H1Transport", "Target"]

_MAX_HEAD: Final = 65_536  # bytes of status line + headers
_MAX_CHUNK_LINE: Final = 4_096
_HIGH_WATER: Final = 1 << 20  # unread body bytes that pause the socket
_HEX: Final = b"0123456789abcdefABCDEF"
_OWS: Final = b" \t"
# hop-by-hop headers: a caller's are dropped, this client frames the request itself
HOP_HEADERS: Final = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade"})

# connection states
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class Target:
    """Where a URL goes, parsed once: origin key, host and port to dial, TLS, the request target and
    the Host header value."""

    __slots__ = ("host", "host_header", "key", "port", "request_target", "tls")

    def __init__(self, url: httpx.URL) -> None:
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}: only http and https")
        host = url.raw_host.decode("ascii")
        if not host:
            raise httpx.UnsupportedProtocol("no host in the upstream URL")
        self.tls = scheme == "https"
        self.host = host
        self.port = url.port or (443 if self.tls else 80)
        self.key = (scheme, host, self.port)
        self.request_target = url.raw_path
        self.host_header = url.netloc
        _check_value(self.request_target, "the request target")


def _check_value(value: bytes, what: str) -> None:
    if b"\r" in value or b"\n" in value or b"\x00" in value or b" " in value:
        raise httpx.LocalProtocolError(f"illegal character in {what}")


_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})


def encode_head(method: bytes, target: Target, headers: Iterable[tuple[bytes, bytes]], body_length: int) -> bytes:
    """The request line and headers. ``headers`` carry Host (first, by convention) and must not
    carry Content-Length, Transfer-Encoding or Connection: this sets Content-Length. A name or value
    with CR, LF or NUL is refused with ``httpx.LocalProtocolError`` (header injection)."""
    lines = [method, b" ", target.request_target, b" HTTP/1.1"]
    append = lines.append
    count = 0
    for name, value in headers:
        append(b"\r\n")
        append(name)
        append(b": ")
        append(value)
        count += 1
    if body_length or method in _BODY_METHODS:
        append(b"\r\ncontent-length: %d\r\n\r\n" % body_length)
        count += 1
    else:
        append(b"\r\n\r\n")
    head = b"".join(lines)
    # one scan for injection: exactly the line breaks written above, no NUL
    if head.count(b"\n") != count + 2 or head.count(b"\r") != count + 2 or b"\x00" in head:
        raise httpx.LocalProtocolError("illegal character in a request header")
    return head


def _check_names(headers: Iterable[tuple[bytes, bytes]], known: set[bytes]) -> None:
    for name, _ in headers:
        if name not in known:
            if not name or b":" in name or b" " in name or b"\t" in name:
                raise httpx.LocalProtocolError(f"illegal header name {name!r}")
            if len(known) < 256:
                known.add(name)


class _Connection(asyncio.Protocol):
    """One upstream connection and the parser of the answer it is reading."""

    __slots__ = (
        "_left",
        "_pool",
        "_response",
        "_rest",
        "_state",
        "closed",
        "idle_since",
        "key",
        "transport",
    )

    def __init__(self, pool: H1Pool, key: tuple[str, str, int]) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._state = _IDLE
        self._rest = bytearray()
        self._left = 0
        self._response: H1Response | None = None

    # -- asyncio callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        response._last_rx = response._loop.time()
        rest = self._rest
        if rest:
            if self._state == _HEAD:  # search only the new bytes (and the 3 before): no rescans
                scanned = len(rest)
                rest += data
                if rest.find(b"\r\n\r\n", max(0, scanned - 3)) < 0:
                    if len(rest) > _MAX_HEAD:
                        self._fail(httpx.RemoteProtocolError("upstream response head too large"))
                    return
            else:
                rest += data
            data = bytes(rest)
            rest.clear()
        try:
            self._parse(response, data)
        except httpx.RemoteProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        self.closed = True  # never handed out again, even before connection_lost runs
        response = self._response
        if response is not None:
            if self._state == _UNTIL_CLOSE:
                self._complete(response, keep=False)
            else:
                self._fail(_cut_short(response))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        response = self._response
        if response is not None:
            if self._state == _UNTIL_CLOSE and exc is None:
                self._complete(response, keep=False)
            else:
                self._fail(_cut_short(response) if exc is None else httpx.ReadError("upstream connection lost"))
        self._pool._forget(self)

    # -- requests ---------------------------------------------------------------------------------

    def send(self, response: H1Response, data: bytes, body: bytes) -> None:
        transport = self.transport
        if transport is None or self.closed:
            raise httpx.ReadError("upstream connection lost")
        self._response = response
        self._state = _HEAD
        if len(body) > 65_536:
            transport.write(data)
            transport.write(body)
        else:
            transport.write(data + body if body else data)

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.close()

    def abort(self) -> None:
        transport = self.transport
        self.closed = True
        if transport is not None:
            transport.abort()

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- the parser -------------------------------------------------------------------------------

    def _parse(self, response: H1Response, data: bytes) -> None:
        pos = 0
        end = len(data)
        while True:
            state = self._state
            if state in (_LENGTH, _CHUNK_DATA):
                if pos == end:
                    return
                left = self._left
                if end - pos < left:
                    self._left = left - (end - pos)
                    response._feed(data[pos:] if pos else data)
                    return
                stop = pos + left
                response._feed(data[pos:stop] if pos or stop != end else data)
                pos = stop
                if state == _CHUNK_DATA:
                    self._state = _CHUNK_END
                    continue
                self._complete(response, keep=response._keep_alive and pos == end)
                return
            if state == _HEAD:
                head_end = data.find(b"\r\n\r\n", pos)
                if head_end < 0:
                    if end - pos > _MAX_HEAD:
                        raise httpx.RemoteProtocolError("upstream response head too large")
                    self._rest = bytearray(data[pos:])
                    return
                if head_end - pos > _MAX_HEAD:
                    raise httpx.RemoteProtocolError("upstream response head too large")
                self._head(response, data[pos:head_end])
                pos = head_end + 4
                if self._state == _IDLE:  # no body: done (anything after it is not ours)
                    self._complete(response, keep=response._keep_alive and pos == end)
                    return
                continue
            if state == _CHUNK_SIZE:
                # complete chunks back to back (an SSE upstream writes each event as its own chunk):
                # taken in this loop, and fed on as one piece, without a state change per chunk
                pieces: list[bytes] = []
                while True:
                    eol = data.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    size = data[pos:eol].partition(b";")[0].strip(_OWS)
                    if not size or len(size) > 16 or size.strip(_HEX):
                        raise httpx.RemoteProtocolError("malformed chunked body from the upstream")
                    left = int(size, 16)
                    stop = eol + 2 + left
                    if not left or stop + 2 > end:
                        break
                    if data[stop : stop + 2] != b"\r\n":
                        raise httpx.RemoteProtocolError("malformed chunked body from the upstream")
                    pieces.append(data[eol + 2 : stop])
                    pos = stop + 2
                if pieces:
                    response._feed(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                if eol < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise httpx.RemoteProtocolError("malformed chunked body from the upstream")
                    if pos < end:
                        self._rest = bytearray(data[pos:])
                    return
                pos = eol + 2
                if left:  # a chunk that continues in the next read
                    self._left = left
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
                continue
            if state == _CHUNK_END:
                if end - pos < 2:
                    self._rest = bytearray(data[pos:])
                    return
                if data[pos : pos + 2] != b"\r\n":
                    raise httpx.RemoteProtocolError("malformed chunked body from the upstream")
                pos += 2
                self._state = _CHUNK_SIZE
                continue
            if state == _TRAILERS:
                if data.startswith(b"\r\n", pos):
                    pos += 2
                else:
                    stop = data.find(b"\r\n\r\n", pos)
                    if stop < 0:
                        if end - pos > _MAX_HEAD:
                            raise httpx.RemoteProtocolError("upstream trailers too large")
                        self._rest = bytearray(data[pos:])
                        return
                    pos = stop + 4
                self._complete(response, keep=response._keep_alive and pos == end)
                return
            if state == _UNTIL_CLOSE:
                if pos < end:
                    response._feed(data[pos:] if pos else data)
                return
            # _IDLE: the answer is complete, yet bytes keep coming
            raise httpx.RemoteProtocolError("upstream sent more than its answer")

    def _head(self, response: H1Response, head: bytes) -> None:
        lines = head.split(b"\r\n")
        breaks = len(lines) - 1
        if head.count(b"\r") != breaks or head.count(b"\n") != breaks or b"\x00" in head:
            raise httpx.RemoteProtocolError("bare CR, LF or NUL in the upstream's response head")
        status_line = lines[0]
        version = status_line[:8]
        code = status_line[9:12]
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or status_line[8:9] != b" "
            or len(code) != 3
            or not code.isdigit()
            or code[0] == 48  # "0": no status below 100
            or status_line[12:13] not in (b"", b" ")
        ):
            raise httpx.RemoteProtocolError("malformed status line from the upstream")
        status = int(code)
        headers: list[tuple[bytes, bytes]] = []
        length: bytes | None = None
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1] in _OWS or name[0] in _OWS:
                raise httpx.RemoteProtocolError("malformed header from the upstream")
            value = value.strip(_OWS)
            headers.append((name, value))
            if len(name) in (10, 14, 17):  # connection, content-length, transfer-encoding
                lower = name.lower()
                if lower == b"content-length":
                    if length is not None and length != value:
                        raise httpx.RemoteProtocolError("conflicting Content-Length from the upstream")
                    length = value
                elif lower == b"transfer-encoding":
                    if chunked or value.lower() != b"chunked":  # gzip, chunked...: not decoded here
                        raise httpx.RemoteProtocolError("unsupported Transfer-Encoding from the upstream")
                    chunked = True
                elif lower == b"connection":
                    tokens = value.lower()
                    if b"close" in tokens:
                        keep_alive = False
                    elif b"keep-alive" in tokens:
                        keep_alive = True
        if chunked and (length is not None or version == b"HTTP/1.0"):
            keep_alive = False  # framing a proxy may have read differently: read by chunks, then close
        if status < 200:
            if status == 101:
                raise httpx.RemoteProtocolError("the upstream switched protocols")
            return  # 100 Continue, 103 Early Hints...: the real answer follows; stay in _HEAD
        response._start(status, status_line[13:], version, headers, keep_alive)
        if response._method == b"HEAD" or status in (204, 304):
            self._state = _IDLE
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if not length.isdigit() or len(length) > 18:
                raise httpx.RemoteProtocolError("malformed Content-Length from the upstream")
            self._left = int(length)
            self._state = _LENGTH if self._left else _IDLE
        else:
            response._keep_alive = False
            self._state = _UNTIL_CLOSE

    def _complete(self, response: H1Response, *, keep: bool) -> None:
        self._state = _IDLE
        self._response = None
        self._rest.clear()
        if response._paused:  # a slow reader paused the socket; the next request needs it reading
            response._paused = False
            self.resume()
        response._end()
        transport = self.transport
        # an answer that came before the whole request was written (an early 413...): not reusable
        if keep and not self.closed and transport is not None and not transport.get_write_buffer_size():
            self._pool._release(self)
        else:
            self.close()
            self._pool._forget(self)

    def _fail(self, exc: BaseException) -> None:
        response = self._response
        self._response = None
        self._state = _IDLE
        self.abort()
        self._pool._forget(self)
        if response is not None:
            response._error(exc)


def _cut_short(response: H1Response) -> httpx.HTTPError:
    if response.status:
        return httpx.RemoteProtocolError("upstream response cut short")
    return httpx.RemoteProtocolError("upstream closed the connection without answering")


class H1Response:
    """An answer being read. ``status``, ``reason``, ``http_version`` and ``headers`` (raw
    ``(name, value)`` bytes in wire order) are set once :meth:`H1Pool.request` returns it; the body
    comes from :meth:`read` (all of it) or ``async for`` (all that has arrived, one piece each
    time). :meth:`close` before the end closes the connection (the upstream sees the disconnect);
    after the end the connection is already back in the pool."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_exc",
        "_keep_alive",
        "_last_rx",
        "_loop",
        "_method",
        "_paused",
        "_read_timeout",
        "_streaming",
        "_timer",
        "_waiter",
        "headers",
        "http_version",
        "reason",
        "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: _Connection, method: bytes, read_timeout: float | None):
        self._loop = loop
        self._conn: _Connection | None = conn
        self._method = method
        self._read_timeout = read_timeout
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._exc: BaseException | None = None
        self._keep_alive = False
        self._streaming = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = loop.create_future()
        self._last_rx = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        if read_timeout is not None:
            self._timer = loop.call_at(self._last_rx + read_timeout, self._check_timeout)
        self.status = 0
        self.reason = b""
        self.http_version = b"HTTP/1.1"
        self.headers: list[tuple[bytes, bytes]] = []

    # -- called by the connection -----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _start(
        self, status: int, reason: bytes, version: bytes, headers: list[tuple[bytes, bytes]], keep: bool
    ) -> None:
        self.status = status
        self.reason = reason
        self.http_version = version
        self.headers = headers
        self._keep_alive = keep
        self._wake()

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._streaming:
            self._wake()
            if self._buffered > _HIGH_WATER and not self._paused and self._conn is not None:
                self._paused = True
                self._conn.pause()

    def _end(self) -> None:
        self._done = True
        self._conn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _error(self, exc: BaseException) -> None:
        if self._done:
            return
        self._done = True
        self._exc = exc
        self._conn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _check_timeout(self) -> None:
        self._timer = None
        if self._done:
            return
        waiter = self._waiter
        if waiter is None or waiter.done():  # the reader is busy (or slow): its next wait re-arms
            return
        assert self._read_timeout is not None
        due = self._last_rx + self._read_timeout
        now = self._loop.time()
        if now < due:  # data came meanwhile
            self._timer = self._loop.call_at(due, self._check_timeout)
            return
        conn = self._conn
        what = "the upstream's answer" if not self.status else "the upstream response"
        if conn is not None:
            conn._response = None
            conn.abort()
            conn._pool._forget(conn)
        self._error(httpx.ReadTimeout(f"timed out waiting for {what}"))

    # -- called by the reader ---------------------------------------------------------------------

    def _resume(self) -> None:
        self._paused = False
        if self._conn is not None:
            self._conn.resume()

    async def _wait(self) -> None:
        """Wait for the next event. The read timeout counts from here (or from the last byte, if
        later): like a socket read, time the reader spends elsewhere does not count."""
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self._loop.create_future()
        self._last_rx = now = self._loop.time()
        if self._timer is None and self._read_timeout is not None:
            self._timer = self._loop.call_at(now + self._read_timeout, self._check_timeout)
        try:
            await waiter
        except asyncio.CancelledError:
            self.close()
            raise

    async def _head_ready(self) -> None:
        while not self.status and not self._done:
            await self._wait()
        if not self.status:
            assert self._exc is not None
            raise self._exc

    async def read(self) -> bytes:
        """The whole body (waits for its end)."""
        if self._paused:
            self._resume()
        self._streaming = False
        while not self._done:
            await self._wait()
        if self._exc is not None:
            raise self._exc
        chunks = self._chunks
        if len(chunks) == 1:
            return chunks.popleft()
        body = b"".join(chunks)
        chunks.clear()
        return body

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        self._streaming = True
        chunks = self._chunks
        while True:
            if chunks:
                # everything that has arrived, as one piece: the chunks of one read (an upstream's
                # SSE events, each its own HTTP chunk) go on as one write, not one write each
                piece = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._resume()
                yield piece
                continue
            if self._done:
                if self._exc is not None:
                    raise self._exc
                return
            await self._wait()

    def close(self) -> None:
        """Stop reading: an answer not yet complete closes its connection."""
        conn = self._conn
        if conn is not None and not self._done:
            conn._response = None
            conn.abort()
            conn._pool._forget(conn)
            self._error(httpx.ReadError("response closed before its end"))
        self._chunks.clear()


class H1Pool:
    """Keep-alive connections per origin, at most ``max_connections`` open at once (all origins).
    Requests that find every slot taken wait in one queue, first come first served (up to
    ``pool_timeout``)."""

    def __init__(
        self,
        *,
        max_connections: int = 256,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._limit = max_connections
        self._keepalive = keepalive_timeout
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # (ticket, waiter), oldest first
        self._tickets = 0
        self._targets: dict[str, Target] = {}
        self._known_names: set[bytes] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    def target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            target = Target(httpx.URL(url))
            if len(self._targets) < 1024:
                self._targets[url] = target
        return target

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return self._ssl

    async def request(
        self,
        method: bytes,
        url: str | Target,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        pool_timeout: float | None = None,
    ) -> H1Response:
        """Send one request; return once the answer's head is in. ``headers`` are raw pairs without
        Host, Content-Length, Transfer-Encoding or Connection."""
        target = url if isinstance(url, Target) else self.target(url)
        _check_names(headers, self._known_names)
        data = encode_head(method, target, headers, len(body))
        loop = asyncio.get_running_loop()
        conn = await self._acquire(loop, target, connect_timeout, pool_timeout)
        response = H1Response(loop, conn, method, read_timeout)
        conn.send(response, data, body)
        await response._head_ready()
        return response

    # -- the pool ---------------------------------------------------------------------------------

    async def _acquire(
        self,
        loop: asyncio.AbstractEventLoop,
        target: Target,
        connect_timeout: float | None,
        pool_timeout: float | None,
    ) -> _Connection:
        if self._closed:
            raise httpx.ConnectError("the upstream connection pool is closed")
        deadline = None if pool_timeout is None else loop.time() + pool_timeout
        ticket = 0  # its place in the queue once it has waited: woken too early, it keeps that place
        while True:
            idle = self._idle.get(target.key)
            if idle:
                now = loop.time()
                while idle:
                    conn = idle.pop()
                    if conn.closed:
                        continue
                    if now - conn.idle_since > self._keepalive:
                        conn.close()
                        self._forget(conn)  # its slot is free now, not when the close completes
                        continue
                    return conn
            if len(self._open) + self._connecting >= self._limit:
                self._evict_idle()  # another origin's idle connection makes room
            if len(self._open) + self._connecting < self._limit:
                return await self._connect(loop, target, connect_timeout)
            # full: wait for a connection to come back or go away, first come first served
            waiter = loop.create_future()
            waiters = self._waiters
            if not ticket:
                self._tickets += 1
                ticket = self._tickets
                waiters.append((ticket, waiter))
            else:  # back in its place, ahead of everyone who came after it
                place = next((i for i, (other, _) in enumerate(waiters) if other > ticket), len(waiters))
                waiters.insert(place, (ticket, waiter))
            try:
                if deadline is None:
                    await waiter
                else:
                    async with asyncio.timeout_at(deadline):
                        await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving (cancelled, timed out): pass it on
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove((ticket, waiter))
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout("no free upstream connection in time") from None
                raise

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, target: Target, connect_timeout: float | None
    ) -> _Connection:
        self._connecting += 1
        conn: _Connection | None = None
        try:
            try:
                async with asyncio.timeout(connect_timeout):
                    if target.tls:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(self, target.key),
                            target.host,
                            target.port,
                            ssl=self._ssl_context(),
                            server_hostname=target.host,
                        )
                    else:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(self, target.key), target.host, target.port
                        )
            except TimeoutError:
                raise httpx.ConnectTimeout(f"timed out connecting to {target.host}:{target.port}") from None
            except ssl.SSLError as exc:
                raise httpx.ConnectError(f"TLS with {target.host}:{target.port} failed: {exc.reason}") from None
            except OSError:
                raise httpx.ConnectError(f"cannot connect to {target.host}:{target.port}") from None
            if self._closed:
                conn.close()
                raise httpx.ConnectError("the upstream connection pool is closed")
            if conn.closed or conn.transport is None:  # closed by the server before we got to use it
                raise httpx.ConnectError(f"{target.host}:{target.port} closed the connection at once")
            self._open.add(conn)
            return conn
        except BaseException:
            if self._waiters:
                self._wake_one()  # the slot this attempt held is free again
            raise
        finally:
            self._connecting -= 1

    def _evict_idle(self) -> None:
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is not None:
            oldest.close()
            self._forget(oldest)

    def _wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            _, waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(self._keepalive, self._sweep_idle)
        if self._waiters:
            self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            idle = self._idle.get(conn.key)
            if idle and conn in idle:
                idle.remove(conn)
            if self._waiters:
                self._wake_one()

    def _sweep_idle(self) -> None:
        """Close connections idle for longer than ``keepalive_timeout``; again later while any stay."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        remaining = False
        for idle in self._idle.values():
            for conn in [c for c in idle if now - c.idle_since > self._keepalive]:
                conn.close()
                self._forget(conn)
            remaining = remaining or bool(idle)
        if remaining and not self._closed:
            self._sweep = loop.call_later(self._keepalive / 2, self._sweep_idle)

    async def aclose(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            if conn._response is not None:
                conn._fail(httpx.ReadError("the upstream connection pool was closed"))
            else:
                conn.close()
        self._idle.clear()
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(httpx.ConnectError("the upstream connection pool is closed"))
        self._waiters.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks


class H1Body(httpx.AsyncByteStream):
    __slots__ = ("_response",)

    def __init__(self, response: H1Response) -> None:
        self._response = response

    def __aiter__(self) -> AsyncIterator[bytes]:
        return aiter(self._response)  # the response's own iterator: no generator around it

    async def aclose(self) -> None:
        self._response.close()


def to_httpx(response: H1Response, stream: httpx.AsyncByteStream | httpx.ByteStream | None = None) -> httpx.Response:
    """The ``httpx.Response`` for an answer: the raw headers as they came (httpx decodes them), the
    body from ``stream`` (default: streamed from the connection)."""
    return httpx.Response(
        status_code=response.status,
        headers=response.headers,
        stream=H1Body(response) if stream is None else stream,
        extensions={"http_version": response.http_version, "reason_phrase": response.reason},
    )


class H1Transport(httpx.AsyncBaseTransport):
    """An httpx transport over one :class:`H1Pool` (the providers' default)."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        max_connections: int = 256,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool = H1Pool(
            max_connections=max_connections, keepalive_timeout=keepalive_timeout, ssl_context=ssl_context
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = request.content if isinstance(request.stream, httpx.ByteStream) else await request.aread()
        ext = request.extensions.get("timeout") or {}
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_HEADERS]
        response = await self.pool.request(
            request.method.encode("ascii"),
            Target(request.url),
            headers,
            body,
            connect_timeout=ext.get("connect", self.connect_timeout),
            read_timeout=ext.get("read", self.read_timeout),
            pool_timeout=ext.get("pool"),
        )
        return to_httpx(response)

    async def aclose(self) -> None:
        await self.pool.aclose()
