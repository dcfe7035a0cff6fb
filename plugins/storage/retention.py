"""Rollups and retention: the ``storage.cleanup`` job and ``llmgateway db cleanup``.

Each run, in order:

1. **Hourly rollups** (:class:`UsageRollup` and :class:`ModelMetric` with ``bucket="hour"``) are
   recomputed from the raw rows for every complete hour that has none yet, plus the last
   ``late_hours`` hours (long streams and rows replayed from the spool land late) and any hour the
   write-behind replayed rows into. Recomputing replaces the bucket, so runs are idempotent.
2. **Daily rollups** the same way, for complete days (UTC).
3. **Raw rows** (usage records, with their routing decisions) older than ``raw_days`` are deleted: their
   hours and days were rolled up in steps 1 and 2 (rollups always run first, and a raw row can only be
   deleted once its hour is complete and rolled up).
4. **Hourly rollups** older than ``hourly_days`` are deleted; **daily rollups** are kept forever
   unless ``daily_days`` is set.

Percentiles (latency p50/p95/p99, time to first token p50/p95) are computed over successful
requests: ``percentile_cont`` on PostgreSQL, the same linear interpolation in Python elsewhere.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from .database import Database
from .settings import Retention
from .sql import at_hour, execute, fetch, number, placeholders, timestamp

log = logging.getLogger("llmgateway.storage")

UTC = dt.UTC
DIMENSIONS = ("key_id", "user_id", "team_id", "alias", "provider")
#: The grouping sets usage is rolled up by, smallest first (``UsageRollup.dims`` → its columns).
#: A query grouped or filtered by dimensions no set covers reads raw rows (kept ``raw_days``).
ROLLUP_SETS: dict[str, tuple[str, ...]] = {
    "": (),
    "alias,provider": ("alias", "provider"),
    "team_id": ("team_id",),
    "team_id,alias,provider": ("team_id", "alias", "provider"),
    "user_id,team_id": ("user_id", "team_id"),
    "key_id,user_id,team_id": ("key_id", "user_id", "team_id"),
}
ROLLUP_LOCK = 0x6C6C6D68
ERROR = "CASE WHEN status >= 400 AND status <> 499 THEN 1 ELSE 0 END"


@dataclass(slots=True)
class CleanupResult:
    hours_rolled: int = 0
    days_rolled: int = 0
    usage_deleted: int = 0  # raw usage rows, routing decisions included (columns of the same rows)
    rollups_deleted: int = 0
    seconds: float = 0.0
    hour_range: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (PostgreSQL's ``percentile_cont``); values sorted."""
    if not values:
        return None
    pos = p * (len(values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


async def cleanup(
    db: Database, retention: Retention, *, now: dt.datetime | None = None, late_hours: Iterable[int] = ()
) -> CleanupResult:
    started = time.perf_counter()
    now = now or dt.datetime.now(UTC)
    result = CleanupResult()
    now_hour = int(now.timestamp() // 3600)  # the current, incomplete hour
    raw_cutoff = now_hour - retention.raw_days * 24

    # 1. hourly rollups
    hours = await _hours_to_roll(db, now_hour, retention.late_hours, "hour")
    hours |= {h for h in late_hours if raw_cutoff <= h < now_hour}
    for start, end in _ranges(sorted(hours)):
        for chunk_start in range(start, end, 24):
            chunk_end = min(end, chunk_start + 24)
            await _roll(db, "hour", chunk_start, chunk_end, 1)
            result.hours_rolled += chunk_end - chunk_start
    if hours:
        result.hour_range = [min(hours), max(hours) + 1]

    # 2. daily rollups (complete days)
    today = now_hour // 24
    days = await _hours_to_roll(db, today * 24, retention.late_hours + 24, "day")
    day_numbers = sorted({h // 24 for h in days} | {h // 24 for h in late_hours if raw_cutoff <= h < today * 24})
    day_numbers = [d for d in day_numbers if d < today]
    for day in day_numbers:
        await _roll(db, "day", day * 24, day * 24 + 24, 24)
        result.days_rolled += 1

    # 3. raw rows past retention
    result.usage_deleted = await execute(db, "DELETE FROM usage_records WHERE hour < ?", [raw_cutoff])

    # 4. rollups past retention
    hourly_cutoff = timestamp(db, at_hour(now_hour - retention.hourly_days * 24))
    for table in ("usage_rollups", "model_metrics"):
        delete = f"DELETE FROM {table} WHERE bucket = ? AND bucket_start < ?"  # noqa: S608 - constant names
        result.rollups_deleted += await execute(db, delete, ["hour", hourly_cutoff])
        if retention.daily_days:
            daily_cutoff = timestamp(db, at_hour((today - retention.daily_days) * 24))
            result.rollups_deleted += await execute(db, delete, ["day", daily_cutoff])
    result.seconds = time.perf_counter() - started
    log.info("storage cleanup: %s", result.as_dict())
    return result


async def _hours_to_roll(db: Database, end_hour: int, late: int, bucket: str) -> set[int]:
    """Complete hours (before ``end_hour``) to (re)compute: after the newest rollup, and the late window."""
    latest = await fetch(
        db, "SELECT MAX(bucket_start) AS latest FROM usage_rollups WHERE bucket = ? AND dims = ''", [bucket]
    )
    latest_start = latest[0]["latest"] if latest else None
    first: int
    if latest_start is None:
        oldest = await fetch(db, "SELECT MIN(hour) AS oldest FROM usage_records")
        if oldest[0]["oldest"] is None:
            return set()
        first = int(oldest[0]["oldest"])
    else:
        if isinstance(latest_start, str):
            latest_start = dt.datetime.fromisoformat(latest_start)
        step = 1 if bucket == "hour" else 24
        first = int(latest_start.timestamp() // 3600) + step
    first = min(first, end_hour - late)
    if bucket == "day":
        first -= first % 24
    return set(range(max(first, 0), end_hour))


def _ranges(sorted_values: list[int]) -> list[tuple[int, int]]:
    """[1,2,3,7,8] → [(1,4), (7,9)]: contiguous half-open ranges."""
    out: list[tuple[int, int]] = []
    for value in sorted_values:
        if out and out[-1][1] == value:
            out[-1] = (out[-1][0], value + 1)
        else:
            out.append((value, value + 1))
    return out


def _bucket_start(db: Database, hour_sql: str) -> str:
    """SQL turning hours since 1970 into the stored form of a UTC timestamp."""
    if db.dialect == "postgres":
        return f"to_timestamp(({hour_sql}) * 3600)"
    return f"strftime('%Y-%m-%d %H:%M:%S+00:00', ({hour_sql}) * 3600, 'unixepoch')"


METRIC_COLUMNS = (
    "bucket",
    "bucket_start",
    "alias",
    "provider",
    "deployment",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
)


async def _roll(db: Database, bucket: str, start_hour: int, end_hour: int, step: int) -> None:
    """Replace the ``bucket`` rollups of [start_hour, end_hour) with fresh aggregates of the raw rows:
    usage rollups with ``INSERT … SELECT`` (no rows travel), model metrics through Python
    (percentiles)."""
    from tortoise.transactions import in_transaction

    from .models import ModelMetric
    from .writer import _statement, _values

    group = "hour" if step == 1 else f"(hour / {step}) * {step}"
    metrics = await _metrics(db, group, start_hour, end_hour)
    lo, hi = timestamp(db, at_hour(start_hour)), timestamp(db, at_hour(end_hour))
    inserts = []
    for columns in ROLLUP_SETS.values():
        cols = "".join(f", {c}" for c in columns)
        inserts.append(
            "INSERT INTO usage_rollups (bucket, bucket_start, dims"  # noqa: S608 - constants only
            f"{cols}, requests, errors, cache_hits, prompt_tokens, completion_tokens, cached_tokens, cost, saved_cost) "
            f"SELECT ?, {_bucket_start(db, group)}, ?{cols}, COUNT(*), SUM({ERROR}), "
            "SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END), SUM(prompt_tokens), SUM(completion_tokens), "
            "SUM(cached_tokens), COALESCE(SUM(cost), 0), COALESCE(SUM(saved_cost), 0) "
            f"FROM usage_records WHERE hour >= ? AND hour < ? GROUP BY {group}{cols}"
        )
    with db.activate():
        async with in_transaction() as conn:
            if db.dialect == "postgres":  # two cleanups at once (job and CLI) take turns per bucket range
                await conn.execute_query("SELECT pg_advisory_xact_lock($1)", [ROLLUP_LOCK])
            for table in ("usage_rollups", "model_metrics"):
                delete = f"DELETE FROM {table} WHERE bucket = ? AND bucket_start >= ? AND bucket_start < ?"  # noqa: S608
                await conn.execute_query(placeholders(db, delete), [bucket, lo, hi])
            for (dims, _), text in zip(ROLLUP_SETS.items(), inserts, strict=True):
                await conn.execute_query(placeholders(db, text), [bucket, dims, start_hour, end_hour])
            if metrics:
                sql, fields = _statement(conn, ModelMetric, METRIC_COLUMNS)
                await conn.execute_many(
                    sql,
                    [_values(fields, ModelMetric, [bucket, *(m.get(c) for c in METRIC_COLUMNS[1:])]) for m in metrics],
                )


def _dec(value: Any) -> Any:
    from decimal import Decimal

    return Decimal(repr(round(number(value), 8)))


async def _metrics(db: Database, group: str, start_hour: int, end_hour: int) -> list[dict[str, Any]]:
    totals = await fetch(
        db,
        f"SELECT {group} AS h, deployment, MIN(alias) AS alias, MIN(provider) AS provider, "  # noqa: S608
        f"COUNT(*) AS requests, SUM({ERROR}) AS errors, SUM(prompt_tokens) AS prompt_tokens, "
        "SUM(completion_tokens) AS completion_tokens, SUM(cost) AS cost "
        "FROM usage_records WHERE hour >= ? AND hour < ? AND deployment IS NOT NULL "
        f"GROUP BY {group}, deployment",
        [start_hour, end_hour],
    )
    if not totals:
        return []
    pcts: dict[tuple[int, str], dict[str, float | None]] = {}
    if db.dialect == "postgres":
        rows = await fetch(
            db,
            f"SELECT {group} AS h, deployment, "  # noqa: S608
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS latency_p50_ms, "
            "percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS latency_p95_ms, "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS latency_p99_ms, "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY ttft_ms) AS ttft_p50_ms, "
            "percentile_cont(0.95) WITHIN GROUP (ORDER BY ttft_ms) AS ttft_p95_ms "
            "FROM usage_records WHERE hour >= ? AND hour < ? AND deployment IS NOT NULL AND status = 200 "
            f"GROUP BY {group}, deployment",
            [start_hour, end_hour],
        )
        for row in rows:
            key = (int(row.pop("h")), str(row.pop("deployment")))
            pcts[key] = row
    else:
        latencies: dict[tuple[int, str], list[float]] = defaultdict(list)
        ttfts: dict[tuple[int, str], list[float]] = defaultdict(list)
        rows = await fetch(
            db,
            f"SELECT {group} AS h, deployment, latency_ms, ttft_ms FROM usage_records "  # noqa: S608
            "WHERE hour >= ? AND hour < ? AND deployment IS NOT NULL AND status = 200",
            [start_hour, end_hour],
        )
        for row in rows:
            key = (int(row["h"]), str(row["deployment"]))
            latencies[key].append(float(row["latency_ms"]))
            if row["ttft_ms"] is not None:
                ttfts[key].append(float(row["ttft_ms"]))
        for key, values in latencies.items():
            values.sort()
            firsts = sorted(ttfts.get(key, []))
            pcts[key] = {
                "latency_p50_ms": percentile(values, 0.5),
                "latency_p95_ms": percentile(values, 0.95),
                "latency_p99_ms": percentile(values, 0.99),
                "ttft_p50_ms": percentile(firsts, 0.5),
                "ttft_p95_ms": percentile(firsts, 0.95),
            }
    out: list[dict[str, Any]] = []
    for row in totals:
        key = (int(row["h"]), str(row["deployment"]))
        p = pcts.get(key, {})
        out.append(
            {
                "bucket_start": at_hour(key[0]),
                "alias": row["alias"] or "",
                "provider": row["provider"] or "",
                "deployment": key[1],
                "requests": int(row["requests"]),
                "errors": int(row["errors"] or 0),
                "prompt_tokens": int(row["prompt_tokens"] or 0),
                "completion_tokens": int(row["completion_tokens"] or 0),
                "cost": _dec(row["cost"]),
                **{k: (None if v is None else float(v)) for k, v in p.items()},
            }
        )
    return out
