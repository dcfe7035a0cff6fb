"""``llmgateway keys create | list | revoke``: the same operations as the admin API, as the admin.

Each command loads the config (``--config``), starts the plugins (the storage plugin opens the
database), does its work and shuts them down again. ``create`` prints the key once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer

from llmgateway.core.errors import GatewayError

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Path to gateway.toml (default: $LLMGATEWAY_CONFIG or ./gateway.toml)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text")]


def _run(config: Path | None, action: Callable[[Any], Awaitable[T]]) -> T:
    from llmgateway.core.cli import fail, load

    gateway = load(config)

    async def main() -> T:
        await gateway.hooks.startup(gateway)
        try:
            return await action(gateway)
        finally:
            await gateway.hooks.shutdown(gateway)
            for client in gateway.clients:
                with contextlib.suppress(Exception):
                    await client.aclose()

    try:
        return asyncio.run(main())
    except GatewayError as exc:
        raise fail(f"Error: {exc.message}") from None


def register(cli: typer.Typer) -> None:
    app = typer.Typer(help="Manage virtual API keys (sk-lg-...).", no_args_is_help=True)
    cli.add_typer(app, name="keys")

    @app.command("create")
    def create(
        config: ConfigOption = None,
        name: Annotated[str, typer.Option(help="A label for the key")] = "",
        role: Annotated[
            list[str] | None, typer.Option("--role", help="admin, operator, viewer or user (repeat)")
        ] = None,
        model: Annotated[list[str] | None, typer.Option("--model", help="An allowed model alias (repeat)")] = None,
        user: Annotated[str | None, typer.Option("--user", help="Owner user id")] = None,
        team: Annotated[str | None, typer.Option("--team", help="Owner team id")] = None,
        expires_in: Annotated[str | None, typer.Option(help="Lifetime: seconds or 90s, 15m, 12h, 30d, 2w")] = None,
        rpm: Annotated[int | None, typer.Option(help="Requests per minute")] = None,
        tpm: Annotated[int | None, typer.Option(help="Tokens per minute")] = None,
        max_parallel: Annotated[int | None, typer.Option(help="Concurrent requests")] = None,
        budget_usd: Annotated[float | None, typer.Option(help="Budget in USD per period")] = None,
        budget_period: Annotated[str, typer.Option(help="daily, weekly, monthly or total")] = "monthly",
        metadata: Annotated[str | None, typer.Option(help="A JSON object kept with the key")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Create a virtual key and print it (it is shown only this once)."""
        from llmgateway.core.cli import fail

        from .admin_keys import KeySpec, create_key, key_json

        try:
            meta = orjson.loads(metadata) if metadata else {}
        except orjson.JSONDecodeError:
            raise fail("--metadata must be a JSON object") from None
        data: dict[str, Any] = {
            "name": name,
            "roles": role or [],
            "allowed_models": model or None,
            "user_id": user,
            "team_id": team,
            "expires_in": expires_in,
            "rpm": rpm,
            "tpm": tpm,
            "max_parallel": max_parallel,
            "budget_usd": budget_usd,
            "budget_period": budget_period,
            "metadata": meta,
        }
        try:
            spec = KeySpec.parse(data)
        except GatewayError as exc:
            raise fail(f"Error: {exc.message}") from None

        async def action(gateway: Any) -> dict[str, Any]:
            from llmgateway.plugins.auth import MASTER

            row, key = await create_key(spec, MASTER)
            return {**key_json(row), "key": key}

        created = _run(config, action)
        if as_json:
            typer.echo(orjson.dumps(created).decode())
            return
        typer.echo(f"Created key {created['id']} ({created['prefix']}…). Store it now; it is not shown again:")
        typer.echo(created["key"])

    @app.command("list")
    def list_(
        config: ConfigOption = None,
        include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys")] = False,
        limit: Annotated[int, typer.Option(help="At most this many keys")] = 1000,
        as_json: JsonOption = False,
    ) -> None:
        """List virtual keys (prefixes only; keys are never stored)."""
        from .admin_keys import key_json, list_keys

        async def action(gateway: Any) -> list[dict[str, Any]]:
            rows = await list_keys(limit=limit, include_revoked=include_revoked)
            return [key_json(r) for r in rows]

        keys = _run(config, action)
        if as_json:
            typer.echo(orjson.dumps(keys).decode())
            return
        if not keys:
            typer.echo("No keys.")
            return
        for k in keys:
            state = "revoked" if k["revoked_at"] else ("expires " + k["expires_at"] if k["expires_at"] else "active")
            models = ",".join(k["allowed_models"]) if k["allowed_models"] is not None else "*"
            typer.echo(
                f"{k['id']:<22} {k['prefix']}…  {','.join(k['roles']):<14} models={models:<20} "
                f"user={k['user_id'] or '-'} team={k['team_id'] or '-'}  {state}  {k['name']}"
            )

    @app.command("revoke")
    def revoke(
        key_id: Annotated[str, typer.Argument(help="The key's id (key_...)")],
        config: ConfigOption = None,
    ) -> None:
        """Revoke a key: it stops working on every replica within seconds."""
        from .admin_keys import revoke_key
        from .keys import KeysPlugin

        async def action(gateway: Any) -> Any:
            from llmgateway.plugins.auth import MASTER

            plugin = gateway.state.get("keys")
            if not isinstance(plugin, KeysPlugin):
                plugin = KeysPlugin()
            return await revoke_key(plugin, key_id, MASTER)

        row = _run(config, action)
        typer.echo(f"Revoked key {row.id} ({row.prefix}…)")
