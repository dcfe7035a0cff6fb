"""The read side for the admin API and dashboards. Every function takes the :class:`Database`
(``gateway.state["storage"].db`` after startup) and returns plain dicts / dataclasses.

Usage over a range is stitched from three sources, cheapest first, so a 90-day chart reads a few
thousand rollup rows instead of millions of raw ones:

* daily rollups for the complete days already rolled up (``bucket="day"`` queries),
* hourly rollups for the complete hours already rolled up,
* raw usage rows for the rest (the hours since the last cleanup run, the current hour).

Rollups exist per grouping set (:data:`~.retention.ROLLUP_SETS`: the total, model and provider,
team, team and model, user, key); a question about dimensions no set covers (e.g. key by model) is
answered from raw rows only, so for the last ``raw_days``.

Ranges are aligned to whole buckets (start rounded down, end rounded up). Hourly buckets older
than the hourly-rollup retention come back as whole days (only the daily rollups remain).

Indexes used: ``usage_records(created_at)`` and ``(key_id|user_id|team_id|alias|provider,
created_at)`` for raw ranges and filters; ``usage_rollups(bucket, bucket_start)``;
``model_metrics(bucket, bucket_start, deployment)``; ``routing_decisions(created_at)`` and
``(alias|strategy, created_at)``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .database import Database
from .retention import ROLLUP_SETS
from .sql import at_hour, epoch_hours, fetch, number, placeholders, timestamp

UTC = dt.UTC
Bucket = Literal["hour", "day"]
#: What usage can be grouped or filtered by, and the column behind each.
DIMENSIONS: dict[str, str] = {
    "model": "alias",
    "provider": "provider",
    "user": "user_id",
    "team": "team_id",
    "key": "key_id",
}
_SUMS = ("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens", "cached_tokens")
ERROR = "CASE WHEN status >= 400 AND status <> 499 THEN 1 ELSE 0 END"


@dataclass(slots=True)
class UsagePoint:
    bucket_start: dt.datetime
    group: str | None  # the value of the group-by dimension (None: no grouping, or no value)
    requests: int = 0
    errors: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0
    saved_cost: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bucket_start"] = self.bucket_start.isoformat()
        return out


def _hours(bucket: Bucket) -> int:
    return 1 if bucket == "hour" else 24


def _align(start: dt.datetime, end: dt.datetime, bucket: Bucket) -> tuple[int, int]:
    step = _hours(bucket)
    first = int(start.astimezone(UTC).timestamp() // 3600)
    last = -(-int(end.astimezone(UTC).timestamp()) // 3600)  # ceil
    return first - first % step, last + (-last % step)


def _where(db: Database, filters: dict[str, str | None]) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for name, value in filters.items():
        column = DIMENSIONS.get(name)
        if column is None:
            raise ValueError(f"unknown dimension {name!r} (known: {', '.join(DIMENSIONS)})")
        if value is None:
            clauses.append(f"{column} IS NULL")
        else:
            clauses.append(f"{column} = ?")
            params.append(value)
    return "".join(f" AND {c}" for c in clauses), params


async def _rollup_edges(db: Database) -> dict[str, tuple[int, int] | None]:
    """For each rollup bucket: (first hour covered, first hour not covered), or None.

    Read from the total set (``dims = ''``), which has a row for every bucket that had traffic."""
    out: dict[str, tuple[int, int] | None] = {"hour": None, "day": None}
    for bucket, step in (("hour", 1), ("day", 24)):
        rows = await fetch(
            db,
            "SELECT MIN(bucket_start) AS first, MAX(bucket_start) AS last FROM usage_rollups "
            "WHERE bucket = ? AND dims = ''",
            [bucket],
        )
        first, last = rows[0]["first"], rows[0]["last"]
        if first is None:
            continue
        if isinstance(first, str):
            first, last = dt.datetime.fromisoformat(first), dt.datetime.fromisoformat(last)
        out[bucket] = (int(first.timestamp() // 3600), int(last.timestamp() // 3600) + step)
    return out


def _plan(
    edges: dict[str, tuple[int, int] | None], first: int, last: int, bucket: Bucket
) -> list[tuple[str, int, int]]:
    """(source, from hour, to hour) segments covering [first, last): day rollups, hour rollups, raw."""
    cursor = first
    segments: list[tuple[str, int, int]] = []
    day, hour = edges["day"], edges["hour"]
    if day is not None and (bucket == "day" or hour is None or cursor < hour[0]):
        upto = min(last, day[1]) if bucket == "day" else min(last, day[1], hour[0] if hour else day[1])
        if cursor < upto:
            segments.append(("day", cursor, upto))
            cursor = upto
    if hour is not None and cursor < min(last, hour[1]):
        upto = min(last, hour[1])
        segments.append(("hour", cursor, upto))
        cursor = upto
    if cursor < last:
        segments.append(("raw", cursor, last))
    return segments


# Sums cast to plain integers and floats: decoding NUMERIC into Decimal costs more than the query.
_INT = "CAST(COALESCE(SUM({}), 0) AS BIGINT)"
_FLOAT = "CAST(COALESCE(SUM({}), 0) AS DOUBLE PRECISION)"
_RAW_SUMS = ", ".join(
    [
        "COUNT(*)",
        *(_INT.format(e) for e in (ERROR, "CASE WHEN cache_hit THEN 1 ELSE 0 END", "prompt_tokens")),
        *(_INT.format(e) for e in ("completion_tokens", "cached_tokens")),
        _FLOAT.format("cost"),
        _FLOAT.format("saved_cost"),
    ]
)
_ROLLUP_SUMS = ", ".join(
    [
        *(_INT.format(e) for e in ("requests", "errors", "cache_hits", "prompt_tokens", "completion_tokens")),
        _INT.format("cached_tokens"),
        _FLOAT.format("cost"),
        _FLOAT.format("saved_cost"),
    ]
)


def _group_by(*terms: str | None) -> str:
    present = [t for t in terms if t]
    return f" GROUP BY {', '.join(present)}" if present else ""


async def _collect(
    db: Database,
    start: dt.datetime,
    end: dt.datetime,
    bucket: Bucket,
    group_by: str | None,
    filters: dict[str, str | None] | None,
    *,
    by_time: bool,
) -> dict[tuple[int, bool, str], list[float]]:
    """(bucket start hour or 0, group is not None, group or "") → [requests, errors, cache hits,
    prompt, completion, cached, cost, saved cost], summed over every source segment."""
    if bucket not in ("hour", "day"):
        raise ValueError("bucket must be 'hour' or 'day'")
    column = DIMENSIONS.get(group_by) if group_by else None
    if group_by and column is None:
        raise ValueError(f"unknown dimension {group_by!r} (known: {', '.join(DIMENSIONS)})")
    first, last = _align(start, end, bucket)
    where, params = _where(db, filters or {})
    needed = {DIMENSIONS[name] for name in (filters or {})} | ({column} if column else set())
    dims = next((d for d, columns in ROLLUP_SETS.items() if needed <= set(columns)), None)
    edges: dict[str, tuple[int, int] | None] = {"hour": None, "day": None}
    if dims is not None:
        edges = await _rollup_edges(db)
    step = _hours(bucket)
    group_sql = column or "NULL"
    out: dict[tuple[int, bool, str], list[float]] = {}  # (hour, has a group, group): sorts natively
    queries_: list[tuple[str, list[Any], int | None]] = []  # (SQL, values, fixed bucket hour)
    for source, lo, hi in _plan(edges, first, last, bucket):
        if source == "raw":
            time_sql = ("hour" if step == 1 else f"(hour / {step}) * {step}") if by_time else "0"
            text = (
                f"SELECT {time_sql} AS h, {group_sql} AS g, {_RAW_SUMS} FROM usage_records "  # noqa: S608
                f"WHERE created_at >= ? AND created_at < ?{where}{_group_by(time_sql if by_time else None, column)}"
            )
            queries_.append((text, [timestamp(db, at_hour(lo)), timestamp(db, at_hour(hi)), *params], None))
            continue
        # rollups of a finer bucket (hours summed into days) or no time at all: one query per bucket,
        # grouped by the dimension only, so the database adds the hours up
        whole = (not by_time) or (source == "hour" and step > 1)
        time_sql = "NULL" if whole else epoch_hours(db, "bucket_start")
        text = (
            f"SELECT {time_sql} AS h, {group_sql} AS g, {_ROLLUP_SUMS} FROM usage_rollups "  # noqa: S608
            f"WHERE bucket = ? AND dims = ? AND bucket_start >= ? AND bucket_start < ?{where}"
            f"{_group_by(None if whole else 'bucket_start', column)}"
        )
        spans = [(lo, hi)] if not (whole and by_time) else [(h, min(h + step, hi)) for h in range(lo, hi, step)]
        for a, b in spans:
            values = [source, dims, timestamp(db, at_hour(a)), timestamp(db, at_hour(b)), *params]
            queries_.append((text, values, (a - a % step) if whole and by_time else (0 if whole else None)))
    get = out.get
    for text, values, fixed in queries_:
        with db.activate():
            _, rows = await db.connection.execute_query(placeholders(db, text), values)
        for row in rows:
            if fixed is not None:
                hour = fixed
            else:
                hour = row[0]
                if not isinstance(hour, int):  # SQLite may hand back a float or text
                    hour = int(hour)
            g = row[1]
            key = (hour - hour % step, g is not None, "" if g is None else g)
            agg = get(key)
            if agg is None:
                out[key] = list(row[2:])
            else:
                for i in range(8):
                    agg[i] += row[i + 2]
    return out


def _point(key: tuple[int, bool, str], sums: list[Any], starts: dict[int, dt.datetime]) -> UsagePoint:
    """The sums are already integers and floats (cast in SQL)."""
    hour = key[0]
    start = starts.get(hour)
    if start is None:
        start = starts[hour] = at_hour(hour)
    return UsagePoint(start, key[2] if key[1] else None, *sums)


async def usage(
    db: Database,
    start: dt.datetime,
    end: dt.datetime,
    *,
    bucket: Bucket = "hour",
    group_by: str | None = None,
    filters: dict[str, str | None] | None = None,
) -> list[UsagePoint]:
    """Requests, errors, tokens and cost per bucket (and per value of ``group_by``) in [start, end).

    ``group_by`` and the keys of ``filters`` are names from :data:`DIMENSIONS` (model, provider,
    user, team, key). Buckets without traffic are omitted. Sorted by bucket, then group.
    """
    collected = await _collect(db, start, end, bucket, group_by, filters, by_time=True)
    starts: dict[int, dt.datetime] = {}
    return [_point(key, collected[key], starts) for key in sorted(collected)]


async def totals(
    db: Database,
    start: dt.datetime,
    end: dt.datetime,
    *,
    group_by: str | None = None,
    filters: dict[str, str | None] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """One total per value of ``group_by`` over the whole range (aligned to days), most expensive
    first (e.g. top teams by cost). Without ``group_by``: a single total (none without traffic)."""
    collected = await _collect(db, start, end, "day", group_by, filters, by_time=False)
    out = []
    starts: dict[int, dt.datetime] = {}
    for key, sums in sorted(collected.items(), key=lambda kv: (-kv[1][6], -kv[1][0], kv[0][1:])):
        row = _point(key, sums, starts).as_dict()
        del row["bucket_start"]
        out.append(row)
    return out[:limit] if limit else out


async def routing_stats(
    db: Database, start: dt.datetime, end: dt.datetime, *, alias: str | None = None
) -> dict[str, Any]:
    """Routing decisions in [start, end): totals, fallback rate, and counts by strategy and reason,
    by chosen deployment and by outcome (raw decisions: kept ``raw_days``)."""
    params: list[Any] = [timestamp(db, start), timestamp(db, end)]
    where = "created_at >= ? AND created_at < ?"
    if alias is not None:
        where += " AND alias = ?"
        params.append(alias)
    rows = await fetch(
        db,
        "SELECT strategy, reason, chosen, outcome, COUNT(*) AS n, "  # noqa: S608 - constant text
        f"SUM(CASE WHEN fell_back THEN 1 ELSE 0 END) AS f FROM routing_decisions WHERE {where} "
        "GROUP BY strategy, reason, chosen, outcome",
        params,
    )  # one scan; the breakdowns are sums of these few groups
    by_reason: dict[tuple[str, str], list[int]] = {}
    by_chosen: dict[str | None, list[int]] = {}
    by_outcome: dict[str, int] = {}
    n = fell_back = 0
    for row in rows:
        count, fell = int(row["n"]), int(row["f"] or 0)
        n += count
        fell_back += fell
        reason = by_reason.setdefault((row["strategy"], row["reason"]), [0, 0])
        chosen = by_chosen.setdefault(row["chosen"], [0, 0])
        for agg in (reason, chosen):
            agg[0] += count
            agg[1] += fell
        by_outcome[row["outcome"]] = by_outcome.get(row["outcome"], 0) + count
    return {
        "decisions": n,
        "fell_back": fell_back,
        "fallback_rate": (fell_back / n) if n else 0.0,
        "by_strategy": [
            {"strategy": k[0], "reason": k[1], "decisions": v[0], "fell_back": v[1]}
            for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1][0])
        ],
        "by_deployment": [
            {"deployment": k, "decisions": v[0], "fell_back": v[1]}
            for k, v in sorted(by_chosen.items(), key=lambda kv: -kv[1][0])
        ],
        "by_outcome": [{"outcome": k, "decisions": v} for k, v in sorted(by_outcome.items(), key=lambda kv: -kv[1])],
    }


async def model_metrics(
    db: Database,
    start: dt.datetime,
    end: dt.datetime,
    *,
    bucket: Bucket = "hour",
    alias: str | None = None,
) -> list[dict[str, Any]]:
    """Per-deployment requests, errors, cost and latency / TTFT percentiles per rolled-up bucket."""
    params: list[Any] = [bucket, timestamp(db, start), timestamp(db, end)]
    where = "bucket = ? AND bucket_start >= ? AND bucket_start < ?"
    if alias is not None:
        where += " AND alias = ?"
        params.append(alias)
    rows = await fetch(
        db,
        "SELECT bucket_start, alias, provider, deployment, requests, errors, prompt_tokens, completion_tokens, cost, "  # noqa: S608
        "latency_p50_ms, latency_p95_ms, latency_p99_ms, ttft_p50_ms, ttft_p95_ms FROM model_metrics "
        f"WHERE {where} ORDER BY bucket_start, deployment",
        params,
    )
    for row in rows:
        b = row["bucket_start"]
        row["bucket_start"] = (dt.datetime.fromisoformat(b) if isinstance(b, str) else b).isoformat()
        row["cost"] = number(row["cost"])
    return rows


RECENT_COLUMNS = (
    "request_id, created_at, endpoint, key_id, user_id, team_id, alias, provider, deployment, upstream_model, "
    "prompt_tokens, completion_tokens, cached_tokens, cost, saved_cost, latency_ms, ttft_ms, status, error_code, "
    "cache_hit, streamed, client_disconnected, attempts"
)


async def recent_requests(
    db: Database,
    *,
    limit: int = 50,
    before: dt.datetime | None = None,
    filters: dict[str, str | None] | None = None,
    errors_only: bool = False,
) -> list[dict[str, Any]]:
    """The newest usage rows (optionally before a time, filtered by dimensions or to errors)."""
    where, params = _where(db, filters or {})
    if before is not None:
        where += " AND created_at < ?"
        params.append(timestamp(db, before))
    if errors_only:
        where += " AND status >= 400"
    rows = await fetch(
        db,
        f"SELECT {RECENT_COLUMNS} FROM usage_records WHERE 1 = 1{where} ORDER BY created_at DESC LIMIT ?",  # noqa: S608
        [*params, max(1, min(int(limit), 1000))],
    )
    for row in rows:
        created = row["created_at"]
        row["created_at"] = (dt.datetime.fromisoformat(created) if isinstance(created, str) else created).isoformat()
        row["cost"] = None if row["cost"] is None else number(row["cost"])
        row["saved_cost"] = None if row["saved_cost"] is None else number(row["saved_cost"])
        for name in ("cache_hit", "streamed", "client_disconnected"):
            row[name] = bool(row[name])
    return rows
