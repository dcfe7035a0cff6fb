"""Plugin ``auth``: the master key and anonymous access (``[auth]``).

``master_key`` (use ``${ENV}``; ``$LLMGATEWAY_MASTER_KEY`` when the config sets none) grants the
admin role. ``allow_anonymous`` lets requests without a key through as the anonymous user — the
default only when no master key is set, so the demo config answers without keys while any
configured deployment is locked by default. Virtual keys (``[auth.keys]``) and JWT (``[auth.jwt]``)
are separate plugins that run before this one; this one runs last.

Keys are compared as SHA-256 digests with :func:`hmac.compare_digest` (constant time, whatever the
length of what was sent).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from llmgateway.core.config import GatewayConfig
from llmgateway.core.errors import AuthenticationError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import ANONYMOUS, Principal, RequestContext

MASTER = Principal(kind="master", roles=frozenset({"admin", "user"}), key_id="master")
MASTER_KEY_ENV = "LLMGATEWAY_MASTER_KEY"


def bearer_token(ctx: RequestContext) -> str | None:
    """The API key a client sent: ``Authorization: Bearer``, ``x-api-key`` or ``api-key``."""
    headers = ctx.headers
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("x-api-key") or headers.get("api-key") or None


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class AuthPlugin:
    def __init__(self) -> None:
        self.master_digest: bytes | None = None
        self.allow_anonymous = True

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        section = config.section("auth")
        master = section.opt_string("master_key") or os.environ.get(MASTER_KEY_ENV) or None
        if master is not None and len(master) < 8:
            raise section.error("master_key", "must be at least 8 characters long")
        self.master_digest = digest(master) if master else None
        self.allow_anonymous = section.boolean("allow_anonymous", master is None)
        section._read.update({"keys", "jwt"})  # sub-tables read by the keys and jwt plugins
        section.check_unknown()

    @hookimpl(trylast=True)
    def llmgateway_authenticate(self, ctx: RequestContext) -> Principal | None:
        token = bearer_token(ctx)
        if token is None:
            if self.allow_anonymous:
                return ANONYMOUS
            raise AuthenticationError("Missing API key; send it as 'Authorization: Bearer <key>'")
        if self.master_digest is not None and hmac.compare_digest(digest(token), self.master_digest):
            return MASTER
        if self.allow_anonymous:
            return ANONYMOUS
        raise AuthenticationError("Invalid API key")
