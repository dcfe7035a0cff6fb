"""The provider interface: how the core talks to one upstream (OpenAI, Anthropic, a local server...).

A provider plugin subclasses :class:`Provider` and registers it through
``llmgateway_register_providers``. The core hands it an :class:`UpstreamCall` whose ``body`` is
an OpenAI-format request with ``model`` already set to the upstream model name; the provider
translates to its wire format, calls upstream through ``self.http`` (an ``httpx.AsyncClient`` over
the gateway's fast transport) and answers in OpenAI format, naming ``call.alias`` as the model.

Contract for streams (:meth:`Provider.chat_stream`, :meth:`Provider.completions_stream`): an async
iterator of complete SSE frames, each ``b"data: <json>\\n\\n"``, ending with ``b"data: [DONE]\\n\\n"``.
The iterator must *raise* an :class:`~llmgateway.core.errors.UpstreamError` if the upstream stream
fails or ends early; it must never just stop. Usage goes into ``call.usage`` (mark it estimated if
upstream sent none); a usage chunk is forwarded to the client only when ``call.include_usage``.
Errors are raised through :func:`~llmgateway.core.errors.error_from_upstream_status` and
:func:`~llmgateway.core.errors.map_upstream_errors`, the single boundary for upstream failures.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import orjson

from .config import ProviderConfig, Section
from .errors import (
    InvalidRequestError,
    UnsupportedParameterError,
    UpstreamProtocolError,
    error_from_upstream_status,
    error_message_from_body,
    map_upstream_errors,
)
from .http import open_stream
from .types import Deployment, RequestContext, Usage

RATE_LIMIT_HEADER_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "ratelimit-", "retry-after")
_RATE_LIMIT_PREFIXES_RAW = tuple(prefix.encode() for prefix in RATE_LIMIT_HEADER_PREFIXES)


@dataclass(slots=True)
class UpstreamCall:
    """One request to one deployment. Providers fill the result fields as they learn them."""

    ctx: RequestContext
    deployment: Deployment
    body: dict[str, Any]
    alias: str
    include_usage: bool = False  # forward the usage chunk to the client (stream_options.include_usage)
    timeout: float | None = None  # seconds left in the request's deadline
    # filled by the provider:
    usage: Usage | None = None
    finish_reason: str | None = None
    upstream_model: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)


class Provider:
    """Base class for provider plugins. Override what the provider supports; the rest refuses."""

    #: what the provider can do; the core answers 400 for an endpoint a deployment cannot serve
    capabilities: ClassVar[frozenset[str]] = frozenset({"chat", "chat_stream"})
    #: OpenAI request parameters this provider cannot honour (400 unless drop_unsupported_params)
    unsupported_params: ClassVar[frozenset[str]] = frozenset()
    #: keys accepted in [providers.NAME] beyond the common ones (validated by validate_options)
    option_keys: ClassVar[frozenset[str]] = frozenset()
    #: default base URL when the config gives none
    default_base_url: ClassVar[str | None] = None

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.name = config.name
        self.http = http
        self.secrets = config.secrets
        base = config.base_url or self.default_base_url
        self.base_url = base.rstrip("/") if base else ""

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        """Check ``config.options`` (unknown keys, types); raise ConfigError naming the key."""
        section = Section(config.options, config.key, "")
        for key in cls.option_keys:
            section._read.add(key)
        section.check_unknown()

    def option(self, key: str, default: Any = None) -> Any:
        return self.config.options.get(key, default)

    # ---- operations ------------------------------------------------------------------------

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        raise InvalidRequestError(f"Provider '{self.name}' does not support chat completions", param="model")

    def chat_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        raise InvalidRequestError(f"Provider '{self.name}' does not support streaming", param="stream")

    async def completions(self, call: UpstreamCall) -> dict[str, Any]:
        raise InvalidRequestError(f"Provider '{self.name}' does not support text completions", param="model")

    def completions_stream(self, call: UpstreamCall) -> AsyncIterator[bytes]:
        raise InvalidRequestError(f"Provider '{self.name}' does not support streaming", param="stream")

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        raise InvalidRequestError(f"Provider '{self.name}' does not support embeddings", param="model")

    async def check_health(self) -> None:
        """Raise if the provider is not reachable. Default: nothing to check."""

    async def aclose(self) -> None:
        """Release provider-owned resources (the shared HTTP client is closed by the core)."""

    # ---- helpers for subclasses -------------------------------------------------------------

    def check_params(self, call: UpstreamCall) -> None:
        """Refuse (or drop, if configured) parameters this provider cannot honour."""
        if not self.unsupported_params:
            return
        for name in self.unsupported_params.intersection(call.body):
            if self.config.drop_unsupported_params:
                del call.body[name]
            else:
                raise UnsupportedParameterError(
                    f"Provider '{self.name}' does not support the parameter '{name}' "
                    "(set drop_unsupported_params = true on the provider to drop it instead)",
                    param=name,
                )

    def raise_for_status(self, response: httpx.Response, body: bytes) -> None:
        """Turn an upstream error response into the client-facing error (the one mapping)."""
        if 300 <= response.status_code < 400:  # never followed (SSRF): a redirect is no answer
            raise UpstreamProtocolError(
                f"Provider '{self.name}' answered with a redirect ({response.status_code}), which the gateway "
                "does not follow",
                provider=self.name,
                upstream_status=response.status_code,
            )
        if response.status_code < 400:
            return
        message, code, param = self.parse_error(body)
        raise error_from_upstream_status(
            self.name,
            response.status_code,
            response.headers,
            message,
            upstream_code=code,
            param=param,
            secrets=self.secrets,
        )

    def streaming(
        self,
        call: UpstreamCall,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> contextlib.AbstractAsyncContextManager[httpx.Response]:
        """POST a streamed request and hold its response open for the block.

        Upstream failures are mapped (:func:`~llmgateway.core.errors.map_upstream_errors`), an error
        status raises the client-facing error with the provider's body, the rate-limit headers land
        in ``call.response_headers``, and the response is closed when the block ends however it ends
        (closing before the end closes the connection: that is how an abandoned stream cancels the
        upstream call). Read the body with :func:`~llmgateway.core.http.body_chunks`
        (``response.aiter_raw()`` without a layer) under ``map_upstream_errors``.
        """
        return _UpstreamStream(self, call, url, content, headers, params)

    def captured_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The upstream response headers kept for the router (rate-limit state). Override to add."""
        return self.rate_limit_headers(headers)

    def parse_error(self, body: bytes) -> tuple[str, str | None, str | None]:
        """(message, code, param) from this provider's error body. Override for odd formats."""
        return error_message_from_body(body)

    @staticmethod
    def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
        if isinstance(headers, httpx.Headers):  # the usual case: test the raw names, decode only matches
            found = {}
            for key, value in headers.raw:
                name = key.lower()
                if name.startswith(_RATE_LIMIT_PREFIXES_RAW):  # numbers and durations: ASCII
                    found[name.decode("latin-1")] = value.decode("latin-1")
            return found
        return {k: v for k, v in headers.items() if k.lower().startswith(RATE_LIMIT_HEADER_PREFIXES)}


class _UpstreamStream(contextlib.AbstractAsyncContextManager["httpx.Response"]):
    """:meth:`Provider.streaming`'s context manager: a class, not a generator (every stream would
    otherwise carry one more async generator: its creation, the event loop's bookkeeping, its close)."""

    __slots__ = ("call", "content", "headers", "params", "provider", "response", "url")

    def __init__(
        self,
        provider: Provider,
        call: UpstreamCall,
        url: str,
        content: bytes,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
    ) -> None:
        self.provider = provider
        self.call = call
        self.url = url
        self.content = content
        self.headers = headers
        self.params = params
        self.response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        provider = self.provider
        with map_upstream_errors(provider.name, provider.secrets):
            response = await open_stream(
                provider.http, self.url, content=self.content, headers=self.headers, params=self.params
            )
        self.response = response
        try:
            self.call.response_headers = provider.captured_headers(response.headers)
            if response.status_code >= 400:
                with map_upstream_errors(provider.name, provider.secrets):
                    body = await response.aread()
                provider.raise_for_status(response, body)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def __aexit__(self, *exc_info: object) -> None:
        if self.response is not None:
            await self.response.aclose()


# ---- helpers shared by OpenAI-format providers -----------------------------------------------

MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


def rewrite_model(frame: bytes, replacement: bytes) -> bytes:
    """Replace the first ``"model": "..."`` in a JSON frame without parsing it."""
    return MODEL_FIELD.sub(replacement, frame, count=1)


def model_field(alias: str) -> bytes:
    return b'"model":' + orjson.dumps(alias)


def estimate_tokens(text_length: int) -> int:
    """A rough token count from a character count (about four characters per token)."""
    return max(1, (text_length + 3) // 4) if text_length else 0


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    source = body.get("messages") if "messages" in body else body.get("prompt", body.get("input", ""))
    return estimate_tokens(len(orjson.dumps(source)))
