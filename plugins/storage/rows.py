"""Usage rows as column values, and the process that writes them to a SQLite file.

Imported by the writer (:mod:`.writer`) and run on its own as a script — ``python -P rows.py`` —
by :class:`.writer.SqliteProcess`: then it imports nothing but the standard library (and orjson
when installed), so the process costs ~13 MB, not the server's ~60.

Why a process: sqlite3 holds the GIL while it binds a statement's values and gives it back only while
SQLite steps; done on a thread of the server, every batch made the event loop wait for the GIL
(measured: +70-130 µs on the median request at one connection, -10 % requests per second at 32).
In a process of its own the server's loop never waits for it.

The protocol, on the process's stdin and stdout: one line of JSON first (``path``, ``sql``,
``busy_timeout``, ``priority``: see :func:`lower_priority`); then per batch ``<size>\n`` and ``size`` bytes (a JSON array of spool-format rows),
answered by one line: ``ok`` or ``E\t<sqlite3 exception class>\t<message>``. End of input ends it.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

Row = dict[str, Any]
UTC = dt.UTC

try:  # what Tortoise's JSONField stores (its JSON_DUMPS): orjson when installed, else compact json
    import orjson

    def json_text(value: Any) -> str:
        return orjson.dumps(value).decode()

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a dependency
    import json

    def json_text(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    _loads = json.loads


_MAX_COST = 999_999.99999999  # DecimalField(max_digits=14, decimal_places=8)
_MAX_INT = 2**31 - 1  # IntField: 32 bits on PostgreSQL


def _decimal(value: float | None) -> Any:
    if value is None:
        return None
    return Decimal(repr(round(min(max(float(value), -_MAX_COST), _MAX_COST), 8)))


def _text(value: str | None, size: int) -> str | None:
    """A string cut to its column's width. Some values come from outside (the upstream's model name,
    its error code, a JWT's user or team claim): one too long must not fail the batch it is in (on
    PostgreSQL), which would then fail again at every replay."""
    return value if value is None or len(value) <= size else value[:size]


def _count(value: int) -> int:
    """A count that fits its 32-bit column (an upstream's usage numbers are not to be trusted)."""
    return value if 0 <= value <= _MAX_INT else min(max(int(value), 0), _MAX_INT)


USAGE_COLUMNS = (
    "request_id",
    "created_at",
    "hour",
    "endpoint",
    "key_id",
    "user_id",
    "team_id",
    "alias",
    "provider",
    "deployment",
    "upstream_model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "cost",
    "saved_cost",
    "latency_ms",
    "ttft_ms",
    "status",
    "error_code",
    "cache_hit",
    "streamed",
    "client_disconnected",
    "attempts",
    "metadata",
    # the routing decision
    "strategy",
    "chosen",
    "route_reason",
    "candidates",
    "fallbacks",
    "fell_back",
    "outcome",
)


class _Encoding:
    """How the row lists carry the values that are not plain strings and numbers: as the Python
    objects Tortoise's fields take (PostgreSQL, through ``to_db_value``), or as what SQLite stores.

    The SQLite encoding is what Tortoise's field conversions and the sqlite3 adapters it registers
    produce (``isoformat(" ")`` of the UTC datetime, ``str`` of the decimal, the JSON field's encoder,
    0/1 for a boolean) — tests compare the two paths — without their per-value dispatch: through
    ``to_db_value`` and sqlite3's adapter registry the conversions cost ~40 µs per row, more than SQLite
    spends inserting it."""

    def __init__(self, sqlite: bool) -> None:
        self.flag: Callable[[Any], Any] = int if sqlite else bool
        self.json: Callable[[Any], Any] = json_text if sqlite else _same
        self.money: Callable[[float | None], Any] = _decimal_text if sqlite else _decimal
        self.time: Callable[[float], Any] = _sqlite_time if sqlite else _utc


def _same(value: Any) -> Any:
    return value


def _utc(started: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(started, UTC)


def _decimal_text(value: float | None) -> str | None:
    return None if value is None else str(_decimal(value))


_SECONDS: dict[int, str] = {}


def _sqlite_time(started: float) -> str:
    """``datetime.fromtimestamp(started, UTC).isoformat(" ")`` for a timestamp ≥ 0, about five times
    faster: microseconds rounded like ``fromtimestamp`` (half to even, carried into the second), the
    formatted second reused across the rows of a batch."""
    fraction, whole = math.modf(started)
    micro = round(fraction * 1e6)
    second = int(whole)
    if micro >= 1_000_000:
        second += 1
        micro -= 1_000_000
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) > 4096:
            _SECONDS.clear()
        prefix = _SECONDS[second] = dt.datetime.fromtimestamp(second, UTC).replace(tzinfo=None).isoformat(" ")
    return f"{prefix}.{micro:06d}+00:00" if micro else f"{prefix}+00:00"


_ENCODINGS: dict[bool, _Encoding] = {}


def row_lists(rows: list[Row], sqlite: bool) -> list[list[Any]]:
    """The usage rows, each with its routing decision, as column lists (``USAGE_COLUMNS``)."""
    enc = _ENCODINGS.get(sqlite)
    if enc is None:
        enc = _ENCODINGS[sqlite] = _Encoding(sqlite)
    flag, json, money, time_of = enc.flag, enc.json, enc.money, enc.time
    no_decision = (None, None, None, None, None, flag(False), None)
    usage: list[list[Any]] = []
    for row in rows:
        started = float(row["started_at"])
        decision = row.get("decision")
        if decision:
            fallbacks = decision.get("fallbacks") or []
            routed: tuple[Any, ...] = (
                _text(decision["strategy"], 64),
                _text(decision["chosen"], 400),
                decision["reason"],
                json(decision["candidates"]),
                json(fallbacks),
                flag(bool(fallbacks)),
                _text(decision["outcome"], 64),
            )
        else:
            routed = no_decision
        usage.append(
            [
                row["request_id"],
                time_of(started),
                int(started // 3600),
                _text(row["endpoint"], 32),
                _text(row["key_id"], 64),
                _text(row["user_id"], 64),
                _text(row["team_id"], 64),
                _text(row["alias"], 200),
                _text(row["provider"], 200),
                _text(row["deployment"], 400),
                _text(row["upstream_model"], 200),
                _count(row["prompt_tokens"]),
                _count(row["completion_tokens"]),
                _count(row["cached_tokens"]),
                _count(row["reasoning_tokens"]),
                flag(row["usage_estimated"]),
                money(row["cost"]),
                money(row["saved_cost"]),
                row["latency_ms"],
                row["ttft_ms"],
                row["status"],
                _text(row["error_code"], 64),
                flag(row["cache_hit"]),
                flag(row["streamed"]),
                flag(row["client_disconnected"]),
                _count(row["attempts"]),
                json(row.get("metadata") or {}),
                *routed,
            ]
        )
    return usage


def insert_many(conn: Any, sql: str, rows: list[list[Any]], most: int = 128) -> None:
    """``executemany`` as multi-row ``INSERT … VALUES (…), (…) …`` statements.

    sqlite3 releases the GIL around every row it steps; on a thread of the server (``insert_rows``,
    an in-memory database) each time the thread waits for the event loop to hand the GIL back, which
    takes milliseconds while requests keep the loop busy. One statement per few hundred rows makes
    that one wait. In the writer process (no GIL to share) statements of at most 32 rows: as fast,
    and ~1 MB less memory for the prepared statements sqlite3 keeps (``most``, a power of two)."""
    head, sep, tail = sql.partition(" VALUES (")
    one, close, rest = tail.partition(")")
    if not rows or not sep or not close or set(one) - {"?", ","}:  # not the shape we build: row by row
        conn.executemany(sql, rows)
        return
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(rows[0])
    values = f"({one})"
    start = 0
    while start < len(rows):
        # statements of 128, 64, 32 ... rows: a handful of shapes, so sqlite3's statement cache (128
        # entries, a prepared multi-row INSERT is large) never fills with one shape per batch size
        size = 1 << min(most.bit_length() - 1, (len(rows) - start).bit_length() - 1, max(0, limit.bit_length() - 1))
        part = rows[start : start + size]
        conn.execute(f"{head} VALUES {','.join([values] * size)}{rest}", [v for row in part for v in row])
        start += size


_NULL: Callable[[Any], Any] = {}.get  # None -> None, without a Python frame (the adapter for None)


# ---- the process -----------------------------------------------------------------------------


def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    """What Tortoise's SQLite client opens (autocommit, its default pragmas) with a smaller page cache
    (appending rows touches few pages: 256 KB instead of 2 MB) and temporary data in memory: a
    multi-row ``INSERT … ON CONFLICT`` inside a transaction opens a statement journal, by default a
    file created, written and deleted for every batch."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    pragmas = (
        "journal_mode=WAL",
        "journal_size_limit=16384",
        "foreign_keys=ON",
        "cache_size=-256",
        "temp_store=MEMORY",
    )
    for pragma in pragmas:
        conn.execute(f"PRAGMA {pragma}")
    return conn


def write_batch(conn: sqlite3.Connection, sql: str, usage: list[list[Any]], most: int = 128) -> None:
    """One batch in one transaction (in the writer process, or on the server's SQLite thread)."""
    # sqlite3 binds None through its adapter protocol: no adapter registered for it, it looks for
    # __adapt__ / __conform__ and clears the AttributeErrors, ~0.6 µs per NULL (a row without a routing
    # decision has eight). An adapter returning None (a C call) binds the same NULL; idempotent.
    sqlite3.register_adapter(type(None), _NULL)
    conn.execute("BEGIN")
    try:
        insert_many(conn, sql, usage, most)
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def lower_priority(priority: str) -> None:
    """Give the CPU to the server first. ``idle``: Linux's SCHED_IDLE policy, the process runs on a
    CPU that has nothing else to do and a server thread that wakes up takes the CPU from it at once
    (measured at one connection, 2 cores, 500-row batches: p99 0.87-1.16 ms against 4.0-5.0 at
    normal priority, where a batch being written kept a woken server waiting); ``low``: nice 19;
    ``normal``: unchanged. Where the policy does not exist (not Linux), ``idle`` is ``low``."""
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            pass
    if priority in ("idle", "low"):
        try:
            os.nice(19)
        except OSError:
            pass


def main() -> None:
    # the server decides when this ends (it closes our input): a Ctrl-C or a SIGTERM sent to the whole
    # process group must not cut a batch in half
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    setup = _loads(stdin.readline())
    lower_priority(setup.get("priority", "normal"))
    conn = _connect(setup["path"], float(setup["busy_timeout"]))
    sql = setup["sql"]
    while True:
        size = stdin.readline()
        if not size:
            break
        payload = stdin.read(int(size))
        try:
            write_batch(conn, sql, row_lists(_loads(payload), sqlite=True), most=32)
            answer = b"ok\n"
        except Exception as exc:  # told to the server, which decides (spool, split, retry)
            message = " ".join(str(exc).split())
            answer = f"E\t{type(exc).__name__}\t{message}\n".encode()
        stdout.write(answer)
        stdout.flush()
    conn.close()


if __name__ == "__main__":
    main()
