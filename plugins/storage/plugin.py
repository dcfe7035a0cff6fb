"""Plugin ``storage``: the database (``[database]``), its migrations, write-behind usage accounting,
retention / rollups, and ``llmgateway db``.

Contract for other plugins (security, routing, ops, admin)
-----------------------------------------------------------
* The models in :mod:`llmgateway.plugins.storage.models` are usable from the end of this plugin's
  ``llmgateway_startup`` (it runs ``tryfirst``) until the start of its ``llmgateway_shutdown``
  (which runs last): in request hooks, in routes, in ``llmgateway_startup`` implementations of
  other plugins and in the tasks they start, and in jobs. Use them as usual
  (``await ApiKey.get_or_none(key_hash=...)``); the schema is migrated before anyone sees it.
* ``gateway.state["storage"]`` is this plugin: ``.db`` (:class:`~.database.Database`, for
  :mod:`~.queries` and ``with db.activate():`` in tasks created outside the gateway),
  ``.writer`` (the write-behind queue and its ``stats``), ``.cleanup()`` (retention now).
* Usage rows are written by this plugin from ``llmgateway_record_usage`` (one per request, with
  ``ctx.decision``): do not insert :class:`~.models.UsageRecord` rows yourself.
* Changing models.py means adding a migration: ``llmgateway db makemigrations --name what_changed``
  (review it; add a data step with ``RunPython`` when existing rows need values).
* ``llmgateway db migrate | status | cleanup`` are added through ``llmgateway_register_commands``;
  the ``storage.cleanup`` job through ``llmgateway_register_jobs``; ``/health/ready`` gets a
  ``storage`` check.
* One SQL dialect per process at a time (Tortoise caches per-model SQL process-wide): tests may
  switch between SQLite and PostgreSQL gateways, but not run both at once.

How every request and task finds *this* gateway's database: Tortoise resolves connections through a
contextvar. The plugin sets it in the lifespan task at startup (so tasks started by later startup
hooks inherit it) and, through ``llmgateway_asgi_wrapper``, around every request, so two gateways in
one process (tests) never mix their databases. The first database opened in a process is also
Tortoise's global fallback for code running elsewhere (a test body).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import typer
from starlette.types import ASGIApp, Receive, Scope, Send

from llmgateway.core.config import GatewayConfig
from llmgateway.core.errors import redact
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.jobs import Job
from llmgateway.core.types import RequestContext, UsageRecord

from .database import _CURRENT, Database
from .retention import CleanupResult
from .retention import cleanup as run_cleanup
from .settings import StorageSettings, parse
from .writer import UsageWriter

log = logging.getLogger("llmgateway.storage")


class SchemaBehindError(RuntimeError):
    """The database needs migrations and ``migrate_on_startup`` is false."""


def _return_freed_memory() -> None:
    """Migrating a new database builds and drops a lot (measured: +36 MB of RSS for the four
    migrations, ~1 MB of it live objects); glibc keeps the freed heap for the life of the process
    unless asked to give it back. Asked once, after migrating: the server then starts ~20 MB lighter."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl...): nothing to trim
            pass


class StoragePlugin:
    def __init__(self) -> None:
        self.settings = StorageSettings()
        self.db: Database | None = None
        self.writer: UsageWriter | None = None

    # ---- configuration -------------------------------------------------------------------

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        self.settings = settings = parse(config)
        self.db = Database(settings.url, settings.timeout)
        wb = settings.write_behind
        self.writer = UsageWriter(
            self.db,
            batch_size=wb.batch_size,
            flush_interval=wb.flush_interval,
            queue_size=wb.queue_size,
            spool_dir=wb.spool_dir,
            timeout=settings.timeout,
            sqlite_process=wb.process,
            process_priority=wb.priority,
        )

    @hookimpl
    def llmgateway_register_commands(self, cli: typer.Typer) -> None:
        from .cli import register

        register(cli)

    @hookimpl
    def llmgateway_register_jobs(self, gateway: Any) -> Sequence[Job]:
        async def run(gateway: Any) -> None:
            await self.cleanup()

        return [
            Job(
                name="storage.cleanup",
                schedule=self.settings.retention.schedule,
                run=run,
                description="Roll usage up into hourly and daily aggregates, then apply [database.retention]",
            )
        ]

    @hookimpl
    def llmgateway_readiness_checks(self, gateway: Any) -> Mapping[str, Callable[[], Awaitable[None]]]:
        assert self.db is not None
        return {"storage": self.db.ping}

    @hookimpl
    def llmgateway_asgi_wrapper(self, gateway: Any) -> Callable[[ASGIApp], ASGIApp]:
        assert self.db is not None
        context = self.db.context

        def wrap(app: ASGIApp) -> ASGIApp:
            async def with_database(scope: Scope, receive: Receive, send: Send) -> None:
                token = _CURRENT.set(context)
                try:
                    await app(scope, receive, send)
                finally:
                    _CURRENT.reset(token)

            return with_database

        return wrap

    # ---- lifecycle -----------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    async def llmgateway_startup(self, gateway: Any) -> None:
        assert self.db is not None
        assert self.writer is not None
        db = self.db
        db.enter()  # this task (the lifespan) and every task started from here on use this database
        await db.open()
        try:
            if self.settings.migrate_on_startup:
                if gateway.serving and (await db.status()).pending:
                    await self._migrate_in_child()
                ran = await db.migrate()  # nothing left when the child did it; here otherwise
                if ran:
                    log.info("database %s migrated: %s", self.settings.display_url, ", ".join(ran))
                    _return_freed_memory()
            else:
                status = await db.status()
                if status.pending:
                    raise SchemaBehindError(
                        f"the database {self.settings.display_url} needs migrations "
                        f"({', '.join(status.pending)}): run `llmgateway db migrate` "
                        "or set database.migrate_on_startup = true"
                    )
        except BaseException:
            await db.close()
            raise
        gateway.state["storage"] = self
        self.writer.start()
        if gateway.serving:
            await self.writer.open_process()

    async def _migrate_in_child(self) -> None:
        """Migrate in a short-lived process (see :mod:`.migrate_child`: the server keeps ~16 MB less).
        Should it fail, the server migrates itself right after and reports what went wrong."""
        from . import migrate_child

        env = {
            **os.environ,
            migrate_child.URL_ENV: self.settings.url,
            migrate_child.TIMEOUT_ENV: str(self.settings.timeout),
        }
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            migrate_child.__name__,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await child.communicate()
        text = out.decode(errors="replace").strip()
        if child.returncode == 0:
            log.info("database %s migrated (in a child process): %s", self.settings.display_url, text)
        else:
            last = text.splitlines()[-1] if text else f"exit status {child.returncode}"
            password = urlsplit(self.settings.url).password
            log.warning(
                "migrating in a child process failed (%s); migrating in the server",
                redact(last.replace(self.settings.url, self.settings.display_url), [password] if password else []),
            )

    @hookimpl(tryfirst=True)  # shutdown runs in reverse call order: this one last
    async def llmgateway_shutdown(self, gateway: Any) -> None:
        if self.writer is not None:
            await self.writer.stop()
            stats = self.writer.stats
            pending = self.writer.spool.pending_rows() if stats.spooled else 0
            if pending:  # rows spooled and replayed while running are in the database already
                log.warning(
                    "%d usage rows are in the spool (%s); the next start writes them", pending, self.writer.spool.dir
                )
        if self.db is not None:
            await self.db.close()

    # ---- the request path ----------------------------------------------------------------

    @hookimpl
    def llmgateway_record_usage(self, ctx: RequestContext, record: UsageRecord) -> None:
        writer = self.writer
        if writer is not None:
            writer.put(record, ctx.decision)

    # ---- maintenance ---------------------------------------------------------------------

    async def cleanup(self) -> CleanupResult:
        """Roll up and apply retention now (the ``storage.cleanup`` job)."""
        assert self.db is not None
        assert self.writer is not None
        late = set(self.writer.late_hours)
        result = await run_cleanup(self.db, self.settings.retention, late_hours=late)
        self.writer.late_hours -= late
        return result
