"""Hand-written SQL shared by the rollups and the admin queries: one text for every database.

Statements are written with ``?`` placeholders and portable SQL only (integer arithmetic on
``usage_records.hour`` instead of date functions); :func:`fetch` renumbers the placeholders for
PostgreSQL (``$1``…). Values are always bound, never formatted into the text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from .database import Database

UTC = dt.UTC


def placeholders(db: Database, text: str) -> str:
    if db.dialect != "postgres":
        return text
    parts = text.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        out.append(f"${i}")
        out.append(part)
    return "".join(out)


async def fetch(db: Database, text: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    with db.activate():
        _, rows = await db.connection.execute_query(placeholders(db, text), params or [])
    return [dict(row) for row in rows]


async def fetch_rows(db: Database, text: str, params: list[Any] | None = None) -> Sequence[Any]:
    """Rows as the driver hands them over (asyncpg ``Record``, ``sqlite3.Row``: no dict per row).

    On PostgreSQL the statement runs without parallel workers (``SET LOCAL`` in a read-only
    transaction): the dashboard questions read at most tens of thousands of rows, and on a busy host
    waiting for workers costs more than they save (usage by team over 30 days: 46 ms with workers,
    10 ms without, under load; benchmarks/STORAGE.md)."""
    with db.activate():
        client = db.connection
        if db.dialect != "postgres":
            _, rows = await client.execute_query(text, params or [])
            return rows
        async with client.acquire_connection() as conn, conn.transaction(readonly=True):
            await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            return list(await conn.fetch(placeholders(db, text), *(params or [])))


async def execute(db: Database, text: str, params: list[Any] | None = None) -> int:
    with db.activate():
        count, _ = await db.connection.execute_query(placeholders(db, text), params or [])
    return int(count or 0)


def epoch_hours(db: Database, column: str) -> str:
    """SQL for a timestamp column as whole hours since 1970 (an integer: cheaper to decode)."""
    if db.dialect == "postgres":
        return f"CAST(EXTRACT(EPOCH FROM {column}) AS BIGINT) / 3600"
    return f"CAST(strftime('%s', {column}) AS INTEGER) / 3600"


def hour_of(moment: dt.datetime) -> int:
    """Whole hours since 1970 (UTC) — the value of ``usage_records.hour``."""
    return int(moment.timestamp() // 3600)


def at_hour(hour: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(hour * 3600, UTC)


def number(value: Any) -> float:
    """A SUM() result as float (Decimal on PostgreSQL, float or None on SQLite)."""
    if value is None:
        return 0.0
    if isinstance(value, Decimal):
        return float(value)
    return float(value)


def boolean(db: Database, value: bool) -> Any:
    return value if db.dialect == "postgres" else int(value)


def timestamp(db: Database, moment: dt.datetime) -> Any:
    """A datetime bound as a parameter, in the form the column stores (ISO text on SQLite)."""
    moment = moment.astimezone(UTC)
    return moment if db.dialect == "postgres" else moment.isoformat(" ")
