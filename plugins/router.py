"""Plugin ``router``: asks the model group's strategy to rank its deployments and records why.

Deployments listed in ``ctx.state["router.unavailable"]`` (set by breaker / health plugins) are
moved behind the available ones (never dropped: a last resort beats no answer).
"""

from __future__ import annotations

from typing import Any

from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.strategy import Strategy
from llmgateway.core.types import Deployment, ModelGroup, RequestContext, RoutingDecision


class RouterPlugin:
    def __init__(self) -> None:
        self._instances: dict[str, Strategy] = {}

    @hookimpl
    def llmgateway_startup(self, gateway: Any) -> None:
        for group in gateway.models.values():
            self._instance(gateway.strategies, group)

    def _instance(self, strategies: dict[str, type[Strategy]], group: ModelGroup) -> Strategy:
        strategy = self._instances.get(group.name)
        if strategy is None:
            strategy = strategies[group.strategy](group, group.strategy_options)
            self._instances[group.name] = strategy
        return strategy

    @hookimpl(trylast=True)
    def llmgateway_route(self, ctx: RequestContext, group: ModelGroup) -> list[Deployment] | None:
        strategy = self._instances.get(group.name)
        if strategy is None:
            return None
        ranked = strategy.rank(ctx, group.deployments)
        deployments = ranked.deployments
        unavailable: set[str] | None = ctx.state.get("router.unavailable")
        if unavailable:
            deployments = [d for d in deployments if d.id not in unavailable] + [
                d for d in deployments if d.id in unavailable
            ]
        ctx.decision = RoutingDecision(
            alias=group.name,
            strategy=group.strategy,
            candidates=[(d.id, s) for d, s in zip(ranked.deployments, ranked.scores, strict=True)],
            chosen=deployments[0].id if deployments else None,
            reason=ranked.reason,
        )
        return deployments
