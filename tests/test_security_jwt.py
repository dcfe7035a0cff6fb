"""JWT: HS256 / RS256 (JWKS over HTTP) / ES256 (PEM file) accepted and mapped to a principal; every
attack in the suite gets a 401 with the OpenAI error envelope."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from starlette.types import Receive, Scope, Send

from tests.conftest import GatewayFactory
from tests.servers import running
from tests.test_security_support import chat, config

SECRET = "hs256-test-secret-with-enough-bytes-1234"
ISSUER = "https://idp.example.test/"
AUDIENCE = "llmgateway"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": "RS256"}


class JWKSServer:
    """Serves a JWKS document and counts fetches."""

    def __init__(self) -> None:
        self.keys = [_jwk(RSA_KEY, "rsa-1")]
        self.fetches = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.fetches += 1
        body = orjson.dumps({"keys": self.keys})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[JWKSServer, str]]:
    server = JWKSServer()
    async with running(server) as url:
        yield server, f"{url}/.well-known/jwks.json"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "alice", "team": "research", "roles": ["idp-ops"], "iss": ISSUER, "aud": AUDIENCE}
    return {**base, "iat": now, "exp": now + 300, **overrides}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    """A token built by hand, for what libraries refuse to make (alg none, algorithm confusion)."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}".encode()
    signature = sign(signing_input) if sign else b""
    return f"{signing_input.decode()}.{b64(signature)}"


def gateway_config(jwks_url: str, ec_pem: Path) -> str:
    return config(
        f"""
        [auth.jwt]
        secret = "{SECRET}"
        jwks_url = "{jwks_url}"
        public_key_file = "{ec_pem}"
        algorithms = ["HS256", "RS256", "ES256"]
        issuer = "{ISSUER}"
        audience = "{AUDIENCE}"
        leeway = 5
        team_claim = "team"
        role_map = {{ "idp-ops" = "operator", "idp-users" = "user" }}
        default_roles = ["user"]
        """
    )


@pytest.fixture
def ec_pem(tmp_path: Path) -> Path:
    path = tmp_path / "ec-public.pem"
    path.write_bytes(
        EC_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


async def test_valid_tokens_of_each_algorithm_map_claims_to_the_principal(
    serve_gateway: GatewayFactory, jwks: tuple[JWKSServer, str], ec_pem: Path
) -> None:
    server, jwks_url = jwks
    tokens = {
        "HS256": jwt.encode(claims(), SECRET, algorithm="HS256"),
        "RS256": jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"}),
        "ES256": jwt.encode(claims(roles="idp-users"), EC_KEY, algorithm="ES256"),
    }
    async with serve_gateway(gateway_config(jwks_url, ec_pem)) as url:
        gateway = serve_gateway.gateway  # type: ignore[attr-defined]
        plugin = gateway.pm.get_plugin("jwt")
        async with httpx.AsyncClient(base_url=url) as http:
            for alg, token in tokens.items():
                response = await http.post(
                    "/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {token}"}
                )
                assert response.status_code == 200, (alg, response.text)
            # operators may read the admin API; the ES256 token maps to a plain user who may not
            ops = await http.get("/admin/api/keys", headers={"Authorization": f"Bearer {tokens['HS256']}"})
            user = await http.get("/admin/api/keys", headers={"Authorization": f"Bearer {tokens['ES256']}"})
        assert ops.status_code != 403
        assert user.status_code == 403
    principal = plugin.principal(await plugin.verify(tokens["RS256"]))
    assert (principal.kind, principal.user_id, principal.team_id) == ("jwt", "alice", "research")
    assert principal.roles == frozenset({"operator"})
    assert server.fetches == 1  # cached


def _attacks() -> dict[str, Callable[[], str]]:
    def hs(payload: dict[str, Any], key: bytes = SECRET.encode(), header: dict[str, Any] | None = None) -> str:
        return forge(
            header or {"alg": "HS256", "typ": "JWT"}, payload, lambda m: hmac.new(key, m, hashlib.sha256).digest()
        )

    return {
        "alg none": lambda: forge({"alg": "none", "typ": "JWT"}, claims(), None),
        "alg None": lambda: forge({"alg": "None", "typ": "JWT"}, claims(), None),
        "confusion: HS256 keyed with the RSA public key": lambda: hs(
            claims(), RSA_PUBLIC_PEM, {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
        ),
        "expired": lambda: jwt.encode(claims(exp=int(time.time()) - 60), SECRET, algorithm="HS256"),
        "not yet valid": lambda: jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"),
        "no exp": lambda: jwt.encode({k: v for k, v in claims().items() if k != "exp"}, SECRET, algorithm="HS256"),
        "wrong audience": lambda: jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256"),
        "wrong issuer": lambda: jwt.encode(claims(iss="https://evil.example/"), SECRET, algorithm="HS256"),
        "unknown kid": lambda: jwt.encode(claims(), OTHER_RSA_KEY, algorithm="RS256", headers={"kid": "nope"}),
        "known kid, other key": lambda: jwt.encode(
            claims(), OTHER_RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "bad signature": lambda: jwt.encode(claims(), SECRET, algorithm="HS256")[:-4] + "AAAA",
        "wrong secret": lambda: jwt.encode(claims(), "another-secret-that-is-long-enough-xx", algorithm="HS256"),
        "algorithm not allowed (HS512)": lambda: forge(
            {"alg": "HS512"}, claims(), lambda m: hmac.new(SECRET.encode(), m, hashlib.sha512).digest()
        ),
        "ES256 header on the RSA kid": lambda: jwt.encode(
            claims(), EC_KEY, algorithm="ES256", headers={"kid": "rsa-1"}
        ),
        "payload swapped": lambda: (
            lambda t: ".".join([t.split(".")[0], b64(orjson.dumps(claims(sub="root"))), t.split(".")[2]])
        )(jwt.encode(claims(), SECRET, algorithm="HS256")),
        "header not JSON": lambda: "eyJub3QganNvbg.e30.AAAA",
        "header a list": lambda: forge([], claims(), None),  # type: ignore[arg-type]
        "kid not a string": lambda: forge(
            {"alg": "RS256", "kid": 7}, claims(), lambda m: RSA_KEY.sign(m, padding.PKCS1v15(), hashes.SHA256())
        ),
    }


async def test_jwt_attack_suite_gets_only_401s_with_the_openai_envelope(
    serve_gateway: GatewayFactory, jwks: tuple[JWKSServer, str], ec_pem: Path
) -> None:
    _, jwks_url = jwks
    async with serve_gateway(gateway_config(jwks_url, ec_pem)) as url, httpx.AsyncClient(base_url=url) as http:
        for name, make in _attacks().items():
            token = make()
            for path in ("/v1/chat/completions", "/admin/api/keys"):
                method = "POST" if path.startswith("/v1") else "GET"
                response = await http.request(
                    method,
                    path,
                    json=chat() if method == "POST" else None,
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert response.status_code == 401, (name, path, response.status_code, response.text)
                error = response.json()["error"]
                assert error["type"] == "authentication_error"
                assert set(error) == {"message", "type", "param", "code"}
                assert token not in response.text


async def test_jwks_is_refetched_for_a_new_kid_and_a_single_pem_key_needs_no_kid(
    serve_gateway: GatewayFactory, jwks: tuple[JWKSServer, str], ec_pem: Path
) -> None:
    server, jwks_url = jwks
    toml = gateway_config(jwks_url, ec_pem).replace("leeway = 5", "leeway = 5\njwks_min_refresh = 0")
    async with serve_gateway(toml) as url, httpx.AsyncClient(base_url=url) as http:
        first = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
        assert (
            await http.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {first}"})
        ).status_code == 200
        server.keys.append(_jwk(OTHER_RSA_KEY, "rsa-2"))  # the IdP rotates in a new key
        rotated = jwt.encode(claims(), OTHER_RSA_KEY, algorithm="RS256", headers={"kid": "rsa-2"})
        response = await http.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {rotated}"})
        assert response.status_code == 200, response.text
    assert server.fetches == 2


def test_configuration_refuses_weak_or_inconsistent_jwt_settings(ec_pem: Path) -> None:
    from llmgateway.core.app import build_gateway
    from llmgateway.core.config import parse_config
    from llmgateway.core.errors import ConfigError

    cases = {
        'secret = "short"': "auth.jwt.secret",
        f'secret = "{SECRET}"\nalgorithms = ["RS256"]': "auth.jwt.algorithms",
        f'public_key_file = "{ec_pem}"\nalgorithms = ["HS256"]': "auth.jwt.algorithms",
        f'secret = "{SECRET}"\nalgorithms = ["none"]': "auth.jwt.algorithms",
        f'secret = "{SECRET}"\nrole_map = {{ x = "root" }}': "auth.jwt.role_map.x",
        'public_key_file = "/nonexistent.pem"': "auth.jwt.public_key_file",
    }
    for body, key in cases.items():
        with pytest.raises(ConfigError) as info:
            build_gateway(parse_config(config("[auth.jwt]\n" + body + "\n")))
        assert info.value.key == key, body
