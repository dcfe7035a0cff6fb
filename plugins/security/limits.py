"""What an identity may use: rate limits and budgets from the Team / User / ApiKey rows.

The ``keys`` plugin already loads the rows while authenticating a virtual key and leaves an
:class:`IdentityLimits` in ``ctx.state[STATE_KEY]``; for other principals (JWT users, teams)
:class:`LimitsResolver` reads the rows itself, through the ORM, with a short cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from llmgateway.core.types import Principal, RequestContext

log = logging.getLogger("llmgateway.security")

STATE_KEY = "security.limits"


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_usd: float | None = None
    budget_period: str = "monthly"

    @classmethod
    def of(cls, row: Any) -> Limits:
        budget = row.budget_usd
        return cls(
            rpm=row.rpm,
            tpm=row.tpm,
            max_parallel=row.max_parallel,
            budget_usd=float(budget) if isinstance(budget, (int, float, Decimal)) else None,
            budget_period=row.budget_period or "monthly",
        )


@dataclass(frozen=True, slots=True)
class IdentityLimits:
    key: Limits | None = None
    user: Limits | None = None
    team: Limits | None = None


NONE = IdentityLimits()


def orm_ready() -> bool:
    """Whether the storage plugin has initialised the ORM (the models are usable)."""
    from tortoise import Tortoise

    return bool(Tortoise.is_inited())


class LimitsResolver:
    """Limits of a principal's user and team rows (cached ``ttl`` seconds)."""

    def __init__(self, ttl: float = 10.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[tuple[str | None, str | None], tuple[float, IdentityLimits]] = {}

    async def get(self, ctx: RequestContext) -> IdentityLimits:
        found = ctx.state.get(STATE_KEY)
        if isinstance(found, IdentityLimits):
            return found
        principal = ctx.principal
        if not (principal.user_id or principal.team_id):
            return NONE
        cache_key = (principal.user_id, principal.team_id)
        now = time.monotonic()
        hit = self._cache.get(cache_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        limits = await self._load(principal)
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[cache_key] = (now + self.ttl, limits)
        return limits

    async def _load(self, principal: Principal) -> IdentityLimits:
        if not orm_ready():
            return NONE
        from llmgateway.plugins.storage.models import Team, User

        try:
            user = await User.get_or_none(id=principal.user_id) if principal.user_id else None
            team = await Team.get_or_none(id=principal.team_id) if principal.team_id else None
        except Exception as exc:  # the database being down must not fail the request here
            log.warning("could not read limits for %s: %s", principal.tenant, type(exc).__name__)
            return NONE
        return IdentityLimits(
            user=Limits.of(user) if user is not None else None,
            team=Limits.of(team) if team is not None else None,
        )
