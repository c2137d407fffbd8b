"""Bulk Data $export: async kick-off, polling, manifest, NDJSON files, _type/_since/_typeFilter,
Group and Patient level, cancel, and consent filtering of every file."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import HA_ORG, client_as

FHIR = "application/fhir+json"
ASYNC = {"Prefer": "respond-async", "Accept": FHIR}


def post(c: FlaskClient, path: str, body: Any) -> Any:
    r = c.post(path, data=json.dumps(body), content_type=FHIR)
    assert r.status_code in (200, 201), r.data
    return r.get_json()


def wait_for(c: FlaskClient, location: str) -> dict[str, Any]:
    path = location.split("localhost", 1)[1]
    for _ in range(200):  # bounded: 200 polls, 20 s at most
        r = c.get(path)
        if r.status_code == 200:
            manifest: dict[str, Any] = r.get_json()
            return manifest
        assert r.status_code == 202, r.data
        assert r.headers["X-Progress"] and r.headers["Retry-After"]
        time.sleep(0.1)
    raise AssertionError("export did not finish")


def read_file(c: FlaskClient, url: str) -> list[dict[str, Any]]:
    r = c.get(url.split("localhost", 1)[1])
    try:
        assert r.status_code == 200 and r.mimetype == "application/fhir+ndjson"
        return [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    finally:
        r.close()  # a streamed file stays open until the response is closed


@pytest.fixture
def world(app: Flask) -> dict[str, Any]:
    staff = client_as(app, "staff")
    system, value = HA_ORG.split("|")
    org = post(
        staff,
        "/fhir/Organization",
        {"resourceType": "Organization", "identifier": [{"system": system, "value": value}]},
    )["id"]
    patients = []
    for i in range(3):
        pid = post(staff, "/fhir/Patient", {"resourceType": "Patient", "gender": "other"})["id"]
        patients.append(pid)
        for code in ("44261-6", "70274-6"):
            post(
                staff,
                "/fhir/Observation",
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                    "subject": {"reference": f"Patient/{pid}"},
                    "valueInteger": i,
                },
            )
    for pid in patients[:2]:  # the third patient never consented to share with the HA
        post(
            staff,
            "/fhir/Consent",
            {
                "resourceType": "Consent",
                "status": "active",
                "scope": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                            "code": "patient-privacy",
                        }
                    ]
                },
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                "patient": {"reference": f"Patient/{pid}"},
                "provision": {
                    "type": "permit",
                    "actor": [
                        {
                            "role": {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                        "code": "IRCP",
                                    }
                                ]
                            },
                            "reference": {"reference": f"Organization/{org}"},
                        }
                    ],
                },
            },
        )
    group = post(
        staff,
        "/fhir/Group",
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{p}"}} for p in patients[1:]],
        },
    )["id"]
    return {"patients": patients, "group": group, "org": org}


def test_system_export_round_trip_is_consent_filtered(app: Flask, world: dict[str, Any]) -> None:
    ha = client_as(app, "ha")
    r = ha.get("/fhir/$export?_type=Patient,Observation", headers=ASYNC)
    assert r.status_code == 202, r.data
    manifest = wait_for(ha, r.headers["Content-Location"])
    assert manifest["requiresAccessToken"] is True and manifest["transactionTime"]
    files = {o["type"]: o for o in manifest["output"]}
    assert set(files) == {"Patient", "Observation"}
    patients = read_file(ha, files["Patient"]["url"])
    observations = read_file(ha, files["Observation"]["url"])
    p = world["patients"]
    assert {x["id"] for x in patients} == {p[0], p[1]}  # the third patient is absent
    assert {o["subject"]["reference"] for o in observations} == {
        f"Patient/{p[0]}",
        f"Patient/{p[1]}",
    }
    assert files["Observation"]["count"] == 4 == len(observations)
    # files need the token, and only the client that asked may read them
    assert (
        app.test_client().get(files["Patient"]["url"].split("localhost", 1)[1]).status_code == 401
    )
    other = client_as(app, "staff").get(files["Patient"]["url"].split("localhost", 1)[1])
    assert other.status_code == 403


def test_staff_group_and_patient_level(app: Flask, world: dict[str, Any]) -> None:
    staff = client_as(app, "staff")
    r = staff.get(f"/fhir/Group/{world['group']}/$export?_type=Observation", headers=ASYNC)
    manifest = wait_for(staff, r.headers["Content-Location"])
    obs = read_file(staff, manifest["output"][0]["url"])
    assert {o["subject"]["reference"] for o in obs} == {
        f"Patient/{p}" for p in world["patients"][1:]
    }
    r = staff.get("/fhir/Patient/$export", headers=ASYNC)
    manifest = wait_for(staff, r.headers["Content-Location"])
    types = {o["type"] for o in manifest["output"]}
    assert "Organization" not in types and {"Patient", "Observation", "Consent"} <= types


def test_since_and_type_filter(app: Flask, world: dict[str, Any]) -> None:
    staff = client_as(app, "staff")
    r = staff.get(
        "/fhir/$export?_type=Observation&_typeFilter=Observation%3Fcode%3Dhttp://loinc.org|70274-6",
        headers=ASYNC,
    )
    manifest = wait_for(staff, r.headers["Content-Location"])
    obs = read_file(staff, manifest["output"][0]["url"])
    assert len(obs) == 3 and {o["code"]["coding"][0]["code"] for o in obs} == {"70274-6"}
    r = staff.get("/fhir/$export?_type=Observation&_since=2999-01-01T00:00:00Z", headers=ASYNC)
    assert wait_for(staff, r.headers["Content-Location"])["output"] == []


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("", {}, 400),  # no Prefer: respond-async
        ("?_outputFormat=text/csv", ASYNC, 400),
        ("?_type=AuditEvent", ASYNC, 400),
        ("?_since=yesterday", ASYNC, 400),
        ("?_typeFilter=Observation%3Fnonsense%3D1", ASYNC, 400),
        ("?bogus=1", ASYNC, 400),
    ],
)
def test_kick_off_refusals(app: Flask, query: str, headers: dict[str, str], status: int) -> None:
    r = client_as(app, "staff").get(f"/fhir/$export{query}", headers=headers)
    assert r.status_code == status and r.get_json()["resourceType"] == "OperationOutcome"


def test_roles_and_cancel(app: Flask, world: dict[str, Any]) -> None:
    assert client_as(app, "referrer").get("/fhir/$export", headers=ASYNC).status_code == 403
    assert client_as(app, "admin").get("/fhir/$export", headers=ASYNC).status_code == 403
    staff = client_as(app, "staff")
    assert staff.get("/fhir/Group/nope/$export", headers=ASYNC).status_code == 404
    r = staff.get("/fhir/$export", headers=ASYNC)
    status_path = r.headers["Content-Location"].split("localhost", 1)[1]
    assert staff.delete(status_path).status_code == 202
    assert staff.get(status_path).status_code == 404
    cap = staff.get("/fhir/metadata").get_json()
    assert "export" in {o["name"] for o in cap["rest"][0]["operation"]}
