"""Memory of requests authenticated by a virtual key: nothing a request creates outlives it, and the
key caches stay within ``[auth.keys] cache_size`` whatever keys clients present."""

from __future__ import annotations

import asyncio
import gc
import secrets
from pathlib import Path

import httpx

from llmgateway.core.types import RequestContext, UsageRecord
from tests.conftest import GatewayFactory
from tests.test_security_support import auth, chat, config, create_key


def alive(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


def gateway_config(tmp_path: Path, cache_size: int = 100) -> str:
    return config(
        f"""
        [database]
        url = "sqlite://{tmp_path / "keys.db"}"

        [auth.keys]
        cache_size = {cache_size}
        """
    )


async def written(gateway: object, rows: int) -> None:
    writer = gateway.state["storage"].writer  # type: ignore[attr-defined]
    for _ in range(1000):  # a cap so a regression fails instead of hanging; not a timing assertion
        if writer.stats.written >= rows:
            return
        await asyncio.sleep(0.01)


async def test_no_request_object_outlives_requests_made_with_a_virtual_key(
    serve_gateway: GatewayFactory, tmp_path: Path
) -> None:
    async with serve_gateway(gateway_config(tmp_path)) as url:
        gateway = serve_gateway.gateway  # type: ignore[attr-defined]
        key = (await create_key(url, name="mem"))["key"]
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for i in range(300):
                body = chat(stream=True) if i % 3 == 0 else chat()
                response = await http.post("/v1/chat/completions", json=body, headers=auth(key))
                assert response.status_code == 200, response.text
        await written(gateway, 300)
        keys = gateway.state["keys"]
        for _ in range(100):  # the last-use write runs in the background
            if not keys._tasks:
                break
            await asyncio.sleep(0.01)
        assert alive(RequestContext) == 0
        assert alive(UsageRecord) == 0
        assert len(keys._cache) == 1
        assert not keys._negative
        assert not keys._inflight
        assert not keys._tasks
        assert len(keys._touched) == 1
        assert gateway.state["storage"].writer.stats.written >= 300


async def test_key_caches_stay_within_cache_size(serve_gateway: GatewayFactory, tmp_path: Path) -> None:
    async with serve_gateway(gateway_config(tmp_path, cache_size=3)) as url:
        gateway = serve_gateway.gateway  # type: ignore[attr-defined]
        keys = gateway.state["keys"]
        created = [(await create_key(url, name=f"k{i}"))["key"] for i in range(6)]
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for _ in range(2):
                for key in created:
                    response = await http.post("/v1/chat/completions", json=chat(), headers=auth(key))
                    assert response.status_code == 200, response.text
            for _ in range(20):  # unknown keys: each is looked up, remembered briefly, refused
                unknown = "sk-lg-" + secrets.token_urlsafe(32)
                response = await http.post("/v1/chat/completions", json=chat(), headers=auth(unknown))
                assert response.status_code == 401
        await written(gateway, 12)
        assert len(keys._cache) <= 3
        assert len(keys._negative) <= 3
        assert len(keys._touched) <= 3
        assert not keys._inflight
