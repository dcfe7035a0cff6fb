"""Memory of the usage write-behind: what an operator sees when the database is slower than the traffic.

* With the default ``[database]`` settings, the records waiting in memory stay a few megabytes however
  many requests arrive while the database does not keep up; the rest goes to the spool file.
* Rows that went to the spool because the queue was full reach the database while the gateway keeps
  running (not only after a restart or an outage), and none is lost or written twice.
* Replaying a large spool while requests keep arriving never lets the queue grow past its bound.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from llmgateway.core.config import parse_config
from llmgateway.core.types import Principal
from llmgateway.plugins.storage.database import Database
from llmgateway.plugins.storage.plugin import StoragePlugin
from llmgateway.plugins.storage.sql import execute, fetch
from llmgateway.plugins.storage.writer import Spool, UsageWriter, encode_row, to_row
from tests.test_storage_support import database_url, decision, opened, record

KEY = Principal(kind="virtual_key", key_id="key_mem", user_id="user_mem", team_id="team_mem")


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with database_url(request.param, tmp_path) as url, opened(url) as database:
        yield database


async def count_rows(db: Database) -> int:
    with db.activate():
        rows = await fetch(db, "SELECT COUNT(*) AS n FROM usage_records")
    return int(rows[0]["n"])


async def wait_for_rows(db: Database, expected: int) -> int:
    """Poll (no timing assertion: a generous cap only so a regression fails instead of hanging)."""
    found = 0
    for _ in range(1500):
        found = await count_rows(db)
        if found >= expected:
            return found
        await asyncio.sleep(0.02)
    return found


def test_default_settings_hold_a_few_megabytes_of_records_when_the_database_stalls(tmp_path: Path) -> None:
    """95,000 requests finish while the flusher makes no progress (a stalled database): the
    write-behind holds at most its queue in memory (default 10,000 records), the rest is spooled."""
    plugin = StoragePlugin()
    plugin.llmgateway_configure(parse_config(f'[database]\nurl = "sqlite://{tmp_path / "g.db"}"\n'))
    writer = plugin.writer
    assert writer is not None
    assert writer.queue_size <= 10_000
    total = 95_000
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(total):
            writer.put(record(f"req_{i:07d}", principal=KEY), decision())
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(writer.queue) <= writer.queue_size
    assert writer.stats.spooled + len(writer.queue) == total
    # ~0.7 KB per waiting row (its spool line): 10,000 of them are well under 24 MB; 95,000 would be ~70 MB
    assert (held - base) < 24 * 2**20, f"{(held - base) / 2**20:.1f} MB held"
    assert (peak - base) < 32 * 2**20, f"{(peak - base) / 2**20:.1f} MB at the peak"
    spooled = sum(len(p.read_bytes().splitlines()) for p in Path(writer.spool.dir).iterdir())
    assert spooled == writer.stats.spooled


async def test_rows_spooled_by_a_full_queue_reach_the_database_while_running(db: Database, tmp_path: Path) -> None:
    """A burst far larger than the queue arrives while the gateway runs and the database is up:
    every row ends up in the database without a restart, once, and the spool is emptied."""
    spool = tmp_path / "spool"
    writer = UsageWriter(db, batch_size=50, flush_interval=0.02, queue_size=200, spool_dir=str(spool))
    with db.activate():
        writer.start()
    writer.put(record("req_first", principal=KEY), None)
    assert await wait_for_rows(db, 1) == 1  # the writer is running (its start-up replay is over)
    total = 2_000
    largest = 0
    for i in range(total):  # one burst, no await: the flusher cannot run in between
        writer.put(record(f"req_{i:05d}", principal=KEY), decision() if i % 2 else None)
        largest = max(largest, len(writer.queue))
    assert largest <= 200
    assert writer.stats.overflowed >= total - 200
    try:
        assert await wait_for_rows(db, total + 1) == total + 1
    finally:
        await writer.stop()
    with db.activate():
        rows = await fetch(db, "SELECT request_id FROM usage_records ORDER BY request_id")
        decided = await fetch(db, "SELECT request_id FROM usage_records WHERE strategy IS NOT NULL ORDER BY request_id")
    assert [r["request_id"] for r in rows] == [f"req_{i:05d}" for i in range(total)] + ["req_first"]
    assert [r["request_id"] for r in decided] == [f"req_{i:05d}" for i in range(1, total, 2)]
    assert writer.stats.written + writer.stats.replayed == total + 1
    assert list(spool.iterdir()) == []
    assert writer.spool.pending_rows() == 0  # what the shutdown log reports as left in the spool


async def test_replaying_a_large_spool_under_load_writes_every_row_once(db: Database, tmp_path: Path) -> None:
    """A spool of 3,000 rows left by a crashed process is replayed at start while requests keep
    arriving: every row, old and new, reaches the database exactly once and no spool is left (the
    queue bound itself is ``put``'s, checked for the record)."""
    spool_dir = tmp_path / "spool"
    old = Spool(str(spool_dir))
    old.pid = 999_999  # a process that is gone
    old.write_lines(encode_row(record(f"old_{i:05d}", principal=KEY), decision()) for i in range(3_000))
    writer = UsageWriter(db, batch_size=100, flush_interval=0.02, queue_size=300, spool_dir=str(spool_dir))
    with db.activate():
        writer.start()
    largest = 0
    live = 2_000
    for i in range(live):
        writer.put(record(f"new_{i:05d}", principal=KEY), None)
        largest = max(largest, len(writer.queue))
        if i % 25 == 0:
            await asyncio.sleep(0)  # requests interleave with the writer
    try:
        assert await wait_for_rows(db, 3_000 + live) == 3_000 + live
    finally:
        await writer.stop()
    assert largest <= 300
    assert writer.stats.written + writer.stats.replayed == 3_000 + live
    assert list(spool_dir.iterdir()) == []


async def test_batches_of_every_size_use_a_handful_of_sqlite_statements(tmp_path: Path) -> None:
    """sqlite3 keeps the last 128 distinct statements prepared, and a prepared multi-row INSERT is
    large: batches of 1 to 300 rows must not each get their own statement (that grew the process by
    ~80 MB)."""
    from llmgateway.plugins.storage.writer import insert_rows

    async with opened(f"sqlite://{tmp_path / 'shapes.db'}") as sqlite_db:
        with sqlite_db.activate():
            await sqlite_db.connection.execute_query("SELECT 1")  # the connection exists
            connection = sqlite_db.connection._connection  # type: ignore[attr-defined]  # aiosqlite's
        inserts: set[str] = set()

        def trace(sql: str) -> None:
            inserts.add(sql.split(" VALUES ")[0] + str(sql.count("),(")))

        # sqlite3 objects belong to aiosqlite's thread
        await connection._execute(connection._conn.set_trace_callback, trace)
        written = 0
        for size in range(1, 301):
            rows = [to_row(record(f"req_{written + i:06d}", principal=KEY), decision()) for i in range(size)]
            await insert_rows(sqlite_db, rows)
            written += size
        await connection._execute(connection._conn.set_trace_callback, None)
        assert await count_rows(sqlite_db) == written
    assert len({s for s in inserts if s.startswith("INSERT")}) <= 2 * 8  # 128, 64 ... 1 rows, two tables


async def test_a_row_the_database_refuses_is_set_aside_and_the_rest_written(db: Database, tmp_path: Path) -> None:
    """A row the database will never take (here: no status, a NOT NULL column) must not hold back
    the rows batched with it, neither live nor in a spool replay, nor be retried forever: the batch
    is split until the row is alone, the row goes to ``rejected-*.jsonl`` and everything else is
    written once."""
    spool_dir = tmp_path / "spool"
    old = Spool(str(spool_dir))
    old.pid = 999_999  # a process that is gone: its spool is replayed at start
    spooled = [to_row(record(f"old_{i:02d}", principal=KEY), decision()) for i in range(10)]
    spooled[4]["status"] = None
    old.write_lines(orjson.dumps(row) + b"\n" for row in spooled)
    writer = UsageWriter(db, batch_size=8, flush_interval=0.02, spool_dir=str(spool_dir))
    with db.activate():
        writer.start()
    live = [record(f"new_{i:02d}", principal=KEY) for i in range(20)]
    live[13].status = None  # type: ignore[assignment]
    for item in live:
        writer.put(item, None)
    try:
        assert await wait_for_rows(db, 28) == 28
    finally:
        await writer.stop()
    ids = {r["request_id"] for r in await fetch(db, "SELECT request_id FROM usage_records")}
    assert ids == {f"old_{i:02d}" for i in range(10) if i != 4} | {f"new_{i:02d}" for i in range(20) if i != 13}
    assert writer.stats.rejected == 2
    assert writer.stats.written + writer.stats.replayed == 28
    [rejected] = spool_dir.glob("rejected-*.jsonl")
    assert sorted(orjson.loads(line)["request_id"] for line in rejected.read_bytes().splitlines()) == [
        "new_13",
        "old_04",
    ]
    assert not list(spool_dir.glob("usage-*"))  # nothing left to replay, nothing retried forever


async def test_rows_for_a_usage_table_of_another_version_wait_in_the_spool(db: Database, tmp_path: Path) -> None:
    """A rolling upgrade: this version's rows have a column the usage table lacks (its migration is
    not applied yet). The rows are not the problem: none is set aside as refused, they wait in the
    spool, and once the column exists they are all written, once."""
    with db.activate():
        await execute(db, "ALTER TABLE usage_records DROP COLUMN outcome")
    spool = tmp_path / "spool"
    writer = UsageWriter(db, batch_size=50, flush_interval=0.02, spool_dir=str(spool))
    writer.schema_retry = 0.1
    with db.activate():
        writer.start()
    try:
        for i in range(120):
            writer.put(record(f"req_{i:05d}", principal=KEY), decision() if i % 2 else None)
        for _ in range(250):
            if writer.stats.spooled >= 120:
                break
            await asyncio.sleep(0.02)
        assert writer.stats.spooled >= 120
        assert writer.schema_mismatch
        assert writer.stats.rejected == 0
        assert not list(spool.glob("rejected-*"))
        assert await count_rows(db) == 0
        with db.activate():
            await execute(db, "ALTER TABLE usage_records ADD COLUMN outcome VARCHAR(64)")
        assert await wait_for_rows(db, 120) == 120
    finally:
        await writer.stop()
    assert writer.stats.rejected == 0
    assert writer.stats.written + writer.stats.replayed == 120
    assert writer.spool.pending_rows() == 0
