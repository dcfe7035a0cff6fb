"""The upstream HTTP/1.1 client (core/h1.py) against raw TCP servers that write exact bytes: body
framing split at every byte, keep-alive and its limits, malformed answers, timeouts, the pool
limit, early close, header injection, TLS. The gateway-level behaviour (errors mapped for clients,
streams forwarded) is covered by the proxy and streaming tests; this is the wire."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmgateway.core.h1 import _HIGH_WATER, H1Pool, H1Transport

Handler = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection, as the scripted server sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        self.reader = reader
        self.writer = writer
        self.server = server

    async def request(self) -> bytes | None:
        """The next request (head and body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        self.server.requests.append(head + body)
        return head + body

    async def send(self, data: bytes, *, bytewise: bool = False) -> None:
        if bytewise:
            for i in range(len(data)):
                self.writer.write(data[i : i + 1])
                await self.writer.drain()
                await asyncio.sleep(0)
        else:
            self.writer.write(data)
            await self.writer.drain()


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        conn = Conn(reader, writer, self)
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()


@asynccontextmanager
async def serving(
    handler: Handler, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[Server, str]]:
    server = Server(handler)
    tcp = await asyncio.start_server(server._serve, host, 0, ssl=ssl_context)
    port = tcp.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context else "http"
    try:
        yield server, f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    finally:
        tcp.close()
        for task in server.tasks:
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        await tcp.wait_closed()


@asynccontextmanager
async def pooled(**settings: Any) -> AsyncIterator[H1Pool]:
    pool = H1Pool(**settings)
    try:
        yield pool
    finally:
        await pool.aclose()


def answers(*responses: bytes, bytewise: bool = False) -> Handler:
    """A handler that answers each request the server gets with the next response (repeating the
    last), keeping the connection open until the client closes it."""

    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            i = len(conn.server.requests) - 1
            await conn.send(responses[min(i, len(responses) - 1)], bytewise=bytewise)

    return handler


def json_answer(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
    b"5;ext=1\r\nhello\r\n"
    b"1A\r\n, world; and more bytes...\r\n"
    b"0\r\nx-trailer: yes\r\n\r\n"
)


async def post(pool: H1Pool, url: str, body: bytes = b"{}", **timeouts: float) -> tuple[int, bytes]:
    response = await pool.request(
        b"POST",
        url + "/v1/chat",
        [(b"host", b"upstream"), (b"content-type", b"application/json")],
        body,
        connect_timeout=timeouts.get("connect", 5.0),
        read_timeout=timeouts.get("read", 5.0),
        pool_timeout=timeouts.get("pool_wait"),
    )
    return response.status, await response.read()


@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "byte-by-byte"])
async def test_content_length_and_chunked_bodies_whatever_the_packet_boundaries(bytewise: bool) -> None:
    async with serving(answers(json_answer(), CHUNKED, json_answer(b"[]"), bytewise=bytewise)) as (server, url):
        async with pooled() as pool:
            assert await post(pool, url) == (200, b'{"ok":true}')
            response = await pool.request(
                b"POST", url + "/v1/chat", [(b"host", b"x")], b"{}", connect_timeout=5, read_timeout=5
            )
            pieces = [piece async for piece in response]
            assert b"".join(pieces) == b"hello, world; and more bytes..."
            if not bytewise:  # chunks that arrive together go on together (one write downstream)
                assert pieces == [b"hello, world; and more bytes..."]
            assert response.headers[0] == (b"transfer-encoding", b"chunked")
            assert await post(pool, url) == (200, b"[]")
    assert server.connections == 1  # three requests, one kept-alive connection
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat HTTP/1.1\r\nhost: upstream\r\ncontent-type: application/json\r\n")
    assert first.endswith(b"content-length: 2\r\n\r\n{}")


async def test_a_streamed_body_arrives_piece_by_piece_as_the_server_writes_it() -> None:
    release = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
        await release.wait()
        await conn.send(b"7\r\ndata: 2\r\n0\r\n\r\n")

    async with serving(handler) as (_, url):
        async with pooled() as pool:
            response = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=5)
            pieces = aiter(response)
            assert await anext(pieces) == b"data: 1"  # before the server wrote the rest
            release.set()
            assert await anext(pieces) == b"data: 2"
            with pytest.raises(StopAsyncIteration):
                await anext(pieces)


async def test_informational_answers_are_skipped_and_head_and_204_have_no_body() -> None:
    continue_then_ok = b"HTTP/1.1 100 Continue\r\n\r\n" + json_answer()
    no_content = b"HTTP/1.1 204 No Content\r\ncontent-length: 99\r\n\r\n"
    async with serving(answers(continue_then_ok, no_content, json_answer())) as (server, url):
        async with pooled() as pool:
            assert await post(pool, url) == (200, b'{"ok":true}')
            assert await post(pool, url) == (204, b"")
            assert await post(pool, url) == (200, b'{"ok":true}')  # the 204 left the connection usable
    assert server.connections == 1


async def test_a_body_delimited_by_close_is_read_to_the_end_and_the_connection_not_reused() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await conn.send(b"part two")
        conn.writer.close()

    async with serving(handler) as (server, url):
        async with pooled() as pool:
            assert await post(pool, url) == (200, b"part one, part two")
            assert await post(pool, url) == (200, b"part one, part two")
    assert server.connections == 2


async def test_connection_close_and_a_server_closing_idle_connections_mean_a_new_connection() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(json_answer(extra=b"connection: close\r\n") if conn.server.connections == 1 else json_answer())
        # the server closes every connection after one answer (an idle timeout, at once)

    async with serving(handler) as (server, url):
        async with pooled() as pool:
            for _ in range(3):
                assert await post(pool, url) == (200, b'{"ok":true}')
                await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle
    assert server.connections == 3  # never a failed request on a connection the server had closed


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
    ids=[
        "status",
        "version",
        "no-colon",
        "obs-fold",
        "two-lengths",
        "negative-length",
        "chunk-size",
        "chunk-size-underscore",
        "chunk-end",
        "te-not-chunked",
        "te-gzip-chunked",
        "switching",
        "head-too-large",
    ],
)
async def test_malformed_answers_are_remote_protocol_errors_and_the_connection_is_dropped(answer: bytes) -> None:
    async with serving(answers(answer, json_answer())) as (server, url):
        async with pooled() as pool:
            with pytest.raises(httpx.RemoteProtocolError):
                await post(pool, url)
            assert await post(pool, url) == (200, b'{"ok":true}')
    assert server.connections == 2


@pytest.mark.parametrize(
    "partial",
    [
        b"",
        b"HTTP/1.1 200 OK\r\ncontent-le",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
    ],
    ids=["nothing", "in-head", "in-body", "in-chunk"],
)
async def test_an_answer_cut_short_is_an_error_not_a_short_body(partial: bytes) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(partial)

    async with serving(handler) as (_, url):
        async with pooled() as pool:
            with pytest.raises(httpx.RemoteProtocolError):
                await post(pool, url)


async def test_read_timeouts_bound_the_wait_for_the_head_and_each_silence_in_the_body() -> None:
    async def silent(conn: Conn) -> None:
        await conn.request()
        await asyncio.sleep(10)

    async def stalls_mid_body(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
        await asyncio.sleep(10)

    async def slow_but_steady(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef"):
            await asyncio.sleep(0.15)
            await conn.send(piece)

    for handler in (silent, stalls_mid_body):
        async with serving(handler) as (_, url):
            async with pooled() as pool:
                with pytest.raises(httpx.ReadTimeout):
                    await post(pool, url, read=0.2)
    async with serving(slow_but_steady) as (_, url):
        pool = H1Pool()
        try:  # 0.45 s in all, never 0.25 s of silence
            assert await post(pool, url, read=0.25) == (200, b"abcdef")
        finally:
            await pool.aclose()


async def test_connect_errors_and_timeouts_are_httpx_errors() -> None:
    async with pooled() as pool:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        with pytest.raises(httpx.ConnectError):
            await post(pool, f"http://127.0.0.1:{port}")
        with socket.socket() as full:  # a listener that never accepts, its queue full: SYNs are dropped
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            queued = [socket.create_connection(full.getsockname(), timeout=2)]  # the one place in the queue
            try:
                with pytest.raises(httpx.ConnectTimeout):
                    await post(pool, "http://{}:{}".format(*full.getsockname()), connect=0.2)
            finally:
                for sock in queued:
                    sock.close()
        with pytest.raises(httpx.UnsupportedProtocol):
            await post(pool, "ftp://127.0.0.1:21")


async def test_the_pool_limit_queues_requests_and_the_pool_timeout_bounds_the_wait() -> None:
    gate = asyncio.Event()

    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            await gate.wait()
            await conn.send(json_answer())

    async with serving(handler) as (server, url):
        async with pooled(max_connections=1) as pool:
            first = asyncio.create_task(post(pool, url))
            second = asyncio.create_task(post(pool, url))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.PoolTimeout):
                await post(pool, url, pool_wait=0.1)
            gate.set()
            assert await first == (200, b'{"ok":true}')
            assert await second == (200, b'{"ok":true}')
    assert server.connections == 1


async def test_a_full_pool_serves_waiting_requests_first_come_first_served() -> None:
    """Requests waiting for a connection get one in the order they came, also when the connection
    freed belongs to another origin (the first waiter closes it to open its own, which wakes the next
    waiter too early: that one must keep its place, not go to the back behind later requests)."""
    gate = asyncio.Event()

    async def slow_body(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
        await gate.wait()
        await conn.send(b"done")
        await conn.request()  # keep the connection open until the client closes it

    async with serving(slow_body) as (_, url_a), serving(answers(json_answer())) as (server_b, url_b):
        async with pooled(max_connections=1) as pool:
            held = await pool.request(b"POST", url_a + "/", [], b"", connect_timeout=5, read_timeout=5)
            first = [asyncio.create_task(post(pool, url_b, body=b"waiter-%d" % i)) for i in range(3)]
            await asyncio.sleep(0.05)  # three requests wait for the one connection
            late = asyncio.create_task(post(pool, url_b, body=b"late"))
            await asyncio.sleep(0.05)
            gate.set()  # the connection to A is free (and idle): the waiters take turns
            assert await held.read() == b"done"
            assert await asyncio.gather(*first, late) == [(200, b'{"ok":true}')] * 4
    bodies = [request.split(b"\r\n\r\n", 1)[1] for request in server_b.requests]
    assert bodies == [b"waiter-0", b"waiter-1", b"waiter-2", b"late"]


async def test_closing_a_stream_early_closes_its_connection_and_the_server_sees_it() -> None:
    disconnected = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                await conn.send(b"7\r\ndata: x\r\n")
                await asyncio.sleep(0.01)
        except ConnectionError:
            disconnected.set()

    async with serving(handler) as (_, url):
        async with pooled() as pool:
            response = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=5)
            async for piece in response:
                assert piece == b"data: x"
                break
            response.close()
            await asyncio.wait_for(disconnected.wait(), 5)
            assert not pool._open  # nothing left to reuse


async def test_a_slow_reader_pauses_the_socket_and_loses_nothing() -> None:
    size = 8 * 1024 * 1024

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + bytes(range(256)) * (size // 256))

    async with serving(handler) as (_, url):
        async with pooled() as pool:
            response = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=2)
            received = bytearray()
            async for piece in response:
                received += piece
                if len(received) < 2 * 1024 * 1024:
                    await asyncio.sleep(0.01)  # slower than loopback
            assert len(received) == size
            assert received[:256] == bytes(range(256))
            assert received[-256:] == bytes(range(256))


@pytest.mark.parametrize(
    "headers",
    [
        [(b"host", b"x"), (b"x-evil", b"a\r\nx-injected: 1")],
        [(b"host", b"x"), (b"x-evil", b"a\nb")],
        [(b"host", b"x"), (b"x-evil: y", b"a")],
        [(b"host", b"x"), (b"x-nul", b"a\x00")],
    ],
    ids=["crlf", "lf", "colon-in-name", "nul"],
)
async def test_header_injection_is_refused_before_anything_is_sent(headers: list[tuple[bytes, bytes]]) -> None:
    async with serving(answers(json_answer())) as (server, url):
        async with pooled() as pool:
            with pytest.raises(httpx.LocalProtocolError):
                await pool.request(b"POST", url + "/", headers, b"{}", connect_timeout=5, read_timeout=5)
    assert server.requests == []


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_tls_upstreams_are_verified(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    async with serving(answers(json_answer()), server_ctx) as (_, url):
        trusting = H1Pool(ssl_context=ssl.create_default_context(cafile=str(cert)))
        default = H1Pool()
        try:
            assert await post(trusting, url) == (200, b'{"ok":true}')
            assert await post(trusting, url) == (200, b'{"ok":true}')
            with pytest.raises(httpx.ConnectError, match="TLS"):
                await post(default, url)  # an unknown issuer is refused
        finally:
            await trusting.aclose()
            await default.aclose()


async def test_the_httpx_transport_speaks_for_any_request() -> None:
    async def handler(conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            line = request.split(b"\r\n", 1)[0]
            await conn.send(json_answer(b'"' + line + b'"'))

    async with serving(handler) as (server, url):
        async with httpx.AsyncClient(transport=H1Transport()) as client:
            got = await client.get(f"{url}/v1/models?limit=2", headers={"x-a": "1"})
            assert got.json() == "GET /v1/models?limit=2 HTTP/1.1"
            assert got.reason_phrase == "OK"
            got = await client.post(f"{url}/v1/x", json={"a": 1})
            assert got.json() == "POST /v1/x HTTP/1.1"
    get = server.requests[0]
    assert b"content-length" not in get.lower()  # no body, no length on a GET
    assert b"\r\nx-a: 1\r\n" in get
    assert server.connections == 1


# Regression (the code once did this): a streamed answer whose last bytes push the buffer over the high-water mark pauses the
# socket and completes in the same data_received: the connection goes back to the pool paused and
# the next request on it never sees its answer.
async def test_a_connection_paused_by_a_slow_reader_is_not_reused_paused() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        body = b"x" * (_HIGH_WATER + 11)
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body[:10])
        await asyncio.sleep(0.1)
        await conn.send(body[10:])  # crosses the high-water mark only with its very last byte
        while await conn.request() is not None:
            await conn.send(json_answer())

    async with serving(handler) as (server, url):
        async with pooled() as pool:
            response = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=5)
            pieces = aiter(response)
            received = len(await anext(pieces))
            await asyncio.sleep(0.3)  # slow reader: everything arrives meanwhile
            async for piece in pieces:
                received += len(piece)
            assert received == _HIGH_WATER + 11
            assert await post(pool, url, read=1.0) == (200, b'{"ok":true}')
    assert server.connections == 1


# Regression (the code once did this): a connect attempt that fails (or is cancelled) frees its slot without waking a request
# waiting for one: that request waits for the pool timeout (forever without one).
async def test_a_failed_connect_wakes_a_request_waiting_for_its_slot() -> None:
    with socket.socket() as full:  # a listener that never accepts, its queue full: connects hang
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = socket.create_connection(full.getsockname(), timeout=2)
        try:
            async with serving(answers(json_answer())) as (_, url):
                async with pooled(max_connections=1) as pool:
                    hanging = asyncio.create_task(
                        post(pool, f"http://{full.getsockname()[0]}:{full.getsockname()[1]}", connect=0.3)
                    )
                    await asyncio.sleep(0.05)
                    waiting = asyncio.create_task(post(pool, url))  # the pool is full: it waits
                    with pytest.raises(httpx.ConnectTimeout):
                        await hanging
                    assert await asyncio.wait_for(waiting, 2) == (200, b'{"ok":true}')
        finally:
            queued.close()


# Regression (the code once did this): a waiter woken by a released connection, then cancelled before it runs, swallows the
# wake-up: the next waiter sleeps although a connection is idle.
async def test_a_cancelled_woken_waiter_passes_the_wake_up_on() -> None:
    gate = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
        await gate.wait()
        await conn.send(b"cd")
        while await conn.request() is not None:
            await conn.send(json_answer())

    async with serving(handler) as (server, url):
        async with pooled(max_connections=1) as pool:
            response = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=5)
            first = asyncio.create_task(post(pool, url))
            second = asyncio.create_task(post(pool, url))
            await asyncio.sleep(0.05)  # both wait for the one connection
            gate.set()
            assert await response.read() == b"abcd"  # wakes `first`, which has not run yet...
            first.cancel()  # ...and is cancelled (its client went away)
            assert await asyncio.wait_for(second, 2) == (200, b'{"ok":true}')
            with pytest.raises(asyncio.CancelledError):
                await first
    assert server.connections == 1


# Regression (the code once did this): the read timeout keeps counting from the last byte received while the reader had the
# socket paused: right after the reader catches up, a ReadTimeout fires although the upstream was
# silent for much less than the timeout outside the pause.
async def test_time_spent_paused_by_a_slow_reader_does_not_count_as_upstream_silence() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        body = b"x" * (_HIGH_WATER + 1)
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(body) + 5) + body[:10])
        await asyncio.sleep(0.1)
        await conn.send(body[10:])
        await asyncio.sleep(1.5)  # 1.2 s of it with the client paused, 0.3 s after it resumes
        await conn.send(b"hello")

    async with serving(handler) as (_, url):
        async with pooled() as pool:
            response = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=0.8)
            pieces = aiter(response)
            received = len(await anext(pieces))
            await asyncio.sleep(1.3)  # the slow reader: the socket is paused for ~1.2 s
            async for piece in pieces:
                received += len(piece)
            assert received == _HIGH_WATER + 6


# Regression (the code once did this): status "000"/"099" is not a valid status code but is taken for a 1xx and skipped;
# the body that follows is then parsed as the next head.
async def test_a_status_below_100_is_a_protocol_error() -> None:
    async with serving(answers(b"HTTP/1.1 000 Zero\r\ncontent-length: 0\r\n\r\n")) as (_, url):
        async with pooled() as pool:
            with pytest.raises(httpx.RemoteProtocolError):
                await post(pool, url, read=1.0)


# Regression (the code once did this): a bare CR inside a header line is accepted and handed up as part of a value
# (RFC 9112 2.2: MUST be treated as invalid or replaced by SP).
async def test_a_bare_cr_in_a_response_header_is_refused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nx-a: 1\rset-cookie: s=1\r\ncontent-length: 2\r\n\r\nok"
    async with serving(answers(answer)) as (_, url):
        async with pooled() as pool:
            with pytest.raises(httpx.RemoteProtocolError):
                await post(pool, url)


# Regression (the code once did this): between eof_received (server closed an idle connection) and connection_lost the
# connection is not marked closed, so _acquire can hand it out; the request is written into a
# closing transport and fails with "closed the connection without answering" instead of being
# sent on a new connection. Emulates exactly what asyncio's transport does on EOF.
async def test_a_connection_whose_eof_was_seen_is_not_handed_out() -> None:
    async with serving(answers(json_answer())) as (server, url):
        async with pooled() as pool:
            assert await post(pool, url) == (200, b'{"ok":true}')
            (conn,) = pool._open
            assert conn.eof_received() is False  # the FIN arrives: asyncio then closes the transport
            assert conn.transport is not None
            conn.transport.close()  # (connection_lost only runs on the next loop iteration)
            assert await post(pool, url) == (200, b'{"ok":true}')
    assert server.connections == 2


# a request cancelled while waiting for the head drops its connection and frees its slot.
async def test_cancel_while_waiting_for_the_head_frees_the_slot() -> None:
    first = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if not first.is_set():
            first.set()
            await conn.request()
            await asyncio.sleep(10)
        await answers(json_answer())(conn)

    async with serving(handler) as (_, url):
        async with pooled(max_connections=1) as pool:
            task = asyncio.create_task(post(pool, url))
            await first.wait()
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not pool._open
            assert pool._connecting == 0
            assert await post(pool, url, pool_wait=1.0) == (200, b'{"ok":true}')


# bytes arriving after an answer in the same read mean the connection is not reused.
async def test_extra_bytes_after_an_answer_mean_a_new_connection() -> None:
    async with serving(answers(json_answer() + b"GARBAGE", json_answer())) as (server, url):
        async with pooled() as pool:
            assert await post(pool, url) == (200, b'{"ok":true}')
            assert await post(pool, url) == (200, b'{"ok":true}')
    assert server.connections == 2


async def test_head_and_304_with_a_length_keep_the_connection() -> None:
    answers_ = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
        json_answer(),
    )
    async with serving(answers(*answers_)) as (server, url):
        async with pooled() as pool:
            response = await pool.request(b"HEAD", url + "/", [], b"", connect_timeout=5, read_timeout=5)
            assert (response.status, await response.read()) == (200, b"")
            assert await post(pool, url) == (304, b"")
            assert await post(pool, url) == (200, b'{"ok":true}')
    assert server.connections == 1


# cancelling a request while it connects gives the slot back.
async def test_cancel_while_connecting_frees_the_slot() -> None:
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = socket.create_connection(full.getsockname(), timeout=2)
        try:
            pool = H1Pool(max_connections=1)
            task = asyncio.create_task(post(pool, f"http://{full.getsockname()[0]}:{full.getsockname()[1]}", connect=5))
            await asyncio.sleep(0.05)
            assert pool._connecting == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool._connecting == 0
            assert not pool._open
            await pool.aclose()
        finally:
            queued.close()


async def test_a_length_next_to_chunked_coding_reads_chunks_then_closes() -> None:
    both = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    async with serving(answers(both, json_answer())) as (server, url):
        async with pooled() as pool:
            assert await post(pool, url) == (200, b"hello")
            assert await post(pool, url) == (200, b'{"ok":true}')
    assert server.connections == 2  # framing another hop may have read differently: not reused


async def test_an_ipv6_upstream_is_dialled_and_named_in_host() -> None:
    async with serving(answers(json_answer()), host="::1") as (server, url):
        async with httpx.AsyncClient(transport=H1Transport()) as client:
            assert (await client.post(f"{url}/v1/chat", content=b"{}")).json() == {"ok": True}
    port = url.rsplit(":", 1)[1]
    assert f"\r\nhost: [::1]:{port}\r\n".encode() in server.requests[0].lower()


async def test_busy_reader_then_silent_upstream_still_times_out() -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await asyncio.sleep(10)

    async with serving(handler) as (_, url):
        async with pooled() as pool:
            response = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=0.2)
            pieces = aiter(response)
            assert await anext(pieces) == b"abc"
            await asyncio.sleep(0.5)  # busy elsewhere: the timer fires and is not re-armed
            with pytest.raises(httpx.ReadTimeout):
                await asyncio.wait_for(anext(pieces), 2)  # TimeoutError here would mean a hang


async def test_a_finished_response_closed_later_leaves_its_reused_connection_alone() -> None:
    gate = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(json_answer())
        await conn.request()
        await gate.wait()
        await conn.send(json_answer(b"[2]"))

    async with serving(handler) as (server, url):
        async with pooled() as pool:
            first = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=0.1)
            second_task = asyncio.create_task(post(pool, url, read=2))
            await asyncio.sleep(0.05)
            first.close()
            await asyncio.sleep(0.3)  # past the first response's read timeout
            gate.set()
            assert await second_task == (200, b"[2]")
    assert server.connections == 1


async def test_httpx_aread_then_aclose_and_full_stream_keep_the_connection() -> None:
    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await asyncio.sleep(0.05)
            await conn.send(b"0\r\n\r\n")

    async with serving(handler) as (server, url):
        transport = H1Transport(read_timeout=2)
        async with httpx.AsyncClient(transport=transport) as client:
            r = await client.post(url + "/", content=b"{}")
            assert r.content == b"abc"
            await r.aclose()
            await r.aclose()
            async with client.stream("POST", url + "/", content=b"{}") as s:
                assert b"".join([c async for c in s.aiter_raw()]) == b"abc"
            await s.aclose()
            r = await client.post(url + "/", content=b"{}")
            assert r.content == b"abc"
    assert server.connections == 1


@pytest.mark.parametrize("split", range(1, 40))
async def test_rest_across_every_split_with_trailers(split: int) -> None:
    body = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n1;x=y\r\nc\r\n0\r\nt: 1\r\nu: 2\r\n\r\n"
    )

    async def handler(conn: Conn) -> None:
        while await conn.request() is not None:
            for i in range(0, len(body), split):
                await conn.send(body[i : i + split])
                await asyncio.sleep(0.001)

    async with serving(handler) as (server, url):
        async with pooled() as pool:
            assert await post(pool, url) == (200, b"abc")
            assert await post(pool, url) == (200, b"abc")
    assert server.connections == 1


async def test_cancel_racing_the_end_of_the_body_keeps_the_released_connection() -> None:
    gate = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabc")
        await gate.wait()
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabcdef")
        await asyncio.sleep(10)

    async with serving(handler) as (server, url):
        async with pooled() as pool:
            response = await pool.request(b"POST", url + "/", [], b"", connect_timeout=5, read_timeout=1)
            conn = response._conn
            assert conn is not None
            task = asyncio.create_task(response.read())
            await asyncio.sleep(0.05)
            conn.data_received(b"def")  # the end arrives...
            task.cancel()  # ...in the same loop turn as the reader's cancellation
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not conn.closed
            gate.set()
            assert await post(pool, url) == (200, b"abcdef")
    assert server.connections == 1
