"""Retention, rollups and the admin queries on SQLite and PostgreSQL: the numbers a dashboard shows
are the same before and after raw rows are rolled up and deleted."""

from __future__ import annotations

import datetime as dt
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from llmgateway.core.types import Principal
from llmgateway.plugins.storage import queries
from llmgateway.plugins.storage.database import Database
from llmgateway.plugins.storage.retention import cleanup, percentile
from llmgateway.plugins.storage.settings import Retention
from llmgateway.plugins.storage.sql import fetch
from llmgateway.plugins.storage.writer import insert_rows, to_row
from tests.test_storage_support import database_url, decision, opened, record

UTC = dt.UTC
NOW = dt.datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
RETENTION = Retention(raw_days=30, hourly_days=35, late_hours=48)
TEAMS = ("team-a", "team-b", None)
MODELS = ("fast", "smart")


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with database_url(request.param, tmp_path) as url, opened(url) as database:
        yield database


def generate(count: int, *, days: float = 40, seed: int = 7) -> list[dict[str, Any]]:
    """Usage rows (spool format) spread over the ``days`` before NOW."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        started = NOW.timestamp() - rng.random() * days * 86400
        team = TEAMS[i % 3]
        alias = MODELS[i % 2]
        status = 200 if i % 11 else (500 if i % 2 else 499)
        rec = record(
            f"req_{seed}_{i:06d}",
            started_at=started,
            alias=alias,
            provider="p-" + alias,
            deployment=f"{alias}/p-{alias}/m#0",
            principal=Principal(kind="virtual_key", key_id=f"key-{i % 5}", user_id=f"user-{i % 4}", team_id=team),
            status=status,
            cost=round(rng.random() / 100, 8),
            prompt=rng.randint(1, 500),
            completion=rng.randint(1, 300),
            cached=rng.randint(0, 1),
            latency_ms=rng.uniform(50, 2000),
            ttft_ms=rng.uniform(10, 300) if i % 3 == 0 else None,
            cache_hit=i % 13 == 0,
            streamed=i % 3 == 0,
        )
        rows.append(to_row(rec, decision(alias, fallbacks=["x"] if i % 7 == 0 else None)))
    return rows


def expected(
    rows: list[dict[str, Any]], start: dt.datetime, end: dt.datetime, step: int, by: str | None
) -> dict[tuple[str, str | None], tuple[int, int, int, float]]:
    """(bucket start ISO, group) → (requests, errors, prompt tokens, cost) computed in Python."""
    column = queries.DIMENSIONS[by] if by else None
    out: dict[tuple[str, str | None], list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for row in rows:
        if not start.timestamp() <= row["started_at"] < end.timestamp():
            continue
        hour = int(row["started_at"] // 3600)
        bucket = dt.datetime.fromtimestamp((hour - hour % step) * 3600, UTC).isoformat()
        key = (bucket, row[column] if column else None)
        agg = out[key]
        agg[0] += 1
        agg[1] += 1 if row["status"] >= 400 and row["status"] != 499 else 0
        agg[2] += row["prompt_tokens"]
        agg[3] += row["cost"]
    return {k: (int(v[0]), int(v[1]), int(v[2]), round(v[3], 6)) for k, v in out.items()}


def observed(points: list[queries.UsagePoint]) -> dict[tuple[str, str | None], tuple[int, int, int, float]]:
    return {
        (p.bucket_start.isoformat(), p.group): (p.requests, p.errors, p.prompt_tokens, round(p.cost, 6)) for p in points
    }


async def test_rollups_and_retention_keep_the_dashboard_numbers(db: Database) -> None:
    rows = generate(3000)
    for i in range(0, len(rows), 500):
        await insert_rows(db, rows[i : i + 500])
    start, end = NOW - dt.timedelta(days=40), NOW + dt.timedelta(hours=1)
    last_week = NOW - dt.timedelta(days=7)

    raw_days = await queries.usage(db, start, end, bucket="day", group_by="team")
    raw_hours = await queries.usage(db, last_week, end, bucket="hour", group_by="model")
    assert observed(raw_days) == expected(rows, start.replace(hour=0, minute=0), end, 24, "team")
    assert observed(raw_hours) == expected(rows, last_week.replace(minute=0), end, 1, "model")

    assert (await queries.routing_stats(db, start, end))["decisions"] == 3000
    result = await cleanup(db, RETENTION, now=NOW)
    assert result.days_rolled >= 39
    assert result.usage_deleted > 0
    # the routing decisions went with their usage rows
    assert (await queries.routing_stats(db, start, end))["decisions"] == 3000 - result.usage_deleted
    remaining = await fetch(db, "SELECT MIN(hour) AS h, COUNT(*) AS n FROM usage_records")
    cutoff_hour = int(NOW.timestamp() // 3600) - 30 * 24
    assert remaining[0]["h"] >= cutoff_hour
    assert remaining[0]["n"] + result.usage_deleted == 3000
    # hourly rollups older than hourly_days are gone, daily ones stay
    old_hourly = await fetch(
        db,
        "SELECT COUNT(*) AS n FROM usage_rollups WHERE bucket = 'hour' AND bucket_start < ?",
        [(NOW - dt.timedelta(days=36)) if db.dialect == "postgres" else (NOW - dt.timedelta(days=36)).isoformat(" ")],
    )
    assert old_hourly[0]["n"] == 0

    # the same questions give the same answers, now read from rollups (and raw rows for the rest)
    assert observed(await queries.usage(db, start, end, bucket="day", group_by="team")) == observed(raw_days)
    assert observed(await queries.usage(db, last_week, end, bucket="hour", group_by="model")) == observed(raw_hours)

    # a second run changes nothing
    await cleanup(db, RETENTION, now=NOW)
    assert observed(await queries.usage(db, start, end, bucket="day", group_by="team")) == observed(raw_days)

    # filters and totals
    team_a = await queries.usage(db, start, end, bucket="day", filters={"team": "team-a"})
    assert observed(team_a) == {
        (k[0], None): v
        for k, v in expected(rows, start.replace(hour=0, minute=0), end, 24, "team").items()
        if k[1] == "team-a"
    }
    top = await queries.totals(db, start, end, group_by="model")
    [total] = await queries.totals(db, start, end)
    assert total["requests"] == 3000
    before = start - dt.timedelta(days=400)
    assert await queries.totals(db, before, before + dt.timedelta(days=2)) == []  # no traffic: no total
    assert [t["group"] for t in top] == sorted(MODELS, key=lambda m: -sum(r["cost"] for r in rows if r["alias"] == m))
    assert sum(t["requests"] for t in top) == 3000
    no_team = await queries.usage(db, start, end, bucket="day", filters={"team": None})
    assert sum(p.requests for p in no_team) == sum(1 for r in rows if r["team_id"] is None)


async def test_late_rows_are_rolled_into_their_hour(db: Database) -> None:
    rows = generate(200, days=3)
    await insert_rows(db, rows)
    await cleanup(db, RETENTION, now=NOW)
    late = generate(50, days=1, seed=8)  # arrive after their hours were rolled up (spool replay, long streams)
    await insert_rows(db, late)
    start, end = NOW - dt.timedelta(days=3), NOW - dt.timedelta(minutes=30)
    await cleanup(db, RETENTION, now=NOW, late_hours={int(r["started_at"] // 3600) for r in late})
    got = observed(await queries.usage(db, start, end, bucket="hour"))
    assert got == expected(rows + late, start.replace(minute=0), end.replace(minute=0), 1, None)


async def test_model_metrics_percentiles(db: Database) -> None:
    hour_start = NOW.replace(minute=0) - dt.timedelta(hours=2)
    latencies = [float(v) for v in range(10, 1010, 10)]  # 100 values
    rows = [
        to_row(
            record(
                f"m{i}",
                started_at=hour_start.timestamp() + i,
                alias="fast",
                deployment="fast/p/m#0",
                latency_ms=latency,
                ttft_ms=latency / 10,
            ),
            None,
        )
        for i, latency in enumerate(latencies)
    ]
    rows.append(to_row(record("m-err", started_at=hour_start.timestamp() + 500, status=500, latency_ms=1.0), None))
    await insert_rows(db, rows)
    await cleanup(db, RETENTION, now=NOW)
    (metric,) = await queries.model_metrics(db, hour_start, hour_start + dt.timedelta(hours=1), alias="fast")
    assert metric["requests"] == 100
    assert metric["deployment"] == "fast/p/m#0"
    for name, values, p in (
        ("latency_p50_ms", latencies, 0.5),
        ("latency_p95_ms", latencies, 0.95),
        ("latency_p99_ms", latencies, 0.99),
        ("ttft_p50_ms", [v / 10 for v in latencies], 0.5),
    ):
        assert metric[name] == pytest.approx(percentile(values, p))
    (chat,) = await queries.model_metrics(db, hour_start, hour_start + dt.timedelta(hours=1), alias="chat")
    assert (chat["requests"], chat["errors"]) == (1, 1)
    daily = await queries.model_metrics(db, NOW - dt.timedelta(days=2), NOW, bucket="day")
    assert daily == []  # today is not complete yet


async def test_routing_stats_and_recent_requests(db: Database) -> None:
    rows = generate(140, days=1)
    unrouted = [
        to_row(record(f"cached_{i}", started_at=NOW.timestamp() - 60 * i, alias="fast"), None) for i in range(9)
    ]
    await insert_rows(db, rows + unrouted)
    start, end = NOW - dt.timedelta(days=1), NOW
    stats = await queries.routing_stats(db, start, end)
    assert stats["decisions"] == 140  # requests without a routing decision (cache hits) are not counted
    assert stats["fell_back"] == 20  # every 7th
    assert stats["fallback_rate"] == pytest.approx(20 / 140)
    assert {(s["strategy"], s["reason"]) for s in stats["by_strategy"]} == {("ordered", "config order")}
    # by the deployment the router chose, not the one that answered (alias/p-alias/m#0)
    assert {d["deployment"]: d["decisions"] for d in stats["by_deployment"]} == {
        "fast/local/m#0": 70,
        "smart/local/m#0": 70,
    }
    assert stats["by_outcome"] == [{"outcome": "success", "decisions": 140}]
    fast = await queries.routing_stats(db, start, end, alias="fast")
    assert fast["decisions"] == 70

    recent = await queries.recent_requests(db, limit=10)
    everything = sorted(rows + unrouted, key=lambda r: -r["started_at"])
    newest = everything[:10]
    assert [r["request_id"] for r in recent] == [r["request_id"] for r in newest]
    assert isinstance(recent[0]["cache_hit"], bool)
    errors = await queries.recent_requests(db, limit=100, errors_only=True, filters={"team": "team-b"})
    assert errors
    assert all(r["status"] >= 400 and r["team_id"] == "team-b" for r in errors)
    before = await queries.recent_requests(db, limit=5, before=dt.datetime.fromisoformat(recent[4]["created_at"]))
    assert [r["request_id"] for r in before] == [r["request_id"] for r in everything[5:10]]
    with pytest.raises(ValueError, match="unknown dimension"):
        await queries.usage(db, start, end, group_by="colour")


SUMS = ("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "cached_tokens", "cost", "saved_cost")


def straightforward(
    rows: list[dict[str, Any]],
    start: dt.datetime,
    end: dt.datetime,
    step: int,
    by: str | None,
    filters: dict[str, str | None] | None = None,
) -> list[tuple[Any, ...]]:
    """Every sum of every point, from the raw rows, sorted like ``queries.usage`` (no value first).
    ``step`` 0: one total per group (``queries.totals``)."""
    column = queries.DIMENSIONS[by] if by else None
    first = int(start.timestamp() // 3600)
    last = -(-int(end.timestamp()) // 3600)
    if step:
        first, last = first - first % step, last + (-last % step)
    else:
        first, last = first - first % 24, last + (-last % 24)
    out: dict[tuple[int, str | None], list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0.0, 0.0])
    for row in rows:
        hour = int(row["started_at"] // 3600)
        if not first <= hour < last:
            continue
        if any(row[queries.DIMENSIONS[name]] != value for name, value in (filters or {}).items()):
            continue
        agg = out[((hour - hour % step) if step else 0, row[column] if column else None)]
        agg[0] += 1
        agg[1] += row["status"] >= 400 and row["status"] != 499
        agg[2] += bool(row["cache_hit"])
        agg[3] += row["prompt_tokens"]
        agg[4] += row["completion_tokens"]
        agg[5] += row["cached_tokens"]
        agg[6] += row["cost"] or 0.0
        agg[7] += row["saved_cost"] or 0.0
    ordered = sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1] is not None, kv[0][1] or ""))
    return [
        (
            dt.datetime.fromtimestamp(h * 3600, UTC) if step else None,
            g,
            *map(int, v[:6]),
            v[6],
            v[7],
        )
        for (h, g), v in ordered
    ]


def answered(points: list[queries.UsagePoint]) -> list[tuple[Any, ...]]:
    return [(p.bucket_start, p.group, *(getattr(p, n) for n in SUMS)) for p in points]


def same(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> bool:
    """Buckets, groups and counts exactly; costs to 1e-9 USD (summed in another order)."""
    return [p[:8] for p in got] == [p[:8] for p in want] and all(
        abs(a - b) < 1e-9 for p, q in zip(got, want, strict=True) for a, b in zip(p[8:], q[8:], strict=True)
    )


def owned_keys(count: int, *, days: float, seed: int) -> list[dict[str, Any]]:
    """Rows where each key has one user and team (as in a real deployment), except ``key-3``, which
    moves to another user and team halfway through every hour."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        started = NOW.timestamp() - rng.random() * days * 86400
        key = i % 7
        user, team = f"user-{key % 4}", TEAMS[key % 3]
        if key == 3 and started % 3600 >= 1800:
            user, team = "user-9", "team-z"
        rec = record(
            f"own_{seed}_{i:06d}",
            started_at=started,
            alias=MODELS[i % 2],
            provider=f"p{i % 3}",
            principal=Principal(kind="virtual_key", key_id=f"key-{key}", user_id=user, team_id=team),
            status=(200, 200, 200, 500, 499, 429)[i % 6],
            cost=round(rng.random() / 100, 8) if i % 10 else None,
            prompt=rng.randint(1, 500),
            completion=rng.randint(1, 300),
            cached=rng.randint(0, 20),
            cache_hit=i % 13 == 0,
        )
        row = to_row(rec, decision(rec.alias))
        row["saved_cost"] = 0.002 if rec.cache_hit else None
        rows.append(row)
    return rows


QUESTIONS: list[tuple[str, int, str | None, dict[str, str | None] | None]] = [
    # (bucket, step, group by, filters)
    ("day", 24, "key", None),
    ("hour", 1, "key", None),
    ("day", 24, "user", None),
    ("hour", 1, "user", {"team": "team-a"}),
    ("day", 24, "team", None),
    ("hour", 1, "model", None),
    ("day", 24, "provider", None),
    ("day", 24, "key", {"team": "team-z"}),
    ("hour", 1, None, {"key": "key-3"}),
    ("day", 24, None, {"team": None}),
    ("hour", 1, None, None),
    ("day", 24, "model", {"team": "team-b"}),
    ("hour", 1, "key", {"model": "fast"}),  # no grouping set: raw rows
]


@pytest.mark.parametrize("data", ["owned keys", "mixed owners"])
async def test_every_sum_of_every_question_matches_the_raw_rows(db: Database, data: str) -> None:
    """Each question the dashboards ask, before any rollup, after the rollups (daily, hourly and raw
    rows stitched together) and after raw rows older than ``raw_days`` are gone: every sum of every
    point equals a straightforward computation over the rows."""
    rows = owned_keys(2500, days=6, seed=3) if data == "owned keys" else generate(2500, days=6, seed=5)
    for i in range(0, len(rows), 500):
        await insert_rows(db, rows[i : i + 500])
    start, end = NOW - dt.timedelta(days=6, hours=5), NOW + dt.timedelta(minutes=20)
    retention = Retention(raw_days=30, hourly_days=35, late_hours=5)

    async def check(phase: str) -> None:
        for bucket, step, by, filters in QUESTIONS:
            got = answered(await queries.usage(db, start, end, bucket=bucket, group_by=by, filters=filters))  # type: ignore[arg-type]
            assert same(got, straightforward(rows, start, end, step, by, filters)), (phase, bucket, by, filters)
            assert got or (filters == {"team": "team-z"} and data == "mixed owners"), (phase, bucket, by, filters)
        for by in ("key", "user", "team", "model", None):
            totals = await queries.totals(db, start, end, group_by=by)
            want = straightforward(rows, start, end, 0, by)
            assert sorted(
                (t["group"] is not None, t["group"] or "", t["requests"], t["errors"]) for t in totals
            ) == sorted((w[1] is not None, w[1] or "", w[2], w[3]) for w in want), (phase, by)
            assert [t["cost"] for t in totals] == sorted((t["cost"] for t in totals), reverse=True)

    await check("raw rows")
    await cleanup(db, retention, now=NOW - dt.timedelta(hours=3))  # hourly and daily rollups, raw rows after
    await check("rollups and raw rows")
    await cleanup(db, retention, now=NOW + dt.timedelta(hours=2))  # the current hour rolled up too
    await check("rollups")


async def test_hours_past_the_hourly_rollups_come_as_whole_days_once(db: Database) -> None:
    """An hourly chart reaching back past ``hourly_days``: those days come from the daily rollups as
    whole days (the day holding the oldest hourly rollup too), every hour counted once."""
    rows = generate(1500, days=6, seed=11)
    await insert_rows(db, rows)
    await cleanup(db, Retention(raw_days=2, hourly_days=3, late_hours=5), now=NOW)
    start = NOW - dt.timedelta(days=6, hours=5)
    points = await queries.usage(db, start, NOW + dt.timedelta(hours=1), bucket="hour")
    oldest_hourly = int(NOW.timestamp() // 3600) - 3 * 24  # hourly rollups before it are deleted
    whole_until = oldest_hourly - oldest_hourly % 24 + 24
    want: dict[dt.datetime, int] = defaultdict(int)
    for row in rows:
        hour = int(row["started_at"] // 3600)
        want[dt.datetime.fromtimestamp((hour - hour % 24 if hour < whole_until else hour) * 3600, UTC)] += 1
    assert {p.bucket_start: p.requests for p in points} == want
    assert len(points) == len(want)


async def test_the_queries_serve_sqlite_and_postgresql_at_once(tmp_path: Path) -> None:
    """The read side is hand-written SQL chosen per database (not Tortoise's per-model query cache,
    which follows the database opened last): one process can ask both, interleaved."""
    rows = generate(300, days=3, seed=13)
    async with (
        database_url("sqlite", tmp_path) as lite_url,
        database_url("postgres", tmp_path) as pg_url,
        opened(lite_url) as lite,
        opened(pg_url) as pg,
    ):
        for database in (lite, pg):
            await insert_rows(database, rows)
        await cleanup(lite, RETENTION, now=NOW)
        start, end = NOW - dt.timedelta(days=3, hours=1), NOW + dt.timedelta(hours=1)
        want = straightforward(rows, start, end, 24, "key")
        for database in (lite, pg, lite):
            assert same(answered(await queries.usage(database, start, end, bucket="day", group_by="key")), want)
            assert len(await queries.recent_requests(database, limit=7)) == 7
