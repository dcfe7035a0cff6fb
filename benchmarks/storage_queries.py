"""The admin dashboard queries against 1,000,000 usage rows in PostgreSQL.

    .venv/bin/python -m benchmarks.storage_queries [--rows 1000000] [--days 30] [--postgres URL] [--keep]

Creates a throwaway database next to the one in ``--postgres`` (default: the ``test`` database on
127.0.0.1), migrates it with the shipped migrations, generates the rows with one
``INSERT … SELECT generate_series`` (usage rows, each with a routing decision in its decision columns:
8 models, 4 providers, 50 teams, 500 users, 1,000 keys, spread evenly over ``--days``), then:

1. times each dashboard query on raw rows only (no rollups yet),
2. runs the retention job once (hourly and daily rollups of every complete hour and day), timed,
3. times the same queries again (rollups for complete hours, raw rows for the current hour).

Each query runs 5 times; the median and the worst are printed. Target (issue 4): ≤ 200 ms each.
The database is dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from llmgateway.plugins.storage import queries
from llmgateway.plugins.storage.database import Database
from llmgateway.plugins.storage.retention import cleanup
from llmgateway.plugins.storage.settings import Retention
from llmgateway.plugins.storage.sql import execute

UTC = dt.UTC

GENERATE_USAGE = """
INSERT INTO usage_records (request_id, created_at, hour, endpoint, key_id, user_id, team_id, alias, provider,
    deployment, upstream_model, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, usage_estimated,
    cost, saved_cost, latency_ms, ttft_ms, status, error_code, cache_hit, streamed, client_disconnected, attempts,
    metadata, strategy, chosen, route_reason, candidates, fallbacks, fell_back, outcome)
SELECT 'req_bench_' || g,
       t,
       FLOOR(EXTRACT(EPOCH FROM t) / 3600)::int,
       'chat.completions',
       'key-' || (g % 1000), 'user-' || (g % 500), 'team-' || (g % 50),
       'model-' || (g % 8), 'provider-' || (g % 4), 'model-' || (g % 8) || '/provider-' || (g % 4) || '/m#0', 'm',
       100 + (g % 900), 20 + (g % 400), g % 50, 0, false,
       ((100 + (g % 900)) * 2.5 + (20 + (g % 400)) * 10.0) / 1000000.0, NULL,
       50 + (g % 2000), CASE WHEN g % 3 = 0 THEN 20 + (g % 300) END,
       CASE WHEN g % 50 = 0 THEN 500 WHEN g % 97 = 0 THEN 499 ELSE 200 END, NULL,
       g % 20 = 0, g % 3 = 0, g % 97 = 0, 1, '{}'::jsonb,
       CASE WHEN g % 2 = 0 THEN 'latency' ELSE 'ordered' END,
       'model-' || (g % 8) || '/provider-' || (g % 4) || '/m#0',
       CASE WHEN g % 2 = 0 THEN 'lowest p50 latency' ELSE 'config order' END, '[]'::jsonb,
       CASE WHEN g % 25 = 0 THEN '["x"]'::jsonb ELSE '[]'::jsonb END, g % 25 = 0,
       CASE WHEN g % 50 = 0 THEN '500' WHEN g % 97 = 0 THEN '499' ELSE 'success' END
FROM (SELECT g, $1::timestamptz + (g * $2::float8) * interval '1 second' AS t
      FROM generate_series(0, $3::int - 1) AS g) AS s
"""


async def timed(name: str, run: Callable[[], Awaitable[Any]]) -> tuple[str, float, float]:
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - t0) * 1000)
    return name, statistics.median(samples), max(samples)


def dashboard(db: Database, now: dt.datetime) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    day, week, month = now - dt.timedelta(days=1), now - dt.timedelta(days=7), now - dt.timedelta(days=30)
    return [
        ("usage by model, hourly, last 24 h", lambda: queries.usage(db, day, now, bucket="hour", group_by="model")),
        ("usage by provider, hourly, last 7 days", lambda: queries.usage(db, week, now, group_by="provider")),
        ("usage by team, daily, last 30 days", lambda: queries.usage(db, month, now, bucket="day", group_by="team")),
        ("usage by key, daily, last 30 days", lambda: queries.usage(db, month, now, bucket="day", group_by="key")),
        ("one team, hourly, last 7 days", lambda: queries.usage(db, week, now, filters={"team": "team-7"})),
        ("top 10 users by cost, 30 days", lambda: queries.totals(db, month, now, group_by="user", limit=10)),
        ("total, 30 days", lambda: queries.totals(db, month, now)),
        ("routing stats, last 24 h", lambda: queries.routing_stats(db, day, now)),
        ("routing stats, last 7 days", lambda: queries.routing_stats(db, week, now)),
        ("model metrics, hourly, last 24 h", lambda: queries.model_metrics(db, day, now)),
        ("recent requests (50)", lambda: queries.recent_requests(db, limit=50)),
        (
            "recent errors of one team (50)",
            lambda: queries.recent_requests(db, errors_only=True, filters={"team": "team-7"}),
        ),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432/test")
    parser.add_argument("--keep", action="store_true", help="do not drop the generated database")
    args = parser.parse_args()

    import asyncpg

    name = f"llmgw_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.postgres)
    await admin.execute(f'CREATE DATABASE "{name}"')
    db = Database(f"{args.postgres.rsplit('/', 1)[0]}/{name}", timeout=600)
    try:
        await db.open()
        await db.migrate()
        now = dt.datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
        start = now - dt.timedelta(days=args.days)
        step = args.days * 86400 / args.rows
        t0 = time.perf_counter()
        await execute(db, GENERATE_USAGE, [start, step, args.rows])
        await execute(db, "ANALYZE")
        print(
            f"generated {args.rows:,} usage rows (with routing decisions) over {args.days:g} days in {time.perf_counter() - t0:.1f} s"
        )

        print("\nraw rows only (before any rollup):")
        for name_, run in dashboard(db, now):
            label, median, worst = await timed(name_, run)
            print(f"  {label:<42} median {median:8.1f} ms   worst {worst:8.1f} ms")

        t0 = time.perf_counter()
        result = await cleanup(db, Retention(raw_days=31, hourly_days=90, late_hours=48), now=now)
        await execute(db, "ANALYZE")
        print(
            f"\nretention job (first run): {result.hours_rolled} hours and {result.days_rolled} days rolled up "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        await cleanup(db, Retention(raw_days=31, hourly_days=90, late_hours=48), now=now + dt.timedelta(hours=1))
        print(f"retention job (next hour, recomputes the 48 h late window): {time.perf_counter() - t0:.1f} s")

        print("\nwith rollups (complete hours from rollups, the current hour from raw rows):")
        over = 0
        for name_, run in dashboard(db, now):
            label, median, worst = await timed(name_, run)
            over += median > 200
            print(f"  {label:<42} median {median:8.1f} ms   worst {worst:8.1f} ms")
        print(f"\n{'all' if not over else 'NOT all'} dashboard queries within 200 ms (median) with rollups")
    finally:
        await db.close()
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            print(f"kept database {name}")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
