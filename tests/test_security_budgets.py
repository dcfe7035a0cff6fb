"""Budgets: the maximum cost is reserved before the provider is called and the real cost settled after,
so a thousand concurrent requests cannot overspend; spend survives a restart; unpriced deployments
reserve nothing; a team's budget is shared by its keys."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from llmgateway.core.types import Principal, Usage, UsageRecord
from tests.conftest import GatewayFactory
from tests.servers import free_port
from tests.test_security_support import (
    MASTER_KEY,
    REDIS_URL,
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
