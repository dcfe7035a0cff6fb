"""llmgateway: one OpenAI-compatible endpoint in front of many LLM providers."""

from __future__ import annotations

from .core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
