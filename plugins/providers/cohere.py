"""Provider ``cohere`` (work in progress)."""

from __future__ import annotations

from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.provider import Provider


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {}
