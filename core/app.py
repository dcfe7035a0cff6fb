"""The app factory: gateway.toml in, an ASGI app out. No global state; everything hangs off
:class:`Gateway`, which plugins receive in the lifecycle hooks."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import secrets as _secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import rbac
from .config import GatewayConfig, load_config
from .errors import (
    AuthenticationError,
    ConfigError,
    GatewayError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
from .http import make_client
from .jobs import Job
from .manager import Hooks, PluginManager, load_plugins
from .pipeline import ProxyEndpoint
from .provider import Provider
from .strategy import Strategy
from .types import ModelGroup, Principal, RequestContext

log = logging.getLogger("llmgateway")

Handler = Callable[[Request, Principal], Awaitable[Response]]


@dataclass(slots=True)
class GatewayRoute:
    """An HTTP route a plugin adds. ``permission`` is checked (via the auth hooks) before the
    handler runs; ``rbac.PUBLIC`` routes skip authentication."""

    path: str
    handler: Handler
    permission: str
    methods: tuple[str, ...] = ("GET",)
    name: str | None = None


@dataclass(slots=True)
class Gateway:
    config: GatewayConfig
    pm: PluginManager
    hooks: Hooks
    providers: dict[str, Provider]
    provider_types: dict[str, type[Provider]]
    strategies: dict[str, type[Strategy]]
    models: dict[str, ModelGroup]
    clients: list[httpx.AsyncClient]
    routes: list[GatewayRoute] = field(default_factory=list)
    jobs: dict[str, Job] = field(default_factory=dict)
    readiness: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    draining: bool = False
    # set by `llmgateway serve`: this process is a server (not a test or an embedding), so plugins may
    # do process-level work at startup (the storage plugin migrates a new database in a child process)
    serving: bool = False
    _id_prefix: str = field(default_factory=lambda: _secrets.token_hex(8))
    _counter: int = 0

    def new_request_id(self) -> str:
        self._counter += 1
        return f"req_{self._id_prefix}{self._counter:010x}"

    async def principal_for(self, request: Request, permission: str) -> Principal:
        """Authenticate a non-proxy request (admin API...) and check ``permission``."""
        ctx = RequestContext(
            request_id=request.scope.get("llmgateway.request_id", ""),
            endpoint="chat.completions",
            body={},
            headers=request.headers,
            client_host=request.client.host if request.client else None,
            path=request.url.path,
        )
        principal = await self.hooks.authenticate(ctx)
        if principal is None:
            raise AuthenticationError("Missing or invalid API key; send it as 'Authorization: Bearer <key>'")
        rbac.require(principal, permission)
        return principal


def build_gateway(
    config: GatewayConfig,
    *,
    plugins: Mapping[str, object] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Gateway:
    """Load plugins, validate the whole config and instantiate providers. Raises ConfigError."""
    pc = config.plugins
    pm = load_plugins(pc.order, pc.disabled, pc.modules, plugins, pc.entry_points, file=config.path)
    pm.hook.llmgateway_configure(config=config)
    config.check_unclaimed()

    provider_types: dict[str, type[Provider]] = {}
    for offered in pm.hook.llmgateway_register_providers():
        for name, cls in (offered or {}).items():
            provider_types.setdefault(name, cls)
    strategies: dict[str, type[Strategy]] = {}
    for offered in pm.hook.llmgateway_register_strategies():
        for name, cls in (offered or {}).items():
            strategies.setdefault(name, cls)

    providers: dict[str, Provider] = {}
    clients: list[httpx.AsyncClient] = []
    for name, pconf in config.providers.items():
        cls = provider_types.get(pconf.type)
        if cls is None:
            known = ", ".join(sorted(provider_types))
            raise ConfigError(
                f"unknown provider type {pconf.type!r} (installed: {known})", key=f"{pconf.key}.type", file=config.path
            )
        cls.validate_config(pconf)
        client = make_client(pconf, transport)
        clients.append(client)
        providers[name] = cls(pconf, client)
    for i, group in enumerate(config.models.values()):
        if strategies and group.strategy not in strategies:
            known = ", ".join(sorted(strategies))
            raise ConfigError(
                f"unknown strategy {group.strategy!r} (installed: {known})",
                key=f"models[{i}].strategy",
                file=config.path,
            )

    gateway = Gateway(
        config=config,
        pm=pm,
        hooks=Hooks(pm),
        providers=providers,
        provider_types=provider_types,
        strategies=strategies,
        models=config.models,
        clients=clients,
    )
    for routes in pm.hook.llmgateway_routes(gateway=gateway):
        gateway.routes.extend(routes or ())
    for jobs in pm.hook.llmgateway_register_jobs(gateway=gateway):
        for job in jobs or ():
            if job.name in gateway.jobs:
                raise ConfigError(f"two plugins offer a job named {job.name!r}", key="jobs", file=config.path)
            gateway.jobs[job.name] = job
    for checks in pm.hook.llmgateway_readiness_checks(gateway=gateway):
        gateway.readiness.update(checks or {})
    return gateway


def tune_gc(threshold: int) -> None:
    """The garbage collector of a serving process (``[server] gc_threshold``; 0 leaves it alone).

    Measured under load (32 connections, one worker): with Python's defaults the collector took
    ~33 µs of CPU per request, ~6 % of the whole: every 700 net allocations a young collection walked
    the objects of the requests in flight (~0.3 ms each), and full collections walked the ~70,000
    objects of the imported code and the app (~40 ms each, a p99 spike each time). So, once startup
    is done: collect, then freeze what is alive (modules, the app, plugins: alive until exit anyway)
    out of every later collection, and collect the young generation after ``threshold`` net
    allocations instead of 700 — requests make almost no reference cycles, so collections become
    rare. The garbage that waits meanwhile is bounded by the threshold (objects in cycles)."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)


def create_app(
    config: GatewayConfig | str | os.PathLike[str] | None = None,
    *,
    plugins: Mapping[str, object] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ASGIApp:
    """Build the ASGI app. ``config`` is a parsed config, a path, or None (``$LLMGATEWAY_CONFIG``
    or ./gateway.toml). ``plugins`` adds plugin objects by name (tests, embedding); ``transport``
    replaces the upstream HTTP transport for every provider (tests)."""
    if not isinstance(config, GatewayConfig):
        config = load_config(config)
    gateway = build_gateway(config, plugins=plugins, transport=transport)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.hooks.startup(gateway)
        if gateway.serving:
            tune_gc(config.server.gc_threshold)
        try:
            yield
        finally:
            gateway.draining = True
            await gateway.hooks.shutdown(gateway)
            for provider in gateway.providers.values():
                with contextlib.suppress(Exception):
                    await provider.aclose()
            for client in gateway.clients:
                with contextlib.suppress(Exception):
                    await client.aclose()

    routes: list[BaseRoute] = []
    proxies: dict[str, ProxyEndpoint] = {}  # exact POST paths, dispatched without starlette's router
    for prefix in ("/v1", ""):
        proxies[f"{prefix}/chat/completions"] = ProxyEndpoint(gateway, "chat.completions")
        proxies[f"{prefix}/completions"] = ProxyEndpoint(gateway, "completions")
        proxies[f"{prefix}/embeddings"] = ProxyEndpoint(gateway, "embeddings")
    for path, endpoint in proxies.items():
        routes.append(Route(path, endpoint, methods=["POST"]))
    taken = {
        "/v1/chat/completions",
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/v1/embeddings",
        "/embeddings",
    }
    for ingresses in gateway.pm.hook.llmgateway_register_ingress(gateway=gateway):
        for path, ingress in (ingresses or {}).items():
            if path in taken:
                raise ConfigError(f"two routes claim the path {path!r}", key="plugins", file=config.path)
            taken.add(path)
            proxies[path] = ProxyEndpoint(gateway, ingress.endpoint, ingress)
            routes.append(Route(path, proxies[path], methods=["POST"]))
    models_permission = rbac.PUBLIC if config.server.public_models else "models:read"
    core_routes = [
        GatewayRoute("/v1/models", _list_models(gateway), models_permission),
        GatewayRoute("/models", _list_models(gateway), models_permission),
        GatewayRoute("/v1/models/{model_id:path}", _get_model(gateway), models_permission),
        GatewayRoute("/models/{model_id:path}", _get_model(gateway), models_permission),
        GatewayRoute("/health/live", _live, rbac.PUBLIC),
        GatewayRoute("/health/ready", _ready(gateway), rbac.PUBLIC),
    ]
    methods_taken: dict[str, set[str]] = {}  # one path may serve several methods (GET list, POST create)
    for route in core_routes + gateway.routes:
        methods = {m.upper() for m in route.methods}
        if route.path in taken or methods & methods_taken.get(route.path, set()):
            raise ConfigError(f"two routes claim the path {route.path!r}", key="plugins", file=config.path)
        methods_taken.setdefault(route.path, set()).update(methods)
        routes.append(Route(route.path, _guarded(gateway, route), methods=list(route.methods), name=route.name))

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _unhandled},
    )
    app.state.gateway = gateway
    gateway.state["starlette"] = app  # the routing table, under any ASGI wrappers (RBAC meta-test, tools)
    wrapped: ASGIApp = ProxyDispatch(app, proxies)
    for wrapper in gateway.pm.hook.llmgateway_asgi_wrapper(gateway=gateway):
        if wrapper is not None:
            wrapped = wrapper(wrapped)
    return RequestIdMiddleware(wrapped, gateway)


def gateway_of(app: ASGIApp) -> Gateway:
    """The Gateway behind an app built by :func:`create_app`."""
    gateway = getattr(app, "gateway", None)
    if not isinstance(gateway, Gateway):
        raise TypeError("not an llmgateway app")
    return gateway


class ProxyDispatch:
    """The hot path's short cut: a ``POST`` to one of the proxy endpoints' exact paths goes straight
    to its :class:`ProxyEndpoint` (which answers every error itself, as the OpenAI envelope);
    everything else, including those paths under a ``root_path`` or with another method, goes
    through starlette's router. The same routes are in starlette's table too (RBAC meta-test,
    tools that list routes)."""

    __slots__ = ("app", "endpoints")

    def __init__(self, app: ASGIApp, endpoints: Mapping[str, ProxyEndpoint]) -> None:
        self.app = app
        self.endpoints = dict(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Gives every HTTP request an id (``x-request-id`` on every response, errors included) and
    turns anything that escaped the app into an OpenAI-shaped 500 — never a traceback."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.gateway.new_request_id()
        scope["llmgateway.request_id"] = request_id
        raw_id = request_id.encode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = message.get("headers") or []
                if not any(k == b"x-request-id" for k, _ in headers):
                    message["headers"] = [*headers, (b"x-request-id", raw_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if not started:
                body = orjson.dumps(
                    {
                        "error": {
                            "message": f"Internal error (request {request_id})",
                            "type": "server_error",
                            "param": None,
                            "code": "internal_error",
                        }
                    }
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"x-request-id", raw_id)],
                    }
                )
                await send({"type": "http.response.body", "body": body})


def error_response(error: GatewayError) -> Response:
    return Response(error.body(), status_code=error.status, headers=error.headers, media_type="application/json")


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error: GatewayError = NotFoundError(f"Unknown path {request.url.path}")
    elif exc.status_code == 405:
        error = GatewayError(
            f"Method {request.method} is not allowed on {request.url.path}",
            status=405,
            type="invalid_request_error",
            code="method_not_allowed",
        )
    else:
        error = GatewayError(str(exc.detail), status=exc.status_code, type="invalid_request_error")
    return error_response(error)


async def _unhandled(request: Request, exc: Exception) -> Response:
    request_id = request.scope.get("llmgateway.request_id", "")
    if isinstance(exc, GatewayError):
        return error_response(exc)
    log.exception("unhandled error in request %s", request_id, exc_info=exc)
    return error_response(GatewayError(f"Internal error (request {request_id})", code="internal_error"))


def _guarded(gateway: Gateway, route: GatewayRoute) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            if route.permission == rbac.PUBLIC:
                principal = Principal(kind="anonymous", roles=frozenset())
            else:
                principal = await gateway.principal_for(request, route.permission)
            return await route.handler(request, principal)
        except GatewayError as error:
            return error_response(error)

    endpoint.__name__ = route.name or route.path
    endpoint.permission = route.permission  # type: ignore[attr-defined]
    return endpoint


def _model_card(group: ModelGroup) -> dict[str, Any]:
    return {"id": group.name, "object": "model", "created": group.created, "owned_by": group.owned_by}


def _list_models(gateway: Gateway) -> Handler:
    async def handler(request: Request, principal: Principal) -> Response:
        data = [
            _model_card(g)
            for g in gateway.models.values()
            if principal.kind == "anonymous" or principal.may_use(g.name)
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    return handler


def _get_model(gateway: Gateway) -> Handler:
    async def handler(request: Request, principal: Principal) -> Response:
        model_id = request.path_params["model_id"]
        group = gateway.models.get(model_id)
        if group is None or not (principal.kind == "anonymous" or principal.may_use(model_id)):
            raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")
        return Response(orjson.dumps(_model_card(group)), media_type="application/json")

    return handler


async def _live(request: Request, principal: Principal) -> Response:
    return Response(orjson.dumps({"status": "ok"}), media_type="application/json")


def _ready(gateway: Gateway) -> Handler:
    async def handler(request: Request, principal: Principal) -> Response:
        if gateway.draining:
            raise ServiceUnavailableError("The gateway is shutting down")
        checks: dict[str, str] = {}
        ok = True
        for name, check in gateway.readiness.items():
            started = time.perf_counter()
            try:
                await check()
                checks[name] = f"ok ({(time.perf_counter() - started) * 1000:.1f} ms)"
            except Exception as exc:
                ok = False
                checks[name] = f"failing: {type(exc).__name__}"
        payload = {"status": "ok" if ok else "unavailable", "checks": checks}
        return Response(orjson.dumps(payload), status_code=200 if ok else 503, media_type="application/json")

    return handler
