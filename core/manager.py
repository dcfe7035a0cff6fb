"""Finding, ordering and calling plugins.

Plugins come from the entry-point groups ``llmgateway.plugins``, ``llmgateway.providers`` and
``llmgateway.strategies`` (the built-ins are declared in llmgateway's own pyproject, exactly like a
third party's), plus ``[plugins] modules`` in gateway.toml and objects passed to ``create_app``.

Call order within every hook: names listed in ``[plugins] order`` first, in that order; then
third-party plugins; then the built-ins. pluggy calls the last-registered implementation first, so
plugins are registered in reverse of that order; ``tryfirst`` / ``trylast`` still apply.

Request hooks may be coroutines. pluggy would only create them, so :class:`Hooks` calls the
implementations itself, in pluggy's resolved order, awaiting each result: a first-result hook stops
at the first value that is not None (later implementations are never called, so no coroutine is
left un-awaited), a fan-out hook runs all of them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from types import CoroutineType
from typing import TYPE_CHECKING, Any, cast

import pluggy

from . import hookspecs
from .errors import ConfigError, GatewayError

if TYPE_CHECKING:
    from .types import (
        Attempt,
        CachedResponse,
        Deployment,
        ModelGroup,
        Principal,
        RequestContext,
        UsageRecord,
    )

log = logging.getLogger("llmgateway.plugins")

ENTRY_POINT_GROUPS = ("llmgateway.plugins", "llmgateway.providers", "llmgateway.strategies")
DIST_NAME = "llmgateway"


@dataclass(slots=True)
class PluginInfo:
    name: str
    module: str
    package: str  # distribution that provided it ("llmgateway" for built-ins, "config", "code")
    group: str
    builtin: bool


class PluginManager(pluggy.PluginManager):
    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}


def _entry_points() -> list[tuple[str, EntryPoint]]:
    found: list[tuple[str, EntryPoint]] = []
    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            found.append((group, ep))
    return found


def load_plugins(
    order: Sequence[str] = (),
    disabled: Iterable[str] = (),
    modules: Sequence[str] = (),
    extra: Mapping[str, object] | None = None,
    use_entry_points: bool = True,
    file: str = "",
) -> PluginManager:
    """Build the plugin manager: discover, order and register plugins, then check them."""
    disabled = set(disabled)
    candidates: list[tuple[str, object, PluginInfo]] = []
    seen: dict[str, PluginInfo] = {}
    builtins_found = False

    def add(name: str, obj: object, info: PluginInfo) -> None:
        if name in disabled:
            return
        if name in seen:
            previous = seen[name]
            if previous.builtin and not info.builtin:  # a third-party plugin replaces a built-in one
                candidates[:] = [c for c in candidates if c[0] != name]
            else:
                return
        seen[name] = info
        candidates.append((name, obj, info))

    for name, obj in (extra or {}).items():
        if isinstance(obj, type):
            obj = obj()
        module = getattr(obj, "__name__", type(obj).__name__)
        add(name, obj, PluginInfo(name, module, "code", "code", False))

    for i, dotted in enumerate(modules):
        try:
            module = importlib.import_module(dotted)
        except ImportError as exc:
            raise ConfigError(
                f"cannot import plugin module {dotted!r}: {exc}", key=f"plugins.modules[{i}]", file=file
            ) from None
        add(dotted, module, PluginInfo(dotted, dotted, "config", "config", False))

    eps = _entry_points()
    for group, ep in eps:
        dist = (ep.dist.name if ep.dist is not None else None) or "?"
        builtin = dist.lower() == DIST_NAME
        builtins_found = builtins_found or builtin
        if not builtin and not use_entry_points:
            continue
        if ep.name in disabled:
            continue
        try:
            obj = ep.load()
            if isinstance(obj, type):  # class-based plugins get one instance per gateway
                obj = obj()
        except Exception as exc:  # a broken third-party plugin must name itself
            raise ConfigError(
                f"plugin {ep.name!r} from {dist} failed to load: {exc!r}", key="plugins", file=file
            ) from None
        add(ep.name, obj, PluginInfo(ep.name, ep.value, dist, group, builtin))
    if not builtins_found:
        raise ConfigError(
            "llmgateway's built-in plugins were not found: install the package (pip install -e .)",
            key="plugins",
            file=file,
        )

    for i, name in enumerate(order):
        if name not in seen and name not in disabled:
            raise ConfigError(f"unknown plugin {name!r}", key=f"plugins.order[{i}]", file=file)

    # desired call order: configured order, then third-party, then built-in
    rank = {name: i for i, name in enumerate(order)}
    ordered = sorted(
        candidates,
        key=lambda c: (0, rank[c[0]]) if c[0] in rank else ((1, 0) if not c[2].builtin else (2, 0)),
    )
    pm = PluginManager()
    for name, obj, info in reversed(ordered):
        pm.register(obj, name=name)
        pm.info[name] = info
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(
            f"plugin {exc.plugin!r} implements an unknown hook: {exc}", key="plugins", file=file
        ) from None
    for name in hookspecs.REQUEST_HOOKS + hookspecs.ASYNC_LIFECYCLE_HOOKS:
        for impl in getattr(pm.hook, name).get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                raise ConfigError(
                    f"plugin {impl.plugin_name!r} wraps {name}: wrappers are only allowed on synchronous "
                    "lifecycle hooks",
                    key="plugins",
                    file=file,
                )
    return pm


def call_order(pm: pluggy.PluginManager, hook: str) -> list[str]:
    """Plugin names implementing ``hook``, in the order they are called."""
    return [impl.plugin_name for impl in reversed(getattr(pm.hook, hook).get_hookimpls())]


# one implementation: (function, positions of its arguments in the hook's own argument list, plugin)
_Impl = tuple[Callable[..., Any], tuple[int, ...], str]


def _is_awaitable(value: Any) -> bool:
    """``inspect.isawaitable`` with the common answers first (hot path: every hook result)."""
    kind = type(value)
    if kind is CoroutineType:
        return True
    if value is None or kind is dict or kind is list:
        return False
    return inspect.isawaitable(value)


class Hooks:
    """Typed, awaitable calls of the request hooks, in the resolved order (computed once).

    Every request calls these, so the dispatch is precomputed: which implementations, in which
    order, and where each one's arguments sit in the hook's signature (pluggy lets an
    implementation take any subset of the spec's arguments, in any order).
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._impls: dict[str, list[_Impl]] = {}
        for name in hookspecs.REQUEST_HOOKS + hookspecs.ASYNC_LIFECYCLE_HOOKS:
            caller = getattr(pm.hook, name)
            spec_args: list[str] = list(caller.spec.argnames) if caller.spec is not None else []
            impls = reversed(caller.get_hookimpls())
            self._impls[name] = [
                (i.function, tuple(spec_args.index(a) for a in i.argnames), i.plugin_name) for i in impls
            ]

    def has(self, name: str) -> bool:
        return bool(self._impls[name])

    async def _first(self, name: str, *args: Any) -> Any:
        for function, positions, _ in self._impls[name]:
            result = function(*[args[i] for i in positions])
            if _is_awaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def _each(self, name: str, *args: Any, swallow: bool = False) -> list[Any]:
        results = []
        for function, positions, plugin in self._impls[name]:
            try:
                result = function(*[args[i] for i in positions])
                if _is_awaitable(result):
                    result = await result
            except Exception:
                if not swallow:
                    raise
                log.exception("plugin %s failed in %s", plugin, name)
                continue
            if result is not None:
                results.append(result)
        return results

    # ---- lifecycle ---------------------------------------------------------------------------

    async def startup(self, gateway: Any) -> None:
        await self._each("llmgateway_startup", gateway)

    async def shutdown(self, gateway: Any) -> None:
        for function, positions, plugin in reversed(self._impls["llmgateway_shutdown"]):
            try:
                result = function(*[(gateway,)[i] for i in positions])
                if _is_awaitable(result):
                    await result
            except Exception:
                log.exception("plugin %s failed in llmgateway_shutdown", plugin)

    # ---- request chain -----------------------------------------------------------------------

    async def authenticate(self, ctx: RequestContext) -> Principal | None:
        return cast("Principal | None", await self._first("llmgateway_authenticate", ctx))

    async def prepare_request(self, ctx: RequestContext) -> None:
        await self._each("llmgateway_prepare_request", ctx)

    async def cache_lookup(self, ctx: RequestContext) -> CachedResponse | None:
        try:
            return cast("CachedResponse | None", await self._first("llmgateway_cache_lookup", ctx))
        except GatewayError:
            raise
        except Exception:
            log.exception("cache lookup failed; answering without the cache")
            ctx.cache_status = "error"
            return None

    async def classify(self, ctx: RequestContext) -> None:
        for labels in await self._each("llmgateway_classify", ctx):
            ctx.labels.update(labels)

    async def route(self, ctx: RequestContext, group: ModelGroup) -> list[Deployment] | None:
        return cast("list[Deployment] | None", await self._first("llmgateway_route", ctx, group))

    async def check_limits(self, ctx: RequestContext) -> None:
        await self._each("llmgateway_check_limits", ctx)

    async def upstream_done(self, ctx: RequestContext, attempt: Attempt) -> None:
        await self._each("llmgateway_upstream_done", ctx, attempt, swallow=True)

    async def response(self, ctx: RequestContext, response: dict[str, Any]) -> None:
        await self._each("llmgateway_response", ctx, response)

    async def cache_store(
        self, ctx: RequestContext, response: dict[str, Any] | None, chunks: list[bytes] | None
    ) -> None:
        await self._each("llmgateway_cache_store", ctx, response, chunks, swallow=True)

    async def record_usage(self, ctx: RequestContext, record: UsageRecord) -> None:
        await self._each("llmgateway_record_usage", ctx, record, swallow=True)

    async def on_error(self, ctx: RequestContext, error: GatewayError) -> None:
        await self._each("llmgateway_on_error", ctx, error, swallow=True)
