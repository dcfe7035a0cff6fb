"""Helpers for the storage tests (no tests here): throwaway PostgreSQL databases, opened
:class:`Database` objects, usage records, a TCP proxy that can cut the database off."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llmgateway.core.types import ANONYMOUS, Principal, RoutingDecision, Usage, UsageRecord
from llmgateway.plugins.storage.database import Database
from llmgateway.plugins.storage.sql import fetch
from tests.conftest import require_service

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


async def pg_execute(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(database="test", **PG)  # type: ignore[arg-type]
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards); yields its URL."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"llmgw_{secrets.token_hex(5)}"
    await pg_execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgres://postgres@127.0.0.1:5432/{name}"
    finally:
        await pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def database_url(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    if kind == "postgres":
        async with pg_database() as url:
            yield url
    else:
        yield f"sqlite://{tmp_path / 'storage.db'}"


@contextlib.asynccontextmanager
async def opened(url: str, *, migrate: bool = True, target: str | None = None) -> AsyncIterator[Database]:
    db = Database(url, timeout=5.0)
    await db.open()
    try:
        if migrate:
            await db.migrate(target)
        yield db
    finally:
        await db.close()


async def usage_rows(url: str, where: str = "1 = 1", params: list[Any] | None = None) -> list[dict[str, Any]]:
    """Usage rows as the database has them, read with a connection of our own."""
    async with opened(url, migrate=False) as db:
        return await fetch(db, f"SELECT * FROM usage_records WHERE {where} ORDER BY id", params)


DECISION_COLUMNS = (
    "request_id, created_at, alias, strategy, chosen, route_reason AS reason, candidates, fallbacks, fell_back, outcome"
)


async def decision_rows(url: str) -> list[dict[str, Any]]:
    """The routing decisions: the decision columns of the usage rows that have one."""
    async with opened(url, migrate=False) as db:
        return await decisions_of(db)


async def decisions_of(db: Database, where: str = "1 = 1") -> list[dict[str, Any]]:
    return await fetch(
        db, f"SELECT {DECISION_COLUMNS} FROM usage_records WHERE strategy IS NOT NULL AND {where} ORDER BY id"
    )


def record(
    request_id: str | None = None,
    *,
    started_at: float | None = None,
    alias: str = "chat",
    provider: str = "local",
    deployment: str | None = "chat/local/m#0",
    principal: Principal = ANONYMOUS,
    status: int = 200,
    cost: float | None = 0.001,
    prompt: int = 10,
    completion: int = 5,
    cached: int = 0,
    latency_ms: float = 100.0,
    ttft_ms: float | None = None,
    cache_hit: bool = False,
    streamed: bool = False,
) -> UsageRecord:
    return UsageRecord(
        request_id=request_id or f"req_{secrets.token_hex(8)}",
        endpoint="chat.completions",
        alias=alias,
        provider=provider,
        deployment=deployment,
        upstream_model="m",
        principal=principal,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached),
        cost=cost,
        status=status,
        error_code=None if status == 200 else str(status),
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        streamed=streamed,
        cache_hit=cache_hit,
        client_disconnected=status == 499,
        started_at=time.time() if started_at is None else started_at,
        attempts=1,
    )


def decision(
    alias: str = "chat", *, fallbacks: list[str] | None = None, reason: str = "config order"
) -> RoutingDecision:
    return RoutingDecision(
        alias=alias,
        strategy="ordered",
        candidates=[(f"{alias}/local/m#0", None), (f"{alias}/local/n#1", 0.5)],
        chosen=f"{alias}/local/m#0",
        reason=reason,
        fallbacks=fallbacks or [],
        outcome="success",
    )


class CuttableProxy:
    """A TCP proxy on loopback in front of a server; :meth:`cut` drops every connection and
    refuses new ones until :meth:`restore` (what a database outage looks like to a client)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.up = True
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.refused = 0

    async def __aenter__(self) -> CuttableProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def cut(self) -> None:
        self.up = False
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def restore(self) -> None:
        self.up = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()
                self.writers.discard(dst)

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
