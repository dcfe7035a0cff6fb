"""Serving the app: hypercorn by default (uvloop when installed), one or several worker processes.

SIGTERM / SIGINT start a graceful drain: ``/health/ready`` turns 503, no new connections are
accepted, in-flight requests (streams included) get ``server.drain_timeout`` seconds to finish, then
the lifespan shutdown runs (plugins flush usage) and the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from email.utils import formatdate
from typing import Any

from hypercorn.config import Config as HyperConfig
from starlette.types import ASGIApp

from .app import create_app, gateway_of
from .config import GatewayConfig


def app_from_env() -> ASGIApp:
    """Factory for worker processes: the config path comes from ``$LLMGATEWAY_CONFIG``."""
    configure_logging()
    return _serving(create_app(os.environ.get("LLMGATEWAY_CONFIG", "gateway.toml")))


def _serving(app: ASGIApp) -> ASGIApp:
    gateway_of(app).serving = True
    return app


def configure_logging() -> None:
    """llmgateway's own log lines (startup, migrations, Redis or database trouble) on stderr from
    INFO up, in hypercorn's format — unless logging was configured already (an embedding
    application's choice stands). Other libraries stay at WARNING: httpx logs every request at INFO."""
    logger = logging.getLogger("llmgateway")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S %z")
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _event_loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a default dependency on Linux
        return None
    return uvloop.new_event_loop


def serve(config: GatewayConfig, *, host: str, port: int, workers: int, server: str) -> None:
    configure_logging()
    os.environ["LLMGATEWAY_CONFIG"] = os.path.abspath(config.path)
    if server == "uvicorn":
        _serve_uvicorn(config, host=host, port=port, workers=workers)
        return
    if server == "granian":
        _serve_granian(config, host=host, port=port, workers=workers)
        return
    hyper = _hypercorn_config()
    hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hyper.graceful_timeout = config.server.drain_timeout
    hyper.accesslog = None
    hyper.errorlog = "-"
    hyper.keep_alive_timeout = 75
    hyper.h11_max_incomplete_size = 64 * 1024
    hyper.include_server_header = False  # no software banner on every answer
    hyper.backlog = 1024
    if workers > 1:
        from hypercorn.run import run

        hyper.workers = workers
        hyper.application_path = "llmgateway.core.server:app_from_env()"
        hyper.worker_class = "uvloop" if _event_loop_factory() else "asyncio"
        run(hyper)
        return
    app = _serving(create_app(config))
    factory = _event_loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_hypercorn(app, hyper))


class GatewayHyperConfig(HyperConfig):
    """hypercorn's Config, formatting the ``Date`` header once a second instead of per answer.

    Module level (not built in a function) so hypercorn can pickle it for worker processes.
    """

    _date: tuple[int, bytes] = (0, b"")

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        if not self.include_date_header or self.alt_svc_headers or getattr(self, "_quic_addresses", None):
            return super().response_headers(protocol)
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode("ascii"))
        headers = [(b"date", self._date[1])]
        if self.include_server_header:
            headers.append((b"server", f"hypercorn-{protocol}".encode("ascii")))
        return headers


def _hypercorn_config() -> GatewayHyperConfig:
    return GatewayHyperConfig()


async def _serve_hypercorn(app: ASGIApp, hyper: Any) -> None:
    from hypercorn.asyncio import serve as hyper_serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    gateway = gateway_of(app)

    def on_signal() -> None:
        gateway.draining = True
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await hyper_serve(app, hyper, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def _serve_uvicorn(config: GatewayConfig, *, host: str, port: int, workers: int) -> None:
    import uvicorn

    uvicorn.run(
        "llmgateway.core.server:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop" if _event_loop_factory() else "asyncio",
        http="httptools",
        access_log=False,
        timeout_graceful_shutdown=int(config.server.drain_timeout),
        log_level="warning",
    )


def _serve_granian(config: GatewayConfig, *, host: str, port: int, workers: int) -> None:
    from granian.constants import Interfaces
    from granian.server import Server

    Server(
        "llmgateway.core.server:app_from_env",
        factory=True,
        address=host,
        port=port,
        workers=workers,
        interface=Interfaces.ASGI,
        log_access=False,
    ).serve()
