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

Each question is one statement (:func:`_statement`): the database sums, buckets, merges the sources
that share a bucket and sorts; Python turns each row into a :class:`UsagePoint` and nothing else
(30 days by key, 31,000 points: the Python merging of the earlier per-source queries took most of
its time).

Ranges are aligned to whole buckets (start rounded down, end rounded up). Hourly buckets older
than the hourly-rollup retention come back as whole days (only the daily rollups remain).

Indexes used: ``usage_records(created_at)`` and ``(key_id|user_id|team_id|alias|provider,
created_at)`` for raw ranges and filters; ``usage_rollups(bucket, bucket_start)``;
``model_metrics(bucket, bucket_start, deployment)``. Routing statistics read the decision columns of
the raw usage rows through ``usage_records(created_at)`` and ``(alias, created_at)``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from itertools import islice, starmap
from operator import attrgetter, eq
from typing import Any, Literal

from .database import Database
from .retention import ROLLUP_SETS
from .sql import at_hour, epoch_hours, fetch, fetch_rows, number, timestamp

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
    rows = await fetch(
        db,
        "SELECT bucket, MIN(bucket_start) AS first, MAX(bucket_start) AS last FROM usage_rollups "
        "WHERE bucket IN ('hour', 'day') AND dims = '' GROUP BY bucket",
    )
    for row in rows:
        first, last = row["first"], row["last"]
        if isinstance(first, str):
            first, last = dt.datetime.fromisoformat(first), dt.datetime.fromisoformat(last)
        step = _hours(row["bucket"])
        out[row["bucket"]] = (int(first.timestamp() // 3600), int(last.timestamp() // 3600) + step)
    return out


def _plan(
    edges: dict[str, tuple[int, int] | None], first: int, last: int, bucket: Bucket
) -> list[tuple[str, int, int]]:
    """(source, from hour, to hour) segments covering [first, last): day rollups, hour rollups, raw.

    Hourly questions reaching back past the hourly rollups (deleted after ``hourly_days``) get whole
    days from the daily rollups, up to the first day the hourly rollups cover completely (never both
    for the same hour)."""
    cursor = first
    segments: list[tuple[str, int, int]] = []
    day, hour = edges["day"], edges["hour"]
    if day is not None and (bucket == "day" or hour is None or cursor < hour[0]):
        upto = min(last, day[1])
        if bucket == "hour" and hour is not None:
            cut = hour[0] - hour[0] % 24  # the day holding the oldest hourly rollup: whole if days before it
            upto = min(upto, cut + 24 if day[0] < cut else cut)  # have rollups (hours were deleted), else hourly
        if cursor < upto:
            segments.append(("day", cursor - cursor % 24, upto))
            cursor = upto
    if hour is not None and cursor < min(last, hour[1]):
        upto = min(last, hour[1])
        segments.append(("hour", cursor, upto))
        cursor = upto
    if cursor < last:
        segments.append(("raw", cursor, last))
    return segments


# Every source part answers the same columns: h (bucket start, whole hours since 1970; 0 without
# time), g (the group's value or NULL), then these sums as plain integers and floats (decoding
# NUMERIC into Decimal costs more than the query; narrow rows also sort in memory).
_NAMES = (
    "requests",
    "errors",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost",
    "saved_cost",
)
_INT = "CAST(COALESCE({}, 0) AS BIGINT) AS {}"
_FLOAT = "CAST(COALESCE({}, 0) AS DOUBLE PRECISION) AS {}"


def _sums(expressions: tuple[str, ...]) -> str:
    return ", ".join(
        (_INT if i < 6 else _FLOAT).format(e, n) for i, (e, n) in enumerate(zip(expressions, _NAMES, strict=True))
    )


_RAW_SUMS = _sums(
    (
        "COUNT(*)",
        f"SUM({ERROR})",
        "SUM(CASE WHEN cache_hit THEN 1 ELSE 0 END)",
        "SUM(prompt_tokens)",
        "SUM(completion_tokens)",
        "SUM(cached_tokens)",
        "SUM(cost)",
        "SUM(saved_cost)",
    )
)
_SUMS_OF = _sums(tuple(f"SUM({n})" for n in _NAMES))
_AS_IS = _sums(_NAMES)  # one rollup row per point: nothing to add up


#: Columns almost always determined by the group (a key has one user and team, a user one team),
#: so a grouping set with them has one row per bucket and group but for the rare owner change.
_OWNERS: dict[str, set[str]] = {"key_id": {"user_id", "team_id"}, "user_id": {"team_id"}}


def _group_by(*terms: str | None) -> str:
    present = [t for t in terms if t]
    return f" GROUP BY {', '.join(present)}" if present else ""


def _statement(
    db: Database,
    start: dt.datetime,
    end: dt.datetime,
    bucket: Bucket,
    group_by: str | None,
    filters: dict[str, str | None] | None,
    edges: dict[str, tuple[int, int] | None] | None,
    *,
    by_time: bool,
) -> tuple[str, list[Any], bool]:
    """One statement answering the whole question, and whether its answer may hold a point twice.

    The database reads each source segment, sums and buckets it, merges the segments that share a
    bucket and sorts the answer, so Python only receives the points (one row each). Rollup rows of
    the question's own bucket are read as they are when the grouping set has at most one row per
    bucket and group (its columns are the group and filtered ones), and otherwise too: a row per
    key *and owner* is almost always a row per key; :func:`_points` adds up the rare rest (a key that
    changed user or team within a bucket). ``edges`` None: raw rows only."""
    column = DIMENSIONS[group_by] if group_by else None
    first, last = _align(start, end, bucket)
    where, params = _where(db, filters or {})
    dims = _rollup_set(group_by, filters)
    fixed = {DIMENSIONS[name] for name in filters or {}} | ({column} if column else set())
    extra = set(ROLLUP_SETS[dims]) - fixed if dims is not None else set()
    # the set's rows of the question's bucket are its points as they are: always when the set has no
    # other column, almost always when the others are the group's owners (key → user, team)
    as_is = not extra or (column is not None and extra <= _OWNERS.get(column, set()))
    twice = False
    step = _hours(bucket)
    g = column or "NULL"
    runs: list[list[tuple[str, list[Any]]]] = []  # parts that may share a bucket are summed together
    for source, lo, hi in _plan(edges or {"hour": None, "day": None}, first, last, bucket):
        values = [timestamp(db, at_hour(lo)), timestamp(db, at_hour(hi)), *params]
        if source == "raw":
            h = ("hour" if step == 1 else f"(hour / {step}) * {step}") if by_time else "0"
            text = (
                f"SELECT {h} AS h, {g} AS g, {_RAW_SUMS} FROM usage_records "  # noqa: S608 - constants only
                f"WHERE created_at >= ? AND created_at < ?{where}{_group_by(h if by_time else None, column)}"
            )
        else:
            hours = epoch_hours(db, "bucket_start")
            sums = _SUMS_OF
            if not by_time:
                h, grouping = "0", column
            elif source == "hour" and step > 1:  # hourly rollups summed into days
                h = f"({hours} / {step}) * {step}"
                grouping = f"{h}, {column}" if column else h
            elif as_is:  # the rollup's own bucket (or whole days for hours past the hourly rollups)
                h, grouping, sums = hours, None, _AS_IS
                twice = twice or bool(extra)
            else:
                h, grouping = hours, f"bucket_start, {column}" if column else "bucket_start"
            text = (
                f"SELECT {h} AS h, {g} AS g, {sums} FROM usage_rollups "  # noqa: S608 - constants only
                f"WHERE bucket = ? AND dims = ? AND bucket_start >= ? AND bucket_start < ?{where}{_group_by(grouping)}"
            )
            values = [source, dims, *values]
        part = (f"SELECT * FROM ({text}) AS p{sum(map(len, runs))}", values)  # noqa: S608
        if runs and (not by_time or lo % step):  # shares its first bucket with the previous part
            runs[-1].append(part)
        else:
            runs.append([part])
    texts, values = [], []
    for i, run in enumerate(runs):
        union = " UNION ALL ".join(text for text, _ in run)
        texts.append(union if len(run) == 1 else f"SELECT h, g, {_SUMS_OF} FROM ({union}) AS m{i} GROUP BY h, g")  # noqa: S608
        values.extend(v for _, part_values in run for v in part_values)
    if not texts:
        return "", [], False
    order = "h" if column is None else ('h, g COLLATE "C" NULLS FIRST' if db.dialect == "postgres" else "h, g")
    when = "to_timestamp(h * 3600)" if db.dialect == "postgres" else "h"  # PostgreSQL: datetimes decoded in C
    union = " UNION ALL ".join(f"SELECT * FROM ({t}) AS r{i}" for i, t in enumerate(texts))  # noqa: S608
    columns = ", ".join(_NAMES)
    return f"SELECT {when} AS b, g, {columns} FROM ({union}) AS u ORDER BY {order}", values, twice  # noqa: S608


def _rollup_set(group_by: str | None, filters: dict[str, str | None] | None) -> str | None:
    """The smallest grouping set with every dimension the question names (None: raw rows only)."""
    for name in [*(filters or {}), *([group_by] if group_by else [])]:
        if name not in DIMENSIONS:
            raise ValueError(f"unknown dimension {name!r} (known: {', '.join(DIMENSIONS)})")
    needed = {DIMENSIONS[name] for name in [*(filters or {}), *([group_by] if group_by else [])]}
    return next((d for d, columns in ROLLUP_SETS.items() if needed <= set(columns)), None)


async def _points(
    db: Database,
    start: dt.datetime,
    end: dt.datetime,
    bucket: Bucket,
    group_by: str | None,
    filters: dict[str, str | None] | None,
    *,
    by_time: bool,
) -> list[UsagePoint]:
    if bucket not in ("hour", "day"):
        raise ValueError("bucket must be 'hour' or 'day'")
    edges = await _rollup_edges(db) if _rollup_set(group_by, filters) is not None else None
    text, values, twice = _statement(db, start, end, bucket, group_by, filters, edges, by_time=by_time)
    if not text:
        return []
    rows = await fetch_rows(db, text, values)
    if db.dialect == "postgres":  # (datetime, group, 8 sums) as the database sent them
        points = list(starmap(UsagePoint, rows))
    else:
        starts: dict[int, dt.datetime] = {}
        points = []
        for row in rows:
            hour = int(row[0])  # SQLite may hand back a float or text
            when = starts.get(hour)
            if when is None:
                when = starts[hour] = at_hour(hour)
            points.append(UsagePoint(when, row[1], *row[2:]))
    if twice:
        keys = list(map(_KEY, points))
        if any(map(eq, keys, islice(keys, 1, None))):  # sorted: a point twice is a point in a row
            return _merge_adjacent(points)
    return points


_KEY = attrgetter("bucket_start", "group")


def _merge_adjacent(points: list[UsagePoint]) -> list[UsagePoint]:
    out: list[UsagePoint] = []
    for point in points:
        if out and _KEY(out[-1]) == _KEY(point):
            last = out[-1]
            for name in _NAMES:
                setattr(last, name, getattr(last, name) + getattr(point, name))
        else:
            out.append(point)
    return out


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
    user, team, key). Buckets without traffic are omitted. Sorted by bucket, then group (no value
    first, then by code point).
    """
    return await _points(db, start, end, bucket, group_by, filters, by_time=True)


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
    points = await _points(db, start, end, "day", group_by, filters, by_time=False)
    if group_by is None:  # an aggregate without GROUP BY answers one row even over no rows at all
        points = [p for p in points if p.requests]
    points.sort(key=lambda p: (-p.cost, -p.requests, p.group is not None, p.group or ""))
    out = []
    for point in points[:limit] if limit else points:
        row = point.as_dict()
        del row["bucket_start"]
        out.append(row)
    return out


async def routing_stats(
    db: Database, start: dt.datetime, end: dt.datetime, *, alias: str | None = None
) -> dict[str, Any]:
    """Routing decisions in [start, end): totals, fallback rate, and counts by strategy and reason,
    by chosen deployment and by outcome (the decision columns of raw usage rows: kept ``raw_days``;
    rows of requests that were not routed have no strategy and are not counted)."""
    params: list[Any] = [timestamp(db, start), timestamp(db, end)]
    where = "created_at >= ? AND created_at < ? AND strategy IS NOT NULL"
    if alias is not None:
        where += " AND alias = ?"
        params.append(alias)
    rows = await fetch(
        db,
        "SELECT strategy, route_reason AS reason, chosen, outcome, COUNT(*) AS n, "  # noqa: S608 - constant text
        f"SUM(CASE WHEN fell_back THEN 1 ELSE 0 END) AS f FROM usage_records WHERE {where} "
        "GROUP BY strategy, route_reason, chosen, outcome",
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
