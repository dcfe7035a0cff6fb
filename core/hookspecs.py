"""The hook specifications: every point where a plugin can change what the gateway does.

Implement a hook by writing a function with the same name (and any subset of its arguments)
decorated with ``@llmgateway.hookimpl`` in a module or object registered as a plugin.

Phases, in the order they fire:

* **Command line**: ``llmgateway_register_commands`` when the ``llmgateway`` CLI starts.
* **Lifecycle** (at startup, synchronous unless noted): ``llmgateway_configure``,
  ``llmgateway_register_providers``, ``llmgateway_register_strategies``, ``llmgateway_routes``, ``llmgateway_register_ingress``,
  ``llmgateway_register_jobs``, ``llmgateway_asgi_wrapper``, ``llmgateway_readiness_checks``,
  then the async ``llmgateway_startup``; ``llmgateway_shutdown`` when the process stops.
* **Request chain** (per request, may be ``async def``): auth → prepare → cache → classifier →
  router → rate-limit → provider (``llmgateway_upstream_done`` after each attempt) → response →
  accounting (``llmgateway_cache_store``, ``llmgateway_record_usage``), plus ``llmgateway_on_error``.

Two calling conventions, stated on every hook:

* **first-result**: implementations run in call order until one returns something other than None;
  that value is used and later implementations do not run.
* **fan-out**: every implementation runs, in call order; results (if any) are all used.

Call order is the order of ``[plugins] order`` in gateway.toml, then third-party plugins, then the
built-in ones (which thereby yield to third parties); ``tryfirst`` / ``trylast`` on an
implementation still apply. ``llmgateway plugins`` prints the resolved order. Request hooks may be
``async def``; pluggy wrappers (``wrapper=True``) are allowed only on the synchronous lifecycle hooks.
Raising a :class:`~llmgateway.core.errors.GatewayError` from a request hook ends the request with
that error, sent to the client in the OpenAI error envelope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer
    from starlette.types import ASGIApp

    from .app import Gateway, GatewayRoute
    from .config import GatewayConfig
    from .errors import GatewayError
    from .ingress import Ingress
    from .jobs import Job
    from .provider import Provider
    from .strategy import Strategy
    from .types import (
        Attempt,
        CachedResponse,
        Deployment,
        ModelGroup,
        Principal,
        RequestContext,
        UsageRecord,
    )

PROJECT = "llmgateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Hooks run by the core per request (may be async; called by the gateway's own runner).
REQUEST_HOOKS = (
    "llmgateway_authenticate",
    "llmgateway_prepare_request",
    "llmgateway_cache_lookup",
    "llmgateway_classify",
    "llmgateway_route",
    "llmgateway_check_limits",
    "llmgateway_upstream_done",
    "llmgateway_response",
    "llmgateway_cache_store",
    "llmgateway_record_usage",
    "llmgateway_on_error",
)

#: Async lifecycle hooks (awaited once each at startup / shutdown).
ASYNC_LIFECYCLE_HOOKS = ("llmgateway_startup", "llmgateway_shutdown")


# ---------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------


@hookspec
def llmgateway_configure(config: GatewayConfig) -> None:
    """Read and validate this plugin's own section of gateway.toml.

    Fires once, at startup, before anything else. Call ``config.section("name")`` to claim a
    top-level section and read it with its typed getters; raise
    :class:`~llmgateway.core.errors.ConfigError` (or let a getter raise it) to stop startup with the
    file, key and reason. A section that no plugin reads is reported as unknown.
    Fan-out; return values are ignored.
    """


@hookspec
def llmgateway_register_providers() -> Mapping[str, type[Provider]] | None:
    """Offer provider classes, keyed by the ``type`` name used in ``[providers.NAME]``.

    Fires once at startup. Fan-out: all mappings are merged; when two plugins offer the same type,
    the one earlier in call order wins (third-party plugins come before the built-ins).
    """


@hookspec
def llmgateway_register_strategies() -> Mapping[str, type[Strategy]] | None:
    """Offer routing strategy classes, keyed by the name used in ``[[models]] strategy``.

    Fires once at startup. Fan-out, merged like ``llmgateway_register_providers``.
    """


@hookspec
def llmgateway_routes(gateway: Gateway) -> Sequence[GatewayRoute] | None:
    """Add HTTP routes (admin API, health, metrics, ingress formats...).

    Fires once while the app is built. Each :class:`~llmgateway.core.app.GatewayRoute` declares
    the permission it needs (see :mod:`llmgateway.core.rbac`). Fan-out: all routes are mounted;
    a path already taken by an earlier route is an error at startup.
    """


@hookspec
def llmgateway_register_ingress(gateway: Gateway) -> Mapping[str, Ingress] | None:
    """Offer request formats other than OpenAI's, keyed by path (e.g. ``"/v1/messages"``).

    Fires once while the app is built. Each :class:`~llmgateway.core.ingress.Ingress` translates its
    requests into OpenAI bodies and the answers back; the path then runs the whole request chain.
    Fan-out; a path already taken is an error at startup.
    """


@hookspec
def llmgateway_register_jobs(gateway: Gateway) -> Sequence[Job] | None:
    """Offer background jobs (cron-scheduled maintenance, reports, health checks).

    Fires once at startup. Fan-out; jobs are listed by ``llmgateway jobs list`` and run by the
    scheduler plugin. Job names must be unique.
    """


@hookspec
def llmgateway_asgi_wrapper(gateway: Gateway) -> Callable[[ASGIApp], ASGIApp] | None:
    """Return a function that wraps the ASGI app (plain ASGI middleware: logging, metrics, CORS).

    Fires once while the app is built. Fan-out: wrappers are applied in call order, so the first
    plugin's wrapper is the innermost.
    """


@hookspec
def llmgateway_readiness_checks(gateway: Gateway) -> Mapping[str, Callable[[], Awaitable[None]]] | None:
    """Name async checks that ``/health/ready`` runs (database reachable, Redis reachable...).

    Fires once at startup. Fan-out: all checks are merged. A check raises to report not ready.
    """


@hookspec
def llmgateway_register_commands(cli: typer.Typer) -> None:
    """Add subcommands to the ``llmgateway`` command line (``db``, ``keys``, ``jobs``...).

    Fires once when the CLI starts, before any config is read (commands load it themselves with
    their ``--config`` option). Fan-out; add commands or sub-apps with ``cli.command`` / ``cli.add_typer``.
    """


@hookspec
def llmgateway_startup(gateway: Gateway) -> Awaitable[None] | None:
    """Open connections, start background tasks. ``gateway.state`` is the place to keep them.

    Fires once when the server starts serving (ASGI lifespan startup), after every sync lifecycle
    hook. May be ``async def``. Fan-out, in call order; an exception aborts startup.
    """


@hookspec
def llmgateway_shutdown(gateway: Gateway) -> Awaitable[None] | None:
    """Flush queues and close connections. Fires once at lifespan shutdown, in reverse call order.

    May be ``async def``. Fan-out; an exception is logged and the other implementations still run.
    """


# ---------------------------------------------------------------------------------------------
# Request chain (in firing order)
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def llmgateway_authenticate(ctx: RequestContext) -> Principal | Awaitable[Principal | None] | None:
    """Establish who is calling, from ``ctx.headers`` (Authorization, x-api-key...).

    Fires first on every proxied request. First-result: return a
    :class:`~llmgateway.core.types.Principal` to accept, None to let the next plugin decide, or
    raise :class:`~llmgateway.core.errors.AuthenticationError` to reject. When every plugin returns
    None the request is rejected with 401, unless the ``auth`` plugin allows anonymous access.
    """


@hookspec
def llmgateway_prepare_request(ctx: RequestContext) -> Awaitable[None] | None:
    """Inspect or change the request after authentication (defaults, guardrails, PII redaction).

    Fires after auth and after the model alias was resolved (``ctx.alias``, ``ctx.model_group``).
    May edit ``ctx.body``. Fan-out; raise a GatewayError to refuse the request.
    """


@hookspec(firstresult=True)
def llmgateway_cache_lookup(ctx: RequestContext) -> CachedResponse | Awaitable[CachedResponse | None] | None:
    """Answer from a cache. First-result: a :class:`~llmgateway.core.types.CachedResponse` is sent
    to the client (as JSON or replayed as SSE, whichever the client asked for) and the router and
    provider phases are skipped; accounting still runs with ``cache_hit=True``.
    Set ``ctx.cache_status`` ("miss", "bypass") to have it reported in ``x-llmgateway-cache``.
    """


@hookspec
def llmgateway_classify(ctx: RequestContext) -> Mapping[str, float] | Awaitable[Mapping[str, float] | None] | None:
    """Label the request's content (code, math, creative, ...) with confidences in 0..1.

    Fires after the cache missed, before routing. Fan-out: every mapping is merged into
    ``ctx.labels`` (a later plugin overwrites an earlier one's label).
    """


@hookspec(firstresult=True)
def llmgateway_route(
    ctx: RequestContext, group: ModelGroup
) -> list[Deployment] | Awaitable[list[Deployment] | None] | None:
    """Choose the deployments for ``group``, best first: the first is tried, the rest are fallbacks.

    First-result. Should set ``ctx.decision`` (a :class:`~llmgateway.core.types.RoutingDecision`).
    The built-in router asks the strategy named in ``[[models]] strategy``.
    """


@hookspec
def llmgateway_check_limits(ctx: RequestContext) -> Awaitable[None] | None:
    """Admit or refuse the request: rate limits, concurrency, budget reservation.

    Fires after routing (``ctx.candidates`` known), before any upstream call. Fan-out. Raise
    :class:`~llmgateway.core.errors.RateLimitError` / ``BudgetExceededError`` to refuse (429 with
    ``Retry-After``). Anything reserved must be released or settled by appending a callback to
    ``ctx.on_finish``; it runs after the request ends, whatever the outcome.
    """


@hookspec
def llmgateway_upstream_done(ctx: RequestContext, attempt: Attempt) -> Awaitable[None] | None:
    """Observe one finished upstream attempt: latency, time to first byte, error, rate-limit headers.

    Fires after each attempt (retries, fallbacks and hedges each fire it) — for streams, when the
    first byte arrived or the attempt failed before it. Feeds latency routing, circuit breakers and
    health. Fan-out; must be fast (it is on the request path); exceptions are logged and ignored.
    """


@hookspec
def llmgateway_response(ctx: RequestContext, response: dict[str, Any]) -> Awaitable[None] | None:
    """Inspect or change a complete (non-streamed) response before it is sent.

    Fan-out; may edit ``response`` in place or set ``ctx.response_headers``. Not called for streams,
    whose chunks are forwarded without being parsed.
    """


@hookspec
def llmgateway_cache_store(
    ctx: RequestContext, response: dict[str, Any] | None, chunks: list[bytes] | None
) -> Awaitable[None] | None:
    """Store a complete, successful answer: ``response`` for a plain request, or the raw SSE
    ``chunks`` (each ``data: ...\\n\\n``) of a stream that ended normally.

    Fires after the response was sent, only when the cache lookup ran and missed. Fan-out.
    Chunks are only collected when some plugin sets ``ctx.state["cache.collect"] = True`` during
    ``llmgateway_cache_lookup``. Errors are logged and ignored: a cache never fails a request.
    """


@hookspec
def llmgateway_record_usage(ctx: RequestContext, record: UsageRecord) -> Awaitable[None] | None:
    """Account for a finished request: one call per request, success or failure, after the last
    byte was sent or the client went away (``record.client_disconnected``).

    Fan-out. Must not block: enqueue and return (storage writes behind). ``ctx.decision`` holds the
    routing decision to record alongside.
    """


@hookspec
def llmgateway_on_error(ctx: RequestContext, error: GatewayError) -> Awaitable[None] | None:
    """Observe an error sent to the client (before the first byte) or ending a stream (after it).

    Fan-out; for logs, metrics and alerts. Must not raise.
    """


def all_hook_names() -> list[str]:
    """Every hook defined here, in the order they are documented."""
    return [name for name in globals() if name.startswith("llmgateway_")]


def describe(name: str) -> dict[str, Any]:
    """The signature and calling convention of one hook (used by docs and meta-tests)."""
    import inspect

    fn = globals()[name]
    opts = getattr(fn, PROJECT + "_spec", {})
    params = inspect.signature(fn).parameters.values()
    args = ", ".join(f"{p.name}: {p.annotation}" for p in params)
    returns = inspect.signature(fn).return_annotation
    return {
        "name": name,
        "signature": f"({args}) -> {returns}",
        "firstresult": bool(opts.get("firstresult")),
        "doc": inspect.getdoc(fn) or "",
    }
