"""The benchmark command runs end to end (tiny settings, no LiteLLM), and the hot-path changes made
from its profiles keep behaviour: ``core.http.post_bytes`` / ``open_stream`` act exactly like
``client.post`` + ``aread`` / ``client.send(stream=True)``.

No timing is asserted here: speed is measured by ``python -m benchmarks run`` (benchmarks/README.md).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmgateway.core.config import ProviderConfig
from llmgateway.core.http import GatewayClient, make_client, open_stream, post_bytes
from tests.conftest import UPSTREAM_KEY
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import free_port, running

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(module: str, *args: str, timeout: float) -> str:
    """``python -m <module> <args>`` from the repository root; its output, once it exited 0."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_benchmark_command_runs_end_to_end(tmp_path: Path) -> None:
    run_benchmark(
        "benchmarks",
        "run",
        "--quick",
        "--skip-litellm",
        "--chain",
        "core",
        "--baselines",
        "--out",
        str(tmp_path),
        timeout=240,
    )
    data = json.loads((tmp_path / "latest.json").read_text())
    results = data["results"]
    for key in ("direct", "baseline_static", "baseline_proxy", "llmgateway"):
        phases = results[key]["phases"]
        assert set(phases) == {"plain_c1", "plain_c32", "stream_c1", "stream_c16"}
        for phase in phases.values():
            assert phase["requests"] > 0
            assert phase["errors"] == 0
    assert results["llmgateway"]["rss_after_load_mb"] > 0
    assert results["llmgateway"]["phases"]["plain_c32"]["cpu_ms_per_request"] > 0
    assert results["llmgateway"]["phases"]["stream_c1"]["ttft_p50_ms"] > 0
    assert "| llmgateway (hypercorn, 1 worker) |" in (tmp_path / "latest.md").read_text()
    assert {t["target"] for t in data["summary"]["targets"]} >= {"RSS ≤ 80 MB after load"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [[], ["--stream", "--no-storage"], ["--chain", "bare"]], ids=["core", "stream", "bare"]
)
def test_inprocess_benchmark_runs(extra: list[str]) -> None:
    out = run_benchmark(
        "benchmarks.inprocess", "--requests", "64", "--concurrency", "4", "--reps", "1", *extra, timeout=120
    )
    assert "64 requests x 1 at concurrency 4: CPU " in out
    assert "µs/request" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)")
def test_instruction_count_benchmark_runs() -> None:
    """``benchmarks.instructions`` serves real requests under callgrind twice and prints the
    difference per request (hypercorn alone: the cheapest target, ~15 s)."""
    out = run_benchmark("benchmarks.instructions", "--targets", "static", "--requests", "10,40", timeout=110)
    assert "instructions per request, plain requests, concurrency 8 (10 vs 40 requests)" in out
    found = re.search(r"^  static +([\d,]+)$", out, re.M)
    assert found, out
    # a served request costs hypercorn at least its HTTP parsing and a socket write and read
    assert int(found.group(1).replace(",", "")) > 50_000


@pytest.mark.slow
async def test_latency_series_runs() -> None:
    """``benchmarks.latency_series`` against an upstream: percentiles, the slow requests and p99
    per second, from a one-connection phase after a short warm-up."""
    async with running(FakeOpenAI()) as url:
        out = await asyncio.to_thread(
            run_benchmark,
            "benchmarks.latency_series",
            "--url",
            f"{url}/v1/chat/completions",
            "--key",
            UPSTREAM_KEY,
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--warmup-concurrency",
            "2",
            timeout=60,
        )
    first = out.splitlines()[0]
    assert re.fullmatch(r"\d+ requests: p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms", first), out
    assert int(first.split()[0]) > 0
    assert "p99 per second:" in out


class Recorder:
    """An upstream that records the headers it got and answers JSON (gzip unless ``compress`` is
    off) with a cookie and rate-limit headers."""

    def __init__(self, compress: bool = True) -> None:
        self.seen: list[list[tuple[str, str]]] = []
        self.delay = 0.0
        self.compress = compress

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append([(k.decode(), v.decode()) for k, v in scope["headers"]])
        if self.delay:
            await asyncio.sleep(self.delay)
        payload = b'{"ok": true, "echo": ' + body + b"}"
        headers = [(b"content-type", b"application/json")]
        if self.compress:
            payload = gzip.compress(payload)
            headers.append((b"content-encoding", b"gzip"))
        headers += [
            (b"x-served-by", "café".encode()),  # not ASCII: both paths must take it alike
            (b"x-ratelimit-remaining-requests", b"7"),
            (b"set-cookie", b"session=abc; Path=/"),
            (b"content-length", str(len(payload)).encode()),
        ]
        status = 429 if scope["path"].endswith("/limited") else 200
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _client(**overrides: Any) -> httpx.AsyncClient:
    config = ProviderConfig(name="p", type="openai", **overrides)
    return make_client(config)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "identity"])
async def test_post_bytes_matches_client_post(compress: bool) -> None:
    recorder = Recorder(compress)
    async with running(recorder) as url:
        headers = {"content-type": "application/json", "authorization": "Bearer sk-x", "accept": "application/json"}
        results = []
        for fast in (True, False):
            async with _client() as client:
                assert isinstance(client, GatewayClient)
                if fast:
                    response = await post_bytes(client, f"{url}/v1/chat", content=b'{"a":1}', headers=headers)
                else:
                    response = await client.post(f"{url}/v1/chat", content=b'{"a":1}', headers=headers)
                    await response.aread()
                results.append(
                    (
                        response.status_code,
                        response.content,
                        response.headers["x-ratelimit-remaining-requests"],
                        response.is_closed,
                        response.is_stream_consumed,
                        response.json(),
                        response.headers["x-served-by"],
                    )
                )
                # one client serves every tenant: an upstream cookie is never kept, never sent back
                assert client.cookies.get("session") is None
                await post_bytes(client, f"{url}/v1/chat", content=b"{}", headers=headers)
                assert not [value for name, value in recorder.seen[-1] if name == "cookie"]
        assert results[0] == results[1]
        assert results[0][1] == b'{"ok": true, "echo": {"a":1}}'
        fast_seen, slow_seen = recorder.seen[0], recorder.seen[2]
        assert fast_seen == slow_seen  # same headers, same order, on the wire

        async with _client() as client:
            limited = await post_bytes(client, f"{url}/limited", content=b"{}", headers=headers)
            assert limited.status_code == 429
            assert limited.json()["ok"] is True


async def test_an_upstream_cookie_is_never_sent_back_by_name_either() -> None:
    """Cookie jars ignore cookies from IP addresses, so also ask by host name: one pool serves every
    tenant, and a cookie one tenant's answer set must never ride on another tenant's request."""
    recorder = Recorder(compress=False)
    async with running(recorder) as url:
        by_name = url.replace("127.0.0.1", "localhost")
        headers = {"content-type": "application/json"}
        async with _client() as client:
            for _ in range(2):
                await post_bytes(client, f"{by_name}/v1/chat", content=b"{}", headers=headers)
                async with client.stream("POST", f"{by_name}/v1/chat", content=b"{}", headers=headers) as response:
                    await response.aread()
                stream = await open_stream(client, f"{by_name}/v1/chat", content=b"{}", headers=headers)
                await stream.aclose()
    assert len(recorder.seen) == 6
    assert all(name != "cookie" for seen in recorder.seen for name, _ in seen)


async def test_open_stream_matches_client_send_stream() -> None:
    recorder = Recorder()
    async with running(recorder) as url:
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        got = []
        for fast in (True, False):
            async with _client() as client:
                if fast:
                    response = await open_stream(client, f"{url}/v1/chat", content=b'{"s":1}', headers=headers)
                else:
                    request = client.build_request("POST", f"{url}/v1/chat", content=b'{"s":1}', headers=headers)
                    response = await client.send(request, stream=True)
                try:
                    raw = b"".join([chunk async for chunk in response.aiter_raw()])
                finally:
                    await response.aclose()
                got.append((response.status_code, raw, response.headers["content-encoding"]))
                assert client.cookies.get("session") is None
        assert got[0] == got[1]
        assert gzip.decompress(got[0][1]) == b'{"ok": true, "echo": {"s":1}}'
        assert recorder.seen[0] == recorder.seen[1]


async def test_post_bytes_errors_are_httpx_errors() -> None:
    recorder = Recorder()
    recorder.delay = 1.0
    async with running(recorder) as url:
        caught = []
        for fast in (True, False):
            async with _client(timeout=0.2) as client:
                call = post_bytes(client, f"{url}/v1/chat", content=b"{}", headers={}) if fast else None
                with pytest.raises(httpx.TimeoutException) as error:
                    await (call or client.post(f"{url}/v1/chat", content=b"{}"))
                caught.append(type(error.value))
        assert caught[0] is caught[1]
    async with _client(connect_timeout=1.0) as client:
        with pytest.raises(httpx.ConnectError):
            await post_bytes(client, f"http://127.0.0.1:{free_port()}/v1/chat", content=b"{}", headers={})
