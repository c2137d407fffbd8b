"""A bearer token is good only while its client is registered as the token says: removing a
client, or narrowing its role, organisation, purpose or scopes, ends its tokens at once — after a
restart with the same signing key, and for tokens the verified-token cache already holds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from flask import Flask

from fhir_kat.app import create_app
from fhir_kat.settings import Settings
from tests.conftest import CLINIC_ORG, TEST_CLIENTS, token_for


def _started(settings: Settings, clients: dict[str, Any]) -> Flask:
    return create_app(replace(settings, extra={"clients": clients}))


def _stop(app: Flask) -> None:
    app.extensions["fhir_kat"].export.shutdown()
    app.extensions["fhir_kat"].store.dispose()


def _get(app: Flask, token: str) -> int:
    c = app.test_client()
    return c.get("/fhir/Observation", headers={"Authorization": f"Bearer {token}"}).status_code


@pytest.fixture
def before_restart(settings: Settings) -> Iterator[Flask]:
    app = _started(settings, TEST_CLIENTS)
    yield app
    _stop(app)


@pytest.mark.parametrize(
    "registration",
    [
        None,  # removed
        {**TEST_CLIENTS["ha"], "role": "referrer", "organization": CLINIC_ORG},
        {**TEST_CLIENTS["ha"], "scopes": ["system/Patient.rs"]},
        {**TEST_CLIENTS["ha"], "purpose_of_use": "PUBHLTH"},
    ],
    ids=["removed", "other-role", "narrower-scopes", "other-purpose"],
)
def test_a_restart_without_the_registration_ends_its_tokens(
    settings: Settings, before_restart: Flask, registration: dict[str, Any] | None
) -> None:
    token = token_for(before_restart, "ha")
    assert _get(before_restart, token) == 200
    clients = {k: v for k, v in TEST_CLIENTS.items() if k != "ha"}
    if registration is not None:
        clients["ha"] = registration
    after = _started(settings, clients)  # same data directory: same signing key
    try:
        answer = after.test_client().get(
            "/fhir/Observation", headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 401
        assert 'error="invalid_token"' in answer.headers["WWW-Authenticate"]
        assert _get(after, token_for(after, "staff")) == 200  # other clients unaffected
        if registration is not None:  # a new token under the new registration works
            assert _get(after, token_for(after, "ha")) in (200, 403)
    finally:
        _stop(after)


def test_a_cached_token_is_checked_against_the_registry_on_every_use(
    before_restart: Flask,
) -> None:
    state = before_restart.extensions["fhir_kat"]
    token = token_for(before_restart, "ha")
    assert _get(before_restart, token) == 200
    assert _get(before_restart, token) == 200  # now from the verified-token cache
    registry = state.clients.clients
    saved = registry.pop("ha")
    assert _get(before_restart, token) == 401
    registry["ha"] = saved  # registered again, as the token says: valid again
    assert _get(before_restart, token) == 200
    registry["ha"] = replace(saved, scopes=registry["staff-readonly"].scopes)
    assert _get(before_restart, token) == 401
