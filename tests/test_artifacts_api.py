"""The native artifact API on both databases: store, dry run, schemas, idempotent re-sends, new
versions on change, one PHN one Patient, references to stored data, roles, and the stored
resources read back through /fhir by a real FHIR client."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from fhirpy import SyncFHIRClient
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import LiveServer, client_as

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
KINDS = [
    "referrals",
    "screenings",
    "consents",
    "medication-administrations",
    "questionnaire-responses",
]


def example(kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / f"{kind}.json").read_text())
    return loaded


def send(c: FlaskClient, kind: str, body: Any, suffix: str = "") -> Any:
    return c.post(f"/api/v1/{kind}{suffix}", data=json.dumps(body), content_type="application/json")


def statuses(response: Any) -> list[str]:
    return [e["response"]["status"] for e in response.get_json()["entry"]]


def test_every_example_is_stored(client: FlaskClient) -> None:
    for kind in KINDS:
        r = send(client, kind, example(kind))
        assert r.status_code == 201, (kind, r.get_json())
        new = [
            e["response"]["status"]
            for e in r.get_json()["entry"]
            # A session writes the program Organization too (as the referral did): unchanged.
            if not e["response"]["location"].startswith("Organization/")
        ]
        assert all(s.startswith("201") for s in new), kind
    obs = client.get("/fhir/Observation?code=http://loinc.org|8867-4&_count=10").get_json()
    assert obs["total"] == 2  # heart rate before and after the session
    task = client.get("/fhir/Task?identifier=https://emr.example-clinic.ca/referrals|R-7781")
    assert task.get_json()["total"] == 1
    prov = client.get("/fhir/Provenance?_count=50").get_json()
    mapped = [e["resource"] for e in prov["entry"] if "policy" in e["resource"]]
    assert len(mapped) == len(KINDS)  # one per artifact (another records the PHQ-9 extraction)
    assert prov["total"] == len(KINDS) + 1
    policies = {p for r in mapped for p in r["policy"]}
    assert any(p.endswith("mappings/referrals/Patient.yaml#v2") for p in policies)
    assert {r["agent"][0]["who"]["identifier"]["value"] for r in mapped} == {"staff"}


def test_resend_is_idempotent_and_a_change_is_a_new_version(client: FlaskClient) -> None:
    referral = example("referrals")
    first = send(client, "referrals", referral)
    again = send(client, "referrals", referral)
    assert again.status_code == 200 and all(s == "200 OK" for s in statuses(again))

    # the same resources (triage moved the Task on after the first answer was written)
    def resources(response: Any) -> list[str]:
        return [
            e["response"]["location"].split("/_history")[0]
            for e in response.get_json()["entry"]
            if "Provenance" not in e["response"]["location"]
        ]

    assert resources(again) == resources(first)
    assert client.get("/fhir/Patient").get_json()["total"] == 1
    changed = copy.deepcopy(referral)
    changed["notes"] = "Updated synthetic note"
    r = send(client, "referrals", changed)
    locations = [e["response"]["location"] for e in r.get_json()["entry"]]
    sr = next(loc for loc in locations if loc.startswith("ServiceRequest/"))
    assert sr.endswith("/_history/2")  # same resource, new version
    patient = next(loc for loc in locations if loc.startswith("Patient/"))
    assert patient.endswith("/_history/1")  # unchanged resources keep their version


def test_one_phn_one_patient_and_conflicts_are_refused(client: FlaskClient) -> None:
    send(client, "referrals", example("referrals"))
    other = copy.deepcopy(example("referrals"))
    other["referral_identifier"]["value"] = "R-9999"
    other["source_id"] = "INTAKE-2026-0002"
    assert send(client, "referrals", other).status_code == 201
    assert client.get("/fhir/Patient").get_json()["total"] == 1
    assert client.get("/fhir/ServiceRequest").get_json()["total"] == 2
    conflict = copy.deepcopy(other)
    conflict["patient"]["birth_date"] = "1990-01-01"
    conflict["patient"]["family_name"] = "Otherperson"
    r = send(client, "referrals", conflict)
    assert r.status_code == 422
    body = r.get_json()
    assert {i["expression"][0] for i in body["issue"]} == {
        "Patient.birthDate",
        "Patient.name.family",
    }
    assert "Otherperson" not in r.get_data(as_text=True) and "1990" not in r.get_data(as_text=True)
    assert (
        client.get("/fhir/Patient").get_json()["entry"][0]["resource"]["birthDate"] == "1984-03-02"
    )


def test_references_to_unstored_data_are_refused_and_nothing_is_stored(client: FlaskClient) -> None:
    r = send(client, "screenings", example("screenings"))  # no referral stored yet
    assert r.status_code == 422
    missing = {i["diagnostics"].split(" ")[0] for i in r.get_json()["issue"]}
    assert missing == {"Patient", "Task", "ServiceRequest"}
    assert client.get("/fhir/Observation").get_json()["total"] == 0
    assert client.get("/fhir/Practitioner").get_json()["total"] == 0


def test_dry_run_schemas_and_refusals(client: FlaskClient) -> None:
    r = send(client, "referrals", example("referrals"), "/$transform")
    assert r.status_code == 200 and r.get_json()["type"] == "transaction"
    assert client.get("/fhir/Patient").get_json()["total"] == 0  # nothing stored
    schema = client.get("/api/v1/schemas/medication-administrations.json")
    assert schema.status_code == 200 and "dose_mg" in schema.get_json()["required"]
    assert client.get("/api/v1/schemas/nope.json").status_code == 404
    bad = example("medication-administrations") | {"dose_mg": 140.0}
    r = send(client, "medication-administrations", bad)
    assert r.status_code == 422 and r.get_json()["issue"][0]["expression"] == ["dose_mg"]
    assert send(client, "unicorns", {}).status_code == 404
    assert (
        client.post("/api/v1/referrals", data="[1]", content_type="application/json").status_code
        == 422
    )
    assert (
        client.post("/api/v1/referrals", data="{", content_type="application/json").status_code
        == 400
    )


def test_roles(app: Flask) -> None:
    referrer = client_as(app, "referrer")
    assert send(referrer, "referrals", example("referrals")).status_code == 201
    assert send(referrer, "consents", example("consents")).status_code == 403
    assert send(client_as(app, "ha"), "referrals", example("referrals")).status_code == 403
    assert send(app.test_client(), "referrals", example("referrals")).status_code == 401


def test_stored_artifacts_read_back_with_fhirpy(
    client: FlaskClient, live_server: LiveServer
) -> None:
    for kind in ("referrals", "medication-administrations"):
        assert send(client, kind, example(kind)).status_code == 201
    fhir = SyncFHIRClient(live_server.url + "/fhir", authorization=f"Bearer {live_server.token}")
    patient = (
        fhir.resources("Patient")
        .search(
            identifier="https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id|9999999998"
        )
        .get()
    )
    vitals = (
        fhir.resources("Observation").search(patient=patient.id, category="vital-signs").fetch_all()
    )
    assert len(vitals) == 8
    bp = [o for o in vitals if o["code"]["coding"][0]["code"] == "85354-9"]
    assert {c["valueQuantity"]["value"] for o in bp for c in o["component"]} == {122, 78, 138, 86}
    ma = fhir.resources("MedicationAdministration").search(patient=patient.id).get()
    assert ma["dosage"]["dose"] == {
        "value": 84.0,
        "unit": "mg",
        "system": "http://unitsofmeasure.org",
        "code": "mg",
    }
    ae = fhir.resources("AdverseEvent").search(subject=f"Patient/{patient.id}").get()
    assert ae["suspectEntity"][0]["instance"]["reference"] == f"MedicationAdministration/{ma.id}"


@pytest.mark.parametrize("kind", KINDS)
def test_examples_are_documented(kind: str) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "artifacts.md").read_text()
    assert f"## {kind}" in text
