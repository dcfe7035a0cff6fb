"""Hand-written SQL shared by the rollups and the admin queries: one text for every database.

Statements are written with ``?`` placeholders and portable SQL only (integer arithmetic on
``usage_records.hour`` instead of date functions); :func:`fetch` renumbers the placeholders for
PostgreSQL (``$1``…). Values are always bound, never formatted into the text.
"""

from __future__ import annotations

import datetime as dt
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
