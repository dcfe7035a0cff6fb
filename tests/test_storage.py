"""Storage: schema from a fresh install, migrations on SQLite and PostgreSQL, usage rows through a
real gateway, write-behind batching, the spool, configuration errors, ``llmgateway db``."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from llmgateway.core.app import create_app
from llmgateway.core.config import parse_config
from llmgateway.core.errors import ConfigError
from llmgateway.core.types import ANONYMOUS, Principal
from llmgateway.plugins.storage import queries
from llmgateway.plugins.storage.database import Database
from llmgateway.plugins.storage.plugin import SchemaBehindError
from llmgateway.plugins.storage.sql import boolean, execute, fetch, timestamp
from llmgateway.plugins.storage.writer import UsageWriter, to_row
from tests.conftest import GatewayFactory, sdk
from tests.test_storage_support import (
    database_url,
    decision,
    decision_rows,
    decisions_of,
    opened,
    pg_database,
    record,
    usage_rows,
)

REPO = Path(__file__).resolve().parent.parent
LATEST = [
    "0001_initial",
    "0002_usage_hour_rollup_savings_unique_decisions",
    "0003_rollup_grouping_sets",
    "0004_usage_hour_index",
    "0005_usage_routing_decision",
]

DEMO = """
[providers.demo]
type = "demo"

[[models]]
name = "demo"
deployments = [{ provider = "demo", model = "demo-1" }]
"""


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    async with opened(db_url) as database:
        yield database


def llmgateway(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmgateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )


# ---- fresh install -----------------------------------------------------------------------------


@pytest.mark.parametrize("process", [True, False])
async def test_fresh_install_creates_the_sqlite_schema_and_fills_the_usage_table(
    serve_gateway: GatewayFactory, tmp_path: Path, process: bool
) -> None:
    """No database URL: the default SQLite file appears next to gateway.toml, migrated, and every
    request (plain and streamed) leaves exactly one usage row and one routing decision — written by
    the writer process, or with ``process = false`` on the server's SQLite thread."""
    toml = f"{DEMO}\n[database.write_behind]\nprocess = {str(process).lower()}\n"
    async with serve_gateway(toml) as url:
        writer = serve_gateway.gateway.state["storage"].writer  # type: ignore[attr-defined]
        assert (writer.sqlite_process is not None) is process
        async with sdk(url) as client:
            plain = await client.chat.completions.with_raw_response.create(
                model="demo", messages=[{"role": "user", "content": "one two three"}]
            )
            streamed = await client.chat.completions.with_raw_response.create(
                model="demo", messages=[{"role": "user", "content": "four"}], stream=True
            )
            async for _ in streamed.parse():
                pass
    database = tmp_path / "llmgateway.db"
    assert database.exists()
    url = f"sqlite://{database}"
    async with opened(url, migrate=False) as database:
        status = await database.status()
    assert status.applied == LATEST
    assert status.pending == []
    rows = {r["request_id"]: r for r in await usage_rows(url)}
    plain_id, stream_id = plain.headers["x-request-id"], streamed.headers["x-request-id"]
    assert set(rows) == {plain_id, stream_id}
    assert rows[plain_id]["streamed"] in (0, False)
    assert rows[stream_id]["streamed"] in (1, True)
    for row in rows.values():
        assert row["alias"] == "demo"
        assert row["provider"] == "demo"
        assert row["deployment"] == "demo/demo/demo-1#0"
        assert row["status"] == 200
        assert row["prompt_tokens"] > 0
        assert row["completion_tokens"] > 0
        assert row["latency_ms"] > 0
        assert row["hour"] > 0
    assert rows[stream_id]["ttft_ms"] is not None
    decisions = await decision_rows(url)
    assert sorted(d["request_id"] for d in decisions) == sorted([plain_id, stream_id])
    assert all(d["strategy"] == "ordered" and d["outcome"] == "success" for d in decisions)


async def test_usage_row_carries_cost_tokens_and_identity(
    serve_gateway: GatewayFactory, upstream: tuple[object, str], tmp_path: Path
) -> None:
    """The openai provider against the fake upstream (usage 11 in / 9 out / 3 cached): the row has
    the cost from the shipped price table, the tokens, and the caller's key id."""
    _, upstream_url = upstream
    toml = textwrap.dedent(
        f"""
        [auth]
        master_key = "mk-storage-test-123"

        [providers.local]
        type = "openai"
        base_url = "{upstream_url}/v1"
        api_key = "sk-upstream-test"

        [[models]]
        name = "mini"
        deployments = [{{ provider = "local", model = "gpt-4o-mini" }}]
        """
    )
    async with serve_gateway(toml) as url:
        async with sdk(url, api_key="mk-storage-test-123") as client:
            response = await client.chat.completions.with_raw_response.create(
                model="mini", messages=[{"role": "user", "content": "hi"}]
            )
    (row,) = await usage_rows(f"sqlite://{tmp_path / 'llmgateway.db'}")
    assert row["request_id"] == response.headers["x-request-id"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (11, 9, 3)
    expected = (8 * 0.15 + 3 * 0.075 + 9 * 0.60) / 1_000_000
    assert float(row["cost"]) == pytest.approx(expected, abs=1e-8)
    assert row["key_id"] == "master"
    assert row["upstream_model"] == "gpt-4o-mini-2024"
    assert row["cache_hit"] in (0, False)
    assert row["client_disconnected"] in (0, False)


async def test_postgres_database_from_config(serve_gateway: GatewayFactory) -> None:
    async with pg_database() as pg_url:
        toml = f'[database]\nurl = "{pg_url}"\n' + DEMO
        async with serve_gateway(toml) as url:
            async with httpx.AsyncClient(base_url=url) as http:
                ready = await http.get("/health/ready")
                answer = await http.post(
                    "/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "x"}]}
                )
        assert ready.json()["checks"]["storage"].startswith("ok")
        rows = await usage_rows(pg_url)
        assert [r["request_id"] for r in rows] == [answer.headers["x-request-id"]]
        assert rows[0]["created_at"].tzinfo is not None


# ---- migrations --------------------------------------------------------------------------------


async def test_migrations_from_an_empty_database(db_url: str) -> None:
    async with opened(db_url, migrate=False) as database:
        assert (await database.status()).pending == LATEST
        assert await database.migrate() == LATEST
        assert await database.migrate() == []
        status = await database.status()
        assert (status.applied, status.pending) == (LATEST, [])
        from llmgateway.plugins.storage.models import ApiKey, Team

        with database.activate():
            team = await Team.create(id="t1", name="Team one")
            await ApiKey.create(id="k1", key_hash="h" * 64, prefix="sk-lg-x", team=team)
            assert await ApiKey.filter(team_id="t1").count() == 1


async def test_upgrade_from_the_first_schema_keeps_the_data(db_url: str) -> None:
    """A database created at 0001 with rows in it upgrades to the latest: the new hour column is
    filled from created_at, duplicate decisions are removed, fell_back is derived from fallbacks,
    rollups are regrouped into grouping sets, the decision lands in its usage row."""
    async with opened(db_url, target="0001_initial") as database:
        assert (await database.status()).pending == LATEST[1:]
        connection = database.connection
        with database.activate():
            await connection.execute_script(
                "INSERT INTO usage_records (request_id, created_at, endpoint, prompt_tokens, completion_tokens, "
                "cached_tokens, reasoning_tokens, usage_estimated, latency_ms, status, cache_hit, streamed, "
                "client_disconnected, attempts, metadata, cost) VALUES ('old-1', '2024-05-01 13:45:12.5+00:00', "
                "'chat.completions', 11, 9, 0, 0, false, 12.5, 200, false, false, false, 1, '{}', 0.25)"
            )
            for key, requests in (("k1", 3), ("k2", 4)):  # rollups of the first schema: one row per combination
                await connection.execute_script(
                    "INSERT INTO usage_rollups (bucket, bucket_start, key_id, user_id, team_id, alias, provider, "
                    "requests, errors, cache_hits, prompt_tokens, completion_tokens, cost) VALUES ('hour', "
                    f"'2024-05-01 13:00:00+00:00', '{key}', 'u1', 't1', 'fast', 'p', {requests}, 1, 0, 10, 5, 0.5)"
                )
            for fallbacks in ('["x"]', "[]"):
                await connection.execute_script(
                    "INSERT INTO routing_decisions (request_id, created_at, alias, strategy, reason, candidates, "
                    f"fallbacks, outcome) VALUES ('old-1', '2024-05-01 13:45:12+00:00', 'a', 'ordered', 'why', "
                    f"'[]', '{fallbacks}', 'success')"
                )
        assert await database.migrate() == LATEST[1:]
        (row,) = await fetch(database, "SELECT request_id, hour, prompt_tokens, cost FROM usage_records")
        assert row["hour"] == 476269  # 2024-05-01 13:00 UTC in hours since 1970
        assert (row["prompt_tokens"], float(row["cost"])) == (11, 0.25)
        rollups = await fetch(
            database, "SELECT dims, key_id, team_id, alias, requests, cost FROM usage_rollups ORDER BY dims, key_id"
        )
        assert [
            (r["dims"], r["key_id"], r["team_id"], r["alias"], r["requests"], float(r["cost"])) for r in rollups
        ] == [
            ("", None, None, None, 7, 1.0),
            ("alias,provider", None, None, "fast", 7, 1.0),
            ("key_id,user_id,team_id", "k1", "t1", None, 3, 0.5),
            ("key_id,user_id,team_id", "k2", "t1", None, 4, 0.5),
            ("team_id", None, "t1", None, 7, 1.0),
            ("team_id,alias,provider", None, "t1", "fast", 7, 1.0),
            ("user_id,team_id", None, "t1", None, 7, 1.0),
        ]
        decisions = [(d["request_id"], d["reason"], bool(d["fell_back"])) for d in await decisions_of(database)]
        assert decisions == [("old-1", "why", True)]
        # the new constraint and columns work
        writer = UsageWriter(database, spool_dir="/nonexistent")
        writer.put(record("new-1", cached=2), decision(fallbacks=["b"]))
        writer.put(record("new-1"), decision())  # the same request again: ignored
        await writer.flush()
        decided = [(d["request_id"], bool(d["fell_back"])) for d in await decisions_of(database)]
        assert decided == [("old-1", True), ("new-1", True)]
        # and it rolls back to 0001 (the decisions back in routing_decisions) and forward again
        assert await database.migrate("0001_initial") == ["-" + name for name in reversed(LATEST[1:])]
        back = await fetch(database, "SELECT request_id, reason FROM routing_decisions ORDER BY request_id")
        assert [(r["request_id"], r["reason"]) for r in back] == [("new-1", "config order"), ("old-1", "why")]
        assert await database.migrate() == LATEST[1:]
        assert [(d["request_id"], bool(d["fell_back"])) for d in await decisions_of(database)] == decided


async def test_upgrade_from_0004_folds_the_routing_decisions_into_the_usage_rows(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database at 0004 (usage rows and decisions in two tables, as the previous version wrote
    them) migrates to 0005: each decision is in its usage row, rows without one have none, a
    decision whose usage row is gone is dropped, and routing statistics answer as they did. Rolling
    back puts the decisions back in their table and keeps usage_records' indexes."""
    base = 1_764_000_000.0
    rows = [
        to_row(
            record(f"r{i:02d}", started_at=base + i * 60, alias=("fast", "smart")[i % 2], status=500 if i % 9 else 200),
            None
            if i % 10 == 3
            else decision(
                ("fast", "smart")[i % 2],
                fallbacks=["x/y/z#1"] if i % 4 == 0 else None,
                reason=("config order", "lowest p50 latency")[i % 3 % 2],
            ),
        )
        for i in range(40)
    ]
    for i, row in enumerate(rows):
        if "decision" in row:
            row["decision"]["strategy"] = ("ordered", "latency")[i % 3 % 2]
            row["decision"]["chosen"] = None if i % 11 == 0 else f"d{i % 3}"
            row["decision"]["outcome"] = "success" if row["status"] == 200 else "500"
    start, end = dt.datetime.fromtimestamp(base + 300, dt.UTC), dt.datetime.fromtimestamp(base + 1800, dt.UTC)
    old_stats = (  # the statement routing_stats ran on routing_decisions before 0005
        "SELECT strategy, reason, chosen, outcome, COUNT(*) AS n, SUM(CASE WHEN fell_back THEN 1 ELSE 0 END) AS f "
        "FROM routing_decisions WHERE created_at >= ? AND created_at < ?{} GROUP BY strategy, reason, chosen, outcome"
    )
    async with opened(db_url, target="0004_usage_hour_index") as database:
        indexes = await usage_indexes(database)
        await insert_as_before_0005(database, rows)
        before = [
            await fetch(database, old_stats.format(""), [timestamp(database, start), timestamp(database, end)]),
            await fetch(
                database,
                old_stats.format(" AND alias = ?"),
                [timestamp(database, start), timestamp(database, end), "fast"],
            ),
        ]
        orphan = to_row(record("orphan", started_at=base + 600), decision())
        await insert_as_before_0005(database, [orphan], usage=False)
        assert await database.migrate() == ["0005_usage_routing_decision"]

        found = {d["request_id"]: d for d in await decisions_of(database)}
        assert set(found) == {r["request_id"] for r in rows if "decision" in r}  # not the orphan
        for row in rows:
            if "decision" not in row:
                continue
            got, want = found[row["request_id"]], row["decision"]
            assert (got["alias"], got["strategy"], got["chosen"], got["reason"], got["outcome"]) == (
                want["alias"],
                want["strategy"],
                want["chosen"],
                want["reason"],
                want["outcome"],
            )
            assert [json_value(got["candidates"]), json_value(got["fallbacks"])] == [
                want["candidates"],
                want["fallbacks"],
            ]
            assert bool(got["fell_back"]) == bool(want["fallbacks"])
        plain = await fetch(database, "SELECT request_id, fell_back FROM usage_records WHERE strategy IS NULL")
        assert sorted((r["request_id"], bool(r["fell_back"])) for r in plain) == [
            (r["request_id"], False) for r in rows if "decision" not in r
        ]
        assert not await fetch(database, "SELECT id FROM usage_records WHERE request_id = 'orphan'")

        for groups, alias in zip(before, (None, "fast"), strict=True):
            stats = await queries.routing_stats(database, start, end, alias=alias)
            with monkeypatch.context() as patched:  # routing_stats' answer from what its old statement returned
                patched.setattr(queries, "fetch", lambda *_, rows=groups: returning(rows))
                was = await queries.routing_stats(database, start, end, alias=alias)
            assert stats["decisions"] > 10
            assert canonical(stats) == canonical(was)

        assert await database.migrate("0004_usage_hour_index") == ["-0005_usage_routing_decision"]
        assert await usage_indexes(database) == indexes
        back = await fetch(database, "SELECT request_id, chosen FROM routing_decisions ORDER BY request_id")
        assert [(r["request_id"], r["chosen"]) for r in back] == sorted(
            (r["request_id"], r["decision"]["chosen"]) for r in rows if "decision" in r
        )


async def usage_indexes(db: Database) -> list[str]:
    if db.dialect == "postgres":
        found = await fetch(db, "SELECT indexdef AS i FROM pg_indexes WHERE tablename = 'usage_records'")
    else:
        found = await fetch(
            db, "SELECT sql AS i FROM sqlite_master WHERE tbl_name = 'usage_records' AND type = 'index'"
        )
    return sorted(str(r["i"]) for r in found)


async def insert_as_before_0005(db: Database, rows: list[dict[str, Any]], *, usage: bool = True) -> None:
    """Write spool-format rows the way the previous version did: a usage row and a routing_decisions row."""
    for row in rows:
        created = timestamp(db, dt.datetime.fromtimestamp(row["started_at"], dt.UTC))
        if usage:
            await execute(
                db,
                "INSERT INTO usage_records (request_id, created_at, hour, endpoint, alias, deployment, prompt_tokens, "
                "completion_tokens, cached_tokens, reasoning_tokens, usage_estimated, latency_ms, status, cache_hit, "
                "streamed, client_disconnected, attempts, metadata) VALUES (?, ?, ?, ?, ?, ?, 1, 1, 0, 0, ?, 1.5, ?, ?, "
                "?, ?, 1, '{}')",
                [
                    row["request_id"],
                    created,
                    int(row["started_at"] // 3600),
                    row["endpoint"],
                    row["alias"],
                    row["deployment"],
                    boolean(db, False),
                    row["status"],
                    *[boolean(db, False)] * 3,
                ],
            )
        decision = row.get("decision")
        if decision:
            await execute(
                db,
                "INSERT INTO routing_decisions (request_id, created_at, alias, strategy, chosen, reason, candidates, "
                "fallbacks, fell_back, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    row["request_id"],
                    created,
                    decision["alias"],
                    decision["strategy"],
                    decision["chosen"],
                    decision["reason"],
                    orjson.dumps(decision["candidates"]).decode(),
                    orjson.dumps(decision["fallbacks"]).decode(),
                    boolean(db, bool(decision["fallbacks"])),
                    decision["outcome"],
                ],
            )


def canonical(stats: dict[str, Any]) -> tuple[object, ...]:
    """routing_stats' answer with its lists sorted (rows with equal counts come in any order)."""
    return (
        stats["decisions"],
        stats["fell_back"],
        stats["fallback_rate"],
        *(
            sorted((tuple(sorted(item.items())) for item in stats[k]), key=repr)
            for k in ("by_strategy", "by_deployment", "by_outcome")
        ),
    )


async def returning(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rows


def json_value(value: Any) -> Any:
    """A JSON column as read back (text on SQLite and from asyncpg)."""
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


async def test_migrate_on_startup_false_refuses_a_stale_schema(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    toml = "[database]\nmigrate_on_startup = false\n" + DEMO
    path.write_text(toml)
    app = create_app(parse_config(toml, file=str(path)))
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    with pytest.raises(SchemaBehindError, match="run `llmgateway db migrate`"):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)  # type: ignore[arg-type]
    assert sent[-1]["type"] == "lifespan.startup.failed"


def test_cli_db_migrate_status_and_cleanup(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[database]\nurl = "sqlite://data/usage.db"\n' + DEMO)
    before = llmgateway("db", "status", "--config", str(config), "--check")
    assert before.returncode == 1, before.stderr
    assert "[pending] 0001_initial" in before.stdout
    migrated = llmgateway("db", "migrate", "--config", str(config))
    assert migrated.returncode == 0, migrated.stderr
    assert "applied 0001_initial" in migrated.stdout
    assert (tmp_path / "data" / "usage.db").exists()  # relative to the config file, not the cwd
    after = llmgateway("db", "status", "--config", str(config), "--check")
    assert after.returncode == 0, after.stderr
    assert "up to date" in after.stdout
    cleanup = llmgateway("db", "cleanup", "--config", str(config))
    assert cleanup.returncode == 0, cleanup.stderr
    assert "rolled up" in cleanup.stdout
    back = llmgateway("db", "migrate", "--config", str(config), "--to", "0001_initial")
    assert back.returncode == 0, back.stderr
    assert "rolled back 0002" in back.stdout


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize("priority", ["idle", "low", "normal"])
async def test_the_writer_process_gives_the_cpu_to_the_server_first(
    serve_gateway: GatewayFactory, priority: str
) -> None:
    """``[database.write_behind] priority``: by default the SQLite writer process runs under Linux's
    SCHED_IDLE policy (what ``ps -o cls`` shows as IDL), ``low`` is nice 19, ``normal`` the server's
    own priority; the rows are written either way."""
    toml = f'{DEMO}\n[database.write_behind]\nflush_interval = 0.05\npriority = "{priority}"\n'
    async with serve_gateway(toml) as url:
        writer = serve_gateway.gateway.state["storage"].writer  # type: ignore[attr-defined]
        async with sdk(url) as client:
            await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
        for _ in range(200):
            if writer.stats.written:
                break
            await asyncio.sleep(0.02)
        assert writer.stats.written == 1
        pid = writer.sqlite_process.process.pid
        policy, nice = os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert (policy, nice) == {
        "idle": (os.SCHED_IDLE, own),
        "low": (os.SCHED_OTHER, 19),
        "normal": (os.SCHED_OTHER, own),
    }[priority]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('url = "redis://x"', "key 'database.url': must start with one of"),
        ("batch_sise = 3", "key 'database.batch_sise': is not a known setting"),
        ("[database.write_behind]\nbatch_size = 0", "key 'database.write_behind.batch_size': must be at least 1"),
        ('[database.write_behind]\npriority = "high"', "key 'database.write_behind.priority': must be one of"),
        ('[database.retention]\nschedule = "hourly"', "key 'database.retention.schedule': must be a cron expression"),
        ("[database.retention]\nraw_days = 1\nlate_hours = 48", "key 'database.retention.late_hours': must be shorter"),
    ],
)
def test_database_section_errors_name_the_key(section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        create_app(parse_config("[database]\n" + section + "\n" + DEMO, file="/tmp/gateway.toml"))


# ---- write-behind ------------------------------------------------------------------------------


async def test_writer_flushes_in_batches_without_losing_or_duplicating(db: Database, tmp_path: Path) -> None:
    writer = UsageWriter(db, batch_size=50, flush_interval=0.05, spool_dir=str(tmp_path / "spool"))
    with db.activate():
        writer.start()
    ids = [f"req_{i:05d}" for i in range(1234)]
    team = Principal(kind="virtual_key", key_id="k1", user_id="u1", team_id="t1")
    for i, request_id in enumerate(ids):
        writer.put(record(request_id, principal=team, cached=i % 3), decision() if i % 2 else None)
        if i % 100 == 0:
            await asyncio.sleep(0)  # requests interleave with the flusher
    await writer.stop()
    rows = await fetch(db, "SELECT request_id, key_id, user_id, team_id FROM usage_records ORDER BY request_id")
    assert [r["request_id"] for r in rows] == ids
    assert {(r["key_id"], r["user_id"], r["team_id"]) for r in rows} == {("k1", "u1", "t1")}
    assert [d["request_id"] for d in await decisions_of(db)] == ids[1::2]  # every other request was routed
    assert writer.stats.batches >= 1234 // 50
    assert writer.stats.spooled == 0


async def test_full_queue_spills_to_the_spool_and_is_replayed(db: Database, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    writer = UsageWriter(db, batch_size=10, flush_interval=30, queue_size=25, spool_dir=str(spool))
    # no flusher running: the queue fills up and overflows into the spool file, a batch at a time
    for i in range(60):
        writer.put(record(f"req_{i:03d}"), None)
        assert len(writer.queue) < 25
    assert writer.stats.overflowed == 40
    assert len(writer.queue) == 20
    assert sum(len(p.read_text().splitlines()) for p in spool.iterdir()) == 40
    with db.activate():
        writer.start()  # the flusher replays the spool first, then writes the queue
    await writer.stop()
    rows = await fetch(db, "SELECT request_id FROM usage_records ORDER BY request_id")
    assert [r["request_id"] for r in rows] == [f"req_{i:03d}" for i in range(60)]
    assert writer.stats.replayed == 40
    assert list(spool.iterdir()) == []


async def test_spool_left_by_a_stopped_process_is_replayed_once(db: Database, tmp_path: Path) -> None:
    """Rows spooled by one process (database down at shutdown) are written by the next one."""
    spool = str(tmp_path / "spool")
    down = Database(f"sqlite://{tmp_path / 'missing-dir' / 'x.db'}")  # never opened: every write fails
    first = UsageWriter(down, spool_dir=spool, timeout=1)
    first.put(record("req_a"), decision())
    first.put(record("req_b"), None)
    await first.stop()
    assert first.stats.spooled == 2
    first.put(record("req_c"), None)  # a request that ends after shutdown: straight to the spool
    assert first.stats.spooled == 3
    # a different process (pid) of the past: mark the files as belonging to a dead pid
    for path in Path(spool).iterdir():
        parts = path.name.split("-")
        path.rename(path.with_name("-".join([parts[0], "999999", *parts[2:]])))
    second = UsageWriter(db, spool_dir=spool)
    assert await second.replay() == 3
    assert await second.replay() == 0
    rows = await fetch(db, "SELECT request_id FROM usage_records ORDER BY request_id")
    assert [r["request_id"] for r in rows] == ["req_a", "req_b", "req_c"]
    assert [d["request_id"] for d in await decisions_of(db)] == ["req_a"]


# Two lines of a spool file as the version before migration 0005 wrote them (the decision as an
# object of its own, its alias included): a file left by a crash is replayed by the next version.
OLD_SPOOL = (
    b'{"request_id":"req_spooled_v4","started_at":1764000000.25,"endpoint":"chat.completions","key_id":"k1",'
    b'"user_id":"u1","team_id":"t1","alias":"chat","provider":"local","deployment":"chat/local/n#1",'
    b'"upstream_model":"m","prompt_tokens":10,"completion_tokens":5,"cached_tokens":2,"reasoning_tokens":0,'
    b'"usage_estimated":false,"cost":0.001,"saved_cost":null,"latency_ms":100.0,"ttft_ms":null,"status":200,'
    b'"error_code":null,"cache_hit":false,"streamed":false,"client_disconnected":false,"attempts":2,'
    b'"metadata":{"tag":"x"},"decision":{"alias":"chat","strategy":"ordered","candidates":[["chat/local/m#0",null],'
    b'["chat/local/n#1",0.5]],"chosen":"chat/local/m#0","reason":"config order","fallbacks":["chat/local/n#1"],'
    b'"outcome":"success"}}\n'
    b'{"request_id":"req_spooled_v4_plain","started_at":1764000001.5,"endpoint":"chat.completions","key_id":null,'
    b'"user_id":null,"team_id":null,"alias":"chat","provider":"local","deployment":"chat/local/m#0",'
    b'"upstream_model":"m","prompt_tokens":10,"completion_tokens":5,"cached_tokens":0,"reasoning_tokens":0,'
    b'"usage_estimated":false,"cost":0.001,"saved_cost":null,"latency_ms":100.0,"ttft_ms":null,"status":200,'
    b'"error_code":null,"cache_hit":false,"streamed":false,"client_disconnected":false,"attempts":1,"metadata":{}}\n'
)


async def test_a_spool_written_by_the_previous_version_is_replayed(db: Database, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "usage-999999-0badf00d-0.jsonl").write_bytes(OLD_SPOOL)  # a process that is gone
    writer = UsageWriter(db, spool_dir=str(spool))
    assert await writer.replay() == 2
    rows = {r["request_id"]: r for r in await fetch(db, "SELECT * FROM usage_records")}
    assert set(rows) == {"req_spooled_v4", "req_spooled_v4_plain"}
    routed = rows["req_spooled_v4"]
    assert (routed["deployment"], routed["chosen"], routed["attempts"]) == ("chat/local/n#1", "chat/local/m#0", 2)
    assert (routed["strategy"], routed["route_reason"], routed["outcome"]) == ("ordered", "config order", "success")
    assert json_value(routed["candidates"]) == [["chat/local/m#0", None], ["chat/local/n#1", 0.5]]
    assert (json_value(routed["fallbacks"]), bool(routed["fell_back"])) == (["chat/local/n#1"], True)
    assert json_value(routed["metadata"]) == {"tag": "x"}
    plain = rows["req_spooled_v4_plain"]
    assert [plain[c] for c in ("strategy", "chosen", "route_reason", "candidates", "fallbacks", "outcome")] == [
        None
    ] * 6
    assert not plain["fell_back"]
    assert list(spool.iterdir()) == []


async def test_decision_rows_via_url_helper(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'd.database'}"
    async with opened(url) as database:
        writer = UsageWriter(database, spool_dir=str(tmp_path / "spool"))
        writer.put(record("r1"), decision(fallbacks=["chat/local/n#1"]))
        await writer.flush()
    (row,) = await decision_rows(url)
    assert row["request_id"] == "r1"
    assert bool(row["fell_back"])


async def test_cleanup_is_offered_as_a_job(serve_gateway: GatewayFactory, tmp_path: Path) -> None:
    toml = '[database.retention]\nschedule = "*/15 * * * *"\n' + DEMO
    async with serve_gateway(toml) as url:
        gateway = serve_gateway.gateway  # type: ignore[attr-defined]
        job = gateway.jobs["storage.cleanup"]
        async with httpx.AsyncClient(base_url=url) as http:
            await http.post(
                "/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "x"}]}
            )
        await gateway.state["storage"].writer.flush()
        await job.run(gateway)  # as the scheduler runs it
        result = await gateway.state["storage"].cleanup()
    assert job.schedule == "*/15 * * * *"
    assert (result.hours_rolled, result.usage_deleted) == (48, 0)  # the late window; the current hour is open
    assert len(await usage_rows(f"sqlite://{tmp_path / 'llmgateway.db'}")) == 1


async def test_a_large_batch_with_rows_already_written_is_inserted_once(db: Database, tmp_path: Path) -> None:
    """One batch larger than a single SQLite statement takes (3,000 rows x 34 columns), half of
    it written before (a spool replayed twice): every row exactly once, decisions too."""
    from llmgateway.plugins.storage.writer import insert_rows, to_row

    rows = [to_row(record(f"req_{i:05d}", cached=i % 7), decision() if i % 2 else None) for i in range(3_000)]
    await insert_rows(db, rows[:1_500])
    await insert_rows(db, rows)
    found = await fetch(db, "SELECT request_id, cached_tokens FROM usage_records ORDER BY request_id")
    assert [(r["request_id"], r["cached_tokens"]) for r in found] == [(f"req_{i:05d}", i % 7) for i in range(3_000)]
    decided = await decisions_of(db)
    assert [d["request_id"] for d in decided] == [f"req_{i:05d}" for i in range(1, 3_000, 2)]


async def test_values_from_outside_that_do_not_fit_their_columns_do_not_poison_a_batch(db: Database) -> None:
    """The upstream names the model and counts the tokens; a JWT names the user and team. Values too
    long or too large for their columns (PostgreSQL refuses them) are cut or clamped: the batch they
    are in is written, instead of failing now and at every replay of the spool."""
    from llmgateway.plugins.storage.writer import insert_rows, to_row

    jwt_user = Principal(kind="jwt", user_id="u" * 300, team_id="t" * 300)
    odd = record("req_odd", principal=jwt_user, prompt=10**12, completion=-5, cost=5e9)
    odd.upstream_model = "m" * 1_000
    odd.error_code = "e" * 500
    normal = record("req_normal")
    await insert_rows(db, [to_row(odd, None), to_row(normal, decision())])
    rows = {r["request_id"]: r for r in await fetch(db, "SELECT * FROM usage_records")}
    assert set(rows) == {"req_odd", "req_normal"}
    row = rows["req_odd"]
    assert row["upstream_model"] == "m" * 200
    assert row["error_code"] == "e" * 64
    assert (row["user_id"], row["team_id"]) == ("u" * 64, "t" * 64)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (2**31 - 1, 0)
    assert float(row["cost"]) == pytest.approx(999_999.99999999)


def test_sqlite_rows_carry_exactly_what_tortoise_and_sqlite3_would_store() -> None:
    """On SQLite the writer encodes values itself (the per-value conversions cost more than the
    insert); what it binds must equal what Tortoise's field conversion followed by sqlite3's adapters
    binds, value for value and type for type, for timestamps whose microseconds round up into the
    next second, halves, whole seconds, and every column's odd cases (the decision columns of rows
    with and without a routing decision included)."""
    import random
    import sqlite3

    import tortoise.backends.sqlite.executor  # noqa: F401  # registers the adapters Tortoise uses on SQLite

    from llmgateway.plugins.storage.models import UsageRecord
    from llmgateway.plugins.storage.rows import USAGE_COLUMNS, row_lists
    from llmgateway.plugins.storage.writer import _values, to_row

    rng = random.Random(7)
    stamps = [1_700_000_000.0, 1_700_000_000.9999996, 1_700_000_000.0000005, 1_700_000_000.0000015, 0.25]
    stamps += [rng.uniform(1.5e9, 2.0e9) for _ in range(2_000)]
    odd = Principal(kind="key", key_id="k1", user_id="u" * 80, team_id=None)
    rows = []
    for i, stamp in enumerate(stamps):
        usage = record(
            f"req_{i}",
            started_at=stamp,
            cost=None if i % 5 == 0 else rng.choice([0.0, 1e-9, 0.123456789, 5e9]),
            ttft_ms=None if i % 2 else 12.5,
            cache_hit=i % 3 == 0,
            streamed=i % 4 == 0,
            status=499 if i % 7 == 0 else 200,
            principal=odd if i % 2 else ANONYMOUS,
        )
        usage.metadata = {"tag": "x", "n": i} if i % 3 else {}
        routed = decision(fallbacks=["a/b/c#1"] if i % 2 else None, reason="r" * (i % 5)) if i % 6 else None
        if routed is not None and i % 5 == 0:
            routed.chosen, routed.outcome, routed.candidates = None, "no_deployment", []
        if routed is not None and i % 7 == 0:
            routed.strategy, routed.candidates = "s" * 80, [("a/b/c#0", 1e-9), ("a/b/c#1", float(i))]
        rows.append(to_row(usage, routed))

    def stored(value: object) -> object:
        adapted = sqlite3.adapt(value, sqlite3.PrepareProtocol, value)  # what sqlite3 binds
        return int(adapted) if isinstance(adapted, bool) else adapted

    fast = row_lists(rows, sqlite=True)
    slow = row_lists(rows, sqlite=False)
    fields = [UsageRecord._meta.fields_map[c] for c in USAGE_COLUMNS]
    assert len(fast) == len(slow) == len(rows)
    strategy = USAGE_COLUMNS.index("strategy")
    assert 0 < sum(1 for r in fast if r[strategy] is None) < len(rows) // 4  # rows with and without a decision
    for fast_row, slow_row in zip(fast, slow, strict=True):
        expected = [stored(v) for v in _values(fields, UsageRecord, slow_row)]
        assert [(type(v), v) for v in fast_row] == [(type(v), v) for v in expected]


async def start_and_stop(app: object) -> list[object]:
    """Run an app's lifespan: startup, then shutdown; the message types it sent."""
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[object] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)  # type: ignore[operator]
    return sent


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_serving_gateway_migrates_a_new_database_in_a_child_process(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``llmgateway serve`` on a database that needs migrations runs them in a short-lived child
    process (the server keeps the memory migrating fragments), then finds nothing left to run;
    an app that is not serving (tests, embeddings) migrates itself as before."""
    from llmgateway.core.app import gateway_of

    for serving in (True, False):
        (tmp_path / str(serving)).mkdir()
        async with database_url(kind, tmp_path / str(serving)) as url:  # a new, empty database
            toml = f'[database]\nurl = "{url}"\n' + DEMO
            app = create_app(parse_config(toml, file=str(tmp_path / "gateway.toml")))
            gateway_of(app).serving = serving
            caplog.clear()
            with caplog.at_level("INFO", logger="llmgateway.storage"):
                sent = await start_and_stop(app)
            assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
            logged = [r.getMessage() for r in caplog.records]
            in_child = [m for m in logged if "migrated (in a child process): 0001_initial, " in m]
            in_server = [m for m in logged if "migrated: 0001_initial" in m]
            assert (len(in_child), len(in_server)) == ((1, 0) if serving else (0, 1)), logged
            async with opened(url, migrate=False) as db:
                assert not (await db.status()).pending
