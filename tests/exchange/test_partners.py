"""Partner configuration: every valid shape parses; every problem is named at once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fhir_kat.exchange.partners import load_partners, parse_partners
from fhir_kat.settings import Settings, SettingsError, load_settings

from .conftest import BASE, TOKEN_URL


def test_defaults_for_a_partner_without_auth() -> None:
    partner = parse_partners({"ehr": {"base_url": BASE + "/"}})["ehr"]
    assert partner.base_url == BASE
    assert partner.auth.kind == "none"
    assert partner.write_mode == "conditional-create"
    assert partner.resource_types is None and partner.wants("referral-feedback")
    assert partner.max_attempts == 12 and partner.timeout_seconds == 30.0


def test_client_credentials_secret_comes_from_the_environment() -> None:
    raw = {
        "ehr": {
            "base_url": BASE,
            "auth": "client_credentials",
            "token_url": TOKEN_URL,
            "client_id": "kat",
            "client_secret_env": "EHR_SECRET",
            "scopes": "system/Patient.cu system/Observation.cu",
        }
    }
    partner = parse_partners(raw, environ={"EHR_SECRET": "s3cret"})["ehr"]
    assert partner.auth.client_secret == "s3cret"
    assert partner.auth.scopes == ("system/Patient.cu", "system/Observation.cu")
    assert "s3cret" not in repr(partner)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend_loads_the_key(alg: str, key_files: dict[str, Path]) -> None:
    raw = {
        "ehr": {
            "base_url": BASE,
            "auth": "smart_backend",
            "token_url": TOKEN_URL,
            "client_id": "kat",
            "private_key_file": str(key_files[alg]),
            "algorithm": alg,
            "kid": "k1",
            "scopes": ["system/*.cu"],
        }
    }
    partner = parse_partners(raw)["ehr"]
    assert partner.auth.private_key is not None and partner.auth.algorithm == alg
    assert "PRIVATE" not in repr(partner)


def test_every_problem_is_reported(tmp_path: Path, key_files: dict[str, Path]) -> None:
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    raw = {
        "a": {"base_url": "ftp://x", "write_mode": "post", "timeout_seconds": -1, "colour": 1},
        "b": {"base_url": BASE, "auth": "client_credentials", "client_secret_env": "NOPE"},
        "c": {
            "base_url": BASE,
            "auth": "smart_backend",
            "token_url": TOKEN_URL,
            "client_id": "kat",
            "private_key_file": str(p256),
            "algorithm": "ES384",
            "kid": "k",
        },
        "d": {
            "base_url": BASE,
            "auth": "smart_backend",
            "token_url": TOKEN_URL,
            "client_id": "kat",
            "private_key_file": str(key_files["ES384"]),
            "algorithm": "HS256",
        },
        "e": {"base_url": BASE, "auth": "kerberos", "max_attempts": 2.5},
        "f": {"base_url": BASE, "resource_types": "Patient", "backoff_cap_seconds": 1},
        "g": "not a table",
        "h": {"base_url": BASE, "auth": "smart_backend", "private_key_file": "/nonexistent.pem"},
        "i": {"base_url": BASE, "organization": "HA-ISLAND", "source_identifier_system": "x|y"},
    }
    with pytest.raises(SettingsError) as err:
        parse_partners(raw, environ={})
    text = str(err.value)
    expected = [
        "[partners.a].base_url",
        "[partners.a].write_mode",
        "[partners.a].timeout_seconds",
        "[partners.a].colour: unknown setting",
        "[partners.b].token_url: required",
        "[partners.b].client_id: required",
        "environment variable NOPE is unset",
        "[partners.c].private_key_file: ES384 needs an EC P-384 key",
        "[partners.d].algorithm",
        "[partners.d].kid: required",
        "[partners.e].auth",
        "[partners.e].max_attempts",
        "[partners.f].resource_types",
        "[partners.f].backoff_cap_seconds",
        "[partners.g]: must be a table",
        "[partners.h].private_key_file: cannot read /nonexistent.pem",
        "[partners.i].organization: must be an identifier as system|value",
        "[partners.i].source_identifier_system",
    ]
    missing = [fragment for fragment in expected if fragment not in text]
    assert not missing, text


def test_settings_table_from_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "kat.toml"
    cfg.write_text(
        '[partners.island]\nbase_url = "https://ehr.example.test/fhir"\n'
        'write_mode = "put"\nresource_types = ["Patient", "Observation"]\n'
        'artifact_kinds = ["screenings"]\n'
    )
    settings = load_settings({"FHIR_KAT_CONFIG": str(cfg)})
    partner = load_partners(settings)["island"]
    assert partner.write_mode == "put"
    assert partner.accepts_type("Patient") and not partner.accepts_type("Consent")
    assert partner.wants("screenings") and not partner.wants("referrals")
    assert not replace(partner, enabled=False).wants("screenings")
    assert load_partners(Settings()) == {}


def test_subscription_retry_policy_is_set_in_the_exchange_table() -> None:
    from fhir_kat.exchange.netguard import policy_from_settings
    from fhir_kat.exchange.partners import SubscriptionDelivery, subscription_delivery

    assert subscription_delivery({}) == SubscriptionDelivery()
    table = {
        "subscription_max_attempts": 30,
        "subscription_backoff_base_seconds": 5,
        "subscription_backoff_cap_seconds": 600,
        "subscription_timeout_seconds": 4,
    }
    assert subscription_delivery(table) == SubscriptionDelivery(30, 5.0, 600.0, 4.0)
    with pytest.raises(SettingsError) as caught:
        subscription_delivery(
            {
                "subscription_max_attempts": 0,
                "subscription_backoff_base_seconds": 60,
                "subscription_backoff_cap_seconds": 30,
                "subscription_timeout_seconds": "fast",
            }
        )
    message = str(caught.value)
    for key in ("max_attempts", "backoff_cap_seconds: must not be below", "timeout_seconds"):
        assert f"subscription_{key}" in message
    # The service and the worker read the same table at start-up: a bad value stops both.
    settings = load_settings({}, database_url="sqlite://")
    good = replace(settings, extra={"exchange": table})
    assert policy_from_settings(good).allowed == ()
    with pytest.raises(SettingsError, match="subscription_max_attempts"):
        policy_from_settings(
            replace(settings, extra={"exchange": {"subscription_max_attempts": -1}})
        )
    with pytest.raises(SettingsError, match="unknown setting"):
        policy_from_settings(replace(settings, extra={"exchange": {"subscription_retries": 3}}))
