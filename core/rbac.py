"""Role-based access control: one policy table of permission x role.

Every route declares the permission it needs (``GatewayRoute.permission``; the proxy endpoints use
``inference``); ``tests/test_rbac.py`` fails on a route without one and checks, over HTTP, that each
role gets exactly what :data:`POLICY` says. Roles are ``admin`` > ``operator`` > ``viewer``, and
``user`` (may call models). ``public`` routes need no principal at all (health checks, the model
list when ``server.public_models``). A permission not in the table is refused to everyone.

To add a permission, add a row here (and to the table in docs/security.md, which a test compares).
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


def markdown_table() -> str:
    """The policy as the Markdown table docs/security.md shows (a test keeps the two equal)."""
    from .types import ROLES

    lines = ["| permission | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    for permission, roles in POLICY.items():
        lines.append(f"| `{permission}` | " + " | ".join("yes" if r in roles else "—" for r in ROLES) + " |")
    return "\n".join(lines)
