"""Public URLs (links, the token URL, the accepted client-assertion ``aud``) never follow a
client-chosen Host header outside local development: ``serve`` on a non-loopback address and
the WSGI app refuse to start without ``FHIR_KAT_PUBLIC_BASE_URL`` unless explicitly allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fhir_kat.app import create_app
from fhir_kat.cli import main
from fhir_kat.settings import Settings, host_derived_urls_problem, load_settings
from tests.conftest import HA_ORG, TEST_CLIENTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_servers_may_take_urls_from_the_request(host: str) -> None:
    assert host_derived_urls_problem(load_settings({}), host) is None


ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the start these tests expect to be refused


@pytest.mark.parametrize("host", [ALL_INTERFACES, "::", "10.0.0.7", "kat.example.org", None])
def test_other_servers_need_a_public_base_url_or_an_explicit_setting(host: str | None) -> None:
    problem = host_derived_urls_problem(load_settings({}), host)
    assert problem is not None and "FHIR_KAT_PUBLIC_BASE_URL" in problem
    configured = load_settings({"FHIR_KAT_PUBLIC_BASE_URL": "https://kat.example.org/fhir"})
    assert host_derived_urls_problem(configured, host) is None
    allowed = load_settings({"FHIR_KAT_ALLOW_HOST_DERIVED_URLS": "1"})
    assert allowed.allow_host_derived_urls and host_derived_urls_problem(allowed, host) is None


def test_the_allow_setting_takes_yes_or_no_only() -> None:
    assert not load_settings({"FHIR_KAT_ALLOW_HOST_DERIVED_URLS": "0"}).allow_host_derived_urls
    with pytest.raises(ValueError, match="allow_host_derived_urls"):
        load_settings({"FHIR_KAT_ALLOW_HOST_DERIVED_URLS": "maybe"})


def test_serve_on_a_public_interface_without_the_url_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("FHIR_KAT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FHIR_KAT_PUBLIC_BASE_URL", raising=False)
    assert main(["serve", "--host", ALL_INTERFACES, "--port", "8099"]) == 2
    assert "FHIR_KAT_PUBLIC_BASE_URL is not set" in capsys.readouterr().err
    assert not (tmp_path / "local-clients.json").exists()  # refused before anything happened


def _import_wsgi(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_KAT_")}
    return subprocess.run(
        [sys.executable, "-c", "import fhir_kat.wsgi"],
        env={**clean, "FHIR_KAT_DATA_DIR": str(tmp_path / "var"), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_wsgi_app_needs_the_public_url(tmp_path: Path) -> None:
    refused = _import_wsgi({}, tmp_path)
    assert refused.returncode != 0 and "FHIR_KAT_PUBLIC_BASE_URL is not set" in refused.stderr
    configured = _import_wsgi(
        {"FHIR_KAT_PUBLIC_BASE_URL": "https://kat.example.org/fhir"}, tmp_path
    )
    assert configured.returncode == 0, configured.stderr
    # A database of its own: the one above took its canonical base from the public URL, and
    # a start without that URL (another base) is refused on it (ADR 0021).
    allowed = _import_wsgi(
        {"FHIR_KAT_ALLOW_HOST_DERIVED_URLS": "1", "FHIR_KAT_DATA_DIR": str(tmp_path / "other")},
        tmp_path,
    )
    assert allowed.returncode == 0 and "follow each request's Host header" in allowed.stderr


def test_with_a_public_url_the_accepted_aud_ignores_the_host_header(settings: Settings) -> None:
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
    app = create_app(
        replace(
            settings, public_base_url="https://kat.example.org/fhir", extra={"clients": clients}
        )
    )
    try:
        c = app.test_client()

        def token_request(aud: str, host: str) -> int:
            claims = {
                "iss": "backend",
                "sub": "backend",
                "aud": aud,
                "exp": int(time.time()) + 60,
                "jti": str(uuid.uuid4()),
            }
            form = {
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": jwt.encode(claims, key, "ES384", headers={"kid": "k1"}),
            }
            return c.post("/auth/token", data=form, headers={"Host": host}).status_code

        # an assertion made for another server, replayed here with that server's name as Host
        assert token_request("https://other.example.net/auth/token", "other.example.net") == 401
        assert token_request("https://kat.example.org/auth/token", "other.example.net") == 200
        conf = c.get("/.well-known/smart-configuration", headers={"Host": "evil.example"})
        assert conf.get_json()["token_endpoint"] == "https://kat.example.org/auth/token"
    finally:
        app.extensions["fhir_kat"].export.shutdown()
        app.extensions["fhir_kat"].store.dispose()
