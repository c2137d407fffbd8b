"""The SMART App Launch client (``security/smart.py``) against an EHR simulated with
``responses``, for what a live EHR will not produce on demand: a smart-configuration missing
each thing SMART 2.0 requires, a token response without a patient, an ID token without a usable
``fhirUser`` (a patient, another server's practitioner, none), an ID token signed by another key.
The flow against a real EHR: tests/web/test_smart_launch.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest
import responses
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet, RSAKey

from fhir_kat.security.oidc import SignInError
from fhir_kat.security.smart import EhrAuthorizationServer, load_ehrs, user_path

ISS = "https://emr.example.org/fhir"
AS = "https://auth.emr.example.org"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})
OTHER = RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})
REDIRECT = "https://kat.example.org/smart/callback"


def configuration() -> dict[str, Any]:
    return {
        "issuer": AS,
        "jwks_uri": f"{AS}/jwks",
        "authorization_endpoint": f"{AS}/authorize",
        "token_endpoint": f"{AS}/token",
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "launch-ehr",
            "launch-standalone",
            "client-confidential-symmetric",
            "sso-openid-connect",
        ],
    }


class FakeEhr:
    def __init__(self, rsps: responses.RequestsMock) -> None:
        self.config = configuration()
        self.claims: dict[str, Any] = {"fhirUser": f"{ISS}/Practitioner/dr-1", "name": "Dr A"}
        self.token_extra: dict[str, Any] = {"patient": "pt-1"}
        self.key: Any = KEY  # signs the ID token
        self.published: Any = KEY  # in the EHR's JWKS
        self.alg = "RS256"
        self.nonce = ""
        self.token_requests: list[dict[str, str]] = []
        rsps.add_callback(
            responses.GET,
            f"{ISS}/.well-known/smart-configuration",
            callback=lambda _r: (200, {}, json.dumps(self.config)),
        )
        rsps.add_callback(
            responses.GET,
            f"{AS}/jwks",
            callback=lambda _r: (
                200,
                {},
                json.dumps(KeySet([self.published]).as_dict(private=False)),
            ),
        )
        rsps.add_callback(responses.POST, f"{AS}/token", callback=self._token)

    def _token(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.token_requests.append(dict(parse_qsl(request.body)))
        now = int(time.time())
        claims = {
            "iss": AS,
            "sub": "u-7",
            "aud": "kat",
            "exp": now + 300,
            "iat": now,
            "nonce": self.nonce,
            **self.claims,
        }
        claims = {k: v for k, v in claims.items() if v is not None}
        id_token = jose_jwt.encode(
            {"alg": self.alg, "kid": "k1"}, claims, self.key, algorithms=[self.alg]
        )
        answer = {
            "access_token": "ehr-at-1",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "launch openid fhirUser patient/*.rs",
            "id_token": id_token,
            **self.token_extra,
        }
        answer = {k: v for k, v in answer.items() if v is not None}
        return 200, {"Content-Type": "application/json"}, json.dumps(answer)


@pytest.fixture
def ehr() -> Iterator[FakeEhr]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield FakeEhr(rsps)


def server() -> EhrAuthorizationServer:
    ehrs = load_ehrs(
        {
            "ehrs": {
                "emr": {
                    "iss": ISS,
                    "client_id": "kat",
                    "client_secret_env": "S",
                    "organization": "https://kat.example.org/sid/organization|C7",
                    "referrer_scopes": ["system/*.cruds"],
                }
            }
        },
        {"S": "test-only-secret"},
    )
    return EhrAuthorizationServer(ehrs["emr"])


def launch(ehr: FakeEhr, launch_id: str | None = "L1") -> Any:
    client = server()
    authorization = client.begin_launch(REDIRECT, launch_id)
    query = parse_qs(urlsplit(authorization.url).query)
    ehr.nonce = query["nonce"][0]
    return client.finish_launch(
        {"code": "c1", "state": authorization.state},
        redirect_uri=REDIRECT,
        nonce=authorization.nonce,
        code_verifier=authorization.code_verifier,
        now=int(time.time()),
    )


def test_a_launch_gives_the_patient_the_physician_and_keeps_the_token_out_of_repr(
    ehr: FakeEhr,
) -> None:
    done = launch(ehr)
    assert (done.patient, done.subject, done.name) == ("pt-1", "u-7", "Dr A")
    assert done.issuer == AS and done.fhir_user.endswith("/Practitioner/dr-1")
    assert "ehr-at-1" not in repr(done)
    sent = ehr.token_requests[0]
    assert sent["grant_type"] == "authorization_code" and len(sent["code_verifier"]) >= 43


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"code_challenge_methods_supported": ["plain"]}, "PKCE S256"),
        ({"code_challenge_methods_supported": None}, "PKCE S256"),
        ({"capabilities": ["launch-ehr", "sso-openid-connect"]}, "client-confidential"),
        ({"capabilities": ["launch-ehr", "client-confidential-symmetric"]}, "sso-openid-connect"),
        ({"issuer": None}, "issuer"),
        ({"jwks_uri": None}, "jwks_uri"),
        ({"token_endpoint": "http://auth.emr.example.org/token"}, "token_endpoint"),
    ],
)
def test_a_smart_configuration_without_what_smart_2_requires_is_refused(
    ehr: FakeEhr, change: dict[str, Any], why: str
) -> None:
    ehr.config = {k: v for k, v in {**ehr.config, **change}.items() if v is not None}
    with pytest.raises(SignInError) as caught:
        server().begin_launch(REDIRECT, "L1")
    assert caught.value.status == 502 and why in caught.value.reason


def test_a_launch_kind_the_ehr_does_not_offer_is_refused(ehr: FakeEhr) -> None:
    ehr.config["capabilities"] = [c for c in ehr.config["capabilities"] if c != "launch-standalone"]
    server().begin_launch(REDIRECT, "L1")  # the EHR launch still works
    with pytest.raises(SignInError) as caught:
        server().begin_launch(REDIRECT, None)
    assert "launch-standalone" in caught.value.reason


@pytest.mark.parametrize(
    ("claims", "token", "why"),
    [
        ({}, {"patient": None}, "without a patient"),
        ({}, {"patient": "../Patient/x"}, "without a patient"),
        ({"fhirUser": None}, {}, "fhirUser"),
        ({"fhirUser": "Patient/pt-1"}, {}, "fhirUser"),
        ({"fhirUser": "https://elsewhere.example.org/fhir/Practitioner/dr-1"}, {}, "fhirUser"),
    ],
)
def test_a_launch_without_a_patient_or_a_practitioner_is_refused(
    ehr: FakeEhr, claims: dict[str, Any], token: dict[str, Any], why: str
) -> None:
    ehr.claims.update(claims)
    ehr.token_extra.update(token)
    with pytest.raises(SignInError) as caught:
        launch(ehr)
    assert why in caught.value.reason


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_id_tokens_signed_with_smarts_other_algorithms_are_accepted(ehr: FakeEhr, alg: str) -> None:
    from joserfc.jwk import ECKey

    key = (
        RSAKey.generate_key(2048, parameters={"kid": "k1"})
        if alg.startswith("RS")
        else ECKey.generate_key("P-384", parameters={"kid": "k1"})
    )
    ehr.key = ehr.published = key
    ehr.alg = alg
    assert launch(ehr).patient == "pt-1"


def test_an_id_token_signed_by_another_key_is_refused(ehr: FakeEhr) -> None:
    ehr.key = OTHER
    with pytest.raises(SignInError) as caught:
        launch(ehr)
    assert "ID token refused" in caught.value.reason


def test_declined_consent_is_a_clear_refusal(ehr: FakeEhr) -> None:
    with pytest.raises(SignInError) as caught:
        server().finish_launch(
            {"error": "access_denied", "state": "s"},
            redirect_uri=REDIRECT,
            nonce="n",
            code_verifier="v" * 64,
            now=int(time.time()),
        )
    assert caught.value.status == 403 and not ehr.token_requests


@pytest.mark.parametrize(
    ("fhir_user", "expected"),
    [
        ("Practitioner/dr-1", "Practitioner/dr-1"),
        (f"{ISS}/PractitionerRole/r-9", "PractitionerRole/r-9"),
        (f"{ISS}/Patient/pt-1", None),
        ("RelatedPerson/x", None),
        (f"{ISS}x/Practitioner/dr-1", None),
        ("https://other.example.org/fhir/Practitioner/dr-1", None),
        ("Practitioner/../../secret", None),
        ("Practitioner/", None),
    ],
)
def test_the_physicians_resource_is_read_only_under_the_registered_iss(
    fhir_user: str, expected: str | None
) -> None:
    assert user_path(fhir_user, ISS) == expected


# ---------------------------------------------------------------------------- the prefill


FHIR = "https://emr.example.org/fhir"


def _bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


@pytest.fixture
def chart_server() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def _prefill(user: str | None) -> Any:
    from fhir_kat.instruments.definitions import load_catalogue
    from fhir_kat.services.smart_launch import LaunchChart

    return LaunchChart(load_catalogue({})).prefill(FHIR, "at", "pt-1", user)


def test_the_physician_behind_a_practitioner_role_prefills_the_referrer(
    chart_server: responses.RequestsMock,
) -> None:
    patient = {"resourceType": "Patient", "id": "pt-1", "name": [{"family": "Doe"}]}
    chart_server.get(f"{FHIR}/Patient/pt-1", json=patient)
    chart_server.get(
        f"{FHIR}/PractitionerRole/r-1",
        json={
            "resourceType": "PractitionerRole",
            "id": "r-1",
            "practitioner": {"reference": "Practitioner/dr-1"},
        },
    )
    chart_server.get(
        f"{FHIR}/Practitioner/dr-1",
        json={"resourceType": "Practitioner", "id": "dr-1", "name": [{"family": "Okafor"}]},
    )
    for rtype in ("Condition", "MedicationRequest", "Observation"):
        chart_server.get(f"{FHIR}/{rtype}", json=_bundle())
    done = _prefill("PractitionerRole/r-1")
    assert done.fields["referrer.family_name"] == "Okafor"
    assert done.fields["patient.family_name"] == "Doe"
    assert done.complete and done.conditions == [] and done.scores == []


def test_a_role_naming_a_practitioner_elsewhere_is_not_followed(
    chart_server: responses.RequestsMock,
) -> None:
    chart_server.get(f"{FHIR}/Patient/pt-1", json={"resourceType": "Patient", "id": "pt-1"})
    chart_server.get(
        f"{FHIR}/PractitionerRole/r-1",
        json={
            "resourceType": "PractitionerRole",
            "practitioner": {"reference": "https://evil.example.org/Practitioner/x"},
        },
    )
    for rtype in ("Condition", "MedicationRequest", "Observation"):
        chart_server.get(f"{FHIR}/{rtype}", status=403)
    done = _prefill("PractitionerRole/r-1")
    assert "referrer.family_name" not in done.fields
    assert not done.complete  # the page tells the physician part of the chart was not read
    assert len(chart_server.calls) == 5  # nothing outside the EHR's FHIR base


def test_a_chart_without_its_patient_is_unavailable(chart_server: responses.RequestsMock) -> None:
    from fhir_kat.services.smart_launch import ChartUnavailable

    chart_server.get(f"{FHIR}/Patient/pt-1", status=503)
    with pytest.raises(ChartUnavailable):
        _prefill(None)
    chart_server.replace(
        responses.GET, f"{FHIR}/Patient/pt-1", json={"resourceType": "Patient", "id": "pt-2"}
    )
    with pytest.raises(ChartUnavailable):  # another patient than the launch's
        _prefill(None)
