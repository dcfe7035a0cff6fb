"""The routing strategy interface. Strategies are plugins (entry-point group ``llmgateway.strategies``).

A strategy ranks the deployments of one model group for one request. The built-in router calls
:meth:`Strategy.rank` and records the result as a :class:`~llmgateway.core.types.RoutingDecision`;
it then drops deployments that other plugins (circuit breaker, health monitor) marked unavailable in
``ctx.state["router.unavailable"]`` (a set of deployment ids), keeping at least one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .types import Deployment, ModelGroup, RequestContext


@dataclass(slots=True)
class Ranked:
    """A strategy's answer: deployments best first, with optional scores and a human reason."""

    deployments: list[Deployment]
    scores: list[float | None]
    reason: str


class Strategy:
    """Base class. One instance per model group, built at startup with the group's options."""

    name: ClassVar[str] = ""
    #: keys accepted in ``[[models]] strategy_options``
    option_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, group: ModelGroup, options: dict[str, Any]) -> None:
        self.group = group
        self.options = options

    def rank(self, ctx: RequestContext, deployments: Sequence[Deployment]) -> Ranked:
        raise NotImplementedError
