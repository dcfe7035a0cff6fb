"""Shared fixtures: a fake OpenAI upstream on loopback, gateways built from TOML and served by
hypercorn on loopback, and the real PostgreSQL / Redis services (skipped off-CI when absent,
failing in CI where ``CI=true``)."""

from __future__ import annotations

import contextlib
import os
import socket
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from llmgateway.core.app import create_app, gateway_of
from llmgateway.core.config import parse_config
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import RequestContext, UsageRecord
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import running

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
UPSTREAM_KEY = "sk-upstream-test"


def service_available(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (on a laptop) or fail (in CI) when a real service the test needs is down."""
    if service_available(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}; CI must run every {name} test (start it as README says)")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own empty directory: a gateway built from a config string (no file)
    keeps its SQLite database there, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
async def fake_openai_server() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    async with running(fake) as url:
        yield fake, url


@pytest.fixture
async def upstream(fake_openai_server: tuple[FakeOpenAI, str]) -> tuple[FakeOpenAI, str]:
    """The fake OpenAI server, with its recorded requests cleared for this test."""
    fake, url = fake_openai_server
    fake.reset()
    return fake, url


def upstream_toml(url: str, models: str = "", extra: str = "") -> str:
    """A config with one `openai` provider named `local` pointing at the fake upstream."""
    return (
        textwrap.dedent(
            f"""
        [providers.local]
        type = "openai"
        base_url = "{url}/v1"
        api_key = "{UPSTREAM_KEY}"
        """
        )
        + textwrap.dedent(models)
        + textwrap.dedent(extra)
    )


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[str]]


@pytest.fixture
def serve_gateway(tmp_path: Path) -> GatewayFactory:
    """``async with serve_gateway(toml) as url:`` — a real gateway on loopback built from TOML."""

    @contextlib.asynccontextmanager
    async def factory(
        toml: str, *, plugins: dict[str, Any] | None = None, env: dict[str, str] | None = None
    ) -> AsyncIterator[str]:
        path = tmp_path / "gateway.toml"
        path.write_text(toml)
        config = parse_config(toml, file=str(path), env={**os.environ, **(env or {})})
        app = create_app(config, plugins=plugins)
        async with running(app) as url:
            factory.gateway = gateway_of(app)  # type: ignore[attr-defined]
            yield url

    return factory


def sdk(url: str, api_key: str = "sk-anything") -> openai.AsyncOpenAI:
    """The official OpenAI SDK pointed at a gateway (no SDK retries: tests see the first answer)."""
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


class Recorder:
    """A test plugin that keeps every usage record the gateway produces."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    @hookimpl
    def llmgateway_record_usage(self, ctx: RequestContext, record: UsageRecord) -> None:
        self.records.append(record)
