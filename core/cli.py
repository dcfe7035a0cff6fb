"""The ``llmgateway`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from . import hookspecs
from .errors import ConfigError

cli = typer.Typer(
    name="llmgateway",
    help="One OpenAI-compatible endpoint in front of many LLM providers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Path to gateway.toml (default: $LLMGATEWAY_CONFIG or ./gateway.toml)"),
]


def fail(message: str) -> typer.Exit:
    typer.secho(message, err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def load(config: Path | None):  # type: ignore[no-untyped-def]
    """Load and fully validate a config (plugins included); exit 2 with the reason on error."""
    from .app import build_gateway
    from .config import load_config

    try:
        conf = load_config(config)
        return build_gateway(conf)
    except ConfigError as exc:
        raise fail(f"Configuration error: {exc}") from None


@cli.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: server.host)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: server.port)")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: server.workers)")] = None,
    server: Annotated[str | None, typer.Option(help="hypercorn (default), uvicorn or granian")] = None,
) -> None:
    """Start the gateway."""
    from .server import serve as run_server

    gateway = load(config)
    conf = gateway.config
    host = host or conf.server.host
    port = port if port is not None else conf.server.port
    chosen = server or conf.server.server
    if chosen not in ("hypercorn", "uvicorn", "granian"):
        raise fail(f"--server must be hypercorn, uvicorn or granian, not {chosen!r}")
    typer.echo(
        f"llmgateway listening on http://{host}:{port}  (config: {conf.path}, models: {', '.join(conf.models) or 'none'})"
    )
    run_server(conf, host=host, port=port, workers=workers or conf.server.workers, server=chosen)


@cli.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Validate gateway.toml (and every plugin's section) without starting."""
    gateway = load(config)
    conf = gateway.config
    typer.echo(
        f"{conf.path}: OK — {len(conf.providers)} provider(s), {len(conf.models)} model alias(es), "
        f"{len(gateway.pm.info)} plugin(s)"
    )


@cli.command()
def plugins(config: ConfigOption = None) -> None:
    """Print the resolved hook chain: each hook with its implementations in call order."""
    from .manager import call_order

    gateway = load(config)
    pm = gateway.pm
    typer.echo("Plugins (call order):")
    for name in reversed(list(pm.info)):  # registered in reverse of call order
        info = pm.info[name]
        kind = "built-in" if info.builtin else info.package
        typer.echo(f"  {name:<16} {info.module:<48} [{kind}]")
    typer.echo("")
    typer.echo("Hooks:")
    for hook in hookspecs.all_hook_names():
        names = call_order(pm, hook)
        spec = hookspecs.describe(hook)
        mode = "first-result" if spec["firstresult"] else "fan-out"
        typer.echo(f"  {hook} ({mode})")
        for plugin_name in names:
            info = pm.info.get(plugin_name)
            where = (info.package if info else "?") if not (info and info.builtin) else "llmgateway"
            typer.echo(f"    - {plugin_name}  ({where})")
        if not names:
            typer.echo("    (none)")


@cli.command()
def version() -> None:
    """Print the version."""
    from llmgateway import __version__

    typer.echo(__version__)


def _register_plugin_commands() -> None:
    """Let plugins add subcommands (``db``, ``keys``, ``jobs``...). Uses entry points, no config."""
    from .manager import load_plugins

    try:
        pm = load_plugins()
    except ConfigError as exc:
        typer.secho(f"warning: plugins could not be loaded for extra commands: {exc}", err=True)
        return
    pm.hook.llmgateway_register_commands(cli=cli)


def main() -> None:
    _register_plugin_commands()
    try:
        cli()
    except ConfigError as exc:  # pragma: no cover - load() already reports these
        typer.secho(f"Configuration error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
