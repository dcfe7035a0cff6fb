"""Plugin ``ratelimit``: requests per minute, tokens per minute and concurrent requests (``[ratelimit]``).

Scopes: the virtual key, its user, its team (limits from their rows, else ``[ratelimit.defaults.*]``)
and the model alias (``[ratelimit.models."alias"]``, else the sum of its deployments' ``rpm`` /
``tpm`` when every deployment has one, else ``[ratelimit.defaults.model]``). A request is admitted
only if every scope has room, and then counts in all of them — atomically.

Windows slide: a scope admits at most ``rpm`` requests (and ``tpm`` tokens) in any 60 seconds, kept
as a log of request ids with their times and token counts. Tokens are reserved at admission (prompt
estimate + ``max_tokens``) and corrected to the real usage when the request ends; concurrency slots
are leases released when the request ends (``ctx.on_finish`` runs even on disconnect) and expire
after ``lease_seconds`` should a replica die holding them.

Backends: ``memory`` (one process) and ``redis`` — one Lua script per admission, using the Redis
server's clock, so N replicas together admit exactly the limit. Redis gets short connect/read
timeouts; when it fails, ``on_redis_error = "local"`` (default) enforces the limits in this process
alone, ``"allow"`` admits; either way the failure is counted in ``stats`` and Redis is tried again
after ``redis_retry_interval`` seconds. A Redis failure never becomes a 5xx. When an admission's
answer never came (Redis may have run the script), its concurrency slots are released in the
background, so they do not stay taken until their lease expires.

Responses carry OpenAI's headers: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` (and ``-tokens``), for the tightest scope; a refusal is a 429
``rate_limit_exceeded`` with ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmgateway.core.config import GatewayConfig, Section
from llmgateway.core.errors import RateLimitError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.provider import estimate_prompt_tokens
from llmgateway.core.types import RequestContext

from .limits import IdentityLimits, Limits, LimitsResolver
from .redis_util import BackgroundBatches, Script, ScriptClient, bulk, close_redis, redis_errors, redis_options

if TYPE_CHECKING:
    from llmgateway.core.app import Gateway

log = logging.getLogger("llmgateway.security.ratelimit")

WINDOW_MS = 60_000
NONE = -1
MAX_QUEUED = 100_000  # finished requests waiting for Redis (beyond this the oldest rely on lease expiry)


@dataclass(frozen=True, slots=True)
class Rule:
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_parallel is None

    def over(self, fallback: Rule) -> Rule:
        """This rule, with the fallback's value wherever this one has none."""
        return Rule(
            rpm=self.rpm if self.rpm is not None else fallback.rpm,
            tpm=self.tpm if self.tpm is not None else fallback.tpm,
            max_parallel=self.max_parallel if self.max_parallel is not None else fallback.max_parallel,
        )

    @classmethod
    def of(cls, limits: Limits | None) -> Rule:
        if limits is None:
            return cls()
        return cls(limits.rpm, limits.tpm, limits.max_parallel)


@dataclass(frozen=True, slots=True)
class Scope:
    name: str  # "key:<id>", "user:<id>", "team:<id>", "model:<alias>"
    rule: Rule
    tokens: int

    @property
    def logs(self) -> bool:
        return self.rule.rpm is not None or self.rule.tpm is not None


@dataclass(slots=True)
class Verdict:
    admitted: bool
    scope: str = ""
    what: str = ""  # "requests" | "tokens" | "parallel"
    wait_ms: int = 0
    limit: int = 0
    # per scope (same order), when admitted: remaining requests, reset ms, remaining tokens, reset ms
    remaining: list[tuple[int, int, int, int]] = field(default_factory=list)


def format_reset(ms: int) -> str:
    """A duration as OpenAI writes it: ``20ms``, ``1s``, ``6m0s``, ``59.5s``."""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


# ---- the memory backend ---------------------------------------------------------------------


class _Log:
    __slots__ = ("conc", "entries", "total")

    def __init__(self) -> None:
        self.entries: OrderedDict[str, list[int]] = OrderedDict()  # member -> [time ms, tokens]
        self.total = 0
        self.conc: dict[str, int] = {}  # member -> lease expiry ms

    def purge(self, now: int) -> None:
        entries = self.entries
        while entries:
            stamp, tokens = next(iter(entries.values()))
            if stamp > now - WINDOW_MS:
                break
            entries.popitem(last=False)
            self.total -= tokens


class MemoryBackend:
    """Exact within one process: every check-and-add runs without awaiting."""

    def __init__(self) -> None:
        self.scopes: dict[str, _Log] = {}

    @staticmethod
    def now() -> int:
        return int(time.monotonic() * 1000)

    def admit(self, member: str, scopes: list[Scope], lease_ms: int) -> Verdict:
        now = self.now()
        logs = []
        for scope in scopes:
            entry = self.scopes.get(scope.name)
            if entry is None:
                entry = self.scopes[scope.name] = _Log()
            logs.append(entry)
            rule = scope.rule
            if scope.logs:
                entry.purge(now)
                count = len(entry.entries)
                if rule.rpm is not None and count + 1 > rule.rpm:
                    stamps = list(entry.entries.values())
                    index = count - rule.rpm
                    wait = stamps[index][0] + WINDOW_MS - now if 0 <= index < len(stamps) else WINDOW_MS
                    return Verdict(False, scope.name, "requests", wait, rule.rpm)
                if rule.tpm is not None and entry.total + scope.tokens > rule.tpm:
                    wait = WINDOW_MS
                    if scope.tokens <= rule.tpm:
                        need = entry.total + scope.tokens - rule.tpm
                        freed = 0
                        for stamp, tokens in entry.entries.values():
                            freed += tokens
                            if freed >= need:
                                wait = stamp + WINDOW_MS - now
                                break
                    return Verdict(False, scope.name, "tokens", wait, rule.tpm)
            if rule.max_parallel is not None and len(entry.conc) + 1 > rule.max_parallel:
                # expired leases (their request's end never came) are looked for only when full
                for lease_member in [m for m, until in entry.conc.items() if until <= now]:
                    del entry.conc[lease_member]
                if len(entry.conc) + 1 > rule.max_parallel:
                    return Verdict(False, scope.name, "parallel", 1000, rule.max_parallel)
        verdict = Verdict(True)
        for scope, entry in zip(scopes, logs, strict=True):
            rule = scope.rule
            if scope.logs:
                entry.entries[member] = [now, scope.tokens]
                entry.total += scope.tokens
                oldest = next(iter(entry.entries.values()))[0]
                reset = oldest + WINDOW_MS - now
                verdict.remaining.append(
                    (
                        rule.rpm - len(entry.entries) if rule.rpm is not None else NONE,
                        reset,
                        rule.tpm - entry.total if rule.tpm is not None else NONE,
                        reset,
                    )
                )
            else:
                verdict.remaining.append((NONE, 0, NONE, 0))
            if rule.max_parallel is not None:
                entry.conc[member] = now + lease_ms
        return verdict

    def finish(self, member: str, scopes: list[Scope], tokens: int | None) -> None:
        for scope in scopes:
            entry = self.scopes.get(scope.name)
            if entry is None:
                continue
            if tokens is not None and member in entry.entries:
                record = entry.entries[member]
                entry.total += tokens - record[1]
                record[1] = tokens
            if scope.rule.max_parallel is not None:
                entry.conc.pop(member, None)
            if not entry.entries and not entry.conc:
                del self.scopes[scope.name]


# ---- the Redis backend ----------------------------------------------------------------------
#
# One script call per admission; finished requests go in batches, one script call each. Key names
# are built in the script from the prefix (fine on a standalone Redis or a primary with replicas,
# not on Redis Cluster). Inside a script every redis.call costs about a microsecond beyond the
# command, and a write about two, so the layout keeps both few:
#
#   {prefix}rl2:{scope}:log   sorted set: one member per admitted request, "{request id}|{tokens}",
#                             scored by its admission time (ms); tokens are the reservation, rewritten
#                             to the real count when the request ends. Its member "_t" holds the
#                             scope's token total, as a negative score (below every time).
#   {prefix}rl2:{scope}:conc  sorted set of concurrency leases: request id -> lease expiry (ms).
#   {prefix}rl2:released      request id -> until when: releases that found no slot to free.
#
# Keys get a TTL with ten seconds to spare and are refreshed (PEXPIRE) only once that spare is used:
# a PTTL read per admission instead of a write.

_SCRIPT_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- the key lives at least ttl ms more (with ten seconds to spare: a write every ten seconds at most)
local function keep(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl + 10000) end
end
"""

ADMIT_LUA = (
    _SCRIPT_COMMON
    + """
-- the tokens a log entry ("{request id}|{tokens}") holds
local function tokens_of(entry)
  return tonumber(string.match(entry, '|(%d+)$')) or 0
end
-- the log's token total (its member "_t", the lowest score: it is negative) and its oldest entry's
-- time, each nil when absent: one call
local function head(log)
  local h = redis.call('ZRANGE', log, 0, 1, 'WITHSCORES')
  if #h == 0 then return nil, nil end
  if h[1] == '_t' then
    if #h > 2 then return -tonumber(h[2]), tonumber(h[4]) end
    return -tonumber(h[2]), nil
  end
  return nil, tonumber(h[2])
end
-- the log's entries older than the window leave it, their tokens leave the total. Returns the total
-- (nil: no "_t") and the oldest entry's time (nil: no entry left). One call when there is nothing
-- to drop.
local function purge(log, now, window)
  while true do
    local total, oldest = head(log)
    if oldest == nil or oldest > now - window then return total, oldest end
    local old = redis.call('ZRANGEBYSCORE', log, '(0', now - window, 'LIMIT', 0, 500)
    local sum = 0
    for j = 1, #old do sum = sum + tokens_of(old[j]) end
    if sum ~= 0 then redis.call('ZINCRBY', log, sum, '_t') end
    redis.call('ZREM', log, unpack(old))
  end
end

-- ARGV: key base ("{prefix}rl2:"), request id, window ms, lease ms, then five per scope:
-- name, rpm, tpm, max parallel (-1: none), tokens to reserve
local base, member = ARGV[1], ARGV[2]
local window, lease = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = (#ARGV - 4) / 5
local now = now_ms()
-- released already (its client gave up waiting for this answer, and released the slots): take nothing
if redis.call('ZSCORE', base .. 'released', member) then return {0, 1, 'released', 1000, 0} end
local counts, totals, oldests = {}, {}, {}
for i = 1, n do
  local a = 4 + 5 * (i - 1)
  local name = base .. ARGV[a + 1]
  local rpm, tpm, par, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  if rpm >= 0 or tpm >= 0 then
    local log = name .. ':log'
    local t, oldest = purge(log, now, window)
    oldests[i] = oldest
    local count, total = 0, 0
    if oldest then
      count = redis.call('ZCARD', log)
      if t then
        count = count - 1
        total = t
      end
    end
    counts[i], totals[i] = count, total
    if rpm >= 0 and count + 1 > rpm then
      local e = redis.call('ZRANGEBYSCORE', log, '(0', '+inf', 'WITHSCORES', 'LIMIT', count - rpm, 1)
      local wait = window
      if #e == 2 then wait = tonumber(e[2]) + window - now end
      return {0, i, 'requests', wait, rpm}
    end
    if tpm >= 0 and total + cost > tpm then
      local wait = window
      if cost <= tpm then
        -- the time when enough of the oldest entries have left the window
        local need, freed, start, found = total + cost - tpm, 0, 0, false
        while not found do
          local e = redis.call('ZRANGEBYSCORE', log, '(0', '+inf', 'WITHSCORES', 'LIMIT', start, 100)
          if #e == 0 then break end
          for j = 1, #e, 2 do
            freed = freed + tokens_of(e[j])
            if freed >= need then
              wait = tonumber(e[j + 1]) + window - now
              found = true
              break
            end
          end
          start = start + 100
        end
      end
      return {0, i, 'tokens', wait, tpm}
    end
  end
  if par >= 0 then
    local conc = name .. ':conc'
    if redis.call('ZCARD', conc) + 1 > par then
      redis.call('ZREMRANGEBYSCORE', conc, '-inf', now)
      if redis.call('ZCARD', conc) + 1 > par then
        return {0, i, 'parallel', 1000, par}
      end
    end
  end
end
local out = {1}
for i = 1, n do
  local a = 4 + 5 * (i - 1)
  local name = base .. ARGV[a + 1]
  local rpm, tpm, par = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if rpm >= 0 or tpm >= 0 then
    local log = name .. ':log'
    local cost = 0
    local total = -1
    if tpm >= 0 then
      cost = tonumber(ARGV[a + 5])
      total = totals[i] + cost -- (a log that was empty starts its total afresh: totals[i] is 0)
      redis.call('ZADD', log, now, member .. '|' .. cost, -total, '_t') -- the entry and the new total
    else
      redis.call('ZADD', log, now, member .. '|' .. cost)
    end
    keep(log, window + lease)
    local reset = (oldests[i] or now) + window - now
    out[#out + 1] = rpm >= 0 and (rpm - counts[i] - 1) or -1
    out[#out + 1] = reset
    out[#out + 1] = tpm >= 0 and (tpm - total) or -1
    out[#out + 1] = reset
  else
    out[#out + 1] = -1
    out[#out + 1] = 0
    out[#out + 1] = -1
    out[#out + 1] = 0
  end
  if par >= 0 then
    local conc = name .. ':conc'
    redis.call('ZADD', conc, now + lease, member)
    keep(conc, lease)
  end
end
return out
"""
)

FINISH_LUA = (
    _SCRIPT_COMMON
    + """
-- ARGV: key base, lease ms, then five per finished (request, scope): request id, scope name, the
-- tokens its log entry holds (-1: the scope counts no tokens), its real tokens (-1: unknown, keep the
-- reservation), release its concurrency slot (1/0). A release that finds no slot (released already,
-- or its admission has not arrived yet: the client gave up waiting for its answer) leaves a marker
-- until the lease would have expired, so a late admission takes no slot.
local base, lease = ARGV[1], tonumber(ARGV[2])
local released = base .. 'released'
local now = nil
for a = 3, #ARGV, 5 do
  local member, name = ARGV[a], base .. ARGV[a + 1]
  local held, real = ARGV[a + 2], ARGV[a + 3]
  if held ~= '-1' and real ~= '-1' and real ~= held then
    local log = name .. ':log'
    local entry = member .. '|' .. held
    local score = redis.call('ZSCORE', log, entry)
    if score then
      redis.call('ZREM', log, entry)
      redis.call('ZADD', log, score, member .. '|' .. real)
      redis.call('ZINCRBY', log, tonumber(held) - tonumber(real), '_t')
    end
  end
  if ARGV[a + 4] == '1' and redis.call('ZREM', name .. ':conc', member) == 0 then
    now = now or now_ms()
    redis.call('ZADD', released, now + lease, member)
  end
end
if now then
  redis.call('ZREMRANGEBYSCORE', released, '-inf', now)
  keep(released, lease)
end
return 1
"""
)

# (request id, scope, tokens held in the log or -1, real tokens or -1, release the slot 1/0), encoded
Finished = tuple[bytes, bytes, bytes, bytes, bytes]
_ONE, _ZERO, _NONE = bulk(1), bulk(0), bulk(NONE)


class RedisBackend:
    """Admissions are one script call each, on the request path. Finished requests are queued and
    sent in batches by a background task (one script call for everything finished meanwhile), off
    the request path: a slot is free again a round trip after its request ended."""

    def __init__(
        self,
        client: ScriptClient,
        prefix: str,
        on_error: Callable[[BaseException], None] | None = None,
        lease_ms: int = 660_000,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ms = lease_ms
        self._base = bulk(f"{prefix}rl2:")
        self._window = bulk(WINDOW_MS)
        self._scope_args: dict[tuple[str, Rule], bytes] = {}
        self._admit = Script(client, ADMIT_LUA)
        self._finish = Script(client, FINISH_LUA)
        self._batches: BackgroundBatches[Finished] = BackgroundBatches(
            self._send,
            name="ratelimit-finish",
            batch_size=500,  # one script call
            cap=MAX_QUEUED,
            trim="after_failure",  # beyond this the oldest rely on lease expiry
            on_error=on_error,  # leases expire anyway should Redis stay away
        )

    def _encoded(self, scope: Scope) -> bytes:
        """A scope's name and rule as script arguments, encoded (the same for every request of that
        scope: kept)."""
        key = (scope.name, scope.rule)
        encoded = self._scope_args.get(key)
        if encoded is None:
            if len(self._scope_args) >= 10_000:
                self._scope_args.clear()
            rule = scope.rule
            encoded = self._scope_args[key] = b"".join(
                bulk(v) for v in (scope.name, _arg(rule.rpm), _arg(rule.tpm), _arg(rule.max_parallel))
            )
        return encoded

    async def admit(self, member: str, scopes: list[Scope], lease_ms: int) -> Verdict:
        parts = [_ZERO, self._base, bulk(member), self._window, bulk(lease_ms)]
        for scope in scopes:
            parts.append(self._encoded(scope))
            parts.append(bulk(scope.tokens))
        result = await self._admit.encoded(4 + 5 * len(scopes), b"".join(parts))
        if result[0] == 0:
            what = result[2].decode() if isinstance(result[2], bytes) else str(result[2])
            return Verdict(False, scopes[int(result[1]) - 1].name, what, int(result[3]), int(result[4]))
        remaining = [(result[i], result[i + 1], result[i + 2], result[i + 3]) for i in range(1, len(result), 4)]
        return Verdict(True, remaining=remaining)

    def finish_later(self, member: str, scopes: list[Scope], tokens: int | None) -> None:
        finished: list[Finished] = []
        encoded_member = bulk(member)
        for scope in scopes:
            counts_tokens = scope.rule.tpm is not None
            adjust = counts_tokens and tokens is not None and tokens != scope.tokens
            release = scope.rule.max_parallel is not None
            if adjust or release:
                finished.append(
                    (
                        encoded_member,
                        bulk(scope.name),
                        bulk(scope.tokens) if adjust else _NONE,
                        bulk(tokens) if adjust and tokens is not None else _NONE,
                        _ONE if release else _ZERO,
                    )
                )
        self._batches.add(*finished)

    async def finish(self, member: str, scopes: list[Scope], tokens: int | None) -> None:
        """Finish one request now (the batch path is :meth:`finish_later`)."""
        self.finish_later(member, scopes, tokens)
        await self.flush()

    async def flush(self) -> None:
        """Send everything queued; what could not be sent stays queued (finishing twice is harmless)."""
        await self._batches.flush()

    async def _send(self, batch: list[Finished]) -> list[tuple[Finished, BaseException]]:
        head = [_ZERO, self._base, bulk(self.lease_ms)]
        await self._finish.encoded(2 + 5 * len(batch), b"".join(head + [part for item in batch for part in item]))
        return []  # all or nothing: a failure raises

    async def aclose(self) -> None:
        """Stop the background task, then send what is still queued (for two seconds at most)."""
        await self._batches.aclose()


def _arg(value: int | None) -> int:
    return NONE if value is None else value


def _rule(section: Section) -> Rule:
    rule = Rule(
        rpm=section.opt_integer("rpm", minimum=1),
        tpm=section.opt_integer("tpm", minimum=1),
        max_parallel=section.opt_integer("max_parallel", minimum=1),
    )
    section.check_unknown()
    return rule


# ---- the plugin -----------------------------------------------------------------------------


class RateLimitPlugin:
    def __init__(self) -> None:
        self.backend_name = "memory"
        self.redis_url: str | None = None
        self.key_prefix = "llmgateway:"
        self.redis_timeout = 0.5
        self.on_redis_error = "local"
        self.redis_retry_interval = 5.0
        self.lease_ms = 0
        self.headers = True
        self.defaults: dict[str, Rule] = {}
        self.models: dict[str, Rule] = {}
        self.memory = MemoryBackend()
        self.redis: RedisBackend | None = None
        self._client: Any = None
        self._redis_down_until = 0.0
        self.resolver = LimitsResolver()
        self._scopes: dict[tuple[Any, ...], tuple[IdentityLimits, list[tuple[str, Rule]]]] = {}
        self.stats: dict[str, int] = {"redis_errors": 0, "local_fallbacks": 0, "allowed_without_redis": 0}

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        section = config.section("ratelimit")
        self.backend_name, self.redis_url, self.key_prefix = redis_options(section)
        self.redis_timeout = section.number("redis_timeout", 0.5, minimum=0.001)
        self.on_redis_error = section.choice("on_redis_error", ("local", "allow"), "local")
        self.redis_retry_interval = section.number("redis_retry_interval", 5.0, minimum=0)
        lease = section.opt_number("lease_seconds", minimum=1)
        self.lease_ms = int((lease if lease is not None else config.server.request_timeout + 60) * 1000)
        self.headers = section.boolean("headers", True)
        defaults = section.table("defaults")
        self.defaults = {name: _rule(defaults.table(name)) for name in ("key", "user", "team", "model")}
        defaults.check_unknown()
        models = section.table("models")
        for alias in models.data:
            if alias not in config.models:
                raise models.error(alias, f"unknown model alias {alias!r}")
            self.models[alias] = _rule(models.table(alias))
        for alias, group in config.models.items():
            derived = Rule(
                rpm=sum(d.rpm for d in group.deployments if d.rpm) if all(d.rpm for d in group.deployments) else None,
                tpm=sum(d.tpm for d in group.deployments if d.tpm) if all(d.tpm for d in group.deployments) else None,
            )
            self.models[alias] = self.models.get(alias, Rule()).over(derived).over(self.defaults["model"])
        section.check_unknown()

    @hookimpl
    async def llmgateway_startup(self, gateway: Gateway) -> None:
        gateway.state["ratelimit.stats"] = self.stats
        if self.backend_name == "redis" and self.redis_url:
            self._client = ScriptClient(self.redis_url, timeout=self.redis_timeout)
            self.redis = RedisBackend(
                self._client, self.key_prefix, on_error=self._redis_failed, lease_ms=self.lease_ms
            )

    @hookimpl
    async def llmgateway_shutdown(self, gateway: Gateway) -> None:
        await close_redis(self.redis, self._client)
        self._client = None
        self.redis = None

    def scopes(self, ctx: RequestContext, limits: IdentityLimits) -> list[Scope]:
        """The limited scopes this request counts against (none: nothing to check). Their token
        estimate is computed only when there is a scope to count it in."""
        principal = ctx.principal
        # the same identity, model and limits give the same scopes: kept (keyed by the limits' id,
        # checked by identity on the way out)
        cache_key = (principal.kind, principal.key_id, principal.user_id, principal.team_id, ctx.alias, id(limits))
        cached = self._scopes.get(cache_key)
        if cached is not None and cached[0] is limits:
            limited = cached[1]
        else:
            limited = self._limited(ctx, limits)
            if len(self._scopes) >= 10_000:
                self._scopes.clear()
            self._scopes[cache_key] = (limits, limited)
        if not limited:
            return []
        tokens = estimate_prompt_tokens(ctx.body) + (ctx.max_output_tokens() or 0)
        return [Scope(name, rule, tokens) for name, rule in limited]

    def _limited(self, ctx: RequestContext, limits: IdentityLimits) -> list[tuple[str, Rule]]:
        principal = ctx.principal
        candidates: list[tuple[str, Rule]] = []
        if principal.kind == "virtual_key" and principal.key_id:
            candidates.append((f"key:{principal.key_id}", Rule.of(limits.key).over(self.defaults["key"])))
        if principal.user_id:
            candidates.append((f"user:{principal.user_id}", Rule.of(limits.user).over(self.defaults["user"])))
        if principal.team_id:
            candidates.append((f"team:{principal.team_id}", Rule.of(limits.team).over(self.defaults["team"])))
        if ctx.alias:
            candidates.append((f"model:{ctx.alias}", self.models.get(ctx.alias, self.defaults["model"])))
        return [(name, rule) for name, rule in candidates if not rule.empty]

    @hookimpl
    async def llmgateway_check_limits(self, ctx: RequestContext) -> None:
        limits = await self.resolver.get(ctx)
        scopes = self.scopes(ctx, limits)
        if not scopes:
            return
        member = ctx.request_id
        backend, verdict = await self._admit(member, scopes)
        if not verdict.admitted:
            headers = self._limit_headers(scopes, verdict) if self.headers else {}
            wait = max(verdict.wait_ms, 1) / 1000
            what = {"requests": "requests per minute", "tokens": "tokens per minute", "parallel": "concurrent requests"}
            raise RateLimitError(
                f"Rate limit reached for {verdict.scope.split(':', 1)[0]} on {what.get(verdict.what, verdict.what)} "
                f"(limit {verdict.limit}); try again in {math.ceil(wait)}s",
                retry_after=wait,
                headers=headers,
            )
        if self.headers:
            ctx.response_headers.update(self._limit_headers(scopes, verdict))

        released = False

        async def finish(ctx: RequestContext) -> None:
            nonlocal released
            if released:  # finished already (on_finish run twice): release nothing more
                return
            released = True
            usage = ctx.usage
            if not ctx.attempts:
                actual: int | None = 0
            elif usage is not None and (usage.prompt_tokens or usage.completion_tokens):
                actual = usage.total_tokens
            else:
                actual = None
            if backend == "redis" and self.redis is not None:
                self.redis.finish_later(member, scopes, actual)
            elif backend == "local":
                self.memory.finish(member, scopes, actual)

        ctx.on_finish.append(finish)

    async def _admit(self, member: str, scopes: list[Scope]) -> tuple[str, Verdict]:
        redis = self.redis  # shutdown may clear self.redis while this request awaits
        if redis is not None:
            if time.monotonic() >= self._redis_down_until:
                try:
                    return "redis", await redis.admit(member, scopes, self.lease_ms)
                except redis_errors() as exc:
                    self._redis_failed(exc)
                    # the script may have run without its answer reaching us: free the slots it may hold
                    redis.finish_later(member, scopes, None)
            if self.on_redis_error == "allow":
                self.stats["allowed_without_redis"] += 1
                return "none", Verdict(True, remaining=[(NONE, 0, NONE, 0)] * len(scopes))
            self.stats["local_fallbacks"] += 1
        return "local", self.memory.admit(member, scopes, self.lease_ms)

    def _redis_failed(self, exc: BaseException) -> None:
        self.stats["redis_errors"] += 1
        now = time.monotonic()
        if now >= self._redis_down_until:
            log.warning(
                "rate limiting: Redis failed (%s); using %s limits for %.0fs",
                type(exc).__name__,
                "local" if self.on_redis_error == "local" else "no",
                self.redis_retry_interval,
            )
        self._redis_down_until = now + self.redis_retry_interval

    @staticmethod
    def _limit_headers(scopes: list[Scope], verdict: Verdict) -> dict[str, str]:
        headers: dict[str, str] = {}
        if not verdict.admitted:
            limit = verdict.limit
            if verdict.what in ("requests", "tokens"):
                headers[f"x-ratelimit-limit-{verdict.what}"] = str(limit)
                headers[f"x-ratelimit-remaining-{verdict.what}"] = "0"
                headers[f"x-ratelimit-reset-{verdict.what}"] = format_reset(verdict.wait_ms)
            return headers
        best_req: tuple[int, int, int] | None = None  # (remaining, limit, reset)
        best_tok: tuple[int, int, int] | None = None
        for scope, (rem_req, reset_req, rem_tok, reset_tok) in zip(scopes, verdict.remaining, strict=True):
            if scope.rule.rpm is not None and rem_req != NONE and (best_req is None or rem_req < best_req[0]):
                best_req = (max(rem_req, 0), scope.rule.rpm, reset_req)
            if scope.rule.tpm is not None and rem_tok != NONE and (best_tok is None or rem_tok < best_tok[0]):
                best_tok = (max(rem_tok, 0), scope.rule.tpm, reset_tok)
        for what, best in (("requests", best_req), ("tokens", best_tok)):
            if best is not None:
                headers[f"x-ratelimit-limit-{what}"] = str(best[1])
                headers[f"x-ratelimit-remaining-{what}"] = str(best[0])
                headers[f"x-ratelimit-reset-{what}"] = format_reset(best[2])
        return headers
