"""RBAC: every route declares a permission from the one policy table, and what each role actually gets
over HTTP, route by route, is exactly what the table says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route

from llmgateway.core import rbac
from llmgateway.core.app import create_app, gateway_of
from llmgateway.core.config import parse_config
from llmgateway.core.types import ROLES
from tests.conftest import GatewayFactory
from tests.test_security_support import MASTER_KEY, auth, chat, config, create_key, database, security_db

__all__ = ["security_db"]

# Every plugin installed, with the sections that switch optional parts on.
FULL = config(
    """
    [auth.jwt]
    secret = "a-test-secret-that-is-at-least-32-bytes"
    """
)


def _starlette(app: Any) -> Starlette:
    """The Starlette router inside the middleware chain (plugins' ASGI wrappers may be closures)."""
    router = gateway_of(app).state["starlette"]
    assert isinstance(router, Starlette)
    return router


def routes_of(app: Any) -> list[tuple[str, str, str | None]]:
    """(path, method, declared permission) for every route the app serves."""
    out: list[tuple[str, str, str | None]] = []
    routes: list[BaseRoute] = _starlette(app).routes
    for route in routes:
        assert isinstance(route, Route), f"{route!r} is not a plain route: it cannot declare a permission"
        permission = getattr(route.endpoint, "permission", None)
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            out.append((route.path, method, permission))
    return out


def test_every_route_declares_a_permission_of_the_policy_table() -> None:
    app = create_app(parse_config(FULL))
    routes = routes_of(app)
    assert any(p == "inference" for _, _, p in routes)
    undeclared = [(path, method) for path, method, permission in routes if permission not in rbac.POLICY]
    assert undeclared == [], f"routes without a permission from core/rbac.py: {undeclared}"


def test_policy_table_names_only_known_roles() -> None:
    for permission, roles in rbac.POLICY.items():
        assert roles <= set(ROLES), permission
    assert rbac.POLICY[rbac.PUBLIC] == frozenset(ROLES)


def _path(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: "demo" if m.group(1) == "model_id" else "missing-" + m.group(1), path)


async def test_route_by_role_matrix_equals_the_policy_table(serve_gateway: GatewayFactory, security_db: str) -> None:
    async with serve_gateway(database(security_db) + FULL) as url:
        app_routes = routes_of(create_app(parse_config(FULL)))
        keys = {role: (await create_key(url, roles=[role], name=f"rbac-{role}"))["key"] for role in ROLES}
        actual: dict[tuple[str, str], dict[str, bool]] = {}
        expected: dict[tuple[str, str], dict[str, bool]] = {}
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def status(method: str, path: str, headers: dict[str, str]) -> int:
                body = chat(max_tokens=5) if method in ("POST", "PUT", "PATCH") else None
                async with http.stream(method, _path(path), json=body, headers=headers) as response:
                    return response.status_code

            for path, method, permission in app_routes:
                assert permission is not None
                allowed = rbac.POLICY[permission]
                row_actual: dict[str, bool] = {}
                for role in ROLES:
                    code = await status(method, path, auth(keys[role]))
                    row_actual[role] = code not in (401, 403)
                    if not row_actual[role]:
                        assert code == 403, (path, method, role, code)
                anonymous = await status(method, path, {})
                row_actual["anonymous"] = anonymous not in (401, 403)
                actual[(path, method)] = row_actual
                expected[(path, method)] = {role: role in allowed for role in ROLES} | {
                    "anonymous": permission == rbac.PUBLIC
                }
                master = await status(method, path, auth(MASTER_KEY))
                assert master not in (401, 403), (path, method, master)
    assert actual == expected


def test_the_documented_policy_table_is_the_policy() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    assert rbac.markdown_table() in docs
