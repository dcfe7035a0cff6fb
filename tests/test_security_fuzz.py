"""Whatever arrives in the Authorization (or x-api-key) header, a caller without a valid credential
gets a plain 401 in the OpenAI error envelope: no 500, no echo of what was sent, no SQL run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmgateway.core.app import create_app, gateway_of
from llmgateway.core.config import parse_config
from tests.servers import running
from tests.test_security_support import MASTER_KEY, auth, chat, config, create_key, database, orm, security_db

__all__ = ["security_db"]

SQL = [
    "' OR '1'='1",
    "' OR 1=1 --",
    "'; DROP TABLE api_keys; --",
    '" OR ""="',
    "') UNION SELECT key_hash FROM api_keys --",
    "%' OR key_hash LIKE '%",
    "\\'; SELECT pg_sleep(10); --",
    "1; UPDATE api_keys SET revoked_at = NULL",
]

# header values a client can actually send: visible latin-1 characters with inner spaces
_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f")
_WORD = st.text(_CHARS, min_size=1, max_size=80)
_SEGMENT = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), max_size=60)
_TOKEN = st.one_of(
    _WORD,
    st.builds(lambda s: "sk-lg-" + s, _WORD),
    st.builds(lambda s: "sk-" + s, _WORD),
    st.builds(lambda a, b, c: f"eyJ{a}.{b}.{c}", _SEGMENT, _SEGMENT, _SEGMENT),
    st.builds(lambda q: "sk-lg-" + q, st.sampled_from(SQL)),
    st.sampled_from(SQL),
    st.builds(lambda n: "sk-lg-" + "A" * n, st.integers(0, 9000)),
)
_HEADER = st.one_of(
    st.builds(lambda t: f"Bearer {t}", _TOKEN),
    st.builds(lambda s, t: f"{s} {t}", st.sampled_from(["bearer", "BEARER", "Basic", "Token", "Bearer "]), _TOKEN),
    st.builds(lambda w, t: f"{w} {t}", _WORD, _TOKEN),
    _TOKEN,
    st.just("Bearer"),
    st.just("Bearer    "),
)


@pytest.fixture(scope="module")
async def locked_gateway(security_db: str) -> AsyncIterator[tuple[str, Any]]:
    toml = config(database(security_db), '[auth.jwt]\nsecret = "a-fuzzing-secret-that-is-32-bytes-long"\n')
    app = create_app(parse_config(toml))
    async with running(app) as url:
        yield url, gateway_of(app)


@pytest.fixture(scope="module")
async def client(locked_gateway: tuple[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=locked_gateway[0], timeout=30) as http:
        yield http


def check_401(response: httpx.Response, sent: str) -> None:
    assert response.status_code == 401, (sent, response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error"
    if len(sent) > 6:
        assert sent not in response.text


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_HEADER, use_api_key_header=st.booleans())
async def test_fuzzed_authorization_headers_get_only_401s(
    client: httpx.AsyncClient, header: str, use_api_key_header: bool
) -> None:
    name = "x-api-key" if use_api_key_header else "authorization"
    value = header.strip().encode("latin-1")
    response = await client.post("/v1/chat/completions", json=chat(), headers={name: value})  # type: ignore[dict-item]
    check_401(response, header.strip())


async def test_sql_injection_in_the_key_gets_a_plain_401_and_changes_nothing(
    locked_gateway: tuple[str, Any], security_db: str
) -> None:
    from llmgateway.plugins.storage.models import ApiKey

    url, gateway = locked_gateway
    await create_key(url, name="bystander")
    with orm(gateway):
        before = sorted((k.id, k.revoked_at) for k in await ApiKey.all())
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for attack in SQL:
            for token in (attack, "sk-lg-" + attack, "sk-lg-x" + attack):
                response = await http.post("/v1/chat/completions", json=chat(), headers=auth(token))
                check_401(response, token)
                admin = await http.get("/admin/api/keys", headers=auth(token))
                check_401(admin, token)
        still = await http.get("/admin/api/keys", headers=auth(MASTER_KEY))
        assert still.status_code == 200
    with orm(gateway):
        assert sorted((k.id, k.revoked_at) for k in await ApiKey.all()) == before
