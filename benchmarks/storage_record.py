"""What recording usage adds to a request, and how fast the write-behind drains to the database.

    .venv/bin/python -m benchmarks.storage_record [--calls 200000] [--rows 20000] [--postgres URL]

1. **Request path**: a real gateway is built from a config (storage on a temporary SQLite file);
   ``gateway.hooks.record_usage(ctx, record)`` — exactly what the pipeline awaits once per request,
   every ``llmgateway_record_usage`` implementation included — is timed per call, with the storage
   plugin's flusher running (so the queue is drained as in production). Target (issue 4): ≤ 20 µs.
2. **Background**: rows per second the flusher writes (bulk inserts of ``batch_size`` usage rows, each
   carrying its routing decision, one transaction per batch) to SQLite and, with ``--postgres``, to a
   throwaway PostgreSQL database created next to the one in the URL.
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
from llmgateway.core.types import Principal, RequestContext, RoutingDecision, Usage, UsageRecord
from llmgateway.plugins.storage.database import Database
from llmgateway.plugins.storage.writer import UsageWriter

CONFIG = """
[database]
url = "sqlite://bench.db"

[database.write_behind]
batch_size = 500
flush_interval = 0.5
queue_size = 1000000  # this loop records far faster than any server answers: no spill to the spool here

[providers.demo]
type = "demo"

[[models]]
name = "demo"
deployments = [{ provider = "demo", model = "demo-1" }]
"""

PRINCIPAL = Principal(kind="virtual_key", key_id="key_0123456789", user_id="user_42", team_id="team_7")


def make(i: int) -> tuple[RequestContext, UsageRecord]:
    ctx = RequestContext(
        request_id=f"req_bench{i:012x}",
        endpoint="chat.completions",
        body={},
        headers=Headers(raw=[]),
        client_host="127.0.0.1",
        path="/v1/chat/completions",
    )
    ctx.decision = RoutingDecision(
        alias="demo",
        strategy="ordered",
        candidates=[("demo/demo/demo-1#0", None)],
        chosen="demo/demo/demo-1#0",
        reason="config order",
        outcome="success",
    )
    record = UsageRecord(
        request_id=ctx.request_id,
        endpoint="chat.completions",
        alias="demo",
        provider="demo",
        deployment="demo/demo/demo-1#0",
        upstream_model="demo-1",
        principal=PRINCIPAL,
        usage=Usage(prompt_tokens=120, completion_tokens=48, cached_tokens=16),
        cost=0.000123,
        status=200,
        error_code=None,
        latency_ms=412.5,
        ttft_ms=88.1,
        streamed=True,
        cache_hit=False,
        client_disconnected=False,
        started_at=time.time(),
        attempts=1,
    )
    return ctx, record


async def request_path(calls: int, directory: Path) -> dict[str, float]:
    path = directory / "gateway.toml"
    path.write_text(CONFIG)
    gateway = build_gateway(parse_config(CONFIG, file=str(path)))
    await gateway.hooks.startup(gateway)
    try:
        items = [make(i) for i in range(calls)]
        record_usage = gateway.hooks.record_usage
        samples: list[float] = []
        chunk = 1000
        for start in range(0, calls, chunk):
            batch = items[start : start + chunk]
            t0 = time.perf_counter_ns()
            for ctx, record in batch:
                await record_usage(ctx, record)
            samples.append((time.perf_counter_ns() - t0) / len(batch) / 1000)
            await asyncio.sleep(0)  # let the flusher run between chunks, as requests would
        storage = gateway.state["storage"]
        await gateway.hooks.shutdown(gateway)
        written = storage.writer.stats.written
    finally:
        for client in gateway.clients:
            await client.aclose()
    samples.sort()
    return {
        "calls": calls,
        "mean_us": statistics.fmean(samples),
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[int(len(samples) * 0.99)],
        "rows_written": written,
    }


async def drain(url: str, rows: int) -> float:
    db = Database(url)
    await db.open()
    try:
        await db.migrate()
        writer = UsageWriter(db, batch_size=500, flush_interval=3600, queue_size=rows + 1, spool_dir="/nonexistent")
        for i in range(rows):
            ctx, record = make(i)
            writer.put(record, ctx.decision)
        t0 = time.perf_counter()
        await writer.flush(final=True)
        elapsed = time.perf_counter() - t0
        assert writer.stats.written == rows, writer.stats
        return rows / elapsed
    finally:
        await db.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--postgres", default=None, help="e.g. postgres://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = await request_path(args.calls, Path(tmp))
        print(
            f"record_usage per request: mean {result['mean_us']:.2f} µs, p50 {result['p50_us']:.2f} µs, "
            f"p99 {result['p99_us']:.2f} µs (per call, chunks of 1000; {result['calls']} calls, "
            f"{result['rows_written']} rows written)"
        )
        sqlite_rate = await drain(f"sqlite://{Path(tmp) / 'drain.db'}", args.rows)
        print(f"flusher to SQLite: {sqlite_rate:,.0f} rows/s (batches of 500, usage rows with their decision)")
    if args.postgres:
        import asyncpg

        name = f"llmgw_bench_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(args.postgres)
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            base = args.postgres.rsplit("/", 1)[0]
            pg_rate = await drain(f"{base}/{name}", args.rows)
            print(f"flusher to PostgreSQL: {pg_rate:,.0f} rows/s (batches of 500, usage rows with their decision)")
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


def run() -> Any:
    asyncio.run(main())


if __name__ == "__main__":
    run()
