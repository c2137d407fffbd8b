"""Where a client-chosen URL may lead: no request to the service's own network by default.

Owns: the address rule for endpoints that *clients* choose (R4 rest-hook Subscription
``channel.endpoint``) and a ``requests`` adapter that enforces it on the socket actually
connected. Must not: apply to ``[partners.*]`` — the operator configured those.

Why: without it, any client allowed to create a Subscription could make the delivery worker
send requests to loopback, the private network or a cloud metadata address (server-side request
forgery). The rule is checked twice: when the Subscription is written (an address literal or
``localhost`` is refused at once, with a clear issue) and on every connection, against the peer
address of the connected socket — so a name that resolves to a private address, or starts to
after the check (DNS rebinding), is refused too. Operators allow their own networks (a sandbox, a
test receiver, an internal subscriber) with ``[exchange] subscription_endpoint_networks``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from fhir_kat.settings import Settings, SettingsError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

SETTING = "subscription_endpoint_networks"


class EndpointRefused(Exception):
    """The endpoint's address is outside what client-chosen endpoints may reach.

    Not an ``OSError``: urllib3 would take it for a network failure and retry it; raised from
    the connection, it passes through urllib3 and ``requests`` unchanged."""


@dataclass(frozen=True)
class EndpointPolicy:
    """Public (globally routable) addresses, plus the networks the operator allowed."""

    allowed: tuple[Network, ...] = ()

    def permits(self, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.allowed):
            return True
        return address.is_global and not address.is_multicast

    def literal_problem(self, url: str) -> str | None:
        """Why ``url`` is refused without a lookup (an address literal or localhost), or None.

        Names are not resolved here: the answer could change before the first delivery, and
        every connection is checked anyway (``guarded_session``)."""
        host = urlsplit(url).hostname or ""
        if host == "localhost" or host.endswith(".localhost"):
            host = "127.0.0.1"
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        if self.permits(address):
            return None
        return (
            "channel.endpoint must be a public address; this server does not deliver to "
            f"loopback, private or reserved addresses unless its operator allows them ([exchange] "
            f"{SETTING})"
        )


def policy_from_settings(settings: Settings) -> EndpointPolicy:
    """The policy from the ``[exchange]`` table of the configuration file."""
    exchange = settings.extra.get("exchange", {})
    unknown = sorted(set(exchange) - {SETTING})
    if unknown:
        raise SettingsError("\n".join(f"[exchange].{key}: unknown setting" for key in unknown))
    try:
        return load_policy(exchange)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def load_policy(exchange: Mapping[str, Any]) -> EndpointPolicy:
    """The policy from the raw ``[exchange]`` table; ``ValueError`` lists every bad entry."""
    raw = exchange.get(SETTING, [])
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise ValueError(f"[exchange].{SETTING} must be a list of networks such as '10.0.0.0/8'")
    nets: list[Network] = []
    bad: list[str] = []
    for value in raw:
        try:
            nets.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            bad.append(value)
    if bad:
        raise ValueError(f"[exchange].{SETTING}: not a network: {', '.join(bad)}")
    return EndpointPolicy(tuple(nets))


def _check_peer(sock: socket.socket, policy: EndpointPolicy) -> None:
    peer = sock.getpeername()[0]
    address = ipaddress.ip_address(str(peer).split("%", 1)[0])  # drop an IPv6 zone id
    if not policy.permits(address):
        sock.close()
        raise EndpointRefused(
            "the endpoint resolves to a loopback, private or reserved address, which this "
            f"server does not deliver to ([exchange] {SETTING})"
        )


def _connection_classes(policy: EndpointPolicy) -> tuple[type, type]:
    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            _check_peer(sock, policy)
            return sock

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            _check_peer(sock, policy)  # before the TLS handshake sends anything
            return sock

    return GuardedHTTPConnection, GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """A ``requests`` adapter whose every new connection is checked against ``policy``.

    Proxies are not used (``trust_env`` is off in ``guarded_session``): through a proxy the
    connected peer would be the proxy, and the rule could not be enforced."""

    def __init__(self, policy: EndpointPolicy, **kwargs: Any) -> None:
        self.policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        http_conn, https_conn = _connection_classes(self.policy)
        http_pool = type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
        https_pool = type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})
        self.poolmanager.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}


def guarded_session(policy: EndpointPolicy) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    for prefix in ("http://", "https://"):
        session.mount(prefix, GuardedAdapter(policy))
    return session


def networks(values: Iterable[str]) -> EndpointPolicy:
    """A policy allowing ``values`` (tests and callers building one in code)."""
    return load_policy({SETTING: list(values)})
