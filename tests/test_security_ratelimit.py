"""Rate limits as clients see them: exact admission under concurrency (memory and Redis), OpenAI's
headers, token reservations corrected by real usage, concurrency slots freed on disconnect, three
gateway processes sharing one Redis, and Redis trouble never turning into a 5xx or a hung request:
a blackholed Redis fails every waiting caller together, a failover is followed, an admission whose
answer was lost frees its slots, and Redis URL options we do not understand are refused."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmgateway.core.provider import estimate_prompt_tokens
from tests.conftest import GatewayFactory
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
    gateway_processes,
    hung_listener,
    orm,
    redis_prefix,
    security_db,
)

__all__ = ["redis_prefix", "security_db"]

SLOW_DEMO = """
[providers.demo]
type = "demo"

[providers.slow]
type = "demo"
delay = 0.5
reply = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"

[[models]]
name = "demo"
deployments = [{ provider = "demo", model = "demo-1" }]

[[models]]
name = "slow"
deployments = [{ provider = "slow", model = "slow-1" }]
"""


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """The ``[ratelimit]`` backend lines for each backend (Redis with a key prefix of its own)."""
    if request.param == "memory":
        return 'backend = "memory"\n'
    prefix = request.getfixturevalue("redis_prefix")
    return f'backend = "redis"\nredis_url = "{REDIS_URL}"\nkey_prefix = "{prefix}"\n'


async def post_many(
    url: str, count: int, key: str = MASTER_KEY, model: str = "demo", **body: object
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=count)) as http:
        return list(
            await asyncio.gather(
                *[http.post("/v1/chat/completions", json=chat(model, **body), headers=auth(key)) for _ in range(count)]  # type: ignore[arg-type]
            )
        )


def check_429(response: httpx.Response, what: str = "requests") -> None:
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 1
    if what != "parallel":
        assert response.headers[f"x-ratelimit-remaining-{what}"] == "0"


async def test_requests_per_minute_are_exact_under_concurrency(serve_gateway: GatewayFactory, backend: str) -> None:
    toml = config(f"[ratelimit]\n{backend}[ratelimit.models.demo]\nrpm = 5\n")
    async with serve_gateway(toml) as url:
        responses = await post_many(url, 12)
        stats = serve_gateway.gateway.pm.get_plugin("ratelimit").stats  # type: ignore[attr-defined]
    assert stats["redis_errors"] == 0
    assert stats["local_fallbacks"] == 0
    ok = [r for r in responses if r.status_code == 200]
    assert len(ok) == 5
    for refused in (r for r in responses if r.status_code != 200):
        check_429(refused)
        assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3, 4]
    assert all(r.headers["x-ratelimit-limit-requests"] == "5" for r in ok)
    assert all(r.headers["x-ratelimit-reset-requests"].endswith("s") for r in ok)


async def test_key_and_team_limits_come_from_their_rows(serve_gateway: GatewayFactory, security_db: str) -> None:
    from llmgateway.plugins.storage.models import Team

    async with serve_gateway(config(database(security_db))) as url:
        with orm(serve_gateway.gateway):  # type: ignore[attr-defined]
            await Team.create(id="t-rpm", name="t-rpm", rpm=4)
        solo = (await create_key(url, rpm=3))["key"]
        first = (await create_key(url, team_id="t-rpm"))["key"]
        second = (await create_key(url, team_id="t-rpm"))["key"]
        solo_results = await post_many(url, 5, solo)
        team_results = await post_many(url, 3, first) + await post_many(url, 3, second)
    assert [r.status_code for r in solo_results].count(200) == 3
    assert [r.status_code for r in team_results].count(200) == 4
    for refused in (r for r in solo_results + team_results if r.status_code != 200):
        check_429(refused)


async def wait_for_tokens(plugin: Any, scope: str, expected: int) -> None:
    """Until the scope's window holds ``expected`` tokens (the plugin's own counters, either backend)."""
    total = None
    for _ in range(200):
        if plugin.redis is not None:
            # the log's member "_t" holds the total as a negative score
            raw = await plugin.redis.client.call("ZSCORE", f"{plugin.redis.prefix}rl2:{scope}:log", "_t")
            total = -int(float(raw)) if raw is not None else None
        else:
            entry = plugin.memory.scopes.get(scope)
            total = entry.total if entry is not None else None
        if total == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{scope} holds {total} tokens, not {expected}")


async def test_tokens_are_reserved_then_corrected_to_real_usage(serve_gateway: GatewayFactory, backend: str) -> None:
    toml = config(f"[ratelimit]\n{backend}[ratelimit.models.demo]\ntpm = 200\n")
    body = chat(max_tokens=60)
    reserve = estimate_prompt_tokens(body) + 60
    async with serve_gateway(toml) as url, httpx.AsyncClient(base_url=url) as http:
        first = await http.post("/v1/chat/completions", json=body, headers=auth(MASTER_KEY))
        assert first.status_code == 200
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 200 - reserve
        used = first.json()["usage"]["total_tokens"]
        assert used < reserve
        # the correction happens when the request ends, just after its response was sent
        await wait_for_tokens(serve_gateway.gateway.pm.get_plugin("ratelimit"), "model:demo", used)  # type: ignore[attr-defined]
        second = await http.post("/v1/chat/completions", json=body, headers=auth(MASTER_KEY))
        assert second.status_code == 200
        # the first request now counts what it really used, the second its reservation
        assert int(second.headers["x-ratelimit-remaining-tokens"]) == 200 - used - reserve
        third = await http.post("/v1/chat/completions", json=chat(max_tokens=190), headers=auth(MASTER_KEY))
        check_429(third, "tokens")
        assert third.headers["x-ratelimit-limit-tokens"] == "200"


async def test_concurrency_slots_are_freed_when_a_client_goes_away(serve_gateway: GatewayFactory, backend: str) -> None:
    toml = config(f"[ratelimit]\n{backend}[ratelimit.models.slow]\nmax_parallel = 2\n", SLOW_DEMO)
    async with serve_gateway(toml) as url, contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30))
        held = []
        for _ in range(2):
            response = await stack.enter_async_context(
                http.stream("POST", "/v1/chat/completions", json=chat("slow", stream=True), headers=auth(MASTER_KEY))
            )
            assert response.status_code == 200
            chunks = response.aiter_bytes()
            await anext(chunks)  # the stream is open; keep a reference so it stays open
            held.append((response, chunks))
        third = await http.post("/v1/chat/completions", json=chat("slow"), headers=auth(MASTER_KEY))
        check_429(third, "parallel")
        response, chunks = held[0]  # the client goes away mid-stream: its slot must come back
        await chunks.aclose()
        await response.aclose()
        status = 429
        for _ in range(100):
            status = (await http.post("/v1/chat/completions", json=chat("slow"), headers=auth(MASTER_KEY))).status_code
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200


def test_three_gateway_processes_sharing_redis_admit_exactly_the_limit(tmp_path: Path, redis_prefix: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        config(
            f"""
            [ratelimit]
            backend = "redis"
            redis_url = "{REDIS_URL}"
            key_prefix = "{redis_prefix}"

            [ratelimit.models.demo]
            rpm = 20
            """
        )
    )

    async def scenario(urls: list[str]) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            return list(
                await asyncio.gather(
                    *[
                        http.post(f"{urls[i % 3]}/v1/chat/completions", json=chat(), headers=auth(MASTER_KEY))
                        for i in range(60)
                    ]
                )
            )

    async def main() -> list[httpx.Response]:
        with gateway_processes(path, 3) as procs:
            await asyncio.gather(*[p.wait_ready() for p in procs])
            results = await scenario([p.url for p in procs])
            for proc in procs:
                assert "Traceback" not in proc.stderr()
            return results

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 20
    assert statuses.count(429) == 40
    for refused in (r for r in responses if r.status_code == 429):
        check_429(refused)


@contextlib.asynccontextmanager
async def blackhole() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers (a hung Redis)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("failure", ["refused", "hung"])
async def test_redis_failure_falls_back_to_local_limits_and_never_5xx(
    serve_gateway: GatewayFactory, failure: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        port = await stack.enter_async_context(blackhole()) if failure == "hung" else free_port()
        toml = config(
            f"""
            [ratelimit]
            backend = "redis"
            redis_url = "redis://127.0.0.1:{port}/0"
            redis_timeout = 0.2

            [ratelimit.models.demo]
            rpm = 3
            """
        )
        async with serve_gateway(toml) as url:
            plugin = serve_gateway.gateway.pm.get_plugin("ratelimit")  # type: ignore[attr-defined]
            responses = await post_many(url, 5)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 429, 429]
    assert plugin.stats["redis_errors"] >= 1
    assert plugin.stats["local_fallbacks"] == 5


async def test_model_limits_default_to_the_sum_of_their_deployments(serve_gateway: GatewayFactory) -> None:
    two = """
    [providers.a]
    type = "demo"

    [providers.b]
    type = "demo"

    [[models]]
    name = "pair"
    deployments = [{ provider = "a", model = "a-1", rpm = 2 }, { provider = "b", model = "b-1", rpm = 3 }]
    """
    async with serve_gateway(config("[ratelimit]\n", two)) as url:
        responses = await post_many(url, 8, model="pair")
    assert [r.status_code for r in responses].count(200) == 5
    assert {r.headers["x-ratelimit-limit-requests"] for r in responses} == {"5"}


async def test_a_jwt_users_limits_come_from_the_users_row(serve_gateway: GatewayFactory, security_db: str) -> None:
    import time

    import jwt

    from llmgateway.plugins.storage.models import User

    secret = "ratelimit-jwt-secret-at-least-32-bytes!"
    toml = config(database(security_db), f'[auth.jwt]\nsecret = "{secret}"\n')
    token = jwt.encode({"sub": "u-jwt-rpm", "exp": int(time.time()) + 300}, secret, algorithm="HS256")
    async with serve_gateway(toml) as url:
        with orm(serve_gateway.gateway):  # type: ignore[attr-defined]
            await User.create(id="u-jwt-rpm", email="u-jwt-rpm@example.com", rpm=2)
        responses = await post_many(url, 4, token)
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]


@pytest.mark.parametrize("pure_python", [False, True], ids=["hiredis", "pure-python"])
async def test_the_script_client_selects_the_database_and_config_refuses_other_schemes(
    redis_prefix: str, pure_python: bool
) -> None:
    from llmgateway.core.app import build_gateway
    from llmgateway.core.config import parse_config
    from llmgateway.core.errors import ConfigError
    from llmgateway.plugins.security.redis_util import ReplyError, Script, ScriptClient

    client = ScriptClient("redis://127.0.0.1:6379/3", timeout=2, pure_python=pure_python)
    try:
        await client.call("SET", f"{redis_prefix}db", "three")
        assert await client.call("GET", f"{redis_prefix}db") == b"three"
        with pytest.raises(ReplyError):
            await client.call("NOSUCHCOMMAND")
        assert await client.call("PING") == b"PONG"  # an error reply leaves the connection usable
        # a script Redis has never seen (EVALSHA refused, then EVAL), nested arrays, nil, integers
        script = Script(client, f"-- {redis_prefix}\nreturn {{1, {{ARGV[1], false, 'x'}}, KEYS[1]}}")
        for _ in range(2):
            assert await script([f"{redis_prefix}k"], ["é" * 3000]) == [
                1,
                ["é".encode() * 3000, None, b"x"],
                f"{redis_prefix}k".encode(),
            ]
        await client.call("DEL", f"{redis_prefix}db")
    finally:
        await client.aclose()
    with pytest.raises(ConfigError) as info:
        build_gateway(parse_config(config('[ratelimit]\nbackend = "redis"\nredis_url = "http://127.0.0.1:6379"\n')))
    assert info.value.key == "ratelimit.redis_url"


def test_both_reply_readers_read_every_reply_split_anywhere() -> None:
    """hiredis and the pure-Python reader give the same values for the same bytes, however they arrive."""
    from llmgateway.plugins.security.redis_util import ReplyError, make_reader

    stream = (
        b"+OK\r\n-ERR wrong\r\n:-42\r\n$5\r\nhe\r\no\r\n$-1\r\n$0\r\n\r\n*-1\r\n*0\r\n"
        b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n-NOSCRIPT x\r\n$-1\r\n"
    )

    def read(pure: bool, cut: int) -> list[Any]:
        reader = make_reader(pure)
        got: list[Any] = []
        for piece in (stream[:cut], stream[cut:]):
            reader.feed(piece)
            while (value := reader.gets()) is not False:
                got.append(value)
        return got

    def plain(values: list[Any]) -> list[Any]:  # errors compared by class and message
        return [
            plain(v) if isinstance(v, list) else (type(v), str(v)) if isinstance(v, Exception) else v for v in values
        ]

    expected = [b"OK", (ReplyError, "ERR wrong"), -42, b"he\r\no", None, b"", None, []]
    expected.append([1, [b"a", (ReplyError, "NOSCRIPT x")], None])
    for cut in range(len(stream) + 1):
        assert plain(read(True, cut)) == expected, cut
        assert plain(read(False, cut)) == expected, cut


async def test_callers_waiting_on_a_blackholed_redis_fail_together_within_the_timeout() -> None:
    from llmgateway.plugins.security.redis_util import ScriptClient, redis_errors

    async with hung_listener() as port:
        client = ScriptClient(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        try:
            started = time.monotonic()
            results = await asyncio.gather(*[client.call("PING") for _ in range(20)], return_exceptions=True)
            elapsed = time.monotonic() - started
        finally:
            await client.aclose()
    assert all(isinstance(r, redis_errors()) for r in results), results
    # one shared connection attempt: not one 0.2 s attempt after another (20 x 0.2 = 4 s)
    assert elapsed < 1.5


async def test_the_first_call_on_a_new_connection_is_bounded_by_one_timeout(redis_prefix: str) -> None:
    from llmgateway.plugins.security.redis_util import ScriptClient

    async with TcpProxy(6379) as proxy:
        proxy.delay = 0.2  # every answer comes 0.2 s late: SELECT, then the command
        client = ScriptClient(f"redis://127.0.0.1:{proxy.port}/3", timeout=0.3)
        try:
            with pytest.raises(TimeoutError):  # 0.4 s in all: more than the 0.3 s the caller was promised
                await client.call("PING")
        finally:
            await client.aclose()


async def test_requests_are_answered_promptly_while_redis_connects_hang(serve_gateway: GatewayFactory) -> None:
    async with hung_listener() as port:
        toml = config(
            f"""
            [ratelimit]
            backend = "redis"
            redis_url = "redis://127.0.0.1:{port}/0"
            redis_timeout = 0.2
            redis_retry_interval = 0

            [ratelimit.models.demo]
            rpm = 30
            """
        )
        async with serve_gateway(toml) as url:
            started = time.monotonic()
            responses = await post_many(url, 50)
            elapsed = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 30  # the local limits, enforced while Redis is away
    assert statuses.count(429) == 20
    assert elapsed < 5  # each request waits for Redis at most its 0.2 s, not behind all the others


async def test_a_failover_is_followed_instead_of_failing_on_the_old_primary(redis_prefix: str) -> None:
    from llmgateway.plugins.security.redis_util import ReplyError, ScriptClient

    async with TcpProxy(6379) as proxy:
        client = ScriptClient(f"redis://127.0.0.1:{proxy.port}/0", timeout=2)
        try:
            assert await client.call("SET", f"{redis_prefix}failover", "before") == b"OK"
            proxy.demote()  # the old primary is a replica now; new connections reach the new primary
            with pytest.raises(ReplyError, match="READONLY"):
                await client.call("SET", f"{redis_prefix}failover", "after")
            assert await client.call("SET", f"{redis_prefix}failover", "after") == b"OK"
            assert await client.call("GET", f"{redis_prefix}failover") == b"after"
        finally:
            await client.aclose()


async def test_redis_url_options_are_honoured_or_refused_at_startup(redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    from llmgateway.core.app import build_gateway
    from llmgateway.core.config import parse_config
    from llmgateway.core.errors import ConfigError
    from llmgateway.plugins.security.redis_util import ScriptClient

    for section in ("ratelimit", "budgets"):
        for option in ("ssl_cert_reqs=none", "socket_timeout=5"):
            url = f"rediss://127.0.0.1:6379/0?{option}"
            toml = config(f'[{section}]\nbackend = "redis"\nredis_url = "{url}"\n')
            with pytest.raises(ConfigError) as info:
                build_gateway(parse_config(toml))
            assert info.value.key == f"{section}.redis_url"
            assert option.split("=")[0] in str(info.value)
    client = ScriptClient("redis://127.0.0.1:6379?db=4", timeout=2)
    other = aioredis.Redis.from_url("redis://127.0.0.1:6379/4")
    try:
        await client.call("SET", f"{redis_prefix}db", "four")
        assert await other.get(f"{redis_prefix}db") == b"four"  # the database ?db= names
    finally:
        await other.delete(f"{redis_prefix}db")
        await other.aclose()
        await client.aclose()


async def test_slots_taken_by_an_admission_whose_answer_was_lost_are_released(
    serve_gateway: GatewayFactory, redis_prefix: str
) -> None:
    async with TcpProxy(6379) as proxy:
        toml = config(
            f"""
            [ratelimit]
            backend = "redis"
            redis_url = "redis://127.0.0.1:{proxy.port}/0"
            key_prefix = "{redis_prefix}"
            redis_timeout = 0.2
            redis_retry_interval = 0

            [ratelimit.models.slow]
            max_parallel = 2
            """,
            SLOW_DEMO,
        )
        async with serve_gateway(toml) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            proxy.set_mode("mute")  # Redis runs the admissions; their answers never come back
            for _ in range(2):
                response = await http.post("/v1/chat/completions", json=chat("slow"), headers=auth(MASTER_KEY))
                assert response.status_code == 200  # admitted by the local limits
            proxy.set_mode("forward")  # Redis is back
            statuses: list[int] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                async with contextlib.AsyncExitStack() as stack:
                    statuses = []
                    for _ in range(2):  # two concurrent requests, as max_parallel allows
                        stream = await stack.enter_async_context(
                            http.stream(
                                "POST", "/v1/chat/completions", json=chat("slow", stream=True), headers=auth(MASTER_KEY)
                            )
                        )
                        statuses.append(stream.status_code)
                if statuses == [200, 200]:
                    break
                await asyncio.sleep(0.1)
            assert statuses == [200, 200]


async def test_a_release_that_arrives_before_its_admission_leaves_a_marker_so_the_admission_takes_no_slot(
    redis_prefix: str,
) -> None:
    """The admission's answer was lost and its slots released; Redis (behind a slow link) runs the
    admission only after the release. It must not take a slot that nothing would free until the lease
    expires, and releasing twice frees nobody else's slot."""
    from llmgateway.plugins.security.ratelimit import RedisBackend, Rule, Scope
    from llmgateway.plugins.security.redis_util import ScriptClient

    client = ScriptClient(REDIS_URL, timeout=2)
    backend = RedisBackend(client, redis_prefix, lease_ms=60_000)
    scopes = [Scope("key:k1", Rule(max_parallel=1), 10)]
    try:
        await backend.finish("late", scopes, None)  # the release comes first
        late = await backend.admit("late", scopes, 60_000)  # then the admission it was meant for
        assert not late.admitted
        assert (await backend.admit("next", scopes, 60_000)).admitted  # the one slot is still free
        await backend.finish("late", scopes, None)  # released again: "next" keeps its slot
        assert not (await backend.admit("third", scopes, 60_000)).admitted
        await backend.finish("next", scopes, None)
        await backend.finish("next", scopes, None)
        assert (await backend.admit("fourth", scopes, 60_000)).admitted
    finally:
        await backend.aclose()
        await client.aclose()


async def test_finishing_a_request_twice_releases_its_slot_once(serve_gateway: GatewayFactory, backend: str) -> None:
    """on_finish may run twice for a request (a disconnect, then a shutdown path): the second run is a no-op."""
    from starlette.datastructures import Headers

    from llmgateway.core.errors import RateLimitError
    from llmgateway.core.types import RequestContext

    toml = config(f"[ratelimit]\n{backend}[ratelimit.models.demo]\nmax_parallel = 1\n")
    async with serve_gateway(toml):
        plugin = serve_gateway.gateway.pm.get_plugin("ratelimit")  # type: ignore[attr-defined]
        gateway = serve_gateway.gateway  # type: ignore[attr-defined]

        def request(request_id: str) -> RequestContext:
            ctx = RequestContext(
                request_id=request_id,
                endpoint="chat.completions",
                body=chat("demo"),
                headers=Headers(),
                client_host=None,
                path="/v1/chat/completions",
            )
            ctx.alias = "demo"
            ctx.model_group = gateway.models["demo"]
            return ctx

        first = request("req-first")
        await plugin.llmgateway_check_limits(first)
        [finish_first] = first.on_finish
        await finish_first(first)
        if plugin.redis is not None:
            await plugin.redis.flush()  # finished requests go to Redis in the background
        second = request("req-second")
        await plugin.llmgateway_check_limits(second)  # takes the one slot
        await finish_first(first)  # the first request finished again
        if plugin.redis is not None:
            await plugin.redis.flush()
        with pytest.raises(RateLimitError):
            await plugin.llmgateway_check_limits(request("req-third"))
        if plugin.redis is not None:
            # the second finish sent nothing: a release Redis had seen twice would have left a
            # "released" marker for the request (a release that finds no slot leaves one)
            marker = await plugin.redis.client.call("ZSCORE", f"{plugin.redis.prefix}rl:released", "req-first")
            assert marker is None


async def test_redis_windows_slide_tokens_are_corrected_and_every_key_expires(redis_prefix: str) -> None:
    """The Redis layout end to end: entries older than the window leave the log with their tokens,
    a correction rewrites an entry once, refusals say how long to wait, and no key lives forever."""
    from llmgateway.plugins.security.ratelimit import WINDOW_MS, RedisBackend, Rule, Scope
    from llmgateway.plugins.security.redis_util import ScriptClient

    client = ScriptClient(REDIS_URL, timeout=2)
    backend = RedisBackend(client, redis_prefix, lease_ms=60_000)
    log = f"{redis_prefix}rl2:key:s:log"
    try:
        seconds, micros = await client.call("TIME")
        long_ago = int(seconds) * 1000 + int(micros) // 1000 - WINDOW_MS - 1000
        # two requests from more than a minute ago, holding 60 tokens
        await client.call("ZADD", log, long_ago, "old1|60", long_ago, "old2|0", -60, "_t")
        scopes = [Scope("key:s", Rule(rpm=2, tpm=100, max_parallel=5), 30)]
        a = await backend.admit("a", scopes, 60_000)
        assert a.admitted
        assert (a.remaining[0][0], a.remaining[0][2]) == (1, 70)  # the old ones left with their tokens
        b = await backend.admit("b", scopes, 60_000)
        assert b.admitted
        assert (b.remaining[0][0], b.remaining[0][2]) == (0, 40)
        c = await backend.admit("c", scopes, 60_000)
        assert (c.admitted, c.what, c.limit) == (False, "requests", 2)
        assert WINDOW_MS - 2000 < c.wait_ms <= WINDOW_MS
        await backend.finish("a", scopes, 10)  # "a" used 10 of its 30
        await backend.finish("a", scopes, 10)  # finishing twice changes nothing
        assert await client.call("ZSCORE", log, "_t") == b"-40"
        assert sorted(await client.call("ZRANGE", log, 0, -1)) == [b"_t", b"a|10", b"b|30"]
        tight = [Scope("key:t", Rule(tpm=100), 70)]
        assert (await backend.admit("x", tight, 60_000)).admitted
        y = await backend.admit("y", tight, 60_000)
        assert (y.admitted, y.what, y.limit) == (False, "tokens", 100)
        assert WINDOW_MS - 2000 < y.wait_ms <= WINDOW_MS  # when "x" leaves the window
        for key in (log, f"{redis_prefix}rl2:key:s:conc", f"{redis_prefix}rl2:key:t:log"):
            assert WINDOW_MS < await client.call("PTTL", key) <= WINDOW_MS + 60_000 + 10_000, key
    finally:
        await backend.aclose()
        await client.aclose()
