"""``llmgateway db …``: migrate, status, cleanup (and makemigrations for developers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from llmgateway.core.cli import ConfigOption, fail
from llmgateway.core.errors import ConfigError

from .database import Database
from .settings import StorageSettings, parse

T = TypeVar("T")


def _settings(config: Path | None) -> StorageSettings:
    from llmgateway.core.config import load_config

    try:
        return parse(load_config(config))
    except ConfigError as exc:
        raise fail(f"Configuration error: {exc}") from None


def _with_db(settings: StorageSettings, work: Callable[[Database], Awaitable[T]]) -> T:
    async def main() -> T:
        db = Database(settings.url, settings.timeout)
        try:
            await db.open()
            return await work(db)
        finally:
            await db.close()

    try:
        return asyncio.run(main())
    except (OSError, ConnectionError) as exc:
        raise fail(f"Cannot reach the database {settings.display_url}: {exc}") from None


def register(cli: typer.Typer) -> None:
    db_app = typer.Typer(name="db", help="The database: migrations, status, retention cleanup.", no_args_is_help=True)

    @db_app.command("migrate")
    def migrate(
        config: ConfigOption = None,
        to: Annotated[
            str | None, typer.Option("--to", help="Migrate forward or back to this migration (e.g. 0001_initial)")
        ] = None,
    ) -> None:
        """Apply the pending migrations (the gateway also does this at startup unless
        database.migrate_on_startup = false)."""
        settings = _settings(config)
        ran = _with_db(settings, lambda db: db.migrate(to))
        if not ran:
            typer.echo(f"{settings.display_url}: already up to date")
        for name in ran:
            typer.echo(f"{'rolled back' if name.startswith('-') else 'applied'} {name.lstrip('-')}")

    @db_app.command("status")
    def status(
        config: ConfigOption = None,
        check: Annotated[bool, typer.Option("--check", help="Exit with status 1 when migrations are pending")] = False,
    ) -> None:
        """Show applied and pending migrations."""
        settings = _settings(config)
        state = _with_db(settings, lambda db: db.status())
        typer.echo(f"database: {settings.display_url}")
        for name in state.applied:
            typer.echo(f"  [applied] {name}")
        for name in state.pending:
            typer.echo(f"  [pending] {name}")
        for name in state.unknown:
            typer.echo(f"  [unknown] {name}  (applied by a newer llmgateway)")
        typer.echo("up to date" if not state.pending else f"{len(state.pending)} migration(s) pending")
        if check and state.pending:
            raise typer.Exit(code=1)

    @db_app.command("cleanup")
    def cleanup(config: ConfigOption = None) -> None:
        """Roll raw usage up into hourly and daily aggregates, then delete what retention allows."""
        from .retention import cleanup as run_cleanup

        settings = _settings(config)
        result = _with_db(settings, lambda db: run_cleanup(db, settings.retention))
        typer.echo(
            f"rolled up {result.hours_rolled} hour(s) and {result.days_rolled} day(s); deleted "
            f"{result.usage_deleted} usage row(s) (with their routing decisions) and "
            f"{result.rollups_deleted} rollup(s) in {result.seconds:.2f} s"
        )

    @db_app.command("makemigrations", hidden=True)
    def makemigrations(
        name: Annotated[str | None, typer.Option(help="Name of the new migration")] = None,
    ) -> None:
        """(Developers) Write a migration for changes to plugins/storage/models.py."""
        from .database import make_migrations

        paths = asyncio.run(make_migrations(name))
        typer.echo("\n".join(paths) if paths else "No changes detected")

    cli.add_typer(db_app, name="db")
