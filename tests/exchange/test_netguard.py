"""The address rule for client-chosen endpoints (``exchange.netguard``): which addresses pass,
how the operator widens it, and that it holds on the connected socket for http and https."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from dataclasses import replace

import pytest

from fhir_kat.exchange.netguard import (
    EndpointPolicy,
    EndpointRefused,
    guarded_session,
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
    assert policy.literal_problem("http://10.20.3.4:8443/hook") is None
    assert policy.literal_problem("http://10.21.0.1/hook") is not None
    assert policy.literal_problem("https://subscriber.example/hook") is None  # names: on connect


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
    # The TCP connection was made (that is how the peer is known) and closed at once:
    # not one byte of a request or of a TLS handshake reached the address.
    assert listener.accepted == 1
    assert listener.data == b""
