"""CDS Hooks 2.0 services (issue 21): discovery and cards checked against the spec's JSON
shapes (tests/support/cds_hooks/), cards for eligible, excluded, review and no-data charts whose
reasons are triage's own for the same data, prefetch or the EHR's FHIR server (``responses``),
the EHR's signed JWT (every defect refused), and feedback recorded in the audit trail."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for

from fhir_kat.app import create_app
from fhir_kat.instruments.definitions import load_catalogue
from fhir_kat.security.cds_clients import CdsClient, CdsHooksConfig, load_cds_hooks
from fhir_kat.services.cds_hooks import CdsHooksService
from fhir_kat.services.referrals import ReferralWorkflow
from fhir_kat.settings import Settings, SettingsError
from fhir_kat.terminology.criteria import load_criteria
from fhir_kat.workflow.chart import age_on, chart_facts
from fhir_kat.workflow.triage import SNOMED, triage
from tests.conftest import client_as

SCHEMA = json.loads(
    (Path(__file__).parent / "support" / "cds_hooks" / "definitions.schema.json").read_text()
)
ISSUER = "https://ehr.example.org"
EHR_FHIR = "https://ehr.example.org/fhir"
PATIENT_VIEW = "kat-referral-patient-view"
ORDER_SELECT = "kat-referral-order-select"
PTSD = "47505003"
PSYCHOSIS = "69322001"
HYPERTENSION = "38341003"
DIABETES = "44054006"  # a condition no triage criterion classifies (unknown: review)
KEY = ec.generate_private_key(ec.SECP384R1())
OTHER_KEY = ec.generate_private_key(ec.SECP384R1())


def _jwks(key: Any, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**jwk, "kid": kid, "alg": "ES384", "use": "sig"}]}


CDS_CONFIG = {
    "clients": {
        "test-ehr": {"issuer": ISSUER, "jwks": _jwks(KEY, "ehr-1"), "fhir_servers": [EHR_FHIR]}
    },
    "order_codes": ["http://snomed.info/sct|306206005"],
}


def check(shape: str, document: Any) -> None:
    schema = {**SCHEMA, "$ref": f"#/$defs/{shape}"}
    cls = validator_for(schema, default=Draft202012Validator)
    errors = [
        e.message for e in cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(document)
    ]
    assert not errors, errors


@pytest.fixture
def cds_app(settings: Settings) -> Iterator[Flask]:
    application = create_app(replace(settings, extra={**settings.extra, "cds_hooks": CDS_CONFIG}))
    yield application
    application.extensions["fhir_kat"].export.shutdown()
    application.extensions["fhir_kat"].store.dispose()


def sign(
    service: str = PATIENT_VIEW,
    *,
    key: Any = KEY,
    kid: str = "ehr-1",
    alg: str = "ES384",
    **claims: Any,
) -> str:
    now = int(time.time())
    body = {
        "iss": ISSUER,
        "aud": f"http://localhost/cds-services/{service}",
        "iat": now,
        "exp": now + 120,
        "jti": str(uuid.uuid4()),
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


def ehr(app: Flask) -> FlaskClient:
    return app.test_client()


def condition(
    cid: str, code: str, system: str = SNOMED, clinical: str = "active"
) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": clinical,
                }
            ]
        },
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/p1"},
    }


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }


PATIENT = {"resourceType": "Patient", "id": "p1", "birthDate": "1980-04-02"}
PHQ9 = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
    "effectiveDateTime": "2026-11-02",
    "valueQuantity": {"value": 18, "unit": "{score}"},
}


def prefetch(
    *conditions: dict[str, Any], patient: dict[str, Any] | None = PATIENT
) -> dict[str, Any]:
    return {
        "patient": patient,
        "conditions": searchset(*conditions),
        "allergies": searchset(),
        "scores": searchset(PHQ9),
        "medications": searchset(),
    }


def hook_request(hook: str = "patient-view", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/dr-1", "patientId": "p1"},
    }
    body.update(changes)
    check("request", body)
    return body


def call(app: Flask, body: dict[str, Any], service: str = PATIENT_VIEW, **kw: Any) -> Any:
    return ehr(app).post(
        f"/cds-services/{service}",
        json=body,
        headers={"Authorization": f"Bearer {sign(service, **kw)}"},
    )


def cards(app: Flask, body: dict[str, Any], service: str = PATIENT_VIEW) -> list[dict[str, Any]]:
    response = call(app, body, service)
    assert response.status_code == 200, response.get_json()
    check("response", response.get_json())
    result: list[dict[str, Any]] = response.get_json()["cards"]
    return result


def expected_decision(*conditions: dict[str, Any], age: int | None = 46) -> Any:
    """Triage's own decision for the same chart (the rule set the card must follow)."""
    return triage(chart_facts(conditions, (), age))


# ---------------------------------------------------------------------------- discovery


def test_discovery_lists_both_services_with_prefetch(cds_app: Flask) -> None:
    response = ehr(cds_app).get("/cds-services")
    assert response.status_code == 200
    doc = response.get_json()
    check("discovery", doc)
    services = {s["id"]: s for s in doc["services"]}
    assert services[PATIENT_VIEW]["hook"] == "patient-view"
    assert services[ORDER_SELECT]["hook"] == "order-select"
    prefetch_keys = set(services[PATIENT_VIEW]["prefetch"])
    assert {"patient", "conditions", "allergies", "scores", "medications"} == prefetch_keys
    scores = services[PATIENT_VIEW]["prefetch"]["scores"]
    for loinc in ("44261-6", "70274-6", "101698-9"):  # PHQ-9, GAD-7, PCL-5 totals (catalogue)
        assert f"http://loinc.org|{loinc}" in scores


# ---------------------------------------------------------------------------- cards


def test_eligible_chart_gets_a_card_with_triage_reasons(cds_app: Flask) -> None:
    chart = (condition("c1", PTSD),)
    [card] = cards(cds_app, hook_request(prefetch=prefetch(*chart)))
    assert card["summary"] == "May be eligible for the ketamine-assisted therapy program"
    assert card["indicator"] == "info"
    decision = expected_decision(*chart)
    for met in decision.met:
        if met.criterion == "diagnosis":
            assert f"- {met.text}" in card["detail"]
    assert "SNOMED CT 47505003" in card["detail"]
    # Only the referrer can state prior treatment failure: the form asks, no review.
    assert (
        "**The referral form will ask**\n- history of previous treatment failure not stated"
        in card["detail"]
    )
    assert "would review" not in card["detail"]
    assert "PHQ-9: 18 (2026-11-02)" in card["detail"]
    [suggestion] = card["suggestions"]
    [action] = suggestion["actions"]
    draft = action["resource"]
    assert action["type"] == "create"
    assert draft["resourceType"] == "ServiceRequest"
    assert (draft["status"], draft["intent"]) == ("draft", "proposal")
    assert draft["subject"] == {"reference": "Patient/p1"}
    assert draft["requester"] == {"reference": "Practitioner/dr-1"}
    assert draft["code"]["coding"][0]["code"] == "kat-program"
    [link] = card["links"]
    assert link["url"] == "http://localhost/app/referrals/new"


def test_excluded_chart_gets_no_card(cds_app: Flask) -> None:
    chart = (condition("c1", PTSD), condition("c2", PSYCHOSIS))
    assert expected_decision(*chart).outcome == "rejected"
    assert cards(cds_app, hook_request(prefetch=prefetch(*chart))) == []


@pytest.mark.parametrize(
    ("chart", "patient"),
    [
        pytest.param(
            (condition("c1", PTSD), condition("c2", DIABETES)), PATIENT, id="unclassified"
        ),
        pytest.param(
            (condition("c1", PTSD), condition("c2", HYPERTENSION)), PATIENT, id="control-unknown"
        ),
        pytest.param(
            (condition("c1", PTSD),), {"resourceType": "Patient", "id": "p1"}, id="no-birth-date"
        ),
        pytest.param(
            (condition("c1", PTSD),), {**PATIENT, "birthDate": "2015-01-01"}, id="under-age"
        ),
    ],
)
def test_review_chart_gets_a_review_card_naming_triage_findings(
    cds_app: Flask, chart: tuple[dict[str, Any], ...], patient: dict[str, Any]
) -> None:
    [card] = cards(cds_app, hook_request(prefetch=prefetch(*chart, patient=patient)))
    assert card["summary"].endswith("(needs clinician review)")
    app_now = cds_app.extensions["fhir_kat"].clock().date()
    decision = expected_decision(*chart, age=age_on(patient.get("birthDate", ""), app_now))
    assert decision.outcome == "on-hold"
    review = card["detail"].split("(a referral is not refused for these):\n")[1].split("\n\n")[0]
    assert review.splitlines() == [
        f"- {f.text}" for f in decision.findings if f.criterion != "prior-treatment-failure"
    ]


@pytest.mark.parametrize(
    "chart",
    [
        pytest.param((), id="no-conditions"),
        pytest.param((condition("c1", DIABETES),), id="no-inclusion-diagnosis"),
        pytest.param((condition("c1", PTSD, clinical="resolved"),), id="inclusion-resolved"),
    ],
)
def test_no_data_or_no_inclusion_gets_no_card(
    cds_app: Flask, chart: tuple[dict[str, Any], ...]
) -> None:
    assert cards(cds_app, hook_request(prefetch=prefetch(*chart))) == []


def test_a_prefetch_of_another_patient_is_refused(cds_app: Flask) -> None:
    other = {**PATIENT, "id": "someone-else"}
    response = call(cds_app, hook_request(prefetch=prefetch(condition("c1", PTSD), patient=other)))
    assert response.status_code == 412
    assert response.get_json()["issue"][0]["expression"] == ["prefetch.patient"]


def test_card_ids_follow_the_hook_instance(cds_app: Flask) -> None:
    body = hook_request(prefetch=prefetch(condition("c1", PTSD)))
    first, again = cards(cds_app, body), cards(cds_app, body)
    assert first == again
    other = cards(cds_app, {**body, "hookInstance": str(uuid.uuid4())})
    assert other[0]["uuid"] != first[0]["uuid"]


# ---------------------------------------------------------------------------- one rule set


def test_card_review_reasons_equal_the_referral_task_status_reason(cds_app: Flask) -> None:
    """The same chart stored as a referral (FHIR transaction) is triaged on-hold with the same
    findings the card names (plus the one only the referrer can state)."""
    staff = client_as(cds_app, "staff")
    chart = [condition("c1", PTSD), condition("c2", HYPERTENSION), condition("c3", DIABETES)]
    entries = [
        {"resource": {**PATIENT, "id": "p-rs"}, "request": {"method": "PUT", "url": "Patient/p-rs"}}
    ]
    for c in chart:
        stored = {**c, "id": f"{c['id']}-rs", "subject": {"reference": "Patient/p-rs"}}
        entries.append(
            {"resource": stored, "request": {"method": "PUT", "url": f"Condition/{stored['id']}"}}
        )
    entries.append(
        {
            "resource": {
                "resourceType": "ServiceRequest",
                "id": "sr-rs",
                "status": "active",
                "intent": "order",
                "code": {
                    "coding": [
                        {
                            "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-service",
                            "code": "kat-program",
                        }
                    ]
                },
                "subject": {"reference": "Patient/p-rs"},
                "authoredOn": "2026-12-01",
            },
            "request": {"method": "PUT", "url": "ServiceRequest/sr-rs"},
        }
    )
    response = staff.post(
        "/fhir",
        json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 200, response.get_json()
    tasks = staff.get("/fhir/Task?focus=ServiceRequest/sr-rs").get_json()["entry"]
    task = tasks[0]["resource"]
    assert task["status"] == "on-hold"
    [card] = cards(cds_app, hook_request(prefetch=prefetch(*chart)))
    review = card["detail"].split("(a referral is not refused for these):\n")[1].split("\n\n")[0]
    ask = card["detail"].split("**The referral form will ask**\n")[1].split("\n\n")[0]
    for line in review.splitlines() + ask.splitlines():
        assert line[2:] in task["statusReason"]["text"]


# ---------------------------------------------------------------------------- order-select


def _draft_orders(code: str, system: str = SNOMED) -> dict[str, Any]:
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-1",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/p1"},
    }
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}


def test_order_select_answers_a_configured_referral_order(cds_app: Flask) -> None:
    context = {
        "userId": "Practitioner/dr-1",
        "patientId": "p1",
        "selections": ["ServiceRequest/draft-1"],
        "draftOrders": _draft_orders("306206005"),  # configured in CDS_CONFIG.order_codes
    }
    body = hook_request("order-select", context=context, prefetch=prefetch(condition("c1", PTSD)))
    [card] = cards(cds_app, body, ORDER_SELECT)
    assert card["summary"].startswith("May be eligible")
    other = {**context, "draftOrders": _draft_orders("183524004")}  # not configured: silent
    assert cards(cds_app, {**body, "context": other}, ORDER_SELECT) == []
    unselected = {**context, "selections": ["ServiceRequest/other"]}
    assert cards(cds_app, {**body, "context": unselected}, ORDER_SELECT) == []


# ---------------------------------------------------------------------------- no prefetch


def _fhir_request(**changes: Any) -> dict[str, Any]:
    return hook_request(
        fhirServer=EHR_FHIR,
        fhirAuthorization={
            "access_token": "ehr-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read patient/Condition.read",
            "subject": "kat-cds",
        },
        **changes,
    )


def _ehr_answers(rsps: responses.RequestsMock, conditions: list[dict[str, Any]]) -> None:
    auth = [responses.matchers.header_matcher({"Authorization": "Bearer ehr-token"})]
    rsps.get(f"{EHR_FHIR}/Patient/p1", json=PATIENT, match=auth)
    rsps.get(f"{EHR_FHIR}/Condition", json=searchset(*conditions), match=auth)
    rsps.get(f"{EHR_FHIR}/AllergyIntolerance", json=searchset(), match=auth)
    rsps.get(f"{EHR_FHIR}/Observation", json=searchset(PHQ9), match=auth)
    rsps.get(f"{EHR_FHIR}/MedicationRequest", json=searchset(), match=auth)


def test_without_prefetch_the_ehr_fhir_server_is_read_with_the_hook_token(cds_app: Flask) -> None:
    with responses.RequestsMock() as rsps:
        _ehr_answers(rsps, [condition("c1", PTSD), condition("c2", PSYCHOSIS)])
        assert cards(cds_app, _fhir_request()) == []
        queried = [c.request.url for c in rsps.calls]
    assert any("Condition?patient=p1" in url for url in queried)
    with responses.RequestsMock() as rsps:
        _ehr_answers(rsps, [condition("c1", PTSD)])
        [card] = cards(cds_app, _fhir_request())
    assert "PHQ-9: 18" in card["detail"]


def test_partial_prefetch_is_completed_from_the_ehr(cds_app: Flask) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        _ehr_answers(rsps, [condition("c1", PTSD)])
        body = _fhir_request(prefetch={"patient": PATIENT, "conditions": None})
        [card] = cards(cds_app, body)
        urls = [c.request.url for c in rsps.calls]
    assert not any("/Patient/" in u for u in urls)  # from prefetch
    assert any("/Condition?" in u for u in urls)  # null in prefetch: read from the EHR
    assert card["summary"].startswith("May be eligible")


@pytest.mark.parametrize(
    "case",
    ["no-server", "unregistered-server", "ehr-error", "ehr-timeout", "not-fhir"],
)
def test_an_unreadable_chart_is_412_naming_what_is_missing(cds_app: Flask, case: str) -> None:
    body = _fhir_request()
    if case == "no-server":
        body = hook_request()
    if case == "unregistered-server":
        body["fhirServer"] = "http://127.0.0.1:9/fhir"  # never called: not registered
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        if case == "ehr-error":
            rsps.get(f"{EHR_FHIR}/Patient/p1", status=500)
        elif case == "ehr-timeout":
            rsps.get(f"{EHR_FHIR}/Patient/p1", body=requests.ConnectTimeout())
        elif case == "not-fhir":
            rsps.get(f"{EHR_FHIR}/Patient/p1", body="<html>sign in</html>")
        for rtype in ("Condition", "AllergyIntolerance", "Observation", "MedicationRequest"):
            rsps.get(f"{EHR_FHIR}/{rtype}", json=searchset())
        response = call(cds_app, body)
        if case in ("no-server", "unregistered-server"):
            assert len(rsps.calls) == 0
    assert response.status_code == 412
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    expressions = [i["expression"][0] for i in outcome["issue"]]
    if case in ("no-server", "unregistered-server"):
        assert expressions == ["prefetch.patient", "prefetch.conditions", "prefetch.allergies"]
    else:
        assert expressions == ["prefetch.patient"]


# ---------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("token", "says"),
    [
        (None, "Authorization: Bearer"),
        ("not-a-jwt", "not a JWT"),
        (lambda: sign(key=OTHER_KEY), "unknown issuer, no registered key"),
        (lambda: sign(kid="other"), "unknown issuer, no registered key"),
        (lambda: sign(iss="https://elsewhere.example"), "unknown issuer, no registered key"),
        (lambda: sign(aud="http://localhost/cds-services/other"), "aud must be the URL"),
        (lambda: sign(exp=int(time.time()) - 10), "expired"),
        (lambda: sign(exp=int(time.time()) + 3600), "more than 5 minutes"),
        (lambda: sign(jti=None), "not valid"),
        (lambda: sign(iat=None), "not valid"),
        (
            lambda: jwt.encode(
                {"iss": ISSUER, "aud": f"http://localhost/cds-services/{PATIENT_VIEW}"},
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
                algorithm="RS256",
            ),
            "ES384 or RS384",
        ),
        (lambda: jwt.encode({"iss": ISSUER}, "s" * 48, algorithm="HS256"), "ES384 or RS384"),
    ],
)
def test_untrusted_requests_are_refused(cds_app: Flask, token: Any, says: str) -> None:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token() if callable(token) else token}"
    body = hook_request(prefetch=prefetch(condition("c1", PTSD)))
    response = ehr(cds_app).post(f"/cds-services/{PATIENT_VIEW}", json=body, headers=headers)
    assert response.status_code == 401
    assert says in response.get_json()["issue"][0]["diagnostics"]


def test_a_jwt_is_used_once(cds_app: Flask) -> None:
    token = sign()
    body = hook_request(prefetch=prefetch(condition("c1", PTSD)))
    headers = {"Authorization": f"Bearer {token}"}
    assert (
        ehr(cds_app).post(f"/cds-services/{PATIENT_VIEW}", json=body, headers=headers).status_code
        == 200
    )
    again = ehr(cds_app).post(f"/cds-services/{PATIENT_VIEW}", json=body, headers=headers)
    assert again.status_code == 401
    assert "already used" in again.get_json()["issue"][0]["diagnostics"]


def test_an_rs384_ehr_key_is_accepted(settings: Settings) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    config = {"clients": {"rsa-ehr": {"issuer": ISSUER, "jwks": {"keys": [{**jwk, "kid": "r1"}]}}}}
    application = create_app(replace(settings, extra={**settings.extra, "cds_hooks": config}))
    try:
        body = hook_request(prefetch=prefetch(condition("c1", PTSD)))
        response = call(application, body, key=rsa_key, kid="r1", alg="RS384")
        assert response.status_code == 200, response.get_json()
    finally:
        application.extensions["fhir_kat"].export.shutdown()
        application.extensions["fhir_kat"].store.dispose()


def test_bad_requests_name_each_problem(cds_app: Flask) -> None:
    response = call(cds_app, {"hook": "order-sign", "context": {"patientId": "a b"}})
    assert response.status_code == 400
    expressions = sorted(i["expression"][0] for i in response.get_json()["issue"])
    assert expressions == ["context.patientId", "context.userId", "hook", "hookInstance"]
    unknown = ehr(cds_app).post(
        "/cds-services/nope", json={}, headers={"Authorization": f"Bearer {sign('nope')}"}
    )
    assert unknown.status_code == 404


def test_configuration_problems_are_named() -> None:
    with pytest.raises(SettingsError) as exc:
        load_cds_hooks(
            {
                "clients": {
                    "a": {"jwks": {"keys": []}},
                    "b": {"issuer": "x", "fhir_servers": ["ftp://x"]},
                },
                "order_codes": ["nocode"],
                "bogus": 1,
            }
        )
    text = str(exc.value)
    for expected in (
        "[cds_hooks].bogus: unknown setting",
        "[cds_hooks.clients.a]: issuer",
        "[cds_hooks.clients.b]: needs jwks or jwks_file",
        "[cds_hooks.clients.b]: fhir_servers",
        "order_codes: 'nocode'",
    ):
        assert expected in text


# ---------------------------------------------------------------------------- feedback


def test_feedback_is_recorded_in_the_audit_trail(cds_app: Flask) -> None:
    [card] = cards(cds_app, hook_request(prefetch=prefetch(condition("c1", PTSD))))
    suggestion = card["suggestions"][0]["uuid"]
    feedback = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": suggestion}],
                "outcomeTimestamp": "2026-12-07T10:00:00Z",
            },
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {"system": "http://example.org/override", "code": "patient-declined"},
                    "userComment": "free text that is not kept",
                },
                "outcomeTimestamp": "2026-12-07T10:01:00Z",
            },
        ]
    }
    check("feedback", feedback)
    url = f"/cds-services/{PATIENT_VIEW}/feedback"
    response = ehr(cds_app).post(
        url,
        json=feedback,
        headers={"Authorization": f"Bearer {sign()}"},
    )
    assert response.status_code == 200
    events = client_as(cds_app, "admin").get("/fhir/AuditEvent?_count=200").get_json()["entry"]
    details = [e["resource"].get("outcomeDesc", "") for e in events]
    [recorded] = [d for d in details if d.startswith("cds-hooks feedback")]
    assert f"card {card['uuid']} accepted (suggestion {suggestion})" in recorded
    assert (
        f"card {card['uuid']} overridden (reason http://example.org/override|patient-declined)"
        in recorded
    )
    assert "free text" not in recorded
    bad = ehr(cds_app).post(
        url,
        json={"feedback": [{"card": card["uuid"], "outcome": "ignored"}]},
        headers={"Authorization": f"Bearer {sign()}"},
    )
    assert bad.status_code == 400
    assert sorted(i["expression"][0] for i in bad.get_json()["issue"]) == [
        "feedback[0].outcome",
        "feedback[0].outcomeTimestamp",
    ]


# ---------------------------------------------------------------------------- the class


def _pool() -> list[tuple[str, str]]:
    """Codes of every criterion ValueSet (what the rules recognise) and codes they do not."""
    known = sorted(
        {(s, c) for vs in load_criteria().values() for s, c in vs.include.codes if s == SNOMED}
    )
    return [*known[::7], (SNOMED, DIABETES), (SNOMED, "840539006"), ("urn:local", "X1")]


POOL = _pool()
CHARTS = st.lists(
    st.tuples(
        st.sampled_from(POOL),
        st.sampled_from(["active", "resolved", "remission"]),
        st.sampled_from(["confirmed", "unconfirmed", "refuted"]),
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chart=CHARTS,
    with_ptsd=st.booleans(),
    birth=st.sampled_from(["1980-04-02", "2015-01-01", None]),
)
def test_every_card_is_triages_decision(
    chart: list[tuple[tuple[str, str], str, str]], with_ptsd: bool, birth: str | None
) -> None:
    """For generated charts: a card exactly when triage finds an inclusion diagnosis met and
    does not reject; "needs clinician review" exactly when triage holds for anything but what
    only the referrer can state; the card's lines are triage's own texts."""
    resources = [
        {
            **condition(f"c{i}", code, system, clinical),
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": verification,
                    }
                ]
            },
        }
        for i, ((system, code), clinical, verification) in enumerate(chart)
    ]
    if with_ptsd:
        resources.append(condition("ptsd", PTSD))
    patient = {"resourceType": "Patient", "id": "p1", **({"birthDate": birth} if birth else {})}
    now = datetime(2026, 12, 7, tzinfo=UTC)
    workflow = ReferralWorkflow(None)  # type: ignore[arg-type]  # judge() reads no store
    service = CdsHooksService(workflow, load_catalogue(), CdsHooksConfig({}), lambda: now)
    body = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/dr-1", "patientId": "p1"},
        "prefetch": {**prefetch(*resources, patient=patient)},
    }
    client = CdsClient("t", ISSUER, {"keys": []})
    answer = service.call(PATIENT_VIEW, body, client, "https://kat.example.org/app/referrals/new")
    check("response", answer)
    decision = triage(chart_facts(resources, (), age_on(birth or "", now.date())))
    diagnosis_met = any(m.criterion == "diagnosis" for m in decision.met)
    if not diagnosis_met or decision.outcome == "rejected":
        assert answer["cards"] == []
        return
    [card] = answer["cards"]
    statements = {"prior-treatment-failure"}
    review = [f for f in decision.findings if f.criterion not in statements]
    assert card["summary"].endswith("(needs clinician review)") == bool(review)
    lines = card["detail"].splitlines()
    for finding in [*decision.met, *decision.findings]:
        assert f"- {finding.text}" in lines
    if any(f.kind == "unclassified" for f in decision.findings):
        assert review  # unknown means review, never a plain "may be eligible"
