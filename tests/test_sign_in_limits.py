"""Failed sign-ins cannot be reset by a spray, and client ids cannot be told apart: the failure
limiter's two budgets and bounded memory, and the same work (and answer) for unknown client ids
at the token endpoint and the browser sign-in."""

from __future__ import annotations

import json
import time
import uuid
from base64 import b64encode
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.app import create_app
from fhir_kat.security import clients as clients_module
from fhir_kat.security.ratelimit import FailureLimiter, source_of
from fhir_kat.settings import Settings
from tests.conftest import HA_ORG, TEST_CLIENTS


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ the limiter itself


def test_a_source_spraying_client_ids_is_limited_whatever_ids_it_presents() -> None:
    limiter = FailureLimiter(10, 600, clock=FakeMonotonic(), source_failures=30)
    for i in range(30):
        assert limiter.wait("198.51.100.9", f"guess-{i}") == 0
        limiter.failed("198.51.100.9", f"guess-{i}")
    assert limiter.wait("198.51.100.9", "never-presented") == 600
    assert limiter.wait("198.51.100.10", "never-presented") == 0  # another source


def test_ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:ffff::9")
    assert source_of("2001:db8:1:2::1") != source_of("2001:db8:1:3::1")
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of(None) == "" and source_of("not an address") == "not an address"
    limiter = FailureLimiter(3, 600, clock=FakeMonotonic())
    for i in range(3):
        limiter.failed(f"2001:db8:1:2::{i + 1:x}", "staff")  # three addresses of one /64
    assert limiter.wait("2001:db8:1:2::99", "staff") > 0


def test_a_spray_never_frees_a_limited_key_and_memory_stays_bounded() -> None:
    clock = FakeMonotonic()
    limiter = FailureLimiter(3, 600, clock=clock, max_keys=100, source_failures=1000)
    for _ in range(3):
        limiter.failed("203.0.113.5", "victim")
    assert limiter.wait("203.0.113.5", "victim") > 0
    # 10,000 failures from 10,000 other sources, each with a new client id
    for i in range(10_000):
        limiter.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"spray-{i}")
        clock.now += 0.001
    assert limiter.wait("203.0.113.5", "victim") > 0  # still limited
    assert len(limiter._pairs.failures) <= 100 and len(limiter._sources.failures) <= 100
    clock.now += 600
    assert limiter.wait("203.0.113.5", "victim") == 0  # the window, not the spray, ends it


def test_a_table_full_of_limited_keys_stays_full_rather_than_forget_one() -> None:
    clock = FakeMonotonic()
    limiter = FailureLimiter(2, 600, clock=clock, max_keys=10, source_failures=2)
    for i in range(10):
        for _ in range(2):
            limiter.failed(f"192.0.2.{i}", "x")
    limiter.failed("192.0.2.200", "x")  # not tracked: every tracked key is limited
    assert all(limiter.wait(f"192.0.2.{i}", "x") > 0 for i in range(10))
    assert len(limiter._pairs.failures) == 10
    clock.now += 600  # all expired: room again
    limiter.failed("192.0.2.200", "x")
    assert "192.0.2.200" in limiter._sources.failures


# ------------------------------------------------------------------ at the endpoints


def _basic(c: FlaskClient, client_id: str, secret: str, source: str = "127.0.0.1") -> Any:
    return c.post(
        "/auth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": "Basic " + b64encode(f"{client_id}:{secret}".encode()).decode()},
        environ_base={"REMOTE_ADDR": source},
    )


def test_spraying_unknown_client_ids_neither_resets_nor_escapes_the_limit(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unknown ids cost a full PBKDF2 each (by design); a cheaper stored form keeps this fast.
    cheap = clients_module.hash_secret("nobody", iterations=1000)
    monkeypatch.setattr(clients_module, "_NO_SECRET", cheap)
    clock = FakeMonotonic()
    app.extensions["fhir_kat"].auth_failures = FailureLimiter(10, 600, clock=clock)
    c = app.test_client()
    for _ in range(10):
        assert _basic(c, "ha", "guess").status_code == 401
    assert _basic(c, "ha", "ha-secret").status_code == 429
    codes = [_basic(c, f"spray-{i}", "x").status_code for i in range(200)]
    assert codes.count(401) == 40 and codes[40:] == [429] * 160  # 50 per source in all
    assert _basic(c, "ha", "ha-secret").status_code == 429  # still limited
    assert _basic(c, "staff", "staff-secret").status_code == 429  # the whole source is
    assert _basic(c, "ha", "ha-secret", source="192.0.2.44").status_code == 200  # not elsewhere
    clock.now += 600
    assert _basic(c, "ha", "ha-secret").status_code == 200


def test_browser_sign_in_shares_the_source_budget(app: Flask) -> None:
    clock = FakeMonotonic()
    app.extensions["fhir_kat"].auth_failures = FailureLimiter(
        10, 600, clock=clock, source_failures=5
    )
    c = app.test_client()
    for i in range(5):
        assert _basic(c, f"spray-{i}", "x").status_code == 401
    page = c.post(
        "/app/login",
        data={"client_id": "staff", "client_secret": "staff-secret", "next": "/app/"},
        headers={"Origin": "http://localhost"},
    )
    assert page.status_code == 429


def test_an_unknown_client_id_costs_the_same_secret_check_as_a_known_one(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    real = clients_module.verify_secret

    def spy(secret: str, stored: str) -> bool:
        checked.append(stored)
        return real(secret, stored)

    monkeypatch.setattr(clients_module, "verify_secret", spy)
    monkeypatch.setattr(clients_module, "_verified", OrderedDict())
    monkeypatch.setattr(
        clients_module, "_NO_SECRET", clients_module.hash_secret("x", iterations=1000)
    )
    c = app.test_client()
    first = _basic(c, "nobody-here", "guess")
    second = _basic(c, "ha", "guess")
    assert first.status_code == second.status_code == 401
    assert first.get_json() == second.get_json()  # one answer for both
    assert checked == [clients_module._NO_SECRET, TEST_CLIENTS["ha"]["secret_hash"]]
    # failures are never remembered: the same wrong guess costs a full check every time
    _basic(c, "nobody-here", "guess")
    _basic(c, "ha", "guess")
    assert len(checked) == 4
    # a success is remembered (a registered client asks every few minutes)
    assert _basic(c, "ha", "ha-secret").status_code == 200
    assert _basic(c, "ha", "ha-secret").status_code == 200
    assert len(checked) == 5
    # the browser sign-in does the same work for an unknown id
    c.post(
        "/app/login",
        data={"client_id": "nobody-here", "client_secret": "guess", "next": "/app/"},
        headers={"Origin": "http://localhost"},
    )
    assert checked[-1] == clients_module._NO_SECRET


def _backend_app(settings: Settings) -> tuple[Flask, Any]:
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "k1", "alg": "ES384"})
    clients = {
        **TEST_CLIENTS,
        "backend": {
            "role": "health-authority",
            "scopes": ["system/*.rs"],
            "organization": HA_ORG,
            "jwks": {"keys": [jwk]},
        },
    }
    return create_app(replace(settings, extra={"clients": clients})), key


def test_a_forged_assertion_gets_one_answer_for_known_and_unknown_client_ids(
    settings: Settings,
) -> None:
    app, key = _backend_app(settings)
    try:
        c = app.test_client()
        forger = ec.generate_private_key(ec.SECP384R1())

        def request(client_id: str, signer: Any, kid: str | None = "k1") -> Any:
            claims = {
                "iss": client_id,
                "sub": client_id,
                "aud": "http://localhost/auth/token",
                "exp": int(time.time()) + 60,
                "jti": str(uuid.uuid4()),
            }
            headers = {"kid": kid} if kid else {}
            return c.post(
                "/auth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:"
                    "jwt-bearer",
                    "client_assertion": jwt.encode(
                        claims, signer, algorithm="ES384", headers=headers
                    ),
                },
            )

        answers = [
            request("backend", forger),  # registered, forged signature
            request("backend", forger, kid="other"),  # registered, unregistered kid
            request("nobody", forger),  # unknown client id
            request("staff", forger),  # a client with a secret and no JWKS
        ]
        assert {a.status_code for a in answers} == {401}
        assert len({json.dumps(a.get_json()) for a in answers}) == 1
        tokens = app.extensions["fhir_kat"].tokens
        assert set(tokens._unheld) == {"ES384"}  # the unknown ids ran a signature check too
        assert request("backend", key).status_code == 200  # the key holder still gets in
    finally:
        app.extensions["fhir_kat"].export.shutdown()
        app.extensions["fhir_kat"].store.dispose()
