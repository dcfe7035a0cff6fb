"""Plugin ``pricing``: per-model prices (USD per million tokens) for deployments that set none.

The table ships in ``pricing.json`` next to this module (input, output and cached-input prices of
common OpenAI, Anthropic, Gemini, Mistral and Cohere models) and is overridden or extended in
gateway.toml::

    [prices."gpt-4o"]
    input = 2.5
    output = 10.0
    cached_input = 1.25      # optional: prompt-cache reads (default: the input price)

At configure time every deployment whose ``input_price`` and ``output_price`` are both unset gets
the price of its upstream ``model``. A name is looked up as given, then without a provider prefix
(``openai/gpt-4o``, ``models/gemini-2.0-flash``), then without a date or version suffix
(``-2024-08-06``, ``-20241022``, ``-0125``, ``-002``, ``-latest``, ``-preview``, ``@20241022``), one
at a time. Deployments with a price of their own keep it; the core computes each request's cost from
the deployment's prices (``llmgateway.core.pipeline.cost_of``) and storage records it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib import resources

from llmgateway.core.config import GatewayConfig
from llmgateway.core.hookspecs import hookimpl

log = logging.getLogger("llmgateway.pricing")

_SUFFIX = re.compile(
    r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{2}-\d{4}|-\d{2}-\d{2}|-\d{3,4}|-v\d+(\.\d+)?(:\d+)?|-latest|-preview|-exp)$"
)


@dataclass(slots=True, frozen=True)
class Price:
    input: float
    output: float
    cached_input: float | None = None


def shipped_prices() -> dict[str, Price]:
    """The table shipped with llmgateway (``pricing.json``)."""
    data = json.loads(resources.files("llmgateway.plugins").joinpath("pricing.json").read_text(encoding="utf-8"))
    return {name: Price(**entry) for name, entry in data["models"].items()}


def candidates(model: str) -> list[str]:
    """The names ``model`` is looked up under, most specific first."""
    names: list[str] = []
    for name in (model, model.rsplit("/", 1)[-1]):
        name = name.split("@", 1)[0]
        while name and name not in names:
            names.append(name)
            stripped = _SUFFIX.sub("", name)
            if stripped == name:
                break
            name = stripped
    return names


def lookup(table: dict[str, Price], model: str) -> Price | None:
    for name in candidates(model):
        price = table.get(name) or table.get(name.lower())
        if price is not None:
            return price
    return None


class PricingPlugin:
    def __init__(self) -> None:
        self.table: dict[str, Price] = {}

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        table = shipped_prices()
        section = config.section("prices")
        for name in list(section.data):
            entry = section.table(name)
            cached = entry.opt_number("cached_input", minimum=0)
            table[name] = Price(
                input=entry.number("input", minimum=0),
                output=entry.number("output", minimum=0),
                cached_input=cached,
            )
            entry.check_unknown()
        section.check_unknown()
        self.table = table
        applied = 0
        for group in config.models.values():
            for deployment in group.deployments:
                if deployment.input_price is not None or deployment.output_price is not None:
                    continue
                price = lookup(table, deployment.model)
                if price is None:
                    continue
                deployment.input_price = price.input
                deployment.output_price = price.output
                if deployment.cached_input_price is None:
                    deployment.cached_input_price = price.cached_input
                applied += 1
        if applied:
            log.debug("prices applied to %d deployment(s)", applied)

    def price(self, model: str) -> Price | None:
        """The price the gateway would use for an upstream model name (None: unknown)."""
        return lookup(self.table, model)
