"""Hardening: client-supplied upstream URLs (SSRF), upstream redirects, request size limits, and canary
secrets (a provider key and a virtual key) that must appear nowhere: not in logs (ours and a
subprocess's stderr), error bodies, database rows, Redis, metrics or admin output, nor upstream."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from llmgateway.plugins.security.ssrf import DEFAULT_PARAMS
from tests.conftest import GatewayFactory, sdk
from tests.servers import running
from tests.test_security_support import (
    MASTER_KEY,
    REDIS_URL,
    GatewayProcess,
    auth,
    chat,
    config,
    create_key,
    database,
    redis_prefix,
    security_db,
)

__all__ = ["redis_prefix", "security_db"]


@dataclass
class CarelessUpstream:
    """An OpenAI-style upstream that echoes credentials in its errors, or redirects when asked.

    Models: ``ok`` answers; ``echo-500`` fails echoing every header it got; ``echo-401`` refuses
    echoing the key; ``redirect`` answers 307 to ``redirect_to``.
    """

    redirect_to: str = ""
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    hits: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.hits += 1
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.headers_seen.append(headers)
        model = orjson.loads(raw).get("model") if raw else None
        if model == "redirect":
            await self._send(send, 307, {}, [(b"location", self.redirect_to.encode())])
        elif model == "echo-500":
            await self._send(send, 500, {"error": {"message": f"crashed handling {headers}", "type": "server_error"}})
        elif model == "echo-401":
            key = headers.get("authorization", "")
            await self._send(
                send, 401, {"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}}
            )
        else:
            await self._send(
                send,
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                },
            )

    @staticmethod
    async def _send(send: Send, status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
        body = orjson.dumps(payload)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def careless() -> AsyncIterator[tuple[CarelessUpstream, str]]:
    fake = CarelessUpstream()
    async with running(fake) as url:
        yield fake, url


def upstream_config(url: str, api_key: str, *extra: str) -> str:
    models = f"""
    [providers.up]
    type = "openai"
    base_url = "{url}/v1"
    api_key = "{api_key}"

    [[models]]
    name = "ok"
    deployments = [{{ provider = "up", model = "ok", input_price = 1.0, output_price = 1.0 }}]

    [[models]]
    name = "echo-500"
    max_attempts = 1
    deployments = [{{ provider = "up", model = "echo-500" }}]

    [[models]]
    name = "echo-401"
    deployments = [{{ provider = "up", model = "echo-401" }}]

    [[models]]
    name = "redirect"
    max_attempts = 1
    deployments = [{{ provider = "up", model = "redirect" }}]
    """
    return config(*extra, models)


# ---- SSRF -------------------------------------------------------------------------------------


async def test_client_supplied_base_urls_are_refused_by_default(serve_gateway: GatewayFactory) -> None:
    async with serve_gateway(config()) as url, sdk(url, MASTER_KEY) as client:
        for param in DEFAULT_PARAMS:
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(
                    model="demo",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_body={param: "http://169.254.169.254/latest/meta-data/"},
                )
            assert info.value.status_code == 400
            assert info.value.param == param  # type: ignore[attr-defined]
            assert param in info.value.message


INTERNAL_URLS = [
    "http://127.0.0.1:8080/v1",
    "http://localhost/v1",
    "http://169.254.169.254/latest/meta-data/iam/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:a9fe:a9fe]/",  # 169.254.169.254 mapped into IPv6
    "http://[2002:a9fe:a9fe::1]/",  # ... and through 6to4
    "http://[64:ff9b::a9fe:a9fe]/",  # ... and through NAT64
    "http://[fd00:ec2::254]/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.100.100.200/",
    "http://0.0.0.0/",
    "http://2130706433/",  # 127.0.0.1 as one number
    "http://0x7f.0.0.1/",
    "http://127.1/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://user:secret@example.com/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "ftp://example.com/",
    "not a url",
    "http:///nohost",
    "",
    12,
]


async def test_allowed_client_urls_still_refuse_internal_addresses(
    serve_gateway: GatewayFactory, careless: tuple[CarelessUpstream, str]
) -> None:
    fake, upstream = careless
    toml = upstream_config(
        upstream,
        "sk-up",
        """
        [ssrf]
        allow_client_base_url = true
        allowed_schemes = ["http", "https"]
        """,
    )
    async with serve_gateway(toml) as url, httpx.AsyncClient(base_url=url) as http:
        for target in INTERNAL_URLS:
            response = await http.post(
                "/v1/chat/completions", json=chat("ok", api_base=target), headers=auth(MASTER_KEY)
            )
            assert response.status_code == 400, (target, response.text)
            assert response.json()["error"]["param"] == "api_base"
        public = await http.post(
            "/v1/chat/completions", json=chat("ok", api_base="https://8.8.8.8/v1"), headers=auth(MASTER_KEY)
        )
        assert public.status_code == 200
    assert fake.hits == 1  # only the accepted request reached an upstream, and without the field


async def test_upstream_redirects_are_never_followed(
    serve_gateway: GatewayFactory, careless: tuple[CarelessUpstream, str]
) -> None:
    fake, upstream = careless
    target = CarelessUpstream()
    async with running(target) as internal:
        fake.redirect_to = f"{internal}/latest/meta-data/"
        async with serve_gateway(upstream_config(upstream, "sk-up")) as url, httpx.AsyncClient(base_url=url) as http:
            response = await http.post("/v1/chat/completions", json=chat("redirect"), headers=auth(MASTER_KEY))
    assert response.status_code >= 400
    assert "error" in response.json()
    assert target.hits == 0


# ---- request size -------------------------------------------------------------------------------


async def test_request_size_limits_hold_with_and_without_content_length(serve_gateway: GatewayFactory) -> None:
    toml = config("[server]\nmax_body_bytes = 2048\n")
    big = orjson.dumps(chat(text="x" * 4000))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    async with serve_gateway(toml) as url, httpx.AsyncClient(base_url=url) as http:
        headers = {**auth(MASTER_KEY), "content-type": "application/json"}
        declared = await http.post("/v1/chat/completions", content=big, headers=headers)
        streamed = await http.post("/v1/chat/completions", content=chunks(), headers=headers)
        small = await http.post("/v1/chat/completions", json=chat(), headers=auth(MASTER_KEY))
        admin = await http.post("/admin/api/keys", json={"metadata": {"x": "y" * 70_000}}, headers=auth(MASTER_KEY))
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200
    assert admin.status_code == 400


# ---- canary secrets -------------------------------------------------------------------------------


async def _database_dump(url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        parts = []
        for row in tables:
            name = row["table_name"]
            parts.append(
                await conn.fetchval(f"SELECT coalesce(string_agg(row_to_json(t)::text, E'\\n'), '') FROM \"{name}\" t")
            )
        return "\n".join(parts)
    finally:
        await conn.close()


async def _redis_dump(prefix: str) -> str:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    out: list[str] = []
    try:
        async for key in client.scan_iter(match=prefix + "*", count=1000):
            out.append(key.decode())
            kind = (await client.type(key)).decode()
            if kind == "hash":
                out.append(repr(await client.hgetall(key)))
            elif kind == "zset":
                out.append(repr(await client.zrange(key, 0, -1, withscores=True)))
            elif kind == "string":
                out.append(repr(await client.get(key)))
    finally:
        await client.aclose()
    return "\n".join(out)


async def test_canary_secrets_are_found_nowhere(
    serve_gateway: GatewayFactory,
    careless: tuple[CarelessUpstream, str],
    security_db: str,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake, upstream = careless
    provider_key = "canary-provider-" + secrets.token_hex(12)  # not "sk-": only exact redaction can hide it
    toml = upstream_config(
        upstream,
        provider_key,
        database(security_db),
        f"""
        [ratelimit]
        backend = "redis"
        redis_url = "{REDIS_URL}"
        key_prefix = "{redis_prefix}"

        [ratelimit.defaults.key]
        rpm = 6

        [budgets]
        backend = "redis"
        redis_url = "{REDIS_URL}"
        key_prefix = "{redis_prefix}"
        """,
    )
    seen: list[str] = []

    async def exercise(url: str, key: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for model in ("ok", "echo-500", "echo-401", "nope", "ok", "ok", "ok", "ok", "ok"):
                response = await http.post("/v1/chat/completions", json=chat(model), headers=auth(key))
                seen.append(f"{response.status_code} {response.headers} {response.text}")
            stream = await http.post("/v1/chat/completions", json=chat("echo-500", stream=True), headers=auth(key))
            seen.append(stream.text)
            for wrong in (key + "x", key[:-1], key.upper()):
                response = await http.post("/v1/chat/completions", json=chat("ok"), headers=auth(wrong))
                seen.append(response.text)
            for route in [*serve_gateway.gateway.routes, None]:  # type: ignore[attr-defined]
                path = route.path if route is not None else "/v1/models"
                if route is not None and ("GET" not in route.methods or "{" in path):
                    continue
                response = await http.get(path, headers=auth(MASTER_KEY))
                seen.append(f"{path} {response.text}")

    async with serve_gateway(toml) as url:
        virtual_key = (await create_key(url, budget_usd=5, name="canary"))["key"]
        await exercise(url, virtual_key)

    config_path = tmp_path / "subprocess.toml"
    config_path.write_text(toml + '\n[plugins]\nmodules = ["tests.test_security_support"]\n')
    process = GatewayProcess(config_path, {"LLMGW_TEST_DEBUG_LOGS": "1"})
    try:
        await process.wait_ready()
        await exercise(process.url, virtual_key)
    finally:
        await asyncio.to_thread(process.stop)
    stderr = process.stderr()
    assert "DEBUG" in stderr  # the subprocess really logged everything

    places = {
        "responses": "\n".join(seen),
        "our logs": caplog.text,
        "subprocess stderr": stderr,
        "database rows": await _database_dump(security_db),
        "redis": await _redis_dump(redis_prefix),
        "headers sent upstream (virtual key)": repr([h for h in fake.headers_seen]).replace(provider_key, ""),
    }
    assert "echo-500" in places["responses"]
    assert "[REDACTED]" in places["responses"]  # the careless upstream did echo the key; it was caught
    for where, text in places.items():
        assert provider_key not in text, f"provider key found in {where}"
        assert virtual_key not in text, f"virtual key found in {where}"
        assert virtual_key[6:] not in text, f"virtual key (without prefix) found in {where}"
