"""Plugin ``ssrf``: upstream URLs sent by clients (``[ssrf]``).

The gateway decides where requests go. A body field that names an upstream (``api_base``,
``base_url``, ... — ``params``) is refused with a 400 naming it, unless the operator sets
``allow_client_base_url = true``. Even then the URL must be ``http(s)`` (``allowed_schemes``), carry
no credentials, match ``allowed_hosts`` when that list is set, and every address its host resolves
to must be public: private, loopback, link-local (cloud metadata at 169.254.169.254), CGNAT,
multicast, reserved and unspecified ranges are refused, IPv4 addresses embedded in IPv6
(mapped, 6to4, Teredo, NAT64) included, plus any ``blocked_networks``. The accepted URL is removed
from the body and left, with the addresses it resolved to, in ``ctx.state["ssrf.base_url"]``
(a :class:`CheckedURL`) for a provider that honours it; such a provider must connect to those
addresses (not resolve again: DNS rebinding) and must not follow redirects — the gateway's own
HTTP client never does.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from llmgateway.core.config import GatewayConfig
from llmgateway.core.errors import InvalidRequestError
from llmgateway.core.hookspecs import hookimpl
from llmgateway.core.types import RequestContext

DEFAULT_PARAMS = ("api_base", "base_url", "api_url", "api_host", "azure_endpoint", "endpoint_url")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_ALWAYS_BLOCKED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT (Alibaba Cloud metadata: 100.100.100.200)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local: AWS / GCP / Azure metadata at 169.254.169.254
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",  # unique local (AWS IPv6 metadata: fd00:ec2::254)
        "fe80::/10",
        "ff00::/8",
    )
)


@dataclass(frozen=True, slots=True)
class CheckedURL:
    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in ipaddress.ip_network("64:ff9b::/96"):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def blocked_address(ip: IPAddress, extra: tuple[Network, ...] = ()) -> bool:
    """Whether connecting to ``ip`` could reach something inside (private, loopback, metadata...)."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates.extend(_embedded_v4(ip))
    for address in candidates:
        if (
            address.is_private
            or address.is_loopback
            or address.is_link_local
            or address.is_multicast
            or address.is_reserved
            or address.is_unspecified
        ):
            return True
        if any(address.version == net.version and address in net for net in (*_ALWAYS_BLOCKED, *extra)):
            return True
    return False


class SsrfPlugin:
    def __init__(self) -> None:
        self.allow = False
        self.params: tuple[str, ...] = DEFAULT_PARAMS
        self.allowed_hosts: list[str] = []
        self.allowed_schemes: tuple[str, ...] = ("https",)
        self.blocked_networks: tuple[Network, ...] = ()
        self.resolve_timeout = 2.0

    @hookimpl
    def llmgateway_configure(self, config: GatewayConfig) -> None:
        section = config.section("ssrf")
        self.allow = section.boolean("allow_client_base_url", False)
        self.params = tuple(section.strings("params", list(DEFAULT_PARAMS)))
        self.allowed_hosts = [h.lower() for h in section.strings("allowed_hosts")]
        schemes = section.strings("allowed_schemes", ["https"])
        for scheme in schemes:
            if scheme not in ("http", "https"):
                raise section.error("allowed_schemes", f"only http and https are possible, not {scheme!r}")
        self.allowed_schemes = tuple(schemes)
        networks: list[Network] = []
        for i, cidr in enumerate(section.strings("blocked_networks")):
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise section.error(f"blocked_networks[{i}]", f"not a network: {cidr!r}") from None
        self.blocked_networks = tuple(networks)
        self.resolve_timeout = section.number("resolve_timeout", 2.0, minimum=0.01)
        section.check_unknown()

    @hookimpl
    async def llmgateway_prepare_request(self, ctx: RequestContext) -> None:
        body = ctx.body
        for name in self.params:
            if name not in body:
                continue
            if not self.allow:
                raise InvalidRequestError(
                    f"The parameter '{name}' is not accepted: this gateway chooses the upstream URL", param=name
                )
            checked = await self.check(body[name], name)
            del body[name]
            ctx.state["ssrf.base_url"] = checked

    async def check(self, value: Any, param: str) -> CheckedURL:
        """Validate a client-supplied URL; InvalidRequestError (400, naming ``param``) if refused."""

        def refuse(reason: str) -> InvalidRequestError:
            return InvalidRequestError(f"The URL in '{param}' is not allowed: {reason}", param=param)

        if not isinstance(value, str) or not value or len(value) > 2048:
            raise refuse("it must be a URL string")
        try:
            parts = urlsplit(value.strip())
            port = parts.port
        except ValueError:
            raise refuse("it is not a valid URL") from None
        if parts.scheme.lower() not in self.allowed_schemes:
            raise refuse(f"the scheme must be {' or '.join(self.allowed_schemes)}")
        if parts.username is not None or parts.password is not None:
            raise refuse("it must not carry credentials")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise refuse("it has no host")
        if self.allowed_hosts and not any(fnmatch.fnmatchcase(host, pattern) for pattern in self.allowed_hosts):
            raise refuse(f"the host '{host}' is not in the allowed list")
        port = port or (443 if parts.scheme.lower() == "https" else 80)
        addresses = await self._resolve(host, port, refuse)
        for address in addresses:
            if blocked_address(address, self.blocked_networks):
                raise refuse(f"'{host}' resolves to a private, loopback, link-local or metadata address")
        return CheckedURL(url=value.strip(), host=host, port=port, addresses=tuple(str(a) for a in addresses))

    async def _resolve(self, host: str, port: int, refuse: Any) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.resolve_timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError, UnicodeError):
            raise refuse(f"the host '{host}' does not resolve") from None
        addresses: list[IPAddress] = []
        for info in infos:
            raw = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
            try:
                addresses.append(ipaddress.ip_address(raw))
            except ValueError:
                raise refuse(f"the host '{host}' resolves to something unexpected") from None
        if not addresses:
            raise refuse(f"the host '{host}' does not resolve")
        return addresses
