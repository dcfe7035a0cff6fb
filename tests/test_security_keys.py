"""Virtual keys end to end: created through the admin API (and the CLI), used with the OpenAI SDK,
stored only as a hash, limited to models, expired, revoked on every replica."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from tests.conftest import GatewayFactory, sdk
from tests.test_security_support import (
    MASTER_KEY,
    REDIS_URL,
    REPO,
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

TWO_MODELS = """
[providers.demo]
type = "demo"

[[models]]
name = "demo"
deployments = [{ provider = "demo", model = "demo-1" }]

[[models]]
name = "other"
deployments = [{ provider = "demo", model = "demo-2" }]
"""


async def test_a_created_key_works_once_shown_and_is_stored_only_as_a_hash(
    serve_gateway: GatewayFactory, security_db: str
) -> None:
    from llmgateway.plugins.storage.models import ApiKey

    async with serve_gateway(config(database(security_db))) as url:
        gateway = serve_gateway.gateway  # type: ignore[attr-defined]
        created = await create_key(url, name="ci", metadata={"owner": "ci"})
        key = created["key"]
        assert key.startswith("sk-lg-")
        assert len(key) > 40
        assert created["prefix"] == key[:10]
        async with sdk(url, key) as client:
            answer = await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        async with httpx.AsyncClient(base_url=url) as http:
            listed = (await http.get("/admin/api/keys", headers=auth(MASTER_KEY))).json()["data"]
            one = (await http.get(f"/admin/api/keys/{created['id']}", headers=auth(MASTER_KEY))).json()
        with orm(gateway):
            row = await ApiKey.get(id=created["id"])
            for _ in range(100):  # last use is written off the request path
                if row.last_used_at is not None:
                    break
                await asyncio.sleep(0.02)
                row = await ApiKey.get(id=created["id"])
    assert row.last_used_at is not None
    mine = [k for k in listed if k["id"] == created["id"]]
    assert mine
    assert "key" not in mine[0]
    assert "key_hash" not in mine[0]
    assert one["metadata"] == {"owner": "ci"}
    assert one["roles"] == ["user"]
    assert key not in orjson.dumps(listed).decode()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in orjson.dumps(dict(row)).decode()


async def test_unknown_revoked_and_expired_keys_get_401(serve_gateway: GatewayFactory, security_db: str) -> None:
    from datetime import UTC, datetime, timedelta

    from llmgateway.plugins.storage.models import ApiKey

    async with serve_gateway(config(database(security_db))) as url:
        revoked = await create_key(url)
        expired = await create_key(url, expires_in="1h")
        with orm(serve_gateway.gateway):  # type: ignore[attr-defined]
            await ApiKey.filter(id=expired["id"]).update(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        async with httpx.AsyncClient(base_url=url) as http:
            gone = await http.delete(f"/admin/api/keys/{revoked['id']}", headers=auth(MASTER_KEY))
            assert gone.status_code == 200
            assert gone.json()["revoked_at"]
            for key in (revoked["key"], expired["key"], "sk-lg-" + "x" * 43):
                response = await http.post("/v1/chat/completions", json=chat(), headers=auth(key))
                assert response.status_code == 401, key
                assert response.json()["error"]["type"] == "authentication_error"


async def test_allowed_models_are_the_intersection_of_key_user_and_team(
    serve_gateway: GatewayFactory, security_db: str
) -> None:
    from llmgateway.plugins.storage.models import Team, User

    async with serve_gateway(config(database(security_db), "[server]\npublic_models = false\n", TWO_MODELS)) as url:
        with orm(serve_gateway.gateway):  # type: ignore[attr-defined]
            team = await Team.create(id="t-models", name="t-models", allowed_models=["demo", "other"])
            await User.create(id="u-models", email="u-models@example.com", team=team, allowed_models=["demo"])
        key = (await create_key(url, user_id="u-models", allowed_models=["demo", "other"]))["key"]
        async with sdk(url, key) as client:
            await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.PermissionDeniedError):
                await client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
            models = [m.id async for m in client.models.list()]
        assert models == ["demo"]


async def test_admin_api_rejects_what_the_caller_may_not_set(serve_gateway: GatewayFactory, security_db: str) -> None:
    async with serve_gateway(config(database(security_db))) as url:
        operator = (await create_key(url, roles=["operator"]))["key"]
        viewer = (await create_key(url, roles=["viewer"]))["key"]
        admin_key = await create_key(url, roles=["admin"])
        async with httpx.AsyncClient(base_url=url) as http:

            async def post(caller: str, body: dict[str, object]) -> httpx.Response:
                return await http.post("/admin/api/keys", json=body, headers=auth(caller))

            refused = await post(operator, {"roles": ["admin"]})
            assert refused.status_code == 403
            assert refused.json()["error"]["param"] == "roles"
            assert (await post(operator, {"roles": ["operator"]})).status_code == 201
            assert (await post(viewer, {"name": "x"})).status_code == 403
            for field in ("key_hash", "id", "revoked_at", "prefix"):
                response = await post(operator, {field: "x"})
                assert response.status_code == 400
                assert response.json()["error"]["param"] == field
            bad = await post(operator, {"rpm": -1})
            assert bad.status_code == 400
            assert bad.json()["error"]["param"] == "rpm"
            no_user = await post(operator, {"user_id": "nobody"})
            assert no_user.status_code == 400
            assert no_user.json()["error"]["param"] == "user_id"
            cannot_revoke = await http.delete(f"/admin/api/keys/{admin_key['id']}", headers=auth(operator))
            assert cannot_revoke.status_code == 403


async def test_a_revoked_key_stops_working_on_another_replica_at_once(
    serve_gateway: GatewayFactory, security_db: str, redis_prefix: str
) -> None:
    """Replica B caches keys for five minutes; only the Redis revocation message can stop it."""
    keys_section = (
        database(security_db)
        + f"""
    [auth.keys]
    cache_ttl = 300
    redis_url = "{REDIS_URL}"
    channel = "{redis_prefix}keys"
    """
    )
    async with serve_gateway(config(keys_section)) as url_a:
        replica_a = serve_gateway.gateway  # type: ignore[attr-defined]
        async with serve_gateway(config(keys_section)) as url_b:
            replica_b = serve_gateway.gateway  # type: ignore[attr-defined]
            for replica in (replica_a, replica_b):
                await asyncio.wait_for(replica.state["keys"].listening.wait(), 10)
            created = await create_key(url_a)
            async with httpx.AsyncClient() as http:
                ok = await http.post(f"{url_b}/v1/chat/completions", json=chat(), headers=auth(created["key"]))
                assert ok.status_code == 200
                revoked = await http.delete(f"{url_a}/admin/api/keys/{created['id']}", headers=auth(MASTER_KEY))
                assert revoked.status_code == 200
                status = 200
                for _ in range(100):  # the message arrives within milliseconds; allow a few seconds
                    response = await http.post(
                        f"{url_b}/v1/chat/completions", json=chat(), headers=auth(created["key"])
                    )
                    status = response.status_code
                    if status == 401:
                        break
                    await asyncio.sleep(0.05)
                assert status == 401


def test_cli_creates_lists_and_revokes_keys(tmp_path: Path, security_db: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config(database(security_db)))

    def run(*args: str) -> str:
        import os

        result = subprocess.run(
            [sys.executable, "-m", "llmgateway", "keys", *args, "--config", str(path)],
            cwd=REPO,
            env=os.environ,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    created = orjson.loads(run("create", "--name", "cli", "--role", "viewer", "--model", "demo", "--json"))
    assert created["key"].startswith("sk-lg-")
    assert created["roles"] == ["viewer"]
    assert created["allowed_models"] == ["demo"]
    assert "Revoked" in run("revoke", created["id"])
    listed = run("list", "--all")
    line = next(line for line in listed.splitlines() if created["id"] in line)
    assert created["prefix"] in line
    assert "revoked" in line
    assert created["key"] not in listed
