"""What virtual-key authentication (cached) and a Redis rate-limit check add to a request.

    .venv/bin/python -m benchmarks.security_auth_ratelimit [--requests 5000] [--redis URL] [--backend memory]

A real gateway is built from a config (storage on a temporary SQLite file, ``[ratelimit]`` on Redis
with per-key, per-user and per-model limits); one virtual key is created through the same code as the
admin API. Then, request after request, the request hooks run exactly as the pipeline calls them:
``authenticate`` (every auth plugin, the key from the in-process cache), ``check_limits`` (the
ratelimit plugin's one Lua script, plus the budgets plugin), a simulated upstream call
(``--upstream-ms``, not measured), and the ``on_finish`` callbacks (which queue the token correction
and slot release for the background batch). Target (issue 5): auth +
rate-limit check ≤ 0.15 ms p50.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers

from llmgateway.core.app import build_gateway
from llmgateway.core.config import parse_config
from llmgateway.core.types import RequestContext


def config(db: Path, redis_url: str, prefix: str, backend: str) -> str:
    return f"""
[auth]
master_key = "benchmark-master-key"

[database]
url = "sqlite://{db}"

[ratelimit]
backend = "{backend}"
redis_url = "{redis_url}"
key_prefix = "{prefix}"

[ratelimit.defaults.key]
rpm = 100000000
tpm = 1000000000
max_parallel = 1000

[ratelimit.models.demo]
rpm = 100000000

[providers.demo]
type = "demo"

[[models]]
name = "demo"
deployments = [{{ provider = "demo", model = "demo-1" }}]
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, samples: list[float]) -> None:
    ms = [s * 1000 for s in samples]
    print(
        f"{name:<34} p50 {statistics.median(ms):.3f} ms   p90 {pct(ms, 0.9):.3f} ms   "
        f"p99 {pct(ms, 0.99):.3f} ms   (n={len(ms)})"
    )


async def run(requests: int, redis_url: str, backend: str, upstream: float = 0.001) -> None:
    from llmgateway.plugins.auth import MASTER
    from llmgateway.plugins.security.admin_keys import KeySpec, create_key

    prefix = f"llmgw-bench:{secrets.token_hex(4)}:"
    with tempfile.TemporaryDirectory() as tmp:
        gateway = build_gateway(parse_config(config(Path(tmp) / "bench.db", redis_url, prefix, backend)))
        await gateway.hooks.startup(gateway)
        try:
            _, key = await create_key(KeySpec.parse({"name": "bench", "user_id": None}), MASTER)
            headers = Headers({"authorization": f"Bearer {key}"})
            body = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
            hooks = gateway.hooks
            group = gateway.models["demo"]

            def new_ctx(i: int) -> RequestContext:
                ctx = RequestContext(
                    request_id=f"bench-{i}",
                    endpoint="chat.completions",
                    body=body,
                    headers=headers,
                    client_host="127.0.0.1",
                    path="/v1/chat/completions",
                )
                ctx.alias = "demo"
                ctx.model_group = group
                ctx.candidates = list(group.deployments)
                return ctx

            for i in range(200):  # warm up: the key cache, Redis connections, the scripts
                ctx = new_ctx(-i - 1)
                ctx.principal = await hooks.authenticate(ctx) or ctx.principal
                await hooks.check_limits(ctx)
                for callback in ctx.on_finish:
                    await callback(ctx)

            auth: list[float] = []
            limits: list[float] = []
            both: list[float] = []
            finish: list[float] = []
            for i in range(requests):
                ctx = new_ctx(i)
                t0 = time.perf_counter()
                principal = await hooks.authenticate(ctx)
                t1 = time.perf_counter()
                assert principal is not None
                assert principal.kind == "virtual_key"
                ctx.principal = principal
                await hooks.check_limits(ctx)
                t2 = time.perf_counter()
                await asyncio.sleep(upstream)  # the upstream call
                t2b = time.perf_counter()
                for callback in ctx.on_finish:
                    await callback(ctx)
                t3 = time.perf_counter()
                auth.append(t1 - t0)
                limits.append(t2 - t1)
                both.append(t2 - t0)
                finish.append(t3 - t2b)
            stats: dict[str, Any] = gateway.state.get("ratelimit.stats", {})
            assert stats.get("redis_errors", 0) == 0, stats
            report("auth (virtual key, cached)", auth)
            report(f"check_limits ({backend})", limits)
            report("auth + check_limits", both)
            report("on_finish (after the response)", finish)
            target = statistics.median(both) * 1000
            print(
                f"target ≤ 0.150 ms p50 for auth + check_limits: {'met' if target <= 0.15 else 'NOT met'} ({target:.3f} ms)"
            )
        finally:
            await gateway.hooks.shutdown(gateway)
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
            if keys:
                await client.delete(*keys)
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--backend", choices=("redis", "memory"), default="redis", help="memory: Python cost alone")
    parser.add_argument(
        "--upstream-ms", type=float, default=1.0, help="simulated upstream time between admission and end"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(run(args.requests, args.redis, args.backend, args.upstream_ms / 1000))
    except ImportError:
        asyncio.run(run(args.requests, args.redis, args.backend, args.upstream_ms / 1000))


if __name__ == "__main__":
    main()
