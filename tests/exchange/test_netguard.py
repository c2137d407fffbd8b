"""The address rule for client-chosen endpoints (``exchange.netguard``): which addresses pass,
how the operator widens it, that every form of an internal address (numeric, octal, hex, short,
trailing dot, IPv6-embedded, names resolving inward) is refused when written and before any
connection, and that a refused address gets no TCP connection (open and closed ports alike)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from dataclasses import replace
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_kat.exchange import netguard
from fhir_kat.exchange.netguard import (
    EndpointPolicy,
    EndpointRefused,
    checked_addresses,
    guarded_session,
    literal_address,
    load_policy,
    networks,
    policy_from_settings,
)
from fhir_kat.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),  # noqa: S104 - an address under test, not a bind
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd12:3456::1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:93.184.216.34", True),
    ],
)
def test_only_public_addresses_pass_by_default(address: str, public: bool) -> None:
    assert EndpointPolicy().permits(ipaddress.ip_address(address)) is public


def test_the_operator_allows_its_own_networks() -> None:
    policy = networks(["10.20.0.0/16", "::1/128"])
    assert policy.permits(ipaddress.ip_address("10.20.3.4"))
    assert policy.permits(ipaddress.ip_address("::ffff:10.20.3.4"))
    assert policy.permits(ipaddress.ip_address("::1"))
    assert not policy.permits(ipaddress.ip_address("10.21.0.1"))
    assert policy.endpoint_problem("http://10.20.3.4:8443/hook") is None
    assert policy.endpoint_problem("http://10.21.0.1/hook") is not None
    assert policy.endpoint_problem("https://subscriber.example/hook") is None  # names: on connect


def test_bad_settings_are_reported_at_start_up() -> None:
    base = load_settings({})
    with pytest.raises(SettingsError, match=r"not a network: ten, 300\.1\.1\.1/8"):
        policy_from_settings(
            replace(
                base,
                extra={"exchange": {"subscription_endpoint_networks": ["ten", "300.1.1.1/8"]}},
            )
        )
    with pytest.raises(SettingsError, match="must be a list"):
        policy_from_settings(
            replace(base, extra={"exchange": {"subscription_endpoint_networks": "10.0.0.0/8"}})
        )
    with pytest.raises(SettingsError, match=r"\[exchange\]\.allow_all: unknown setting"):
        policy_from_settings(replace(base, extra={"exchange": {"allow_all": True}}))
    assert policy_from_settings(base) == EndpointPolicy()
    assert load_policy({}) == EndpointPolicy()


class Listener:
    """A loopback TCP port that accepts and counts connections, and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.data = b""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for _ in range(100):  # bounded: 20 s at most
            if self._stop.is_set():
                return
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.settimeout(0.5)
            with contextlib.suppress(TimeoutError, OSError):
                self.data += conn.recv(1024)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_refused_address_gets_no_request_and_no_tls_hello(scheme: str) -> None:
    listener = Listener()
    session = guarded_session(EndpointPolicy())
    try:
        with pytest.raises(EndpointRefused):
            session.post(f"{scheme}://127.0.0.1:{listener.port}/hook", data=b"{}", timeout=2)
    finally:
        session.close()
        listener.close()
    # Checked before connecting: not even a TCP connection reached the address.
    assert listener.accepted == 0
    assert listener.data == b""


# ------------------------------------------------------------------ every form of an address

INTERNAL_V4 = [
    ipaddress.IPv4Network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "0.0.0.0/8",
        "192.0.0.0/24",
    )
]


@st.composite
def internal_ipv4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    net = draw(st.sampled_from(INTERNAL_V4))
    offset = draw(st.integers(0, net.num_addresses - 1))
    return net.network_address + offset


def _part(value: int, style: str) -> str:
    if style == "hex":
        return hex(value)
    if style == "HEX":
        return "0X" + format(value, "X")
    if style == "octal":
        return "0" + format(value, "o")
    if style == "padded":
        return "000" + format(value, "o")  # a leading 0 means octal, however many
    return str(value)


@st.composite
def ipv4_forms(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """``address`` written in one of the forms the C library's resolver accepts."""
    n = int(address)
    octets = list(address.packed)
    shape = draw(st.sampled_from(["4", "3", "2", "1"]))
    styles = st.sampled_from(["dec", "hex", "HEX", "octal", "padded"])
    if shape == "4":
        text = ".".join(_part(o, draw(styles)) for o in octets)
    elif shape == "3":
        low = _part(n & 0xFFFF, draw(st.sampled_from(["dec", "hex", "octal"])))
        text = ".".join([_part(octets[0], draw(styles)), _part(octets[1], draw(styles)), low])
    elif shape == "2":
        text = f"{_part(octets[0], draw(styles))}."
        text += _part(n & 0xFFFFFF, draw(st.sampled_from(["dec", "hex", "octal"])))
    else:
        text = _part(n, draw(st.sampled_from(["dec", "hex", "HEX", "octal"])))
    return text + ("." if draw(st.booleans()) else "")


@st.composite
def embedded_in_ipv6(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    hi, lo = int(address) >> 16, int(address) & 0xFFFF
    form = draw(
        st.sampled_from(
            [
                f"::ffff:{address}",
                f"::ffff:{hi:x}:{lo:x}",
                f"0:0:0:0:0:ffff:{hi:X}:{lo:X}",
                f"::{address}",  # IPv4-compatible (deprecated)
                f"64:ff9b::{address}",  # NAT64
                f"64:ff9b::{hi:x}:{lo:x}",
                f"2002:{hi:x}:{lo:x}::1",  # 6to4
                f"::ffff:0:{address}",  # SIIT
            ]
        )
    )
    zone = draw(st.sampled_from(["", "%25eth0"])) if form.startswith("fe80") else ""
    return f"[{form}{zone}]"


INTERNAL_V6 = st.sampled_from(
    [
        "[::1]",
        "[0:0:0:0:0:0:0:1]",
        "[::0001]",
        "[0000::1]",
        "[::]",
        "[fe80::1]",
        "[FE80::abcd%25eth0]",
        "[fd00::1]",
        "[fc12:3456::9]",
        "[fec0::1]",
        "[ff02::1]",
        "[2001:db8::1]",
    ]
)


@st.composite
def internal_hosts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["v4", "v6-embedded", "v6", "localhost"]))
    if kind == "localhost":
        return draw(st.sampled_from(["localhost", "LOCALHOST.", "api.localhost", "x.localhost."]))
    if kind == "v6":
        return draw(INTERNAL_V6)
    address = draw(internal_ipv4())
    if kind == "v4":
        return draw(ipv4_forms(address))
    return draw(embedded_in_ipv6(address))


@settings(max_examples=400, deadline=None)
@given(host=internal_hosts(), port=st.sampled_from(["", ":80", ":8443", ":1"]))
def test_no_form_of_an_internal_address_passes_either_check(host: str, port: str) -> None:
    policy = EndpointPolicy()
    url = f"http://{host}{port}/hook"
    assert policy.endpoint_problem(url) is not None, url
    parts = urlsplit(url)
    with pytest.raises(EndpointRefused):
        checked_addresses(parts.hostname or "", parts.port or 80, policy)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_form_of_a_public_address_passes_and_means_that_address(data: st.DataObject) -> None:
    address = ipaddress.IPv4Address(
        data.draw(st.sampled_from(["93.184.216.34", "8.8.4.4", "1.1.1.1", "198.41.0.4"]))
    )
    host = data.draw(ipv4_forms(address))
    assert literal_address(host) == address
    assert EndpointPolicy().endpoint_problem(f"https://{host}/hook") is None
    assert checked_addresses(host, 443, EndpointPolicy()) == [address]


def test_names_are_resolved_and_every_address_must_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        "inward.example": ["127.0.0.1"],
        "metadata.example": ["169.254.169.254"],
        "mixed.example": ["93.184.216.34", "10.0.0.8"],  # one public, one private: refused
        "outward.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
    }

    def fake_getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port, 0, 0) if ":" in a else (a, port),
            )
            for a in answers[host]
        ]

    monkeypatch.setattr(netguard.socket, "getaddrinfo", fake_getaddrinfo)
    policy = EndpointPolicy()
    for host in ("inward.example", "metadata.example", "mixed.example"):
        assert policy.endpoint_problem(f"https://{host}/hook") is not None, host
        with pytest.raises(EndpointRefused):
            checked_addresses(host, 443, policy)
    assert policy.endpoint_problem("https://outward.example/hook") is None
    assert len(checked_addresses("outward.example", 443, policy)) == 2
    # not resolvable now: accepted when written, refused by every delivery until it resolves
    assert policy.endpoint_problem("https://not-yet.example/hook") is None
    with pytest.raises(socket.gaierror):
        checked_addresses("not-yet.example", 443, policy)
    assert networks(["127.0.0.0/8"]).endpoint_problem("https://inward.example/hook") is None


@pytest.mark.parametrize("form", ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1"])
def test_an_open_and_a_closed_internal_port_fail_alike_and_get_no_connection(form: str) -> None:
    listener = Listener()
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    session = guarded_session(EndpointPolicy())
    answers = []
    try:
        for port in (listener.port, closed_port):
            with pytest.raises(EndpointRefused) as refused:
                session.post(f"http://{form}:{port}/hook", data=b"{}", timeout=2)
            answers.append(str(refused.value))
    finally:
        session.close()
        listener.close()
    assert answers[0] == answers[1]
    assert listener.accepted == 0


def test_an_allowed_address_in_any_form_is_connected_to() -> None:
    listener = Listener()
    session = guarded_session(networks(["127.0.0.0/8"]))
    try:
        with pytest.raises(requests.RequestException):  # the listener never answers
            session.post(f"http://0x7f.1:{listener.port}/hook", data=b"{}", timeout=0.5)
    finally:
        session.close()
        listener.close()
    assert listener.accepted == 1 and listener.data.startswith(b"POST /hook")
