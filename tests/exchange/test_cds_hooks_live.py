"""CDS Hooks without prefetch against a real FHIR server: the EHR's chart lives in SEKMET on
loopback, the hook carries only ``fhirServer`` and ``fhirAuthorization``, and the service
reads the chart there with real HTTP (issue 21). Shapes and every refusal are in
tests/test_cds_hooks.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import requests
from flask import Flask

from fhir_kat.app import create_app
from fhir_kat.settings import Settings
from fhir_kat.workflow.chart import chart_facts
from fhir_kat.workflow.triage import SNOMED, triage
from tests.exchange.conftest import SekmetServer
from tests.test_cds_hooks import ISSUER, KEY, PATIENT_VIEW, _jwks, check, sign


@pytest.fixture
def ehr_app(settings: Settings, sekmet: SekmetServer) -> Iterator[Flask]:
    config = {
        "clients": {
            "sekmet-ehr": {
                "issuer": ISSUER,
                "jwks": _jwks(KEY, "ehr-1"),
                "fhir_servers": [sekmet.base],
            }
        }
    }
    application = create_app(replace(settings, extra={**settings.extra, "cds_hooks": config}))
    yield application
    application.extensions["fhir_kat"].export.shutdown()
    application.extensions["fhir_kat"].store.dispose()


def _put(server: SekmetServer, resource: dict[str, Any]) -> None:
    r = requests.put(
        f"{server.base}/{resource['resourceType']}/{resource['id']}",
        json=resource,
        headers={"Content-Type": "application/fhir+json"},
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text


def _condition(cid: str, patient: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {"coding": [{"system": SNOMED, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }


def _hook(app: Flask, server: SekmetServer, patient: str) -> list[dict[str, Any]]:
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": server.base,
        "fhirAuthorization": {
            "access_token": "opaque-ehr-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "kat-cds",
        },
        "context": {"userId": "Practitioner/dr-1", "patientId": patient},
    }
    check("request", body)
    response = app.test_client().post(
        f"/cds-services/{PATIENT_VIEW}", json=body, headers={"Authorization": f"Bearer {sign()}"}
    )
    assert response.status_code == 200, response.get_json()
    check("response", response.get_json())
    cards: list[dict[str, Any]] = response.get_json()["cards"]
    return cards


def test_cards_from_a_chart_read_on_a_live_fhir_server(
    ehr_app: Flask, sekmet: SekmetServer
) -> None:
    _put(sekmet, {"resourceType": "Patient", "id": "cds-eligible", "birthDate": "1979-06-01"})
    ptsd = _condition("cds-c1", "cds-eligible", "47505003")
    _put(sekmet, ptsd)
    _put(
        sekmet,
        {
            "resourceType": "Observation",
            "id": "cds-phq9",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "44261-6"}]},
            "subject": {"reference": "Patient/cds-eligible"},
            "effectiveDateTime": "2026-11-20",
            "valueQuantity": {
                "value": 17,
                "unit": "{score}",
                "system": "http://unitsofmeasure.org",
                "code": "{score}",
            },
        },
    )
    [card] = _hook(ehr_app, sekmet, "cds-eligible")
    assert card["summary"] == "May be eligible for the ketamine-assisted therapy program"
    decision = triage(chart_facts([ptsd], (), 47))
    assert [f"- {m.text}" for m in decision.met] == [
        line for line in card["detail"].splitlines() if "SNOMED CT" in line
    ]
    assert "PHQ-9: 17 (2026-11-20)" in card["detail"]

    _put(sekmet, {"resourceType": "Patient", "id": "cds-excluded", "birthDate": "1979-06-01"})
    _put(sekmet, _condition("cds-c2", "cds-excluded", "47505003"))
    _put(sekmet, _condition("cds-c3", "cds-excluded", "69322001"))  # psychotic disorder
    assert _hook(ehr_app, sekmet, "cds-excluded") == []

    _put(sekmet, {"resourceType": "Patient", "id": "cds-empty"})
    assert _hook(ehr_app, sekmet, "cds-empty") == []
