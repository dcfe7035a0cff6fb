"""Plugin ``keys``: virtual API keys (``[auth.keys]``).

A virtual key is ``sk-lg-`` followed by 43 url-safe characters from :mod:`secrets`. It is shown once,
when created; the database keeps only its SHA-256 (``ApiKey.key_hash``) and a display prefix
(``sk-lg-`` and four characters). Authentication hashes the presented key and looks the hash up
through the ORM (parameterized), then compares digests in constant time. Results are cached in
process for ``cache_ttl`` seconds (unknown keys for ``negative_cache_ttl``); with ``redis_url`` set,
revocations are also published on a Redis channel so every replica drops the key at once.

The principal gets the key's roles (``["user"]`` when it has none), the key / user / team ids and
the allowed models (intersection of the key's, its user's and its team's lists). The rows' rate
limits and budgets are left in ``ctx.state`` for the ``ratelimit`` and ``budgets`` plugins.

Managed through ``/admin/api/keys`` (see :mod:`.admin_keys`) and ``llmgateway keys``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from llmgateway.core.config import GatewayConfig
from llmgateway.core.errors import AuthenticationError, ServiceUnavailableError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import ROLES, Principal, RequestContext
from llmgateway.plugins.auth import bearer_token

from .limits import STATE_KEY, IdentityLimits, Limits, orm_ready
from .redis_util import make_redis, redis_errors

if TYPE_CHECKING:
    import typer

    from llmgateway.core.app import Gateway, GatewayRoute

log = logging.getLogger("llmgateway.security.keys")

KEY_PREFIX = "sk-lg-"
DISPLAY_LENGTH = len(KEY_PREFIX) + 4
INVALID = "Invalid API key"


def generate_key() -> tuple[str, str, str]:
    """A new virtual key: (the key, its SHA-256 hex digest, its display prefix)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key), key[:DISPLAY_LENGTH]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


@dataclass(slots=True)
class _Entry:
    principal: Principal | None  # None: the key does not authenticate (unknown or revoked)
    error: str
    limits: IdentityLimits
    key_id: str | None
    expires_at: float | None  # unix time of the key's expiry
    fresh_until: float  # monotonic time until which the entry may be used without a lookup


def _models(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    models = frozenset(str(m) for m in value)
    return None if "*" in models else models


def intersect_models(*lists: Any) -> frozenset[str] | None:
    """The models every level allows (None at a level: no restriction there)."""
    result: frozenset[str] | None = None
    for value in lists:
        models = _models(value)
        if models is None:
            continue
        result = models if result is None else result & models
    return result


class KeysPlugin:
    def __init__(self) -> None:
        self.cache_ttl = 5.0
        self.negative_cache_ttl = 1.0
        self.cache_size = 100_000
        self.redis_url: str | None = None
        self.redis_timeout = 0.25
        self.channel = "llmgateway:keys:revoked"
        self.touch_interval = 60.0
        self._cache: dict[str, _Entry] = {}
        self._negative: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._redis: Any = None
        self._listener: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------------

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        section = config.section("auth").table("keys")
        self.cache_ttl = section.number("cache_ttl", 5.0, minimum=0)
        self.negative_cache_ttl = section.number("negative_cache_ttl", 1.0, minimum=0)
        self.cache_size = section.integer("cache_size", 100_000, minimum=1)
        self.redis_url = section.opt_string("redis_url")
        self.redis_timeout = section.number("redis_timeout", 0.25, minimum=0.001)
        self.channel = section.string("channel", "llmgateway:keys:revoked")
        self.touch_interval = section.number("touch_interval", 60.0, minimum=0)
        section.check_unknown()

    @hookimpl
    async def llmgateway_startup(self, gateway: Gateway) -> None:
        gateway.state["keys"] = self
        if self.redis_url:
            self._redis = make_redis(self.redis_url, timeout=self.redis_timeout, max_connections=16)
            self._listener = asyncio.create_task(self._listen(), name="keys-revocation-listener")

    @hookimpl
    async def llmgateway_shutdown(self, gateway: Gateway) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=2.0)
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
            self._redis = None

    @hookimpl
    def llmgateway_routes(self, gateway: Gateway) -> Sequence[GatewayRoute]:
        from .admin_keys import routes

        return routes(self)

    @hookimpl
    def llmgateway_register_commands(self, cli: typer.Typer) -> None:
        from .keys_cli import register

        register(cli)

    # ---- authentication ----------------------------------------------------------------------

    @hookimpl
    async def llmgateway_authenticate(self, ctx: RequestContext) -> Principal | None:
        token = bearer_token(ctx)
        if token is None or not token.startswith(KEY_PREFIX):
            return None
        digest = hash_key(token)
        now = time.monotonic()
        entry = self._cache.get(digest) or self._negative.get(digest)
        if entry is None or entry.fresh_until <= now:
            entry = await self._lookup(digest)
        if entry.principal is None:
            raise AuthenticationError(entry.error)
        if entry.expires_at is not None and time.time() >= entry.expires_at:
            raise AuthenticationError("This API key has expired")
        ctx.state[STATE_KEY] = entry.limits
        if entry.key_id is not None and self.touch_interval:
            self._touch(entry.key_id, now)
        return entry.principal

    async def _lookup(self, digest: str) -> _Entry:
        """One database lookup per digest at a time, however many requests wait for it."""
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._load(digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda t: self._lookup_done(digest, t))
        return await asyncio.shield(task)

    def _lookup_done(self, digest: str, task: asyncio.Task[_Entry]) -> None:
        self._inflight.pop(digest, None)
        if task.cancelled() or task.exception() is not None:
            return
        entry = task.result()
        target = self._cache if entry.principal is not None else self._negative
        limit = self.cache_size
        if len(target) >= limit:
            if target is self._negative:
                target.clear()
            else:
                target.pop(next(iter(target)))
        self._cache.pop(digest, None)
        self._negative.pop(digest, None)
        target[digest] = entry

    async def _load(self, digest: str) -> _Entry:
        now = time.monotonic()
        if not orm_ready():
            return _Entry(None, INVALID, IdentityLimits(), None, None, now + self.negative_cache_ttl)
        from llmgateway.plugins.storage.models import ApiKey, Team

        try:
            row = await ApiKey.filter(key_hash=digest).select_related("user", "team").first()
            team = row.team if row is not None else None
            user = row.user if row is not None else None
            user_team = getattr(user, "team_id", None)
            if row is not None and team is None and user_team:
                team = await Team.get_or_none(id=user_team)
        except Exception as exc:
            log.error("virtual key lookup failed: %s", type(exc).__name__)
            raise ServiceUnavailableError("The key store is unavailable; try again shortly") from None
        if row is None or not hmac.compare_digest(str(row.key_hash), digest):
            return _Entry(None, INVALID, IdentityLimits(), None, None, now + self.negative_cache_ttl)
        if row.revoked_at is not None:
            return _Entry(None, "This API key has been revoked", IdentityLimits(), row.id, None, now + self.cache_ttl)
        roles = frozenset(r for r in (row.roles or []) if r in ROLES) or frozenset({"user"})
        principal = Principal(
            kind="virtual_key",
            roles=roles,
            key_id=row.id,
            key_prefix=row.prefix,
            user_id=user.id if user is not None else None,
            team_id=team.id if team is not None else None,
            allowed_models=intersect_models(
                row.allowed_models,
                user.allowed_models if user is not None else None,
                team.allowed_models if team is not None else None,
            ),
            metadata=dict(row.metadata or {}),
        )
        limits = IdentityLimits(
            key=Limits.of(row),
            user=Limits.of(user) if user is not None else None,
            team=Limits.of(team) if team is not None else None,
        )
        expires = row.expires_at.timestamp() if row.expires_at is not None else None
        return _Entry(principal, INVALID, limits, row.id, expires, now + self.cache_ttl)

    def _touch(self, key_id: str, now: float) -> None:
        """Record ``last_used_at`` at most once per ``touch_interval`` per key, off the request path."""
        last = self._touched.get(key_id)
        if last is not None and now - last < self.touch_interval:
            return
        if len(self._touched) >= self.cache_size:
            self._touched.clear()
        self._touched[key_id] = now
        task = asyncio.create_task(self._write_last_used(key_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_last_used(self, key_id: str) -> None:
        from llmgateway.plugins.storage.models import ApiKey

        try:
            await ApiKey.filter(id=key_id).update(last_used_at=datetime.now(UTC))
        except Exception as exc:
            log.warning("could not record last use of key %s: %s", key_id, type(exc).__name__)

    # ---- revocation --------------------------------------------------------------------------

    def invalidate(self, key_id: str) -> None:
        """Forget every cached entry of ``key_id`` (its next use is looked up again)."""
        for table in (self._cache, self._negative):
            for digest in [d for d, e in table.items() if e.key_id == key_id]:
                table.pop(digest, None)

    async def publish_revocation(self, key_id: str) -> None:
        """Drop the key here and tell every other replica (when Redis is configured)."""
        self.invalidate(key_id)
        client = self._redis
        owned = False
        if client is None and self.redis_url:
            client = make_redis(self.redis_url, timeout=max(self.redis_timeout, 1.0), max_connections=1)
            owned = True
        if client is None:
            return
        try:
            await client.publish(self.channel, key_id)
        except redis_errors() as exc:
            log.warning("could not publish the revocation of %s: %s", key_id, type(exc).__name__)
        finally:
            if owned:
                await client.aclose(close_connection_pool=True)

    async def _listen(self) -> None:
        backoff = 0.2
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._cache.clear()  # anything may have been revoked while we were not listening
                self.listening.set()
                backoff = 0.2
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message.get("data")
                        self.invalidate(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                log.warning("key revocation listener: %s; retrying in %.1fs", type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
