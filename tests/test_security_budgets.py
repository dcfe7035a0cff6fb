"""Budgets: the maximum cost is reserved before the provider is called and the real cost settled after,
so a thousand concurrent requests cannot overspend; spend survives a restart (and a restart while the
database is down does not start a budget from zero); unpriced deployments reserve nothing; a team's
budget is shared by its keys; Redis trouble between reservation and settlement neither loses spend,
counts it twice, nor leaves reservations behind; the memory backend forgets past periods."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from llmgateway.core.types import Principal, Usage, UsageRecord
from tests.conftest import GatewayFactory, Recorder, upstream_toml
from tests.fakes.openai_server import FakeOpenAI
from tests.servers import free_port
from tests.test_security_support import (
    MASTER_KEY,
    REDIS_URL,
    TcpProxy,
    auth,
    chat,
    config,
    create_key,
    database,
    orm,
    redis_prefix,
    security_db,
)

__all__ = ["redis_prefix", "security_db"]

# Every answer is "ok": one completion token at $10,000 per million = exactly $0.01 per request.
PRICED = """
[providers.priced]
type = "demo"
reply = "ok"

[providers.free]
type = "demo"
reply = "ok"

[[models]]
name = "priced"
deployments = [{ provider = "priced", model = "p-1", input_price = 0.0, output_price = 10000.0 }]

[[models]]
name = "free"
deployments = [{ provider = "free", model = "f-1" }]
"""


@pytest.fixture(params=["memory", "redis"])
def budgets(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return '[budgets]\nbackend = "memory"\n'
    prefix = request.getfixturevalue("redis_prefix")
    # a generous timeout: this test is about atomicity, and a thousand requests in one process
    # slow the event loop down enough to look like a slow Redis
    return f'[budgets]\nbackend = "redis"\nredis_url = "{REDIS_URL}"\nkey_prefix = "{prefix}"\nredis_timeout = 10\n'


@dataclass
class Answer:
    status_code: int
    body: dict[str, Any]


async def spend(url: str, key: str, count: int, model: str = "priced") -> list[Answer]:
    """``count`` requests at once, each on its own connection (aiohttp: httpx's pool crawls at this size)."""
    payload = orjson.dumps(chat(model, max_tokens=1))
    headers = {**auth(key), "content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=count)) as session:

        async def one() -> Answer:
            async with session.post(f"{url}/v1/chat/completions", data=payload, headers=headers) as response:
                return Answer(response.status, orjson.loads(await response.read()))

        return list(await asyncio.gather(*[one() for _ in range(count)]))


def check_refused(response: Answer) -> None:
    assert response.status_code == 429
    error = response.body["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "budget_exceeded"


async def test_a_thousand_concurrent_requests_never_spend_more_than_a_one_dollar_budget(
    serve_gateway: GatewayFactory, security_db: str, budgets: str
) -> None:
    async with serve_gateway(config(database(security_db), budgets, PRICED)) as url:
        key = (await create_key(url, budget_usd=1.0, budget_period="total"))["key"]
        responses = await spend(url, key, 1000)
        after = await spend(url, key, 1)
        stats = serve_gateway.gateway.pm.get_plugin("budgets").stats  # type: ignore[attr-defined]
    assert stats["redis_errors"] == 0
    assert stats["local_fallbacks"] == 0
    ok = [r for r in responses if r.status_code == 200]
    spent_microdollars = sum(r.body["usage"]["completion_tokens"] * 10_000 for r in ok)  # $10,000 per 1M tokens
    assert spent_microdollars <= 1_000_000
    assert len(ok) == 100  # each reservation is exactly the cost, so the budget is used to the cent
    for refused in (r for r in responses if r.status_code != 200):
        check_refused(refused)
    check_refused(after[0])


async def test_spend_survives_a_restart_in_redis(
    serve_gateway: GatewayFactory, security_db: str, redis_prefix: str
) -> None:
    toml = config(
        database(security_db),
        f'[budgets]\nbackend = "redis"\nredis_url = "{REDIS_URL}"\nkey_prefix = "{redis_prefix}"\n',
        PRICED,
    )
    async with serve_gateway(toml) as url:
        key = (await create_key(url, budget_usd=0.05, budget_period="monthly"))["key"]
        assert [r.status_code for r in await spend(url, key, 8)].count(200) == 5
    async with serve_gateway(toml) as url:  # a new process: nothing in memory
        check_refused((await spend(url, key, 1))[0])


async def test_the_memory_backend_restarts_from_the_usage_rows_of_the_current_period(
    serve_gateway: GatewayFactory, security_db: str
) -> None:
    toml = config(database(security_db), '[budgets]\nbackend = "memory"\n', PRICED)
    async with serve_gateway(toml) as url:
        spent_today = await create_key(url, budget_usd=0.05, budget_period="daily")
        spent_yesterday = await create_key(url, budget_usd=0.05, budget_period="daily")
        assert [r.status_code for r in await spend(url, spent_today["key"], 7)].count(200) == 5
        yesterday = UsageRecord(  # a previous day's spend, written like any usage, must not count today
            request_id=f"req-yesterday-{spent_yesterday['id']}",
            endpoint="chat.completions",
            alias="priced",
            provider="priced",
            deployment=None,
            upstream_model=None,
            principal=Principal(kind="virtual_key", key_id=spent_yesterday["id"]),
            usage=Usage(prompt_tokens=1, completion_tokens=1000),
            cost=10.0,
            status=200,
            error_code=None,
            latency_ms=1.0,
            ttft_ms=None,
            streamed=False,
            cache_hit=False,
            client_disconnected=False,
            started_at=(datetime.now(UTC) - timedelta(days=1, minutes=1)).timestamp(),
            attempts=1,
        )
        serve_gateway.gateway.state["storage"].writer.put(yesterday, None)  # type: ignore[attr-defined]
    async with serve_gateway(toml) as url:  # a new process: the budget starts from today's usage rows
        check_refused((await spend(url, spent_today["key"], 1))[0])
        assert (await spend(url, spent_yesterday["key"], 1))[0].status_code == 200


async def test_deployments_without_prices_reserve_nothing(
    serve_gateway: GatewayFactory, security_db: str, budgets: str
) -> None:
    async with serve_gateway(config(database(security_db), budgets, PRICED)) as url:
        key = (await create_key(url, budget_usd=0, budget_period="total"))["key"]
        assert [r.status_code for r in await spend(url, key, 3, model="free")] == [200, 200, 200]
        check_refused((await spend(url, key, 1))[0])


async def test_a_team_budget_is_shared_by_its_keys(
    serve_gateway: GatewayFactory, security_db: str, budgets: str
) -> None:
    from llmgateway.plugins.storage.models import Team

    team_id = f"t-budget-{len(budgets)}"
    async with serve_gateway(config(database(security_db), budgets, PRICED)) as url:
        with orm(serve_gateway.gateway):  # type: ignore[attr-defined]
            await Team.create(id=team_id, name=team_id, budget_usd=0.05, budget_period="weekly")
        first = (await create_key(url, team_id=team_id))["key"]
        second = (await create_key(url, team_id=team_id, budget_usd=100))["key"]
        results = await spend(url, first, 4) + await spend(url, second, 4)
    assert [r.status_code for r in results].count(200) == 5
    for refused in (r for r in results if r.status_code != 200):
        check_refused(refused)


async def test_with_redis_down_budgeted_requests_are_refused_not_overspent_and_never_5xx(
    serve_gateway: GatewayFactory, security_db: str
) -> None:
    port = free_port()  # nothing listens there
    toml = config(
        database(security_db),
        f'[budgets]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{port}/0"\nredis_timeout = 0.2\n',
        PRICED,
    )
    async with serve_gateway(toml) as url:
        key = (await create_key(url, budget_usd=1.0))["key"]
        budgeted = await spend(url, key, 3)
        unbudgeted = await spend(url, MASTER_KEY, 3)
    for response in budgeted:
        assert response.status_code == 429
        assert response.body["error"]["code"] == "budget_unavailable"
    assert [r.status_code for r in unbudgeted] == [200, 200, 200]


SLOW_PRICED = """
[providers.slowpriced]
type = "demo"
reply = "ok"
delay = 0.3

[[models]]
name = "slowpriced"
deployments = [{ provider = "slowpriced", model = "sp-1", input_price = 0.0, output_price = 10000.0 }]
"""

JWT_SECRET = "budgets-jwt-secret-at-least-32-bytes!!"


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


async def spend_one_by_one(url: str, key: str, count: int) -> list[Answer]:
    return [(await spend(url, key, 1))[0] for _ in range(count)]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_restart_while_the_database_is_down_does_not_start_a_budget_from_zero(
    serve_gateway: GatewayFactory, security_db: str, redis_prefix: str, backend: str
) -> None:
    import jwt

    user = f"u-seed-{secrets.token_hex(4)}"
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 300}, JWT_SECRET, algorithm="HS256")

    def toml(database_url: str, prefix: str) -> str:
        store = (
            '[budgets]\nbackend = "memory"\n'
            if backend == "memory"
            else f'[budgets]\nbackend = "redis"\nredis_url = "{REDIS_URL}"\nkey_prefix = "{prefix}"\n'
        )
        return config(
            database(database_url),
            f'[auth.jwt]\nsecret = "{JWT_SECRET}"\n',
            store,
            '[budgets.defaults.user]\nusd = 0.05\nperiod = "monthly"\n',
            PRICED,
        )

    async with serve_gateway(toml(security_db, redis_prefix)) as url:
        assert [r.status_code for r in await spend(url, token, 7)].count(200) == 5  # the month's budget is spent
    async with TcpProxy(5432) as proxy:
        behind_proxy = security_db.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        # a new process (and, with Redis, no counter for the month: a flushed Redis)
        async with serve_gateway(toml(behind_proxy, f"{redis_prefix}restarted:")) as url:
            proxy.set_mode("down")  # the database goes away: the month's spend cannot be read
            unavailable = (await spend(url, token, 1))[0]
            assert unavailable.status_code == 429
            assert unavailable.body["error"]["code"] == "budget_unavailable"
            proxy.set_mode("forward")  # back: the counter starts from the usage rows, not from zero
            check_refused((await spend(url, token, 1))[0])


@pytest.mark.parametrize("failure", ["down", "mute"])
async def test_a_settlement_redis_missed_is_retried_and_counted_once(
    serve_gateway: GatewayFactory, security_db: str, redis_prefix: str, failure: str
) -> None:
    async with TcpProxy(6379) as proxy:
        toml = config(
            database(security_db),
            f"""
            [budgets]
            backend = "redis"
            redis_url = "redis://127.0.0.1:{proxy.port}/0"
            key_prefix = "{redis_prefix}"
            redis_timeout = 0.2
            redis_retry_interval = 0
            lease_seconds = 1
            """,
            PRICED,
            SLOW_PRICED,
        )
        async with serve_gateway(toml) as url:
            stats = serve_gateway.gateway.pm.get_plugin("budgets").stats  # type: ignore[attr-defined]
            key = (await create_key(url, budget_usd=0.05, budget_period="total"))["key"]
            body = orjson.dumps(chat("slowpriced", max_tokens=1, stream=True))
            headers = {**auth(key), "content-type": "application/json"}
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as response,
            ):
                assert response.status == 200
                await response.content.readuntil(b"\n\n")  # reserved, answering
                # Redis goes away (down), or does the work but its answers are lost (mute)
                proxy.set_mode(failure)
                assert b"[DONE]" in await response.read()
            await until(lambda: stats["redis_errors"] >= 1, "the settlement failed")
            proxy.set_mode("forward")
            await until(lambda: stats.get("settles_pending", 0) == 0, "the queued settlement reached Redis")
            await asyncio.sleep(1.2)  # the reservation's 1 s lease is over: only a settlement can count the cost now
            # the streamed request cost $0.01, counted exactly once: $0.04 are left
            results = await spend_one_by_one(url, key, 5)
    assert [r.status_code for r in results] == [200, 200, 200, 200, 429]
    check_refused(results[-1])


async def test_reservations_whose_answer_was_lost_are_released(
    serve_gateway: GatewayFactory, security_db: str, redis_prefix: str
) -> None:
    async with TcpProxy(6379) as proxy:
        toml = config(
            database(security_db),
            f"""
            [budgets]
            backend = "redis"
            redis_url = "redis://127.0.0.1:{proxy.port}/0"
            key_prefix = "{redis_prefix}"
            redis_timeout = 0.5  # short, for the muted calls; not so short that a busy CI host times out healthy ones
            redis_retry_interval = 0
            """,
            PRICED,
        )
        async with serve_gateway(toml) as url:
            key = (await create_key(url, budget_usd=0.05, budget_period="total"))["key"]
            assert (await spend(url, key, 1))[0].status_code == 200  # $0.01 spent
            proxy.set_mode("mute")  # Redis makes the reservations; their answers never come back
            for refused in await spend_one_by_one(url, key, 3):
                assert refused.status_code == 429
                assert refused.body["error"]["code"] == "budget_unavailable"
            proxy.set_mode("forward")
            # the lost reservations ($0.03) are released: the remaining $0.04 can be spent
            succeeded = 0
            deadline = time.monotonic() + 15
            while succeeded < 4 and time.monotonic() < deadline:
                answer = (await spend(url, key, 1))[0]
                if answer.status_code == 200:
                    succeeded += 1
                else:
                    check_refused(answer)
                    await asyncio.sleep(0.1)
            assert succeeded == 4
            check_refused((await spend(url, key, 1))[0])


def test_the_memory_backend_forgets_past_periods() -> None:
    from llmgateway.plugins.security.budgets import PERIODS, Budget, MemoryBudgets, period_bounds

    memory = MemoryBudgets()
    now = datetime.now(UTC)

    def budget(period: str, when: datetime) -> Budget:
        period_id, start, end = period_bounds(period, when)
        return Budget("key", "k-periods", 10**9, period, period_id, start, end)

    past = [
        budget("daily", now - timedelta(days=2)),
        budget("weekly", now - timedelta(days=15)),
        budget("monthly", now - timedelta(days=65)),
    ]
    for old in past:
        memory.seed(old, 0)
        assert memory.reserve([old], 100) is None
        memory.settle([old], 100, 50)
    current = [budget(period, now) for period in PERIODS]
    for new in current:
        memory.seed(new, 0)
    assert memory.reserve(current, 100) is None
    memory.settle(past, 100, 50)  # a request of a past period ending late changes nothing
    # one counter per budget and current period: a long-running process does not keep every period's
    assert set(memory.counters) == {b.name for b in current}
    # a stream that began in a period now over (a daily budget across midnight) is not cut for it:
    # the old period bounds nothing any more; budgets still current keep bounding the growth
    assert memory.extend(past, 300) == (300, 0)
    tight = Budget("team", "t-periods", 150, "daily", *period_bounds("daily", now)[0:3])
    memory.seed(tight, 0)
    assert memory.extend([past[0], tight], 300) == (150, 1)


# ---- [budgets] stop_streams --------------------------------------------------------------------


async def charged(plugin: Any, key_id: str) -> float:
    """What a key's total budget has been charged, in USD (from the backend's counter)."""
    [budget] = [b for b in plugin.memory.counters if b.startswith(f"key:{key_id}:")] or [f"key:{key_id}:total"]
    if plugin.redis is None:
        return float(plugin.memory.counters[budget][0] / 1e9)
    spent = await plugin.redis.client.call("HGET", f"{plugin.redis.prefix}budget:{budget}", "spent")
    return int(spent) / 1e9


def streaming_toml(upstream_url: str, budgets_section: str, *, stop: bool) -> str:
    """The fake OpenAI upstream at $1 per output token (and free input), streaming one word every 20 ms."""
    return upstream_toml(
        upstream_url,
        """
        [[models]]
        name = "metered"
        deployments = [{ provider = "local", model = "slow-20", input_price = 0.0, output_price = 1000000.0 }]
        """,
        budgets_section + f"stop_streams = {'true' if stop else 'false'}\n",
    )


async def stream_once(url: str, key: str, max_tokens: int) -> tuple[int, list[bytes]]:
    body = {**chat("metered", max_tokens=max_tokens), "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth(key)) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response.status_code, [event for event in raw.split(b"\n\n") if event]


async def test_stop_streams_ends_a_stream_when_its_budget_runs_out_and_charges_what_it_used(
    serve_gateway: GatewayFactory, security_db: str, budgets: str, upstream: tuple[FakeOpenAI, str]
) -> None:
    _, upstream_url = upstream
    recorder = Recorder()
    toml = config(database(security_db), streaming_toml(upstream_url, budgets, stop=True))
    async with serve_gateway(toml, plugins={"rec": recorder}) as url:
        # $4: the reservation of 2 output tokens ($2) is admitted; the answer (11 tokens) does not fit
        key = await create_key(url, budget_usd=4.0, budget_period="total")
        status, events = await stream_once(url, key["key"], max_tokens=2)
        await until(lambda: len(recorder.records) == 1, "the stopped stream is recorded")
        after = await stream_once(url, key["key"], max_tokens=2)
        plugin = serve_gateway.gateway.pm.get_plugin("budgets")  # type: ignore[attr-defined]
        spent = await charged(plugin, key["id"])
    assert status == 200  # the stream had started
    assert b"data: [DONE]" not in events
    error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "budget_exceeded"
    words = [orjson.loads(e.removeprefix(b"data: "))["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert 1 <= len([w for w in words if w]) < 9  # part of the answer was forwarded, not all of it
    assert plugin.stats["streams_stopped"] == 1
    assert recorder.records[0].status == 429
    assert recorder.records[0].error_code == "budget_exceeded"
    # what was streamed is charged: at least the $2 reserved and the word tokens forwarded, and within
    # a frame of the $4 limit
    assert 2.0 <= spent <= 5.0
    assert after[0] == 429  # the budget is spent: the next request is refused before any byte
    refused = orjson.loads(after[1][0])["error"]
    assert refused["code"] == "budget_exceeded"


async def test_without_stop_streams_a_stream_past_its_budget_completes(
    serve_gateway: GatewayFactory, security_db: str, upstream: tuple[FakeOpenAI, str]
) -> None:
    _, upstream_url = upstream
    recorder = Recorder()
    toml = config(database(security_db), streaming_toml(upstream_url, '[budgets]\nbackend = "memory"\n', stop=False))
    async with serve_gateway(toml, plugins={"rec": recorder}) as url:
        key = await create_key(url, budget_usd=4.0, budget_period="total")
        status, events = await stream_once(url, key["key"], max_tokens=2)
        await until(lambda: len(recorder.records) == 1, "the stream is recorded")
    assert status == 200
    assert events[-1] == b"data: [DONE]"
    [record] = recorder.records
    assert record.status == 200
    assert record.cost is not None
    assert record.cost > 4.0  # the reservation bounded nothing: this is what the option is for


def test_stop_streams_is_off_by_default_and_must_be_a_boolean() -> None:
    from llmgateway.core.config import ConfigError, parse_config
    from llmgateway.plugins.security.budgets import BudgetsPlugin

    plugin = BudgetsPlugin()
    plugin.llmgateway_configure(parse_config(config('[budgets]\nbackend = "memory"\n')))
    assert plugin.stop_streams is False
    plugin.llmgateway_configure(parse_config(config('[budgets]\nbackend = "memory"\nstop_streams = true\n')))
    assert plugin.stop_streams is True
    with pytest.raises(ConfigError, match="stop_streams"):
        BudgetsPlugin().llmgateway_configure(
            parse_config(config('[budgets]\nbackend = "memory"\nstop_streams = "yes"\n'))
        )


async def test_a_long_stream_keeps_its_redis_reservation_past_its_first_lease(redis_prefix: str) -> None:
    """Growing a reservation renews its lease, and a reservation whose lease did expire (purged by
    another request) is taken up again: a long stream with budget left is never cut for it."""
    from llmgateway.plugins.security.budgets import Budget, RedisBudgets
    from llmgateway.plugins.security.redis_util import ScriptClient

    client = ScriptClient("redis://127.0.0.1:6379/0", timeout=2)
    store = RedisBudgets(client, redis_prefix, lease_ms=300)
    budget = Budget("key", "long-stream", 10_000, "total", "total", None, None)
    field = "r:long"
    hash_key = f"{redis_prefix}budget:{budget.name}"
    try:
        await store.seed(budget, 0)
        assert (await store.reserve([budget], "long", 100, 300))[0] == 1
        await asyncio.sleep(0.2)
        assert (await store.extend([budget], "long", 100, 300))[0] == 100  # renews the lease: +300 ms
        await asyncio.sleep(0.2)  # past the first lease, within the renewed one
        assert (await store.reserve([budget], "other", 100, 300))[0] == 1  # purges expired leases
        assert await client.call("HGET", hash_key, field) == b"200"  # still held
        await asyncio.sleep(0.4)  # now past the renewed lease too
        assert (await store.reserve([budget], "third", 100, 300))[0] == 1  # purges "long" (and "other")
        assert await client.call("HGET", hash_key, field) is None
        added, _ = await store.extend([budget], "long", 100, 300)
        assert added == 100  # taken up again, not refused as if the budget were spent
        await store.settle([budget], "long", 250)
    finally:
        await store.aclose()
        await client.aclose()
