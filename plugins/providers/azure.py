"""Provider ``azure``: Azure OpenAI (and Azure AI Foundry's OpenAI endpoints).

Config (``[providers.NAME]``)::

    type = "azure"
    base_url = "https://my-resource.openai.azure.com"   # the resource endpoint
    api_key = "${AZURE_OPENAI_API_KEY}"                  # sent as the ``api-key`` header
    # azure_ad_token = "${AZURE_OPENAI_AD_TOKEN}"        # or a Microsoft Entra ID token (Bearer)
    # azure_tenant_id = "..."                            # or a service principal: tokens fetched
    # azure_client_id = "..."                            # and renewed by the gateway (client
    # azure_client_secret = "${AZURE_CLIENT_SECRET}"     # credentials; see plugins/providers/entra.py)
    # azure_authority_host = "https://login.microsoftonline.com"
    # azure_scope = "https://cognitiveservices.azure.com/.default"
    api_version = "2024-10-21"                           # the ``api-version`` query parameter
    api_style = "deployments"                            # or "v1" for /openai/v1/ (no api-version)

A gateway deployment's ``model`` is the Azure *deployment name*. With ``api_style = "deployments"``
requests go to ``{base_url}/openai/deployments/{model}/chat/completions?api-version=...``; with
``"v1"`` they go to ``{base_url}/openai/v1/chat/completions`` with the deployment name as ``model``
(``api-version`` is sent only when configured).

Azure speaks the OpenAI format with a few additions, handled here:

* Content filtering: a prompt that trips the filter is a 400 with ``code: "content_filter"``, which
  becomes the client-facing ``content_policy_violation`` error (``error_class = "content_policy"``);
  an answer filtered while generating ends with ``finish_reason: "content_filter"`` (passed on).
* Streams start with an annotation chunk that has no choices (``prompt_filter_results``, empty
  ``id``/``model``/``object``) and, with asynchronous filtering, carry annotation-only choices
  (``content_filter_offsets``, no ``delta``). Such annotation-only chunks and choices are never
  forwarded: clients that read ``chunk.choices[0]`` keep working. The prompt filter results are
  attached to the first forwarded chunk instead, and ``content_filter_results`` on real choices
  pass through untouched, as they do in plain (non-streamed) answers.
* Usage arrives in a final chunk with empty ``choices`` (``stream_options.include_usage``, always
  requested); it is forwarded only when the client asked for it. When Azure sends none (older API
  versions), usage is estimated and marked so.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from llmgateway.core.config import ProviderConfig, Section
from llmgateway.core.errors import ConfigError, UpstreamProtocolError, map_upstream_errors
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.http import body_chunks
from llmgateway.core.provider import (
    Provider,
    UpstreamCall,
    model_field,
    rewrite_model,
)
from llmgateway.core.sse import SSEDecoder, frame, parse_event
from llmgateway.core.types import Usage
from llmgateway.plugins.providers.entra import DEFAULT_AUTHORITY, DEFAULT_SCOPE, EntraToken
from llmgateway.plugins.providers.openai import OpenAIProvider, StreamState

#: the newest generally available data-plane API version when this was written
DEFAULT_API_VERSION = "2024-10-21"

# Frames that need parsing; every other frame is forwarded as bytes (model rewritten).
_AZURE_MARKERS = (b'"prompt_filter_results"', b'"content_filter_offsets"', b'"choices":[]', b'"choices": []')
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_TEXT = re.compile(rb'"(?:content|arguments|text)"\s*:\s*"((?:[^"\\]|\\.)*)"')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]+)"')


_PRINCIPAL = ("azure_tenant_id", "azure_client_id", "azure_client_secret")


@dataclass(slots=True)
class _StreamState(StreamState):
    prompt_filters: Any = None


class AzureOpenAIProvider(OpenAIProvider):
    capabilities = frozenset({"chat", "chat_stream", "completions", "completions_stream", "embeddings"})
    option_keys = frozenset(
        {"api_version", "api_style", "azure_ad_token", *_PRINCIPAL, "azure_authority_host", "azure_scope"}
    )

    @classmethod
    def validate_config(cls, config: ProviderConfig) -> None:
        section = Section(config.options, config.key, "")
        section.choice("api_style", ("deployments", "v1"), "deployments")
        section.opt_string("api_version")
        token = section.opt_string("azure_ad_token")
        principal = {name: section.opt_string(name) for name in _PRINCIPAL}
        section.opt_string("azure_authority_host")
        section.opt_string("azure_scope")
        section.check_unknown()
        if not config.base_url:
            raise ConfigError(
                "is required for Azure OpenAI: the resource endpoint, e.g. https://my-resource.openai.azure.com",
                key=f"{config.key}.base_url",
            )
        if any(principal.values()):
            missing = [name for name, value in principal.items() if not value]
            if missing:
                raise ConfigError(
                    "is required with the other service principal settings (azure_tenant_id, azure_client_id, "
                    "azure_client_secret)",
                    key=f"{config.key}.{missing[0]}",
                )
            if token or config.api_key:
                other = "azure_ad_token" if token else "api_key"
                raise ConfigError(
                    "give one way to authenticate: a service principal, azure_ad_token or api_key",
                    key=f"{config.key}.{other}",
                )
            return
        if token and config.api_key:
            raise ConfigError("give either api_key or azure_ad_token, not both", key=f"{config.key}.azure_ad_token")
        has_auth_header = any(k.lower() in ("api-key", "authorization") for k in config.headers)
        if not token and not config.api_key and not has_auth_header:
            raise ConfigError(
                "is required: an API key (sent as the api-key header), azure_ad_token (a Microsoft Entra ID "
                "token), or a service principal (azure_tenant_id, azure_client_id, azure_client_secret)",
                key=f"{config.key}.api_key",
            )

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        root = self.base_url
        for suffix in ("/openai/v1", "/openai"):
            if root.endswith(suffix):
                root = root[: -len(suffix)]
                break
        self.root = root
        self.v1 = self.option("api_style", "deployments") == "v1"
        version = self.option("api_version") or (None if self.v1 else DEFAULT_API_VERSION)
        if version:
            self.params["api-version"] = str(version)
        headers = {"content-type": "application/json", "accept": "application/json"}
        token = self.option("azure_ad_token")
        self.entra: EntraToken | None = None
        self._token: str | None = None
        if self.option("azure_tenant_id"):
            self.entra = EntraToken(
                self.name,
                http,
                tenant_id=str(self.option("azure_tenant_id")),
                client_id=str(self.option("azure_client_id")),
                client_secret=str(self.option("azure_client_secret")),
                authority=str(self.option("azure_authority_host") or DEFAULT_AUTHORITY),
                scope=str(self.option("azure_scope") or DEFAULT_SCOPE),
                secrets=self.secrets,
            )
            self.refreshes_auth = True
        elif token:
            headers["authorization"] = f"Bearer {token}"
        elif config.api_key:
            headers["api-key"] = config.api_key
        headers.update(config.headers)
        self.headers = headers

    # ---- a service principal's token ---------------------------------------------------------

    async def refresh_auth(self) -> None:
        """Send the current Entra ID token (renewed by :class:`EntraToken`) from now on."""
        assert self.entra is not None
        token = await self.entra.get()
        if token != self._token:
            self._token = token
            self.headers = {**self.headers, "authorization": f"Bearer {token}"}  # a new dict: no torn reads
            self.secrets = self.entra.secrets

    async def aclose(self) -> None:
        if self.entra is not None:
            await self.entra.aclose()
        await super().aclose()

    def url(self, path: str, deployment_model: str) -> str:
        if self.v1:
            return f"{self.root}/openai/v1{path}"
        return f"{self.root}/openai/deployments/{quote(deployment_model, safe='')}{path}"

    # ---- streams -----------------------------------------------------------------------------

    async def _relay(self, response: httpx.Response, call: UpstreamCall) -> AsyncGenerator[bytes, None]:
        decoder = SSEDecoder()
        replacement = model_field(call.alias)
        state = _StreamState()
        try:
            with map_upstream_errors(self.name, self.secrets):
                async for chunk in body_chunks(response):
                    for block in decoder.feed(chunk):
                        _, data = parse_event(block)
                        if not data:
                            continue
                        if data == b"[DONE]":
                            for out in self._finish(call, state):
                                yield out
                            return
                        if data.startswith(b'{"error"'):
                            raise self._stream_error(data)
                        if (
                            state.prompt_filters is not None
                            or _USAGE.search(data)
                            or any(marker in data for marker in _AZURE_MARKERS)
                        ):
                            for out in self._annotated(orjson.loads(data), call, state):
                                yield out
                            continue
                        if call.upstream_model is None or not state.id:
                            self._remember(orjson.loads(data), call, state)
                        for match in _TEXT.finditer(data):
                            state.text += len(match.group(1))
                        if b'"finish_reason":"' in data or b'"finish_reason": "' in data:
                            found = _FINISH.search(data)
                            if found:
                                state.finish = found.group(1).decode()
                        yield b"data: " + rewrite_model(data, replacement) + b"\n\n"
            raise UpstreamProtocolError(
                f"Provider '{self.name}' ended the stream before it was complete", provider=self.name
            )
        finally:
            self._finish_usage(call, state.text)  # a cut or abandoned stream still bills its text

    @staticmethod
    def _remember(parsed: dict[str, Any], call: UpstreamCall, state: _StreamState) -> None:
        """Keep the upstream model and the chunk identity (Azure's annotation chunks have neither)."""
        if parsed.get("model") and call.upstream_model is None:
            call.upstream_model = str(parsed["model"])
        if parsed.get("id") and not state.id:
            state.id = str(parsed["id"])
            state.created = int(parsed.get("created") or 0)
            state.object = str(parsed.get("object") or state.object)

    def _annotated(self, parsed: dict[str, Any], call: UpstreamCall, state: _StreamState) -> list[bytes]:
        """A chunk with Azure annotations or usage: keep what a client needs, in OpenAI's shape."""
        out: list[bytes] = []
        usage = parsed.pop("usage", None)
        filters = parsed.pop("prompt_filter_results", None)
        if filters is not None:
            state.prompt_filters = filters
        choices = []
        for choice in parsed.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if "delta" not in choice and "text" not in choice:
                if choice.get("finish_reason") is None:
                    continue  # annotation only (asynchronous content filter results)
                choice["delta"] = {}
            choices.append(choice)
            delta = choice.get("delta") or {}
            state.text += len(str(delta.get("content") or choice.get("text") or ""))
            for tool_call in delta.get("tool_calls") or ():
                state.text += len(str((tool_call.get("function") or {}).get("arguments") or ""))
            if choice.get("finish_reason"):
                state.finish = str(choice["finish_reason"])
        if choices:
            self._remember(parsed, call, state)
            parsed["choices"] = choices
            parsed["model"] = call.alias
            if state.prompt_filters is not None:
                parsed["prompt_filter_results"] = state.prompt_filters
                state.prompt_filters = None
            out.append(frame(parsed))
        if isinstance(usage, dict):
            if parsed.get("model") and call.upstream_model is None:
                call.upstream_model = str(parsed["model"])
            call.usage = Usage.from_openai(usage)
            if call.include_usage:
                out.append(self._usage_frame(call, state, usage))
        return out


@hookimpl
def llmgateway_register_providers() -> dict[str, type[Provider]]:
    return {"azure": AzureOpenAIProvider}
