"""Other wire formats on the way in (e.g. Anthropic Messages at ``/v1/messages``).

The pipeline works on OpenAI-format bodies. An :class:`Ingress` translates a request in its own
format to an OpenAI body, and the OpenAI answer (plain or streamed) back to its format; everything
between (auth, cache, routing, limits, providers, accounting) is the same request path. Plugins
offer ingresses through ``llmgateway_register_ingress`` (path → Ingress).

Error bodies keep the OpenAI envelope (``{"error": {message, type, param, code}}``); an ingress may
add keys around it (Anthropic clients also expect ``"type": "error"`` at the top level).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .errors import GatewayError
from .types import Endpoint, RequestContext


class Ingress:
    #: which OpenAI endpoint the translated request goes to
    endpoint: Endpoint = "chat.completions"
    #: a short name for logs and usage rows
    name: str = "ingress"

    def to_openai(self, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        """The request as an OpenAI body. Raise InvalidRequestError (naming the param) on bad input."""
        raise NotImplementedError

    def from_openai(self, ctx: RequestContext, response: dict[str, Any]) -> dict[str, Any]:
        """A complete OpenAI response in this format."""
        raise NotImplementedError

    def stream(self, ctx: RequestContext, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """OpenAI SSE frames in (``data: ...\\n\\n`` ending with ``[DONE]``), this format's frames out.

        Must not buffer the whole stream. If ``frames`` raises a GatewayError, let it propagate:
        the core then sends :meth:`error_event`. Close ``frames`` (``aclose``) in a ``finally``.
        """
        raise NotImplementedError

    def error_body(self, error: GatewayError) -> bytes:
        return error.body()

    def error_event(self, error: GatewayError) -> bytes:
        return error.sse_event()
