"""Microsoft Entra ID access tokens for a service principal (OAuth 2.0 client credentials), kept fresh.

The ``azure`` provider uses this when configured with ``azure_tenant_id``, ``azure_client_id`` and
``azure_client_secret``: a token is fetched from ``{authority}/{tenant}/oauth2/v2.0/token`` on the
first request, reused until a few minutes before it expires, then renewed in the background while
the old one keeps serving (no request waits for a renewal while a valid token exists). Concurrent
requests that find no valid token share one fetch. A failed fetch is reported to the requests that
needed it as the token endpoint's error (its ``error`` and ``error_description``, with the secret
redacted) and is not repeated for ``RETRY_AFTER_FAILURE`` seconds, so a wrong secret does not turn
every request into a call to the identity platform.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import quote

import httpx
import orjson

from llmgateway.core.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    map_upstream_errors,
    redact,
)

log = logging.getLogger("llmgateway.providers.azure")

DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_SCOPE = "https://cognitiveservices.azure.com/.default"


class EntraToken:
    #: renew this many seconds before expiry (at most half of the token's lifetime)
    REFRESH_BEFORE = 300.0
    #: after a failed fetch, requests get that failure for this long instead of a new fetch
    RETRY_AFTER_FAILURE = 10.0

    def __init__(
        self,
        provider: str,
        http: httpx.AsyncClient,
        *,
        tenant_id: str,
        client_id: str,
        client_secret: str,
        authority: str = DEFAULT_AUTHORITY,
        scope: str = DEFAULT_SCOPE,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.provider = provider
        self.http = http
        self.url = f"{authority.rstrip('/')}/{quote(tenant_id, safe='')}/oauth2/v2.0/token"
        self.form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret,
            "scope": scope,
        }
        self._secrets = (*secrets, client_secret)
        self.secrets = self._secrets  # and the current token, once there is one
        self.token: str | None = None
        self.usable_until = 0.0  # time.monotonic() after which the token is not sent any more
        self.renew_at = 0.0
        self.fetches = 0
        self._fetching: asyncio.Task[None] | None = None
        self._failure: UpstreamError | None = None
        self._failed_at = -1e9

    async def get(self) -> str:
        """A valid token: the kept one, else a fetched one (raises the fetch's failure)."""
        now = time.monotonic()
        token = self.token
        if token is not None and now < self.renew_at:
            return token  # the usual case
        if token is not None and now < self.usable_until:  # renew in the background, serve the old one
            if self._fetching is None and now - self._failed_at >= self.RETRY_AFTER_FAILURE:
                self._start()
            return token
        if self._fetching is None:
            if self._failure is not None and now - self._failed_at < self.RETRY_AFTER_FAILURE:
                raise self._failure.with_traceback(None)  # not a traceback growing with every raise
            self._start()
        assert self._fetching is not None
        await asyncio.shield(self._fetching)  # a caller that gives up leaves the fetch to the others
        assert self.token is not None
        return self.token

    def _start(self) -> None:
        task = self._fetching = asyncio.get_running_loop().create_task(self._fetch(), name="entra-token")
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._fetching = None
        if not task.cancelled() and task.exception() is not None and self.token is not None:
            log.warning("provider %s: renewing the Entra ID token failed: %s", self.provider, task.exception())

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            with map_upstream_errors(self.provider, self.secrets):
                response = await self.http.post(self.url, data=self.form, headers={"accept": "application/json"})
                body = await response.aread()
            if response.status_code != 200:
                raise UpstreamStatusError(
                    f"Provider '{self.provider}' could not get a Microsoft Entra ID token: {self._reason(body)}",
                    upstream_status=response.status_code,
                    provider=self.provider,
                )
            try:
                data = orjson.loads(body)
                token, lifetime = str(data["access_token"]), float(data["expires_in"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UpstreamProtocolError(
                    f"Provider '{self.provider}': the Entra ID token endpoint sent an unreadable answer",
                    provider=self.provider,
                ) from None
        except UpstreamError as error:
            self._failure, self._failed_at = error, time.monotonic()
            raise
        now = time.monotonic()
        # not sent in its last moments (a tenth of its lifetime, 30 s at most): it could expire in transit
        self.token, self.usable_until = token, now + lifetime - min(30.0, lifetime / 10)
        self.renew_at = now + max(lifetime - self.REFRESH_BEFORE, lifetime / 2)
        self._failure = None
        self.secrets = (*self._secrets, token)

    def _reason(self, body: bytes) -> str:
        try:
            data = orjson.loads(body)
            text = f"{data.get('error', 'error')}: {data.get('error_description', '')}".strip(": ")
        except (orjson.JSONDecodeError, AttributeError):
            text = body[:200].decode(errors="replace")
        return redact(text.splitlines()[0] if text else "no details", self.secrets)

    async def aclose(self) -> None:
        task = self._fetching
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
