"""The admin API for virtual keys, and the operations it shares with ``llmgateway keys``.

==========================================  ==============  ==========================================
route                                       permission      what
==========================================  ==============  ==========================================
``GET /admin/api/keys``                     admin:read      list (``limit``, ``offset``, ``revoked``)
``POST /admin/api/keys``                    keys:write      create; the answer holds the key, once
``GET /admin/api/keys/{key_id}``            admin:read      one key
``DELETE /admin/api/keys/{key_id}``         keys:write      revoke (the row stays, for the audit)
==========================================  ==============  ==========================================

A create body may only hold the fields in :data:`FIELDS` (anything else is a 400 naming it), and the
caller may only grant roles at or below its own (an operator cannot create an admin key: 403), nor
revoke a key that holds a role above its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from llmgateway.core.errors import (
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from llmgateway.core.types import ROLES, Principal

from .keys import generate_key, new_key_id
from .limits import orm_ready

if TYPE_CHECKING:
    from llmgateway.core.app import GatewayRoute

    from .keys import KeysPlugin

BUDGET_PERIODS = ("daily", "weekly", "monthly", "total")
FIELDS = frozenset(
    {
        "name",
        "user_id",
        "team_id",
        "roles",
        "allowed_models",
        "metadata",
        "expires_at",
        "expires_in",
        "rpm",
        "tpm",
        "max_parallel",
        "budget_usd",
        "budget_period",
    }
)
_RANK = {"viewer": 1, "operator": 2, "admin": 3}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_METADATA_BYTES = 8192
MAX_BODY_BYTES = 64 * 1024


def grantable(principal: Principal) -> frozenset[str]:
    """Roles ``principal`` may give a key: ``user`` and any staff role up to its own."""
    top = max((_RANK.get(r, 0) for r in principal.roles), default=0)
    return frozenset({"user"} | {r for r, rank in _RANK.items() if rank <= top and top > 0})


def parse_duration(value: Any, param: str) -> timedelta:
    """Seconds as an integer, or ``90s``, ``15m``, ``12h``, ``30d``, ``2w``."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise InvalidRequestError(f"'{param}' must be seconds or a duration like '30d'", param=param)
    if seconds <= 0:
        raise InvalidRequestError(f"'{param}' must be positive", param=param)
    return timedelta(seconds=seconds)


@dataclass(slots=True)
class KeySpec:
    """A validated request to create a key."""

    name: str = ""
    user_id: str | None = None
    team_id: str | None = None
    roles: list[str] = field(default_factory=list)
    allowed_models: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    expires_at: datetime | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_usd: float | None = None
    budget_period: str = "monthly"

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> KeySpec:
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            raise InvalidRequestError(f"Unknown or read-only field '{unknown[0]}'", param=unknown[0])
        spec = cls()
        if "name" in data:
            spec.name = _string(data, "name", 200)
        spec.user_id = _opt_id(data, "user_id")
        spec.team_id = _opt_id(data, "team_id")
        roles = data.get("roles") or []
        if not isinstance(roles, list) or not all(isinstance(r, str) and r in ROLES for r in roles):
            raise InvalidRequestError(f"'roles' must be a list of {', '.join(ROLES)}", param="roles")
        spec.roles = sorted(set(roles))
        models = data.get("allowed_models")
        if models is not None:
            if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
                raise InvalidRequestError(
                    "'allowed_models' must be a list of model names or null", param="allowed_models"
                )
            spec.allowed_models = list(dict.fromkeys(models))
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict) or len(orjson.dumps(metadata)) > MAX_METADATA_BYTES:
            raise InvalidRequestError(
                f"'metadata' must be an object of at most {MAX_METADATA_BYTES} bytes", param="metadata"
            )
        spec.metadata = metadata
        if data.get("expires_at") is not None and data.get("expires_in") is not None:
            raise InvalidRequestError("Give 'expires_at' or 'expires_in', not both", param="expires_in")
        now = datetime.now(UTC)
        if data.get("expires_in") is not None:
            spec.expires_at = now + parse_duration(data["expires_in"], "expires_in")
        elif data.get("expires_at") is not None:
            spec.expires_at = _datetime(data["expires_at"], "expires_at")
            if spec.expires_at <= now:
                raise InvalidRequestError("'expires_at' must be in the future", param="expires_at")
        for name in ("rpm", "tpm", "max_parallel"):
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"'{name}' must be a positive integer or null", param=name)
            setattr(spec, name, value)
        budget = data.get("budget_usd")
        if budget is not None:
            if (
                isinstance(budget, bool)
                or not isinstance(budget, (int, float))
                or not math.isfinite(budget)
                or budget < 0
            ):
                raise InvalidRequestError("'budget_usd' must be a number ≥ 0 or null", param="budget_usd")
            spec.budget_usd = float(budget)
        period = data.get("budget_period", "monthly")
        if period not in BUDGET_PERIODS:
            raise InvalidRequestError(
                f"'budget_period' must be one of {', '.join(BUDGET_PERIODS)}", param="budget_period"
            )
        spec.budget_period = period
        return spec


def _string(data: Mapping[str, Any], name: str, limit: int) -> str:
    value = data.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidRequestError(f"'{name}' must be a string of at most {limit} characters", param=name)
    return value


def _opt_id(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 64:
        raise InvalidRequestError(f"'{name}' must be an id (1 to 64 characters) or null", param=name)
    return value


def _datetime(value: Any, param: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{param}' must be an ISO 8601 date-time", param=param)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequestError(f"'{param}' must be an ISO 8601 date-time", param=param) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _require_orm() -> None:
    if not orm_ready():
        raise ServiceUnavailableError("Virtual keys need the database ([database] and the storage plugin)")


async def create_key(spec: KeySpec, caller: Principal) -> tuple[Any, str]:
    """Check what ``caller`` may grant, store the key's hash; returns (row, the key itself)."""
    allowed = grantable(caller)
    for role in spec.roles:
        if role not in allowed:
            raise PermissionDeniedError(f"You may not create a key with the role '{role}'", param="roles")
    _require_orm()
    from llmgateway.plugins.storage.models import ApiKey, Team, User

    if spec.user_id is not None and not await User.exists(id=spec.user_id):
        raise InvalidRequestError(f"There is no user '{spec.user_id}'", param="user_id")
    if spec.team_id is not None and not await Team.exists(id=spec.team_id):
        raise InvalidRequestError(f"There is no team '{spec.team_id}'", param="team_id")
    key, digest, prefix = generate_key()
    row = await ApiKey.create(
        id=new_key_id(),
        key_hash=digest,
        prefix=prefix,
        name=spec.name,
        user_id=spec.user_id,
        team_id=spec.team_id,
        roles=spec.roles,
        allowed_models=spec.allowed_models,
        metadata=spec.metadata,
        expires_at=spec.expires_at,
        rpm=spec.rpm,
        tpm=spec.tpm,
        max_parallel=spec.max_parallel,
        budget_usd=spec.budget_usd,
        budget_period=spec.budget_period,
    )
    return row, key


async def revoke_key(plugin: KeysPlugin, key_id: str, caller: Principal) -> Any:
    _require_orm()
    from llmgateway.plugins.storage.models import ApiKey

    row = await ApiKey.get_or_none(id=key_id)
    if row is None:
        raise NotFoundError(f"There is no key '{key_id}'")
    allowed = grantable(caller)
    for role in row.roles or []:
        if role not in allowed:
            raise PermissionDeniedError(f"You may not revoke a key with the role '{role}'")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        await row.save(update_fields=["revoked_at"])
    await plugin.publish_revocation(row.id)
    return row


async def list_keys(*, limit: int = 100, offset: int = 0, include_revoked: bool = False) -> list[Any]:
    _require_orm()
    from llmgateway.plugins.storage.models import ApiKey

    query = ApiKey.all() if include_revoked else ApiKey.filter(revoked_at__isnull=True)
    return list(await query.order_by("-created_at", "id").offset(offset).limit(limit))


def key_json(row: Any) -> dict[str, Any]:
    """A key as the admin API shows it: never its hash."""

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": row.id,
        "object": "api_key",
        "name": row.name,
        "prefix": row.prefix,
        "user_id": row.user_id,
        "team_id": row.team_id,
        "roles": list(row.roles or []) or ["user"],
        "allowed_models": row.allowed_models,
        "metadata": row.metadata or {},
        "expires_at": when(row.expires_at),
        "revoked_at": when(row.revoked_at),
        "created_at": when(row.created_at),
        "last_used_at": when(row.last_used_at),
        "rpm": row.rpm,
        "tpm": row.tpm,
        "max_parallel": row.max_parallel,
        "budget_usd": float(row.budget_usd) if row.budget_usd is not None else None,
        "budget_period": row.budget_period,
    }


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be an integer", param=name) from None
    if not 0 <= value <= maximum:
        raise InvalidRequestError(f"'{name}' must be between 0 and {maximum}", param=name)
    return value


def routes(plugin: KeysPlugin) -> list[GatewayRoute]:
    from llmgateway.core.app import GatewayRoute

    async def list_handler(request: Request, principal: Principal) -> Response:
        rows = await list_keys(
            limit=_int_param(request, "limit", 100, 1000),
            offset=_int_param(request, "offset", 0, 10**9),
            include_revoked=request.query_params.get("revoked", "").lower() in ("1", "true", "yes"),
        )
        return _json({"object": "list", "data": [key_json(r) for r in rows]})

    async def create_handler(request: Request, principal: Principal) -> Response:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise InvalidRequestError(f"The request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise InvalidRequestError("The request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("The request body must be a JSON object")
        row, key = await create_key(KeySpec.parse(data), principal)
        return _json({**key_json(row), "key": key}, status=201)

    async def get_handler(request: Request, principal: Principal) -> Response:
        _require_orm()
        from llmgateway.plugins.storage.models import ApiKey

        key_id = request.path_params["key_id"]
        row = await ApiKey.get_or_none(id=key_id)
        if row is None:
            raise NotFoundError(f"There is no key '{key_id}'")
        return _json(key_json(row))

    async def revoke_handler(request: Request, principal: Principal) -> Response:
        row = await revoke_key(plugin, request.path_params["key_id"], principal)
        return _json(key_json(row))

    return [
        GatewayRoute("/admin/api/keys", list_handler, "admin:read", ("GET",), name="keys-list"),
        GatewayRoute("/admin/api/keys", create_handler, "keys:write", ("POST",), name="keys-create"),
        GatewayRoute("/admin/api/keys/{key_id}", get_handler, "admin:read", ("GET",), name="keys-get"),
        GatewayRoute("/admin/api/keys/{key_id}", revoke_handler, "keys:write", ("DELETE",), name="keys-revoke"),
    ]
