"""Fixtures and helpers shared by the security tests (no tests here).

* ``security_db``: the URL of a throwaway PostgreSQL database for the session; gateways get it as
  ``[database] url`` (:func:`database`) and the storage plugin migrates it; test bodies use the
  models inside ``with orm(gateway):``.
* ``redis_prefix``: a unique Redis key prefix per test, its keys deleted afterwards.
* :func:`create_key`: a virtual key made through the admin API, as an operator would.
* :func:`hung_listener`: a port where TCP connects hang (a blackholed Redis).
* :class:`TcpProxy`: a proxy in front of the real Redis or PostgreSQL that a test breaks on purpose:
  down, muted (the server does the work, its answers are lost), slow, or demoted (READONLY).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmgateway.core.hookspecs import hookimpl
from tests.conftest import require_service
from tests.servers import free_port

MASTER_KEY = "mk-security-tests-0123456789"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS_URL = "redis://127.0.0.1:6379/0"
REPO = Path(__file__).resolve().parent.parent

DEMO = """
[providers.demo]
type = "demo"

[[models]]
name = "demo"
deployments = [{ provider = "demo", model = "demo-1" }]
"""


def config(*parts: str, master: bool = True) -> str:
    """A gateway config: the demo model, the master key, then ``parts`` (dedented TOML)."""
    head = f'[auth]\nmaster_key = "{MASTER_KEY}"\n' if master else ""
    return (
        head + "".join(textwrap.dedent(p) for p in parts) + ("" if parts and "[[models]]" in "".join(parts) else DEMO)
    )


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(model: str = "demo", text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def create_key(url: str, caller: str = MASTER_KEY, **fields: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.post("/admin/api/keys", json=fields, headers=auth(caller))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def pg_execute(sql: str, database: str = "test") -> None:
    import asyncpg

    conn = await asyncpg.connect(database=database, **PG)  # type: ignore[arg-type]
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


_db: dict[str, Any] = {"users": 0, "url": None, "name": None}


@pytest.fixture(scope="session")
async def security_db() -> AsyncIterator[str]:
    """The URL of a fresh PostgreSQL database (the storage plugin migrates it on first use).

    Test modules import this fixture, so pytest may set it up once per module: the database is
    shared and dropped when the last user is done.
    """
    require_service("PostgreSQL", "127.0.0.1", 5432)
    if _db["users"] == 0:
        name = f"llmgw_sec_{secrets.token_hex(4)}"
        await pg_execute(f'CREATE DATABASE "{name}"')
        _db.update(name=name, url=f"postgres://postgres@127.0.0.1:5432/{name}")
    _db["users"] += 1
    try:
        yield str(_db["url"])
    finally:
        _db["users"] -= 1
        if _db["users"] == 0:
            await pg_execute(f'DROP DATABASE IF EXISTS "{_db["name"]}" WITH (FORCE)')


def database(url: str) -> str:
    return f'[database]\nurl = "{url}"\n'


@contextlib.contextmanager
def orm(gateway: Any) -> Iterator[None]:
    """Use the models on ``gateway``'s database (its storage plugin's connections)."""
    with gateway.state["storage"].db.activate():
        yield


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    require_service("Redis", "127.0.0.1", 6379)
    import redis.asyncio as aioredis

    prefix = f"llmgw-test:{secrets.token_hex(6)}:"
    yield prefix
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


# Loaded by subprocess gateways (``[plugins] modules = ["tests.test_security_support"]``) that must
# log everything at DEBUG to stderr, so a leaked secret would show there.
@hookimpl
def llmgateway_configure(config: Any) -> None:
    if os.environ.get("LLMGW_TEST_DEBUG_LOGS"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, force=True)


class GatewayProcess:
    """``python -m llmgateway serve`` in a subprocess; stderr collected for inspection."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = config_path.with_suffix(f".{self.port}.stderr")
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmgateway", "serve", "--config", str(config_path), "--port", str(self.port)],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while loop.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited: {self.stderr()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/health/live")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"gateway on {self.url} did not start: {self.stderr()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")


@contextlib.contextmanager
def gateway_processes(
    config_path: Path, count: int, env: dict[str, str] | None = None
) -> Iterator[list[GatewayProcess]]:
    procs = [GatewayProcess(config_path, env) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@contextlib.asynccontextmanager
async def hung_listener() -> AsyncIterator[int]:
    """A port where TCP connects hang: a listening socket that never accepts, its queue filled up
    (SYNs to a full accept queue are dropped, as for a blackholed host)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    loop = asyncio.get_running_loop()
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            sock = socket.socket()
            sock.setblocking(False)
            fillers.append(sock)
            try:
                async with asyncio.timeout(0.2):
                    await loop.sock_connect(sock, ("127.0.0.1", port))
            except TimeoutError:
                break  # this connect hangs: so will the next ones
        else:
            raise RuntimeError("could not make connects hang")
        yield port
    finally:
        for sock in fillers:
            sock.close()
        server.close()


def _commands(buffer: bytearray) -> int:
    """Complete RESP commands (arrays of bulk strings) at the start of ``buffer``, removed from it."""
    count = 0
    while True:
        pos, end = 0, buffer.find(b"\r\n")
        if not buffer.startswith(b"*") or end < 0:
            return count
        items, pos = int(buffer[1:end]), end + 2
        for _ in range(items):
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                return count
            pos = end + 2 + int(buffer[pos + 1 : end]) + 2
            if pos > len(buffer):
                return count
        del buffer[:pos]
        count += 1


class TcpProxy:
    """A TCP proxy on loopback in front of a real server (Redis, PostgreSQL), for breaking it on purpose.

    ``mode``: ``"forward"``; ``"down"`` (open connections are cut, new ones closed at once: a dead
    server); ``"mute"`` (requests still reach the server, its answers are dropped: it did the work but
    the client never hears of it). ``delay`` holds each answer back that many seconds.
    :meth:`demote` makes the open connections answer every command with ``-READONLY`` (the old
    primary after a failover) while new connections still reach the server (the new primary).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "forward"
        self.delay = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._server.wait_closed()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "down":
            for link in list(self._links):
                link.close()

    def demote(self) -> None:
        for link in self._links:
            link.readonly = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        for coro in (self._requests(link, reader), self._answers(link, up_reader)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _requests(self, link: _Link, reader: asyncio.StreamReader) -> None:
        pending = bytearray()
        try:
            while data := await reader.read(65536):
                if link.readonly:
                    pending += data
                    for _ in range(_commands(pending)):
                        link.client.write(b"-READONLY You can't write against a read only replica.\r\n")
                else:
                    link.upstream.write(data)
        except OSError:
            pass
        finally:
            link.close()
            self._links.discard(link)

    async def _answers(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.mode == "forward" and not link.readonly:
                    link.client.write(data)
        except OSError:
            pass
        finally:
            link.close()
            self._links.discard(link)


class _Link:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.readonly = False

    def close(self) -> None:
        self.client.close()
        self.upstream.close()
