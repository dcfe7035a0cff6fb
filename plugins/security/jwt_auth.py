"""Plugin ``jwt``: bearer JWTs from an identity provider (``[auth.jwt]``).

Only tokens shaped like a JWT (``eyJ….….…``) come here; anything else goes on to the other auth
plugins. A JWT that does not verify is a 401 — it never falls through to anonymous access.

* Algorithms: ``algorithms`` lists what is accepted (HS256/384/512, RS256/384/512, PS256/384/512,
  ES256/384/512). ``none`` never is. The key decides the algorithm family, not the token: an HMAC
  algorithm is only ever verified with ``secret``, an RSA/EC one only with an RSA/EC public key of
  the same type, so a token "signed" HS256 with the RSA public key as the secret (algorithm
  confusion) is refused.
* Keys: ``secret`` (HMAC, at least 32 bytes), ``public_key_file`` (PEM), ``jwks_file`` or
  ``jwks_url`` (fetched when first needed, cached ``jwks_cache_ttl`` seconds, refetched at most every
  ``jwks_min_refresh`` seconds when a token names an unknown ``kid``; a ``kid`` still unknown is a 401).
* Claims: ``exp`` is required (``required_claims``), ``nbf``/``iat`` checked, ``issuer`` and
  ``audience`` when configured; ``leeway`` seconds of clock skew.
* Mapping: ``user_claim`` (default ``sub``), ``team_claim``, ``roles_claim`` (a list or a
  space/comma separated string; dotted paths such as ``realm_access.roles`` work), ``role_map``
  (IdP role → gateway role), ``default_roles``, ``models_claim``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmgateway.core.config import GatewayConfig, Section
from llmgateway.core.errors import AuthenticationError, ConfigError, ServiceUnavailableError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import ROLES, Principal, RequestContext
from llmgateway.plugins.auth import bearer_token

if TYPE_CHECKING:
    import httpx

    from llmgateway.core.app import Gateway

log = logging.getLogger("llmgateway.security.jwt")

JWT_SHAPE = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*$")
FAMILIES = {
    **{f"HS{n}": "oct" for n in (256, 384, 512)},
    **{f"RS{n}": "RSA" for n in (256, 384, 512)},
    **{f"PS{n}": "RSA" for n in (256, 384, 512)},
    **{f"ES{n}": "EC" for n in (256, 384, 512)},
}


def looks_like_jwt(token: str) -> bool:
    return len(token) < 16_384 and JWT_SHAPE.match(token) is not None


def _key_family(key: Any) -> str | None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    return None


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v for v in re.split(r"[\s,]+", value) if v]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


class JwtPlugin:
    def __init__(self) -> None:
        self.enabled = False
        self.algorithms: tuple[str, ...] = ()
        self.secret: bytes | None = None
        self.file_keys: dict[str | None, tuple[str, Any]] = {}  # kid (None: PEM file) -> (family, key)
        self.jwks_url: str | None = None
        self.jwks_cache_ttl = 300.0
        self.jwks_min_refresh = 30.0
        self.jwks_timeout = 5.0
        self.issuer: str | None = None
        self.audience: list[str] | None = None
        self.leeway = 30.0
        self.required_claims: list[str] = ["exp"]
        self.user_claim = "sub"
        self.team_claim: str | None = None
        self.roles_claim: str | None = "roles"
        self.models_claim: str | None = None
        self.role_map: dict[str, str] = {}
        self.default_roles: frozenset[str] = frozenset({"user"})
        self._url_keys: dict[str, tuple[str, Any]] = {}
        self._fetched_at = 0.0  # monotonic time of the last successful fetch (0: never)
        self._tried_at = -1e9  # monotonic time of the last attempt
        self._fetch_lock = asyncio.Lock()
        self._http: httpx.AsyncClient | None = None

    # ---- configuration -----------------------------------------------------------------------

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        section = config.section("auth").table("jwt")
        self.enabled = bool(section.data)
        if not self.enabled:
            return
        try:
            import cryptography  # noqa: F401
            import jwt  # noqa: F401
        except ImportError:
            raise ConfigError("needs PyJWT and cryptography: pip install 'llmgateway[jwt]'", key=section.key) from None
        secret = section.opt_string("secret")
        if secret is not None and len(secret.encode()) < 32:
            raise section.error("secret", "must be at least 32 bytes long")
        self.secret = secret.encode() if secret else None
        pem = section.opt_string("public_key_file")
        if pem:
            self.file_keys[None] = self._load_pem(section, pem)
        jwks_file = section.opt_string("jwks_file")
        if jwks_file:
            try:
                self.file_keys.update(self._parse_jwks(Path(jwks_file).read_bytes()))
            except (OSError, ValueError) as exc:
                raise section.error("jwks_file", f"cannot read a JWKS from it: {exc}") from None
        self.jwks_url = section.opt_string("jwks_url")
        if self.jwks_url and not self.jwks_url.startswith(("https://", "http://")):
            raise section.error("jwks_url", "must be an http(s) URL")
        self.jwks_cache_ttl = section.number("jwks_cache_ttl", 300.0, minimum=1)
        self.jwks_min_refresh = section.number("jwks_min_refresh", 30.0, minimum=0)
        self.jwks_timeout = section.number("jwks_timeout", 5.0, minimum=0.1)
        asymmetric = bool(self.file_keys or self.jwks_url)
        if not (self.secret or asymmetric):
            raise section.error("secret", "set secret, public_key_file, jwks_file or jwks_url")
        default_algs = (["HS256"] if self.secret else []) + (["RS256", "ES256"] if asymmetric else [])
        algorithms = section.strings("algorithms", default_algs)
        for alg in algorithms:
            family = FAMILIES.get(alg)
            if family is None:
                raise section.error("algorithms", f"unsupported algorithm {alg!r} ({', '.join(FAMILIES)})")
            if family == "oct" and not self.secret:
                raise section.error("algorithms", f"{alg} needs 'secret'")
            if family == "oct" and self.secret and len(self.secret) * 8 < int(alg[2:]):
                raise section.error("secret", f"must be at least {int(alg[2:]) // 8} bytes long for {alg}")
            if family != "oct" and not asymmetric:
                raise section.error("algorithms", f"{alg} needs public_key_file, jwks_file or jwks_url")
        if not algorithms:
            raise section.error("algorithms", "must not be empty")
        self.algorithms = tuple(algorithms)
        self.issuer = section.opt_string("issuer")
        audience = section.data.get("audience")
        if isinstance(audience, str):
            section.string("audience")
            self.audience = [audience]
        elif audience is not None:
            self.audience = section.strings("audience") or None
        self.leeway = section.number("leeway", 30.0, minimum=0)
        if self.leeway > 300:
            raise section.error("leeway", "must be at most 300 seconds")
        self.required_claims = section.strings("required_claims", ["exp"])
        self.user_claim = section.string("user_claim", "sub")
        self.team_claim = section.opt_string("team_claim")
        self.roles_claim = section.string("roles_claim", "roles") or None
        self.models_claim = section.opt_string("models_claim")
        self.role_map = section.string_map("role_map")
        for idp_role, role in self.role_map.items():
            if role not in ROLES:
                raise ConfigError(f"must be one of {', '.join(ROLES)}", key=f"{section.key}.role_map.{idp_role}")
        default_roles = section.strings("default_roles", ["user"])
        for role in default_roles:
            if role not in ROLES:
                raise section.error("default_roles", f"unknown role {role!r} ({', '.join(ROLES)})")
        self.default_roles = frozenset(default_roles)
        section.check_unknown()

    @staticmethod
    def _load_pem(section: Section, path: str) -> tuple[str, Any]:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            key = load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise section.error("public_key_file", f"cannot read a PEM public key from it: {exc}") from None
        family = _key_family(key)
        if family is None:
            raise section.error("public_key_file", "must hold an RSA or EC public key")
        return family, key

    @staticmethod
    def _parse_jwks(raw: bytes) -> dict[str | None, tuple[str, Any]]:
        """The RSA and EC keys of a JWKS document, by kid (symmetric keys are ignored)."""
        import jwt
        import orjson

        data = orjson.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("not a JWKS document (no 'keys' list)")
        keys: dict[str | None, tuple[str, Any]] = {}
        for item in data["keys"]:
            if not isinstance(item, dict) or item.get("kty") not in ("RSA", "EC"):
                continue
            if item.get("use") not in (None, "sig"):
                continue
            try:
                jwk = jwt.PyJWK(item)
            except jwt.PyJWTError:
                continue
            family = _key_family(jwk.key)
            if family is not None:
                keys[jwk.key_id] = (family, jwk.key)
        return keys

    @hookimpl
    def llmgateway_startup(self, gateway: Gateway) -> None:
        if self.enabled and self.jwks_url:
            import httpx

            self._http = httpx.AsyncClient(timeout=self.jwks_timeout, follow_redirects=False, trust_env=False)

    @hookimpl
    async def llmgateway_shutdown(self, gateway: Gateway) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # ---- verification ------------------------------------------------------------------------

    @hookimpl
    async def llmgateway_authenticate(self, ctx: RequestContext) -> Principal | None:
        if not self.enabled:
            return None
        token = bearer_token(ctx)
        if token is None or not looks_like_jwt(token):
            return None
        claims = await self.verify(token)
        return self.principal(claims)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or AuthenticationError saying (without secrets) what is wrong."""
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthenticationError("Invalid token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthenticationError("The token's algorithm is not accepted")
        family = FAMILIES[alg]
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("Invalid token")
        key: Any
        if family == "oct":
            key = self.secret
        else:
            key = await self._public_key(kid, family)
        options: dict[str, Any] = {"require": self.required_claims, "verify_aud": self.audience is not None}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("The token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("The token is not meant for this gateway (audience)") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("The token's issuer is not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"The token lacks the '{exc.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("The token's signature is invalid") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthenticationError("Invalid token") from None
        return claims

    async def _public_key(self, kid: str | None, family: str) -> Any:
        found = self._find(kid, family)
        if found is not None:
            return found
        if self.jwks_url is None:
            raise AuthenticationError("The token's signing key is unknown")
        now = time.monotonic()
        stale = now - self._fetched_at >= self.jwks_cache_ttl
        if stale or (kid is not None and now - self._tried_at >= self.jwks_min_refresh):
            await self._refresh()
            found = self._find(kid, family)
        if found is None:
            if not self._url_keys and not self.file_keys and self._fetched_at == 0:
                raise ServiceUnavailableError("The identity provider's keys could not be fetched")
            raise AuthenticationError("The token's signing key is unknown")
        return found

    def _find(self, kid: str | None, family: str) -> Any:
        if kid is not None:
            entry = self._url_keys.get(kid) or self.file_keys.get(kid)
            if entry is None and self.jwks_url is None and set(self.file_keys) == {None}:
                entry = self.file_keys[None]  # a single PEM key and nothing else: the kid is only a label
        else:
            candidates = [e for e in (*self.file_keys.values(), *self._url_keys.values()) if e[0] == family]
            entry = candidates[0] if len(candidates) == 1 else None
        if entry is None:
            return None
        if entry[0] != family:
            raise AuthenticationError("The token's algorithm does not match its key")
        return entry[1]

    async def _refresh(self) -> None:
        async with self._fetch_lock:
            now = time.monotonic()
            if now - self._tried_at < min(self.jwks_min_refresh, 1.0):
                return  # another request just fetched
            self._tried_at = now
            if self._http is None or self.jwks_url is None:
                return
            try:
                response = await self._http.get(self.jwks_url)
                if response.status_code != 200:
                    raise ValueError(f"HTTP {response.status_code}")
                keys = self._parse_jwks(response.content)
            except Exception as exc:
                log.warning("could not fetch the JWKS from %s: %s", self.jwks_url, type(exc).__name__)
                return
            self._url_keys = {k: v for k, v in keys.items() if k is not None}
            self._fetched_at = time.monotonic()

    # ---- claims → principal ------------------------------------------------------------------

    def principal(self, claims: dict[str, Any]) -> Principal:
        user = _claim(claims, self.user_claim)
        team = _claim(claims, self.team_claim) if self.team_claim else None
        roles: set[str] = set()
        if self.roles_claim:
            for name in _strings(_claim(claims, self.roles_claim)):
                mapped = self.role_map.get(name, name if not self.role_map else None)
                if mapped in ROLES:
                    roles.add(mapped)
        models = _strings(_claim(claims, self.models_claim)) if self.models_claim else None
        return Principal(
            kind="jwt",
            roles=frozenset(roles) or self.default_roles,
            user_id=str(user) if isinstance(user, (str, int)) else None,
            team_id=str(team) if isinstance(team, (str, int)) else None,
            allowed_models=frozenset(models) if models is not None and "*" not in models else None,
            metadata={k: claims[k] for k in ("iss", "sub") if isinstance(claims.get(k), str)},
        )
