"""One Tortoise ORM context per gateway: open, migrate (Tortoise's own migrations), check, close.

Tortoise keeps its connections in a :class:`tortoise.context.TortoiseContext` found through a
contextvar. :class:`Database` owns one context; :meth:`Database.activate` makes it current for the
calling task (and the tasks it starts), which is how the storage plugin gives every request and
background task of *its* gateway the right connections even when several gateways share a process
(tests). The first database opened in a process also becomes Tortoise's global fallback, so code in
other tasks (a test body, a REPL) finds it without ceremony.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tortoise import context as tortoise_context
from tortoise.backends.base import executor as tortoise_executor
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.context import TortoiseContext
from tortoise.migrations.executor import MigrationExecutor, MigrationTarget
from tortoise.migrations.graph import MigrationKey
from tortoise.migrations.loader import MigrationLoader
from tortoise.migrations.recorder import MigrationRecorder

APP = "models"  # the Tortoise app label; models.py refers to "models.Team" etc.
MODELS_MODULE = "llmgateway.plugins.storage.models"
MIGRATIONS_MODULE = "llmgateway.plugins.storage.migrations"
_CURRENT = tortoise_context._current_context  # the contextvar Tortoise resolves connections through
PG_MIGRATION_LOCK = 0x6C6C6D67  # pg_advisory_lock key: one migrator at a time across replicas

log = logging.getLogger("llmgateway.storage")


def tortoise_config(url: str) -> dict[str, Any]:
    return {
        "connections": {"default": url},
        "apps": {APP: {"models": [MODELS_MODULE], "default_connection": "default", "migrations": MIGRATIONS_MODULE}},
        "use_tz": True,
        "timezone": "UTC",
    }


@dataclass(slots=True)
class MigrationStatus:
    applied: list[str]
    pending: list[str]
    unknown: list[str]  # applied in the database but not shipped (a newer llmgateway migrated it)


class Database:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self.context = TortoiseContext()
        self.dialect = (
            "postgres" if urlsplit(url).scheme in ("postgres", "postgresql", "asyncpg") else urlsplit(url).scheme
        )
        self.opened = False

    # ---- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self.dialect == "sqlite":
            path = self.sqlite_path
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self.activate():
            await self.context.init(config=tortoise_config(self.url))
        # Tortoise caches each model's INSERT/DELETE text per connection *name* ("default") in a
        # process-wide dict, and builds each model's base query for the dialect of the database
        # initialised last: one process serves one dialect at a time (switching between them, as
        # the tests do, is fine once the cache is cleared).
        tortoise_executor.EXECUTOR_CACHE.clear()
        self.opened = True
        if tortoise_context._global_context is None:
            tortoise_context.set_global_context(self.context)

    async def close(self) -> None:
        if not self.opened:
            return
        self.opened = False
        with self.activate():
            await self.context.close_connections()

    @contextlib.contextmanager
    def activate(self) -> Iterator[TortoiseContext]:
        """Make this database current for the calling task (and tasks it creates) until the block ends.

        Safe for concurrent tasks (the token is local; ``TortoiseContext.__enter__`` keeps one token
        per context object, which concurrent requests would overwrite)."""
        token = _CURRENT.set(self.context)
        try:
            yield self.context
        finally:
            _CURRENT.reset(token)

    def enter(self) -> None:
        """Make this database current for the rest of the calling task (no reset)."""
        _CURRENT.set(self.context)

    @property
    def sqlite_path(self) -> str | None:
        if self.dialect != "sqlite":
            return None
        path = self.url[len("sqlite://") :].split("?", 1)[0]
        return None if path == ":memory:" else path

    @property
    def connection(self) -> BaseDBAsyncClient:
        return self.context.db()

    def reset(self) -> None:
        """Drop the connection pool after a failure (a new one is made on next use).

        A pool whose connections died mid-operation (network cut, server restart) can keep handing
        out, or waiting for, broken connections; terminating it is immediate and safe: whatever was
        using it has failed already."""
        client = self.context.connections.get("default") if self.opened else None
        pool = getattr(client, "_pool", None)
        if client is None or pool is None or self.dialect != "postgres":
            return
        client._pool = None
        pool.terminate()

    async def ping(self) -> None:
        async def select_one() -> None:
            with self.activate():
                await self.connection.execute_query("SELECT 1")

        async with asyncio.timeout(self.timeout):
            await asyncio.create_task(select_one())  # see writer.insert_rows: no context leaks

    # ---- migrations ----------------------------------------------------------------------

    def _executor(self) -> MigrationExecutor:
        return MigrationExecutor(self.connection, tortoise_config(self.url)["apps"])

    async def migrate(self, target: str | None = None) -> list[str]:
        """Apply (or, with an older ``target``, roll back) migrations; returns what ran, in order.

        ``target`` is a migration name (``0001_initial``) or None for the latest. Replicas starting
        together serialise on a lock (PostgreSQL advisory lock, a file lock next to a SQLite file).
        """
        ran: list[str] = []

        def progress(event: str, app: str, name: str) -> None:
            if event in ("apply_done", "rollback_done"):
                ran.append(("-" if event == "rollback_done" else "") + name)
                log.info("migration %s.%s: %s", app, name, event.replace("_done", "ed").replace("applyed", "applied"))

        targets = [MigrationTarget(APP, target if target else "__latest__")]
        with self.activate():
            async with self._migration_lock():
                await self._executor().migrate(targets, progress=progress)
        return ran

    async def status(self) -> MigrationStatus:
        with self.activate():
            recorder = MigrationRecorder(self.connection)
            applied_keys = [k for k in await recorder.applied_migrations() if k.app_label == APP]
            loader = MigrationLoader(tortoise_config(self.url)["apps"], recorder)
            await loader.build_graph()
        shipped: list[str] = []
        for leaf in loader.graph.leaf_nodes(APP):
            for key in loader.graph.forwards_plan(leaf):
                if key.app_label == APP and key.name not in shipped:
                    shipped.append(key.name)
        applied = [k.name for k in applied_keys]
        return MigrationStatus(
            applied=[n for n in applied if n in shipped],
            pending=[n for n in shipped if n not in applied],
            unknown=[n for n in applied if n not in shipped],
        )

    @contextlib.asynccontextmanager
    async def _migration_lock(self) -> AsyncIterator[None]:
        if self.dialect == "postgres":
            async with self.connection.acquire_connection() as conn:  # one session holds the lock
                await conn.execute("SELECT pg_advisory_lock($1)", PG_MIGRATION_LOCK)
                try:
                    yield
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", PG_MIGRATION_LOCK)
            return
        path = self.sqlite_path
        if path is None:
            yield
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: one process migrates at a time anyway
            yield
            return
        fd = os.open(path + ".migrate-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def migration_key(name: str) -> MigrationKey:
    return MigrationKey(app_label=APP, name=name)


async def make_migrations(name: str | None = None, url: str = "sqlite://:memory:") -> list[str]:
    """Write a migration for the differences between models.py and the shipped migrations
    (developer tool: ``llmgateway db makemigrations``). Returns the written paths."""
    from tortoise.migrations.autodetector import MigrationAutodetector
    from tortoise.migrations.writer import format_migration_name

    db = Database(url)
    await db.open()
    try:
        with db.activate():
            apps = db.context.apps
            assert apps is not None
            detector = MigrationAutodetector(apps, tortoise_config(url)["apps"])
            writers = await detector.changes()
        paths: list[str] = []
        for writer in writers:
            if name:
                writer.name = format_migration_name(int(writer.name.split("_", 1)[0]), name)
            paths.append(str(writer.write()))
        return paths
    finally:
        await db.close()
