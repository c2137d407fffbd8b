"""CDS Hooks calls are held up like sign-ins (issue 21 hardening): per registered EHR after its
JWT is verified (``[cds_hooks] rate_limit_per_minute``), and per source before, by the sign-in
limiter itself (``FailureLimiter``: failed attempts per source and presented issuer, and per
source whatever it presents — one budget shared with ``/auth/token``). Both answer 429 with
Retry-After and an OperationOutcome (the service's error model); a limited source is refused
before its JWT is even checked."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask

from fhir_kat.app import create_app
from fhir_kat.security.cds_clients import DEFAULT_RATE_LIMIT, load_cds_hooks
from fhir_kat.settings import Settings, SettingsError
from tests.test_cds_hooks import (
    CDS_CONFIG,
    PATIENT_VIEW,
    PTSD,
    condition,
    hook_request,
    prefetch,
    sign,
)

OTHER_ISSUER = "https://other-ehr.example.org"
OTHER_KEY = ec.generate_private_key(ec.SECP384R1())


def _jwks(key: Any, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**jwk, "kid": kid, "alg": "ES384", "use": "sig"}]}


def _config(rate: int | None) -> dict[str, Any]:
    config = copy.deepcopy(CDS_CONFIG)
    config["clients"]["other-ehr"] = {"issuer": OTHER_ISSUER, "jwks": _jwks(OTHER_KEY, "o-1")}
    if rate is not None:
        config["rate_limit_per_minute"] = rate
    return config


@pytest.fixture
def make_app(settings: Settings) -> Iterator[Callable[..., Flask]]:
    """Apps with a CDS Hooks rate (and other settings changed), closed after the test."""
    made: list[Flask] = []

    def make(rate: int | None = None, **changes: Any) -> Flask:
        extra = {**settings.extra, "cds_hooks": _config(rate)}
        application = create_app(replace(settings, extra=extra, **changes))
        state = application.extensions["fhir_kat"]
        state.cds_rate_limiter.clock = lambda: 1000.0  # no refill while the test runs
        made.append(application)
        return application

    yield make
    for application in made:
        application.extensions["fhir_kat"].export.shutdown()
        application.extensions["fhir_kat"].store.dispose()


@pytest.fixture
def limited(make_app: Callable[..., Flask]) -> Flask:
    return make_app(rate=3)


def _call(app: Flask, token: str, path: str = f"/cds-services/{PATIENT_VIEW}") -> Any:
    body = hook_request(prefetch=prefetch(condition("c1", PTSD)))
    if path.endswith("/feedback"):
        body = {
            "feedback": [
                {
                    "card": "5b0e4f4e-6a43-4d3c-a3a4-9a1f3c0f6a21",
                    "outcome": "overridden",
                    "outcomeTimestamp": "2026-12-07T10:01:00Z",
                }
            ]
        }
    return app.test_client().post(path, json=body, headers={"Authorization": f"Bearer {token}"})


def _throttled(response: Any) -> None:
    assert response.status_code == 429, response.get_json()
    assert int(response.headers["Retry-After"]) >= 1
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert [i["code"] for i in outcome["issue"]] == ["throttled"]


def test_each_ehr_has_its_own_budget(limited: Flask) -> None:
    assert _call(limited, sign()).status_code == 200
    assert _call(limited, sign()).status_code == 200
    feedback = f"/cds-services/{PATIENT_VIEW}/feedback"
    assert _call(limited, sign(), feedback).status_code == 200  # feedback counts too
    _throttled(_call(limited, sign()))
    _throttled(_call(limited, sign(), feedback))
    # Another registered EHR is not held up by the first one's calls.
    other = sign(key=OTHER_KEY, kid="o-1", iss=OTHER_ISSUER)
    assert _call(limited, other).status_code == 200


def test_a_source_that_keeps_failing_is_refused_before_its_jwt_is_checked(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(auth_failure_limit=2, auth_failure_source_limit=3)
    bad = sign(key=OTHER_KEY)  # claims the registered issuer, signed with another key
    assert _call(app, bad).status_code == 401
    assert _call(app, bad).status_code == 401
    # Its budget for this issuer is spent: even a good JWT is refused, unchecked — and so not
    # spent either (its jti can still be used once the source may try again).
    good = sign()
    _throttled(_call(app, good))
    # Another issuer from the same source: one more failure, then the source's own budget.
    stranger = sign(iss="https://stranger.example")
    assert _call(app, stranger).status_code == 401
    _throttled(_call(app, sign(key=OTHER_KEY, kid="o-1", iss=OTHER_ISSUER)))
    _throttled(_call(app, "not-a-jwt"))


def test_failed_sign_ins_and_failed_hooks_share_the_source_budget(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(auth_failure_limit=10, auth_failure_source_limit=3)
    client = app.test_client()
    for attempt in range(3):
        r = client.post(
            "/auth/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": "Basic " + "c3RhZmY6d3Jvbmc="},  # staff:wrong
        )
        assert r.status_code == 401, (attempt, r.get_json())
    _throttled(_call(app, sign()))


def test_without_a_setting_the_default_applies_and_zero_turns_it_off(
    make_app: Callable[..., Flask],
) -> None:
    assert load_cds_hooks({}).rate_limit_per_minute == DEFAULT_RATE_LIMIT
    off = make_app(rate=0)
    for _ in range(5):
        assert _call(off, sign()).status_code == 200
    with pytest.raises(SettingsError) as exc:
        load_cds_hooks({"rate_limit_per_minute": -1})
    assert "[cds_hooks].rate_limit_per_minute" in str(exc.value)
    with pytest.raises(SettingsError):
        load_cds_hooks({"rate_limit_per_minute": "many"})
