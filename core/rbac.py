"""Role-based access control: one policy table of permission x role.

Every route declares the permission it needs (a meta-test fails on a route without one). Roles are
``admin`` > ``operator`` > ``viewer``, and ``user`` (may call models). ``public`` routes need no
principal at all (health checks, the model list when ``server.public_models``).
"""

from __future__ import annotations

from .errors import PermissionDeniedError
from .types import Principal

PUBLIC = "public"

#: permission -> roles that hold it
POLICY: dict[str, frozenset[str]] = {
    PUBLIC: frozenset({"admin", "operator", "viewer", "user"}),
    "models:read": frozenset({"admin", "operator", "viewer", "user"}),
    "inference": frozenset({"admin", "operator", "user"}),
    "admin:read": frozenset({"admin", "operator", "viewer"}),
    "admin:write": frozenset({"admin", "operator"}),
    "keys:write": frozenset({"admin", "operator"}),
    "config:read": frozenset({"admin", "operator", "viewer"}),
    "admin:all": frozenset({"admin"}),
}


def allowed(principal: Principal, permission: str) -> bool:
    roles = POLICY.get(permission)
    if roles is None:
        return False
    return not roles.isdisjoint(principal.roles)


def require(principal: Principal, permission: str) -> None:
    if not allowed(principal, permission):
        raise PermissionDeniedError(f"This key may not do '{permission}'")
