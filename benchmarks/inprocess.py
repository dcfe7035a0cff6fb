"""The gateway's own CPU per request, without a server: the app driven in process.

    .venv/bin/python -m benchmarks.inprocess [--requests 4000] [--concurrency 32] [--stream]
        [--chain core|bare] [--no-storage] [--reps 5] [--profile N]

A canned upstream runs in its own process (``benchmarks.upstream``); the ASGI app built from a
generated gateway.toml (master key, one OpenAI-compatible deployment, storage on its default SQLite
file in a temporary directory unless ``--no-storage``) is called directly with prebuilt ``scope`` /
``receive`` / ``send``. ``--chain bare`` drives :func:`benchmarks.baselines.proxy` instead (the upstream client
alone, the floor). Prints CPU µs per request of this process (every thread: the SQLite writer's
too), minimum and median of ``--reps`` runs, and the time to the first body byte.

What the server costs (hypercorn, uvicorn) is not in these numbers: ``python -m benchmarks run``
measures that. This is for A/B comparisons of changes to the request path (same machine, minutes
apart); for numbers that do not move with the machine's load, run it under
``valgrind --tool=callgrind`` twice with different ``--requests`` and divide the difference of the
instruction counts by the difference of the requests. ``--profile N`` prints cProfile's top N
functions by own time and the Python calls per request.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from . import procs

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-inprocess-master-0123456789"
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def gateway_toml(upstream_url: str, storage: bool) -> str:
    return f"""
[auth]
master_key = "{KEY}"

[providers.bench]
type = "openai"
base_url = "{upstream_url}/v1"
api_key = "sk-upstream"

[[models]]
name = "bench"
deployments = [{{ provider = "bench", model = "gpt-4o-mini" }}]
""" + ("" if storage else '\n[plugins]\ndisabled = ["storage"]\n')


async def _lifespan(app: App, messages: asyncio.Queue[dict[str, Any]], started: asyncio.Event) -> None:
    async def receive() -> dict[str, Any]:
        return await messages.get()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)


async def drive(app: App, body: bytes, requests: int, concurrency: int, first_bytes: list[float]) -> None:
    headers = [
        (b"host", b"gateway"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {KEY}".encode()),
        (b"content-length", str(len(body)).encode()),
    ]

    async def one() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
            "state": {},
        }
        delivered = False
        done = asyncio.Event()
        started = time.perf_counter()
        status = 0
        first = True

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, first
            if message["type"] == "http.response.start":
                status = message["status"]
            elif first:
                first = False
                first_bytes.append(time.perf_counter() - started)

        await app(scope, receive, send)
        done.set()
        if status != 200:
            raise RuntimeError(f"the app answered {status}")

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    share, extra = divmod(requests, concurrency)
    await asyncio.gather(*(worker(share + (1 if i < extra else 0)) for i in range(concurrency)))


async def measure(args: argparse.Namespace, upstream_url: str) -> None:
    if args.chain == "bare":
        os.environ["BASELINE_UPSTREAM"] = upstream_url
        from .baselines import proxy

        app: App = proxy
    else:
        from llmgateway.core.app import create_app
        from llmgateway.core.config import parse_config

        app = create_app(parse_config(gateway_toml(upstream_url, not args.no_storage), file="gateway.toml"))
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()
    await messages.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(_lifespan(app, messages, started))
    await started.wait()
    payload: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": "hello there"}]}
    if args.stream:
        payload["stream"] = True
    body = orjson.dumps(payload)
    try:
        await drive(app, body, min(500, args.requests), args.concurrency, [])  # warm-up
        cpu: list[float] = []
        first_bytes: list[float] = []
        profile = cProfile.Profile() if args.profile else None
        for _ in range(1 if profile else args.reps):
            c0 = time.process_time()
            if profile:
                profile.enable()
            await drive(app, body, args.requests, args.concurrency, first_bytes)
            if profile:
                profile.disable()
            cpu.append((time.process_time() - c0) * 1e6 / args.requests)
        what = "stream" if args.stream else "plain"
        chain = args.chain + (", no storage" if args.no_storage and args.chain != "bare" else "")
        print(
            f"{chain}, {what}, {args.requests} requests x {len(cpu)} at concurrency {args.concurrency}: "
            f"CPU {min(cpu):.1f} µs/request (min), {statistics.median(cpu):.1f} (median); "
            f"first body byte p50 {statistics.median(first_bytes) * 1e6:.0f} µs"
        )
        if profile:
            stats = pstats.Stats(profile)
            print(f"Python calls per request: {stats.total_calls / args.requests:.0f}")  # type: ignore[attr-defined]
            stats.sort_stats("tottime").print_stats(args.profile)
    finally:
        await messages.put({"type": "lifespan.shutdown"})
        await lifespan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="streamed requests (8-chunk streams)")
    parser.add_argument("--chain", choices=("core", "bare"), default="core", help="bare: the upstream client alone")
    parser.add_argument("--no-storage", action="store_true", help="the storage plugin disabled")
    parser.add_argument("--reps", type=int, default=5, help="runs; min and median are printed")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile, top N functions")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the default SQLite file and spool land here
        port = procs.free_port()
        upstream = procs.start(
            "upstream",
            [sys.executable, "-m", "benchmarks.upstream", "--port", str(port)],
            Path(tmp) / "upstream.log",
            cwd=str(ROOT),
        )
        try:
            procs.wait_port(port, 20, upstream.proc, upstream.log)
            try:
                import uvloop
            except ImportError:  # pragma: no cover - uvloop is a default dependency on Linux
                asyncio.run(measure(args, f"http://127.0.0.1:{port}"))
            else:
                uvloop.run(measure(args, f"http://127.0.0.1:{port}"))
        finally:
            upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
