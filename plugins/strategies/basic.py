"""Strategies ``ordered`` (deployments in config order: the first is primary, the rest fallbacks)
and ``weighted`` (weighted random choice of the primary, the rest in config order)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.strategy import Ranked, Strategy
from llmgateway.core.types import Deployment, RequestContext


class Ordered(Strategy):
    name = "ordered"

    def rank(self, ctx: RequestContext, deployments: Sequence[Deployment]) -> Ranked:
        return Ranked(list(deployments), [None] * len(deployments), "config order")


class Weighted(Strategy):
    name = "weighted"

    def rank(self, ctx: RequestContext, deployments: Sequence[Deployment]) -> Ranked:
        weights: list[float] = [max(d.weight, 0.0) for d in deployments]
        if sum(weights) <= 0:
            return Ranked(list(deployments), [None] * len(deployments), "all weights zero: config order")
        chosen = random.choices(range(len(deployments)), weights=weights)[0]
        order = [deployments[chosen]] + [d for i, d in enumerate(deployments) if i != chosen]
        scores: list[float | None] = [weights[chosen], *(w for i, w in enumerate(weights) if i != chosen)]
        return Ranked(order, scores, f"weighted random (weight {weights[chosen]:g} of {sum(weights):g})")


@hookimpl
def llmgateway_register_strategies() -> dict[str, type[Strategy]]:
    return {"ordered": Ordered, "weighted": Weighted}
