"""Plugin ``budgets``: spend limits per virtual key, user and team, per period (``[budgets]``).

Budgets come from the rows (``budget_usd`` and ``budget_period``: daily, weekly, monthly — UTC
calendar periods, weeks starting Monday — or total), else from ``[budgets.defaults.key|user|team]``.

Before the provider is called, the request's *maximum* cost is reserved in every budget that applies:
prompt estimate * input price + max output tokens * output price, for the most expensive deployment
it may reach (routed candidates and fallbacks; a deployment without prices reserves 0; max output
tokens from the request, else the deployment's ``max_output_tokens``, else
``default_max_output_tokens``). The reservation is all-or-nothing and atomic (a Lua script in Redis,
or one synchronous step in process memory); if it would take any budget past its limit the request
is refused — 429 ``insufficient_quota`` — so concurrent requests can never overspend. When the
request ends (``ctx.on_finish``: success, error or disconnect) the reservation is replaced by the
real cost (``ctx.cost``).

If Redis fails (``redis_timeout`` seconds to connect or answer, default 1), ``on_redis_error``
decides: ``refuse`` (default: budgeted requests get a 429 ``budget_unavailable`` until Redis answers
again — overspending is impossible), ``local`` (each process keeps its own counters, started from the
usage rows: replicas may then together overspend), ``allow``. Redis is retried after
``redis_retry_interval`` seconds. Never a 5xx. A reservation whose answer never came (Redis may have
made it) is released in the background; a settlement that fails is queued and retried in the
background until Redis takes it (settling is idempotent per request: a retry counts once).

Spend is counted in integer nano-dollars. It survives restarts: Redis keeps it (one hash per budget
and period); the memory backend — and Redis when a period's counter is missing — starts from the sum
of the period's usage rows. When those cannot be read (the database is down or slow), the counter is
not started: the request is treated as with Redis unavailable (``allow`` admits it, ``refuse`` and
``local`` refuse it with ``budget_unavailable``) and a later request tries again. Reservations in
Redis are leases: a replica that dies holding one frees it after ``lease_seconds``. The memory
backend forgets a period's counters once the period is over.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from llmgateway.core.config import GatewayConfig, Section
from llmgateway.core.errors import BudgetExceededError, GatewayError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.provider import estimate_prompt_tokens
from llmgateway.core.types import Deployment, ModelGroup, RequestContext

from .limits import IdentityLimits, Limits, LimitsResolver, orm_ready
from .redis_util import BackgroundBatches, Script, ScriptClient, close_redis, redis_errors, redis_options, transient

if TYPE_CHECKING:
    from llmgateway.core.app import Gateway

log = logging.getLogger("llmgateway.security.budgets")

PERIODS = ("daily", "weekly", "monthly", "total")
NANO = 1_000_000_000
MAX_QUEUED = 100_000  # settlements waiting for Redis (beyond this the oldest are dropped, and logged)
MIN_SETTLED_MS = 600_000  # a settled request is remembered at least this long (a retry counts once)


def to_nano(usd: float) -> int:
    """USD as integer nano-dollars; float noise (0.01 → 10000000.000000002) does not round up."""
    value = usd * NANO
    nearest = round(value)
    return int(nearest) if abs(value - nearest) < 1e-3 else math.ceil(value)


def period_bounds(period: str, now: datetime) -> tuple[str, datetime | None, datetime | None]:
    """(id, start, end) of the period containing ``now`` (UTC); total has neither start nor end."""
    if period == "daily":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return f"d{start:%Y%m%d}", start, start + timedelta(days=1)
    if period == "weekly":
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - timedelta(days=day.weekday())
        return f"w{start:%Y%m%d}", start, start + timedelta(days=7)
    if period == "monthly":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return f"m{start:%Y%m}", start, end
    return "total", None, None


@dataclass(frozen=True, slots=True)
class Budget:
    level: str  # "key" | "user" | "team"
    ident: str
    limit: int  # nano-dollars
    period: str
    period_id: str
    start: datetime | None
    end: datetime | None

    @property
    def name(self) -> str:
        return f"{self.level}:{self.ident}:{self.period_id}"


Settlement = tuple[list[Budget], str, int]  # (its budgets, the request, its cost: 0 releases a reservation)


def reservation_for(ctx: RequestContext, deployments: list[Deployment], default_max_output: int) -> int:
    """The most a request may cost, in nano-dollars, over the deployments it may reach."""
    prompt = estimate_prompt_tokens(ctx.body)
    requested = ctx.max_output_tokens()
    worst = 0
    for d in deployments:
        if d.input_price is None and d.output_price is None:
            continue
        output = requested or d.max_output_tokens or default_max_output
        # prices are USD per million tokens: one token at price p costs p * 1000 nano-dollars
        cost = prompt * (d.input_price or 0.0) * 1000 + output * (d.output_price or 0.0) * 1000
        worst = max(worst, to_nano(cost / NANO))
    return worst


# ---- the memory backend ---------------------------------------------------------------------


class MemoryBudgets:
    """Counters per budget and period, in this process. A period's counters are dropped once it is over."""

    def __init__(self) -> None:
        self.counters: dict[str, list[int]] = {}  # budget name -> [spent, reserved]
        self._ends: list[tuple[float, str]] = []  # heap of (period end, budget name)

    def _prune(self) -> None:
        ends, now = self._ends, time.time()
        while ends and ends[0][0] <= now:
            self.counters.pop(heapq.heappop(ends)[1], None)

    def _counter(self, budget: Budget, spent: int = 0) -> list[int]:
        counter = self.counters.get(budget.name)
        if counter is None:
            counter = self.counters[budget.name] = [spent, 0]
            if budget.end is not None:
                heapq.heappush(self._ends, (budget.end.timestamp(), budget.name))
        return counter

    def has(self, budget: Budget) -> bool:
        return budget.name in self.counters

    def seed(self, budget: Budget, spent: int) -> None:
        self._prune()
        self._counter(budget, spent)

    def reserve(self, budgets: list[Budget], amount: int) -> tuple[Budget, int] | None:
        """Reserve ``amount`` in every budget, or return (the budget that has no room, its use)."""
        self._prune()
        counters = [self._counter(budget) for budget in budgets]
        for budget, (spent, reserved) in zip(budgets, counters, strict=True):
            if spent + reserved + amount > budget.limit:
                return budget, spent
        for counter in counters:
            counter[1] += amount
        return None

    def extend(self, budgets: list[Budget], step: int) -> tuple[int, int]:
        """Add up to ``step`` to a reservation in every budget, as much as all of them have room for:
        (what was added, the index of the tightest budget)."""
        room, tightest = step, 0
        counters = []
        for index, budget in enumerate(budgets):
            counter = self.counters.get(budget.name)
            if counter is None:  # its period is over (a stream across midnight): it bounds nothing now
                continue
            counters.append(counter)
            free = budget.limit - counter[0] - counter[1]
            if free < room:
                room, tightest = free, index
        if room <= 0:
            return 0, tightest
        for counter in counters:
            counter[1] += room
        return room, tightest

    def settle(self, budgets: list[Budget], amount: int, cost: int) -> None:
        for budget in budgets:
            counter = self.counters.get(budget.name)
            if counter is None:  # its period is over (and forgotten)
                continue
            counter[1] = max(0, counter[1] - amount)
            counter[0] += cost

    def spent(self, budget: Budget) -> int:
        return self.counters.get(budget.name, [0, 0])[0]


# ---- the Redis backend ----------------------------------------------------------------------

# A budget is a hash (spent, reserved, seeded, and r:<request> = its reservation, or "-" once settled)
# and a sorted set of requests by expiry: a reservation's lease, then how long its settlement is
# remembered (so a retried settlement counts once, and a reservation arriving after its own release
# reserves nothing).

RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, amount, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS / 2
for i = 1, n do
  local h, leases = KEYS[2*i-1], KEYS[2*i]
  if redis.call('HEXISTS', h, 'seeded') == 0 then return {-1, i, 0} end
  -- released already (this call's client gave up waiting): reserve nothing
  if redis.call('HGET', h, 'r:' .. member) == '-' then return {1, 0, 0} end
  while true do
    local old = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 500)
    if #old == 0 then break end
    for j = 1, #old do
      local f = 'r:' .. old[j]
      local held = redis.call('HGET', h, f)
      if held and held ~= '0' and held ~= '-' then redis.call('HINCRBY', h, 'reserved', '-' .. held) end
      redis.call('HDEL', h, f)
    end
    redis.call('ZREM', leases, unpack(old))
  end
  local spent = tonumber(redis.call('HGET', h, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', h, 'reserved') or '0')
  if spent + reserved + amount > tonumber(ARGV[3 + i]) then return {0, i, spent} end
end
for i = 1, n do
  local h, leases = KEYS[2*i-1], KEYS[2*i]
  redis.call('HINCRBY', h, 'reserved', ARGV[2])
  redis.call('HSET', h, 'r:' .. member, ARGV[2])
  redis.call('ZADD', leases, now + lease, member)
end
return {1, 0, 0}
"""

SETTLE_LUA = """
-- amounts stay strings: Lua would print large numbers as 1e+14 and zero negated as -0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, cost, keep = ARGV[1], ARGV[2], tonumber(ARGV[3])
local f = 'r:' .. member
local n = #KEYS / 2
for i = 1, n do
  local h, leases = KEYS[2*i-1], KEYS[2*i]
  -- not seeded: nothing was reserved here, and the usage rows will count the cost
  if redis.call('HEXISTS', h, 'seeded') == 1 then
    local held = redis.call('HGET', h, f)
    if held ~= '-' then  -- '-': settled already, this is a retry
      if held and held ~= '0' then redis.call('HINCRBY', h, 'reserved', '-' .. held) end
      if cost ~= '0' then redis.call('HINCRBY', h, 'spent', cost) end
      redis.call('HSET', h, f, '-')
      redis.call('ZADD', leases, now + keep, member)
    end
  end
end
return 1
"""

EXTEND_LUA = """
-- a stream outgrowing its reservation: add up to ARGV[2] to it, as much as every budget has room for,
-- and renew its lease (ARGV[3] ms: a long stream outlives the first one). Nothing once the request is
-- settled. A reservation whose lease expired (purged by another request) is taken up again from what
-- is added. Returns {added, tightest budget}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, room, lease, tightest = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), 1
local f = 'r:' .. member
local n = #KEYS / 2
for i = 1, n do
  local h = KEYS[2*i-1]
  if redis.call('HGET', h, f) == '-' then return {0, i} end
  local spent = tonumber(redis.call('HGET', h, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', h, 'reserved') or '0')
  local free = tonumber(ARGV[3 + i]) - spent - reserved
  if free < room then room, tightest = free, i end
end
for i = 1, n do redis.call('ZADD', KEYS[2*i], now + lease, member) end
if room <= 0 then return {0, tightest} end
local add = string.format('%d', room)
for i = 1, n do
  local h = KEYS[2*i-1]
  redis.call('HINCRBY', h, 'reserved', add)
  redis.call('HINCRBY', h, f, add)
end
return {room, tightest}
"""

SEED_LUA = """
if redis.call('HSETNX', KEYS[1], 'seeded', 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'spent', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'reserved', 0)
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""


class RedisBudgets:
    """Reservations and settlements are one script call each, on the request path. A settlement that
    fails (or a release of a reservation whose answer never came) is queued and retried by a
    background task until Redis takes it; settling is idempotent per request."""

    def __init__(
        self,
        client: ScriptClient,
        prefix: str,
        *,
        lease_ms: int,
        on_error: Callable[[BaseException], None] | None = None,
        stats: dict[str, int] | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.settled_ms = max(lease_ms, MIN_SETTLED_MS)
        self._reserve = Script(client, RESERVE_LUA)
        self._settle = Script(client, SETTLE_LUA)
        self._seed = Script(client, SEED_LUA)
        self._extend = Script(client, EXTEND_LUA)
        self._batches: BackgroundBatches[Settlement] = BackgroundBatches(
            self._send,
            name="budgets-settle",
            batch_size=500,  # pipelined
            cap=MAX_QUEUED,
            trim="on_add",
            on_error=on_error,
            on_drop=self._dropped,
            on_change=self._count,
            on_unsent=self._unsent,
        )
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("settles_queued", 0)
        self.stats.setdefault("settles_pending", 0)
        self.stats.setdefault("settles_dropped", 0)

    def _keys(self, budget: Budget) -> list[str]:
        base = f"{self.prefix}budget:{budget.name}"
        return [base, f"{base}:leases"]

    async def reserve(self, budgets: list[Budget], member: str, amount: int, lease_ms: int) -> tuple[int, int, int]:
        keys: list[str] = []
        for budget in budgets:
            keys += self._keys(budget)
        result = await self._reserve(keys=keys, args=[member, amount, lease_ms, *[b.limit for b in budgets]])
        return int(result[0]), int(result[1]), int(result[2])

    async def extend(self, budgets: list[Budget], member: str, step: int, lease_ms: int) -> tuple[int, int]:
        """Grow the request's reservation by up to ``step`` and renew its lease: (what was added, the
        tightest budget's index)."""
        keys: list[str] = []
        for budget in budgets:
            keys += self._keys(budget)
        result = await self._extend(keys=keys, args=[member, step, lease_ms, *[b.limit for b in budgets]])
        return int(result[0]), int(result[1]) - 1

    async def seed(self, budget: Budget, spent: int) -> None:
        ttl = 0
        if budget.end is not None:
            ttl = int((budget.end - datetime.now(UTC)).total_seconds()) + 7 * 86400
        await self._seed(keys=self._keys(budget), args=[spent, max(ttl, 0)])

    async def settle(self, budgets: list[Budget], member: str, cost: int) -> None:
        """Replace the request's reservation by its cost (once: settling again changes nothing)."""
        keys: list[str] = []
        for budget in budgets:
            keys += self._keys(budget)
        await self._settle(keys=keys, args=[member, cost, self.settled_ms])

    def settle_later(self, budgets: list[Budget], member: str, cost: int) -> None:
        """Settle in the background, retrying until Redis takes it (cost 0: a release)."""
        self.stats["settles_queued"] += 1
        self._batches.add((budgets, member, cost))

    def _dropped(self, count: int) -> None:
        self.stats["settles_dropped"] += count
        log.warning("budgets: %d settlements wait for Redis; dropping the oldest", MAX_QUEUED)

    def _unsent(self, count: int) -> None:
        log.warning("budgets: %d settlements could not reach Redis before shutdown", count)

    def _count(self) -> None:
        self.stats["settles_pending"] = self._batches.pending

    async def _send(self, batch: list[Settlement]) -> list[tuple[Settlement, BaseException]]:
        """Settle a batch (pipelined); returns what failed for a passing reason (the rest is dropped, and logged)."""
        results = await asyncio.gather(*[self.settle(*item) for item in batch], return_exceptions=True)
        again: list[tuple[Settlement, BaseException]] = []
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                if transient(result):
                    again.append((item, result))
                else:
                    self.stats["settles_dropped"] += 1
                    log.warning("budgets: Redis refused a settlement: %s", type(result).__name__)
        return again

    async def flush(self) -> None:
        """Send what is queued (500 at a time, pipelined); what failed for a passing reason stays queued."""
        await self._batches.flush()

    async def aclose(self) -> None:
        """Stop the background task, then send what is still queued (for two seconds at most)."""
        await self._batches.aclose()


class Unseeded(Exception):
    """A period's past spend could not be read (the database is down or slow): its counter must not start."""


async def spent_from_usage(budget: Budget) -> int:
    """The period's spend so far according to the usage rows (0 without a database)."""
    if not orm_ready():
        return 0
    from tortoise.functions import Sum

    from llmgateway.plugins.storage.models import UsageRecord

    filters: dict[str, Any] = {f"{budget.level}_id": budget.ident}
    if budget.start is not None:
        filters["created_at__gte"] = budget.start
    rows = await UsageRecord.filter(**filters).annotate(total=Sum("cost")).values("total")
    total = rows[0]["total"] if rows else None
    return to_nano(float(total)) if total is not None else 0


def _default(section: Section) -> tuple[float | None, str]:
    usd = section.opt_number("usd", minimum=0)
    period = section.choice("period", PERIODS, "monthly")
    section.check_unknown()
    return usd, period


# ---- stopping a stream when its budget runs out ([budgets] stop_streams) ---------------------

# the text a frame carries, found without parsing it: OpenAI chunks (content, tool arguments, text
# completions) and Anthropic events (text, partial_json, thinking)
_TEXT = re.compile(rb'"(?:content|text|arguments|partial_json|thinking)"\s*:\s*"((?:[^"\\]|\\.)*)"')


class StreamGuard:
    """A stream watcher (``ctx.stream_watchers``) that estimates a stream's spend as its frames go
    out and stops it once the budget is spent.

    Output tokens are estimated without parsing a frame: the larger of the number of frames (about
    one token each for OpenAI-style streams) and the streamed text's length / 4 (one regex over the
    bytes). While the estimate stays within the request's reservation nothing else happens. Beyond
    it the reservation is grown, atomically in every budget, by as much as they all have room for
    (up to another reservation's worth at a time): synchronously in process memory; in Redis by a
    background call started when half a step is left, so the stream never waits for Redis. When no
    budget room is left, the watcher returns a 429 ``insufficient_quota`` / ``budget_exceeded`` that
    ends the stream. The request is then settled at its real (estimated) cost like any other.
    """

    __slots__ = (
        "_extending",
        "backend",
        "budgets",
        "ctx",
        "exhausted",
        "frames",
        "held",
        "member",
        "per_token",
        "plugin",
        "prompt_cost",
        "spent",
        "step",
        "stopped",
        "text",
        "tightest",
        "unavailable",
    )

    def __init__(
        self, plugin: BudgetsPlugin, ctx: RequestContext, budgets: list[Budget], member: str, held: int, backend: str
    ) -> None:
        self.plugin = plugin
        self.ctx = ctx
        self.budgets = budgets
        self.member = member
        self.backend = backend
        self.held = held  # nano-dollars reserved for this request now
        self.step = held
        self.per_token = -1  # nano-dollars per output token; -1 until the serving deployment is known
        self.prompt_cost = 0
        self.spent = 0  # the estimate after the last frame
        self.frames = 0
        self.text = 0
        self.exhausted = False
        self.stopped = False
        self.tightest = 0
        self.unavailable = False  # the last extension failed on Redis (on_redis_error = "refuse")
        self._extending: asyncio.Task[None] | None = None

    def _prices(self) -> None:
        deployment = self.ctx.deployment
        if deployment is None or (deployment.input_price is None and deployment.output_price is None):
            self.per_token = 0
            return
        # prices are USD per million tokens: one token at price p costs p * 1000 nano-dollars
        self.per_token = math.ceil((deployment.output_price or 0.0) * 1000)
        self.prompt_cost = math.ceil(estimate_prompt_tokens(self.ctx.body) * (deployment.input_price or 0.0) * 1000)
        self.spent = self.prompt_cost
        self.step = max(self.held, self.per_token * 256, 1)

    def __call__(self, chunk: bytes) -> GatewayError | None:
        if self.per_token <= 0:
            if self.per_token == 0:
                return None
            self._prices()
            if self.per_token == 0:
                return None
        self.frames += chunk.count(b"\n\n")
        for text in _TEXT.findall(chunk):
            self.text += len(text)
        spend = self.prompt_cost + max(self.frames, (self.text + 3) // 4) * self.per_token
        # stop a frame early rather than late: the frame refused is billed too (upstream made it)
        spend, self.spent = spend + (spend - self.spent), spend
        if self.backend == "local":
            while spend > self.held:
                added, self.tightest = self.plugin.memory.extend(self.budgets, self.step)
                if not added:
                    return self._stop()
                self.held += added
            return None
        # Redis: grow ahead of need, in the background (after a Redis failure, once it may answer again)
        if (
            spend + self.step // 2 > self.held
            and self._extending is None
            and not self.exhausted
            and time.monotonic() >= self.plugin._redis_down_until
        ):
            self._extending = asyncio.get_running_loop().create_task(self._extend(), name="budgets-extend")
        if spend > self.held and (self.exhausted or self.unavailable):
            return self._stop()
        return None

    async def _extend(self) -> None:
        redis = self.plugin.redis
        try:
            if redis is None:
                raise ConnectionError("the Redis client is closed")
            added, self.tightest = await redis.extend(self.budgets, self.member, self.step, self.plugin.lease_ms)
        except redis_errors() as exc:
            self.plugin._redis_failed(exc)
            if self.plugin.on_redis_error == "refuse":
                self.unavailable = True  # stopped (budget_unavailable) only if it outgrows what it holds
            else:  # allow / local: Redis cannot say; the stream goes on unwatched rather than cut falsely
                self.plugin.stats["allowed_without_redis"] += 1
                self.backend = "none"
                self.per_token = 0
            return
        finally:
            self._extending = None
        self.unavailable = False
        if added:
            self.held += added
        elif self.per_token:
            self.exhausted = True

    def _stop(self) -> GatewayError:
        budget = self.budgets[min(self.tightest, len(self.budgets) - 1)]
        self.plugin.stats["streams_stopped"] += 1
        self.stopped = True
        self.per_token = 0  # one error ends the stream; nothing more to watch
        if self.unavailable and not self.exhausted:
            return BudgetExceededError(
                "Budgets cannot be checked right now and this stream outgrew its reservation; the answer was cut short",
                code="budget_unavailable",
            )
        per = {"daily": "per day", "weekly": "per week", "monthly": "per month"}.get(budget.period, "in total")
        return BudgetExceededError(
            f"Budget exhausted for this {budget.level} during the stream (${budget.limit / NANO:,.2f} {per}); "
            "the answer was cut short"
        )


# ---- the plugin -----------------------------------------------------------------------------


class BudgetsPlugin:
    def __init__(self) -> None:
        self.backend_name = "memory"
        self.redis_url: str | None = None
        self.key_prefix = "llmgateway:"
        self.redis_timeout = 1.0
        self.on_redis_error = "refuse"
        self.redis_retry_interval = 5.0
        self.default_max_output_tokens = 4096
        self.seed_from_usage = True
        self.stop_streams = False
        self.lease_ms = 0
        self.defaults: dict[str, tuple[float | None, str]] = {}
        self.memory = MemoryBudgets()
        self.redis: RedisBudgets | None = None
        self._client: Any = None
        self._redis_down_until = 0.0
        self._reading: dict[str, asyncio.Task[int]] = {}  # budget name -> the one read of its past spend
        self.seed_timeout = 5.0
        self.resolver = LimitsResolver()
        self._models: dict[str, ModelGroup] = {}
        self.stats: dict[str, int] = {
            "redis_errors": 0,
            "local_fallbacks": 0,
            "allowed_without_redis": 0,
            "refused_without_redis": 0,
            "refused": 0,
            "seed_errors": 0,
            "settles_queued": 0,
            "settles_pending": 0,
            "settles_dropped": 0,
            "streams_stopped": 0,
        }

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        section = config.section("budgets")
        self.backend_name, self.redis_url, self.key_prefix = redis_options(section)
        self.redis_timeout = section.number("redis_timeout", 1.0, minimum=0.001)
        self.on_redis_error = section.choice("on_redis_error", ("refuse", "local", "allow"), "refuse")
        self.redis_retry_interval = section.number("redis_retry_interval", 5.0, minimum=0)
        self.default_max_output_tokens = section.integer("default_max_output_tokens", 4096, minimum=1)
        self.seed_from_usage = section.boolean("seed_from_usage", True)
        self.stop_streams = section.boolean("stop_streams", False)
        lease = section.opt_number("lease_seconds", minimum=1)
        self.lease_ms = int((lease if lease is not None else config.server.request_timeout + 60) * 1000)
        defaults = section.table("defaults")
        self.defaults = {level: _default(defaults.table(level)) for level in ("key", "user", "team")}
        defaults.check_unknown()
        section.check_unknown()

    @hookimpl
    async def llmgateway_startup(self, gateway: Gateway) -> None:
        gateway.state["budgets.stats"] = self.stats
        self._models = gateway.models
        storage = gateway.state.get("storage")
        timeout = getattr(getattr(storage, "db", None), "timeout", None)
        if isinstance(timeout, (int, float)):
            self.seed_timeout = float(timeout)  # reading past spend waits as long as [database] timeout
        if self.backend_name == "redis" and self.redis_url:
            self._client = ScriptClient(self.redis_url, timeout=self.redis_timeout)
            self.redis = RedisBudgets(
                self._client, self.key_prefix, lease_ms=self.lease_ms, on_error=self._redis_failed, stats=self.stats
            )

    @hookimpl
    async def llmgateway_shutdown(self, gateway: Gateway) -> None:
        await close_redis(self.redis, self._client)
        self._client = None
        self.redis = None

    def budgets(self, ctx: RequestContext, limits: IdentityLimits) -> list[Budget]:
        principal = ctx.principal
        if not (principal.user_id or principal.team_id or principal.kind == "virtual_key"):
            return []  # no key, user or team to hold a budget
        now = datetime.now(UTC)
        levels: list[tuple[str, str | None, Limits | None]] = [
            ("key", principal.key_id if principal.kind == "virtual_key" else None, limits.key),
            ("user", principal.user_id, limits.user),
            ("team", principal.team_id, limits.team),
        ]
        out: list[Budget] = []
        for level, ident, row in levels:
            if not ident:
                continue
            usd, period = (row.budget_usd, row.budget_period) if row is not None else (None, "monthly")
            if usd is None:
                usd, period = self.defaults[level]
            if usd is None:
                continue
            if period not in PERIODS:
                period = "monthly"
            period_id, start, end = period_bounds(period, now)
            out.append(Budget(level, ident, to_nano(usd), period, period_id, start, end))
        return out

    @hookimpl
    async def llmgateway_check_limits(self, ctx: RequestContext) -> None:
        budgets = self.budgets(ctx, await self.resolver.get(ctx))
        if not budgets:
            return
        deployments = list(ctx.candidates)
        group = ctx.model_group
        if group is not None:
            for name in group.fallbacks:  # fallback aliases may be reached too: their prices count
                other = self._models.get(name)
                if other is not None:
                    deployments += other.deployments
        amount = reservation_for(ctx, deployments, self.default_max_output_tokens)
        member = ctx.request_id
        backend = await self._reserve(budgets, member, amount)
        guard: StreamGuard | None = None
        if self.stop_streams and ctx.stream and backend != "none":
            guard = StreamGuard(self, ctx, budgets, member, amount, backend)
            ctx.stream_watchers.append(guard)

        async def settle(ctx: RequestContext) -> None:
            cost = to_nano(ctx.cost) if ctx.cost and ctx.attempts else 0
            if guard is not None and guard.stopped:
                # a provider may learn its usage only after the request is accounted: never less than
                # the estimate of what was streamed (the frame refused included: upstream made it)
                cost = max(cost, guard.spent)
            redis = self.redis
            if backend == "redis" and redis is not None:
                try:
                    await redis.settle(budgets, member, cost)
                except redis_errors() as exc:
                    self._redis_failed(exc)
                    redis.settle_later(budgets, member, cost)  # Redis may have taken it: settling twice counts once
            elif backend == "local":
                self.memory.settle(budgets, guard.held if guard is not None else amount, cost)

        ctx.on_finish.append(settle)

    async def _reserve(self, budgets: list[Budget], member: str, amount: int) -> str:
        redis = self.redis
        if redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                for _ in range(len(budgets) + 1):
                    status, index, spent = await redis.reserve(budgets, member, amount, self.lease_ms)
                    if status == 1:
                        return "redis"
                    budget = budgets[index - 1]
                    if status == 0:
                        self._refuse(budget, spent, amount)
                    await redis.seed(budget, await self._spent_from_usage(budget))  # status -1: a new period
                self._redis_failed(RuntimeError("budget counters vanished while being initialised"))
            except redis_errors() as exc:
                self._redis_failed(exc)
                # the script may have run without its answer reaching us: release what it may hold
                redis.settle_later(budgets, member, 0)
            except Unseeded:
                return self._unavailable(seeding=True)
        if redis is not None:
            if self.on_redis_error != "local":
                return self._unavailable(seeding=False)
            self.stats["local_fallbacks"] += 1
        try:
            for budget in budgets:
                if not self.memory.has(budget):
                    self.memory.seed(budget, await self._spent_from_usage(budget))
        except Unseeded:
            return self._unavailable(seeding=True)
        refused = self.memory.reserve(budgets, amount)
        if refused is not None:
            self._refuse(refused[0], refused[1], amount)
        return "local"

    def _unavailable(self, *, seeding: bool) -> str:
        """No budget store can decide (Redis unavailable, or past spend unreadable): allow or refuse."""
        if self.on_redis_error == "allow":
            self.stats["allowed_without_redis"] += 1
            return "none"
        self.stats["refused_without_redis"] += 1
        raise BudgetExceededError(
            "Budgets cannot be checked right now; try again shortly",
            code="budget_unavailable",
            retry_after=1.0 if seeding else max(1.0, self.redis_retry_interval),
        )

    async def _spent_from_usage(self, budget: Budget) -> int:
        """The period's past spend; concurrent requests share one read. Raises :class:`Unseeded`."""
        if not self.seed_from_usage:
            return 0
        reading = self._reading.get(budget.name)
        if reading is None:
            reading = self._reading[budget.name] = asyncio.create_task(self._read_spent(budget))
            reading.add_done_callback(lambda task: self._read_done(budget.name, task))
        return await asyncio.shield(reading)

    def _read_done(self, name: str, task: asyncio.Task[int]) -> None:
        if self._reading.get(name) is task:
            del self._reading[name]
        if not task.cancelled():
            task.exception()  # retrieved here: its waiters may all have gone

    async def _read_spent(self, budget: Budget) -> int:
        try:
            async with asyncio.timeout(self.seed_timeout):
                return await spent_from_usage(budget)
        except Exception as exc:
            self.stats["seed_errors"] += 1
            log.warning("could not read past spend for %s: %s; not counting it yet", budget.name, type(exc).__name__)
            raise Unseeded(budget.name) from exc

    def _refuse(self, budget: Budget, spent: int, amount: int) -> None:
        self.stats["refused"] += 1
        limit_usd = budget.limit / NANO
        per = {"daily": "per day", "weekly": "per week", "monthly": "per month"}.get(budget.period, "in total")
        retry_after: float | None = None
        if spent + amount <= budget.limit:
            retry_after = 1.0  # only in-flight reservations are in the way
        elif budget.end is not None:
            retry_after = max(1.0, (budget.end - datetime.now(UTC)).total_seconds())
        raise BudgetExceededError(
            f"Budget exceeded for this {budget.level} (${limit_usd:,.2f} {per}; "
            f"${spent / NANO:,.4f} spent, this request may cost up to ${amount / NANO:,.4f})",
            retry_after=retry_after,
        )

    def _redis_failed(self, exc: BaseException) -> None:
        self.stats["redis_errors"] += 1
        now = time.monotonic()
        if now >= self._redis_down_until:
            then = {
                "local": "this process's own budgets",
                "allow": "no budgets",
                "refuse": "refusing budgeted requests",
            }
            log.warning(
                "budgets: Redis failed (%s); %s for %.0fs",
                type(exc).__name__,
                then[self.on_redis_error],
                self.redis_retry_interval,
            )
        self._redis_down_until = now + self.redis_retry_interval
