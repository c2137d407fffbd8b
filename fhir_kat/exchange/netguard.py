"""Where a client-chosen URL may lead: no request to the service's own network by default.

Owns: the address rule for endpoints that *clients* choose (R4 rest-hook Subscription
``channel.endpoint``) and a ``requests`` adapter that enforces it before every connection.
Must not: apply to ``[partners.*]`` — the operator configured those.

Why: without it, any client allowed to create a Subscription could make the delivery worker
send requests to loopback, the private network or a cloud metadata address (server-side request
forgery), or learn which internal ports are open from how its deliveries fail. The host is
resolved the way the connection would resolve it — address literals in every form the C
library accepts (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, a trailing dot,
IPv6 forms that embed an IPv4 address) and names through ``getaddrinfo`` — and *every* address
it yields must pass, or nothing is connected at all:

- when the Subscription is written (``endpoint_problem``: a refused literal, ``localhost`` or a
  name that resolves to a refused address is a clear issue; a name that does not resolve yet is
  accepted and checked again on delivery);
- before every connection (``GuardedAdapter``): the name is resolved again, every address
  checked, and only the checked addresses are connected to — so a name that starts to resolve
  inward later (DNS rebinding) gets nothing, and a refused address gets no TCP connection, so
  an open port and a closed one give the same answer.

Operators allow their own networks (a sandbox, a test receiver, an internal subscriber) with
``[exchange] subscription_endpoint_networks``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family, create_connection

from fhir_kat.exchange.partners import SUBSCRIPTION_KEYS, subscription_delivery
from fhir_kat.settings import Settings, SettingsError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

SETTING = "subscription_endpoint_networks"
#: How long a Subscription write waits for a name to resolve before accepting it unresolved
#: (it runs inside the write transaction; delivery checks the name again anyway).
LOOKUP_SECONDS = 2.0
REFUSED = (
    "the endpoint resolves to a loopback, private or reserved address, which this server does "
    f"not deliver to ([exchange] {SETTING})"
)

#: IANA special-purpose IPv4 blocks that are not globally reachable: named here as well so the
#: rule does not depend on the Python version's ``is_global`` table.
_IPV4_RESERVED = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
#: IPv6 blocks refused outright: IPv4-compatible (``::a.b.c.d``, deprecated; includes ``::``
#: and ``::1``) and the deprecated site-local block, which ``is_global`` still calls global.
_IPV6_RESERVED = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("fec0::/10"))
#: IPv6 blocks that carry an IPv4 address in their last 32 bits, reached through a translator
#: (NAT64, SIIT): the embedded address must pass the rule itself.
_IPV6_EMBEDDING = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
)
#: Every character of an IPv4 literal in the C library's forms (decimal, octal, hex parts).
_IPV4_LITERAL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*|[0-9a-fA-FxX.]*[0-9][0-9a-fA-FxX.]*")


class EndpointRefused(Exception):
    """The endpoint's address is outside what client-chosen endpoints may reach.

    Not an ``OSError``: urllib3 would take it for a network failure and retry it; raised from
    the connection, it passes through urllib3 and ``requests`` unchanged."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in _IPV6_EMBEDDING):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class EndpointPolicy:
    """Public (globally routable) addresses, plus the networks the operator allowed."""

    allowed: tuple[Network, ...] = ()

    def permits(self, address: Address) -> bool:
        if any(address in net for net in self.allowed):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            if any(address in net for net in _IPV6_RESERVED):
                return False
            embedded = _embedded_ipv4(address)
            if embedded is not None:
                return self.permits(embedded)
        elif any(address in net for net in _IPV4_RESERVED):
            return False
        return address.is_global and not address.is_multicast

    def endpoint_problem(self, url: str) -> str | None:
        """Why ``url`` is refused as a subscriber endpoint, or None.

        Literals and ``localhost`` are decided at once; a name is resolved (for at most
        ``LOOKUP_SECONDS``) and every address it resolves to must pass. A name that does not
        resolve now is accepted: every delivery resolves and checks it again."""
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return "channel.endpoint has an invalid port"
        host = parts.hostname or ""
        if _is_localhost(host):
            addresses: list[Address] | None = [ipaddress.IPv4Address("127.0.0.1")]
        else:
            literal = literal_address(host)
            addresses = [literal] if literal is not None else _lookup(host, port)
        if addresses is None or all(self.permits(a) for a in addresses):
            return None
        return (
            "channel.endpoint must be a public address; this server does not deliver to "
            f"loopback, private or reserved addresses unless its operator allows them ([exchange] "
            f"{SETTING})"
        )


def _is_localhost(host: str) -> bool:
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def literal_address(host: str) -> Address | None:
    """The address ``host`` denotes without a lookup, in any form the C library's resolver
    would accept (``127.1``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1``, a trailing dot,
    ``[::ffff:7f00:1]``, a zone id), or None for a name."""
    text = host.strip().strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    text = text.rstrip(".") if text.count(".") <= 4 else text
    if not _IPV4_LITERAL.fullmatch(text):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def _resolve(host: str, port: int) -> list[tuple[int, Address]]:
    """(address family, address) of every address a connection to ``host`` would try."""
    literal = literal_address(host)
    if literal is not None:
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        return [(family, literal)]
    found: list[tuple[int, Address]] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(
        host, port, allowed_gai_family(), socket.SOCK_STREAM
    ):
        found.append((family, ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])))
    return found


def _lookup(host: str, port: int) -> list[Address] | None:
    """Every address ``host`` resolves to, or None when it does not resolve within
    ``LOOKUP_SECONDS``."""
    answer: list[list[Address]] = []

    def run() -> None:
        with contextlib.suppress(OSError, UnicodeError, ValueError):
            answer.append([address for _, address in _resolve(host, port)])

    thread = threading.Thread(target=run, name="endpoint-lookup", daemon=True)
    thread.start()
    thread.join(LOOKUP_SECONDS)
    return answer[0] if answer and answer[0] else None


def checked_addresses(host: str, port: int, policy: EndpointPolicy) -> list[Address]:
    """Every address a connection to ``host`` would try, all permitted; ``EndpointRefused``
    if any is not (one refused address refuses the name: a connection could reach it)."""
    if _is_localhost(host):
        raise EndpointRefused(REFUSED)
    addresses = [address for _, address in _resolve(host, port)]
    if not addresses or not all(policy.permits(a) for a in addresses):
        raise EndpointRefused(REFUSED)
    return addresses


def policy_from_settings(settings: Settings) -> EndpointPolicy:
    """The policy from the ``[exchange]`` table of the configuration file (the whole table is
    checked here, the Subscription retry keys included: a bad one stops start-up)."""
    exchange = settings.extra.get("exchange", {})
    unknown = sorted(set(exchange) - {SETTING, *SUBSCRIPTION_KEYS})
    if unknown:
        raise SettingsError("\n".join(f"[exchange].{key}: unknown setting" for key in unknown))
    subscription_delivery(exchange)
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


def _connect(conn: HTTPConnection, policy: EndpointPolicy) -> socket.socket:
    """Resolve, check every address, then connect to the checked addresses only (urllib3's
    own ``_new_conn``, with the lookup done and checked first)."""
    host = conn._dns_host  # what urllib3 itself resolves (a trailing dot kept)
    try:
        addresses = checked_addresses(host, conn.port or 80, policy)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    error: Exception | None = None
    for address in addresses:
        try:
            return create_connection(
                (str(address), conn.port or 80),
                conn.timeout,
                source_address=conn.source_address,
                socket_options=conn.socket_options,
            )
        except TimeoutError as exc:
            error = ConnectTimeoutError(
                conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
            )
            error.__cause__ = exc
        except OSError as exc:
            error = NewConnectionError(conn, f"Failed to establish a new connection: {exc}")
            error.__cause__ = exc
    raise error if error is not None else EndpointRefused(REFUSED)


def _connection_classes(policy: EndpointPolicy) -> tuple[type, type]:
    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _connect(self, policy)

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _connect(self, policy)  # the TLS handshake follows on the checked socket

    return GuardedHTTPConnection, GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """A ``requests`` adapter whose every new connection is checked against ``policy`` before
    it is made.

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
