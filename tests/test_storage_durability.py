"""No usage row is lost: a database outage in the middle of the load (a TCP proxy we cut and
restore between the gateway and PostgreSQL), the SQLite writer process killed and the SQLite file
locked, and SIGTERM while requests are in flight (a real ``llmgateway serve`` process)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.servers import free_port
from tests.test_storage_support import CuttableProxy, decision_rows, pg_database, usage_rows

pytestmark = pytest.mark.slow

DEMO = """
[providers.demo]
type = "demo"
delay = 0.02

[[models]]
name = "demo"
deployments = [{ provider = "demo", model = "demo-1" }]
"""


async def call(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
    """One request (every third one streamed); returns (request id, status)."""
    body: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": f"request {i} a b c d"}]}
    if i % 3 == 0:
        body["stream"] = True
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            text = b"".join([chunk async for chunk in response.aiter_bytes()])
            assert response.status_code != 200 or text.endswith(b"data: [DONE]\n\n")
            return response.headers["x-request-id"], response.status_code
    response = await http.post("/v1/chat/completions", json=body)
    return response.headers["x-request-id"], response.status_code


def small_batches(url: str, tmp_path: Path) -> str:
    """A database written in batches of ten every 50 ms, timing out after a second."""
    return textwrap.dedent(
        f"""
        [database]
        url = "{url}"
        timeout = 1.0

        [database.write_behind]
        batch_size = 10
        flush_interval = 0.05
        spool_dir = "{tmp_path / "spool"}"
        """
    )


def start_load(
    http: httpx.AsyncClient, done: list[tuple[str, int]], *, workers: int, each: int
) -> list[asyncio.Task[None]]:
    """``workers`` clients making ``each`` requests one after the other; results land in ``done``."""

    async def worker(start: int) -> None:
        for i in range(start, start + each):
            done.append(await call(http, i))

    return [asyncio.create_task(worker(w * 1000)) for w in range(workers)]


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_database_outage_mid_load_loses_no_row(serve_gateway: GatewayFactory, tmp_path: Path) -> None:
    async with pg_database() as pg_url, CuttableProxy(5432) as proxy:
        name = pg_url.rsplit("/", 1)[1]
        toml = small_batches(f"postgres://postgres@127.0.0.1:{proxy.port}/{name}", tmp_path)
        done: list[tuple[str, int]] = []
        async with serve_gateway(toml + DEMO) as url:
            writer = serve_gateway.gateway.state["storage"].writer  # type: ignore[attr-defined]
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                load = start_load(http, done, workers=8, each=60)
                await wait_for(lambda: len(done) >= 100)
                proxy.cut()  # the database goes away in the middle of the load
                await wait_for(lambda: writer.stats.failures >= 1 and len(done) >= 250)
                not_ready = await http.get("/health/ready")
                proxy.restore()
                await asyncio.gather(*load)
                await wait_for(lambda: writer.down_since is None and not writer.queue)
                ready = await http.get("/health/ready")
        stats = writer.stats
        assert not_ready.status_code == 503
        assert ready.status_code == 200
        assert len(done) == 480
        assert all(status == 200 for _, status in done)
        assert stats.spooled > 0  # rows really went through the spool
        assert stats.replayed >= stats.spooled
        rows = await usage_rows(pg_url)
        ids = [r["request_id"] for r in rows]
        assert sorted(ids) == sorted(request_id for request_id, _ in done)  # each exactly once
        decisions = [d["request_id"] for d in await decision_rows(pg_url)]
        assert sorted(decisions) == sorted(ids)
        assert not any(p.name.endswith(".jsonl") for p in (tmp_path / "spool").iterdir())


async def test_sqlite_writer_process_killed_or_database_locked_loses_no_row(
    serve_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A SQLite file's usage rows are written by a process of its own: killed in the middle of the
    load, it is replaced; while another process holds the database locked, rows wait in the spool.
    Every answered request has its row, exactly once."""
    import sqlite3

    path = tmp_path / "gateway.db"
    done: list[tuple[str, int]] = []
    async with serve_gateway(small_batches(f"sqlite://{path}", tmp_path) + DEMO) as url:
        writer = serve_gateway.gateway.state["storage"].writer  # type: ignore[attr-defined]
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            load = start_load(http, done, workers=4, each=50)
            await wait_for(lambda: writer.stats.written >= 20)
            first = writer.sqlite_process.process
            assert first is not None
            assert first.pid != os.getpid()
            os.kill(first.pid, signal.SIGKILL)
            await wait_for(lambda: writer.stats.failures >= 1 and writer.down_since is None and len(done) >= 80)
            second = writer.sqlite_process.process
            assert second is not None
            assert second.pid != first.pid

            locker = sqlite3.connect(path, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")  # another process writing for a long while
            failures = writer.stats.failures
            await wait_for(lambda: writer.stats.failures > failures)
            locker.rollback()
            locker.close()
            await asyncio.gather(*load)
            await wait_for(lambda: writer.down_since is None and not writer.queue)
    assert len(done) == 200
    assert all(status == 200 for _, status in done)
    assert writer.stats.spooled > 0
    assert writer.sqlite_process.process is None  # stopped with the gateway
    assert second.returncode == 0  # ended by the end of its input, not killed
    ids = [r["request_id"] for r in await usage_rows(f"sqlite://{path}")]
    assert sorted(ids) == sorted(request_id for request_id, _ in done)
    assert not any(p.name.endswith(".jsonl") for p in (tmp_path / "spool").iterdir())


def test_sigterm_under_load_loses_no_row(tmp_path: Path) -> None:
    """SIGTERM while requests (plain and streamed) are in flight: every request that got a
    response has its row, although nothing was flushed before the signal. (The SQLite writer
    process is already running when the gateway is ready, before the first request.)"""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        textwrap.dedent(
            """
            [server]
            drain_timeout = 20

            [database.write_behind]
            flush_interval = 3600
            batch_size = 100000
            """
        )
        + DEMO
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "llmgateway", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        results = asyncio.run(_load_then_sigterm(process, f"http://127.0.0.1:{port}"))
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output.decode(errors="replace")
    answered = [request_id for request_id, status in results if status == 200]
    assert len(answered) >= 20
    rows = asyncio.run(usage_rows(f"sqlite://{tmp_path / 'llmgateway.db'}"))
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert set(answered) <= set(ids)
    streamed = {r["request_id"] for r in rows if r["streamed"]}
    assert any(request_id in streamed for request_id in answered)
    assert not (tmp_path / "llmgateway-spool").exists()  # flushed to the database, not spooled


async def _load_then_sigterm(process: subprocess.Popen[bytes], url: str) -> list[tuple[str, int]]:
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=200)) as http:
        deadline = time.monotonic() + 30
        while True:
            try:
                if (await http.get("/health/ready")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "the gateway exited during startup"
            assert time.monotonic() < deadline, "the gateway did not become ready"
            await asyncio.sleep(0.05)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert any(b"rows.py" in Path(f"/proc/{child}/cmdline").read_bytes() for child in children)
        results: list[tuple[str, int]] = []

        async def one(i: int) -> None:
            try:
                results.append(await call(http, i))
            except httpx.TransportError:
                pass  # refused after the signal: no response, no row expected

        tasks = [asyncio.create_task(one(i)) for i in range(120)]
        await wait_for(lambda: len(results) >= 10)
        process.send_signal(signal.SIGTERM)  # while the rest are in flight
        in_flight = 120 - len(results)
        await asyncio.gather(*tasks)
        assert in_flight > 0
        return results
