"""The audit trail says who tried and whose data left: a refused sign-in records the client id
presented (never the secret), and each `$export` file download lists the patients whose data
the file holds."""

from __future__ import annotations

import base64
import json
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import client_as
from tests.test_export import read_file, wait_for

FHIR = "application/fhir+json"


def _events(app: Flask, **query: str) -> list[dict[str, Any]]:
    params = "&".join(f"{k}={v}" for k, v in {"_count": "500", **query}.items())
    bundle = client_as(app, "admin").get(f"/fhir/AuditEvent?{params}").get_json()
    return [e["resource"] for e in bundle.get("entry", [])]


def _refusals(app: Flask) -> list[dict[str, Any]]:
    return [e for e in _events(app) if "refused" in e.get("outcomeDesc", "")]


def test_refused_sign_ins_record_the_presented_client_id_not_the_secret(app: Flask) -> None:
    c = app.test_client()
    basic = base64.b64encode(b"ha:wrong-secret-1").decode()
    c.post("/auth/token", data={"grant_type": "client_credentials"},
           headers={"Authorization": f"Basic {basic}"})  # fmt: skip
    c.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "no-such-client",
            "client_secret": "wrong-secret-2",
        },
    )
    c.post(
        "/app/login",
        data={"client_id": "staff", "client_secret": "wrong-secret-3", "next": "/app/"},
        headers={"Origin": "http://localhost"},
    )
    # control characters inside Basic credentials (a form field with one is a 400 before
    # this): the presented id is kept printable, and the audit write still works on PostgreSQL
    odd = base64.b64encode(b"odd\x07id\x00:x").decode()
    c.post("/auth/token", data={"grant_type": "client_credentials"},
           headers={"Authorization": f"Basic {odd}"})  # fmt: skip
    refusals = _refusals(app)
    who = sorted(e["agent"][0]["who"]["identifier"]["value"] for e in refusals)
    assert who == ["ha", "no-such-client", "oddid", "staff"]
    for event in refusals:
        assert event["outcome"] == "4"
        assert event["agent"][0]["who"]["display"] == "presented client id (not authenticated)"
    assert "wrong-secret" not in json.dumps(refusals)
    # a successful sign-in is still recorded as the authenticated client
    assert (
        c.post(
            "/auth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "ha",
                "client_secret": "ha-secret",
            },
        ).status_code
        == 200
    )
    issued = [e for e in _events(app) if e.get("outcomeDesc") == "token issued"]
    assert issued[-1]["agent"][0]["who"]["display"] == "ha (health-authority)"


def _post(c: FlaskClient, path: str, body: Any) -> str:
    r = c.post(path, data=json.dumps(body), content_type=FHIR)
    assert r.status_code == 201, r.data
    rid: str = r.get_json()["id"]
    return rid


def test_an_export_download_lists_whose_data_left(app: Flask) -> None:
    staff = client_as(app, "staff")
    patients = [_post(staff, "/fhir/Patient", {"resourceType": "Patient"}) for _ in range(3)]
    for pid in patients[:2]:
        _post(
            staff,
            "/fhir/Observation",
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "weight"},
                "subject": {"reference": f"Patient/{pid}"},
            },
        )
    _post(staff, "/fhir/Organization", {"resourceType": "Organization", "name": "Clinic"})
    kick = staff.get("/fhir/$export?_type=Observation,Organization",
                     headers={"Prefer": "respond-async"})  # fmt: skip
    assert kick.status_code == 202
    manifest = wait_for(staff, kick.headers["Content-Location"])
    urls = {o["type"]: o["url"] for o in manifest["output"]}
    observations = read_file(staff, urls["Observation"])
    read_file(staff, urls["Organization"])
    downloads = {
        e["outcomeDesc"]: e for e in _events(app) if "$export file" in e.get("outcomeDesc", "")
    }
    listed = {
        ent["what"]["reference"]
        for ent in downloads["$export file Observation.ndjson"].get("entity", [])
        if ent["role"]["code"] == "1"
    }
    in_file = {o["subject"]["reference"] for o in observations}
    assert listed == in_file == {f"Patient/{p}" for p in patients[:2]}
    organization_entities = downloads["$export file Organization.ndjson"].get("entity", [])
    assert not [e for e in organization_entities if e["role"]["code"] == "1"]
    # the list beside each file is the audit's, never a download
    job_files = urls["Observation"].rsplit("/", 1)[0].split("localhost", 1)[1]
    assert staff.get(f"{job_files}/Observation.patients.json").status_code == 404
