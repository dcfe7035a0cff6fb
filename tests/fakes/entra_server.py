"""A fake Microsoft identity platform token endpoint (OAuth 2.0 client credentials grant).

``POST /{tenant}/oauth2/v2.0/token`` with a form body (``grant_type=client_credentials``,
``client_id``, ``client_secret``, ``scope``) answers as Entra ID does: ``200`` with
``{"token_type": "Bearer", "expires_in", "ext_expires_in", "access_token"}``, or its error body
(``error``, ``error_description`` starting with an ``AADSTS`` code, ``error_codes``, ``timestamp``,
``trace_id``, ``correlation_id``, ``error_uri``) with 400 (bad request, unknown tenant, wrong scope)
or 401 (``invalid_client``: a wrong secret). Issued tokens are added to ``issued`` (and to the
``accept`` set given, e.g. a fake Azure OpenAI's ``tokens``); ``expires_in`` sets their lifetime.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from starlette.types import Receive, Send

from tests.fakes.asgi import FakeServer, Request, send_json

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0b8d7e2c-5a31-4c4e-9a57-6f1c2f8e4d10"
CLIENT_SECRET = "entra-secret~0123456789abcdefghij"
SCOPE = "https://cognitiveservices.azure.com/.default"


@dataclass
class FakeEntra(FakeServer):
    expires_in: int = 3599
    issued: list[str] = field(default_factory=list)
    accept: set[str] = field(default_factory=set)
    fail_with: int | None = None  # answer every request with this status (500, 503...)

    def reset(self) -> None:
        super().reset()
        self.issued.clear()
        self.expires_in = 3599
        self.fail_with = None

    async def handle(self, request: Request, send: Send, receive: Receive) -> None:
        form = {k: v[0] for k, v in parse_qs(request.raw.decode()).items()}
        self.record(request, form)
        parts = request.path.strip("/").split("/")
        if request.method != "POST" or parts[1:] != ["oauth2", "v2.0", "token"]:
            await self._error(send, 404, "invalid_request", "AADSTS90002: the endpoint does not exist.", 90002)
            return
        if self.fail_with is not None:
            await self._error(send, self.fail_with, "temporarily_unavailable", "AADSTS90033: try again.", 90033)
            return
        if parts[0] != TENANT:
            await self._error(send, 400, "invalid_request", f"AADSTS90002: Tenant '{parts[0]}' not found.", 90002)
            return
        if form.get("grant_type") != "client_credentials" or "client_id" not in form:
            await self._error(
                send, 400, "invalid_request", "AADSTS900144: The request body must contain: grant_type.", 900144
            )
            return
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            await self._error(
                send,
                401,
                "invalid_client",
                f"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the "
                f"client secret value, not the client secret ID, for a secret added to app '{form.get('client_id')}'.",
                7000215,
            )
            return
        if form.get("scope") != SCOPE:
            await self._error(
                send, 400, "invalid_scope", "AADSTS70011: The provided value for scope is not valid.", 70011
            )
            return
        token = f"eyJ0eXAiOiJKV1Qi.entra-{len(self.issued) + 1}.{uuid.uuid4().hex}"
        self.issued.append(token)
        self.accept.add(token)
        await send_json(
            send,
            200,
            {
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "ext_expires_in": self.expires_in,
                "access_token": token,
            },
        )

    @staticmethod
    async def _error(send: Send, status: int, error: str, description: str, code: int) -> None:
        trace = str(uuid.uuid4())
        await send_json(
            send,
            status,
            {
                "error": error,
                "error_description": f"{description}\r\nTrace ID: {trace}\r\nCorrelation ID: {uuid.uuid4()}\r\n"
                "Timestamp: 2026-11-27 18:00:00Z",
                "error_codes": [code],
                "timestamp": "2026-11-27 18:00:00Z",
                "trace_id": trace,
                "correlation_id": str(uuid.uuid4()),
                "error_uri": f"https://login.microsoftonline.com/error?code={code}",
            },
        )
