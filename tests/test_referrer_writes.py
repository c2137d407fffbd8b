"""A referrer changes only what is its organisation's (``Access.may_change``), on every write
path: PUT, DELETE, transaction and batch entries, $process-message and the native route.
Creating stays open; an identical re-send stays a harmless no-op; staff are not affected."""

from __future__ import annotations

import copy
import json
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import client_as
from tests.test_messaging import as_message, process, referral, transform

FHIR = "application/fhir+json"
TAG = {"system": "https://fhir-kat.example.org/fhir/CodeSystem/test", "code": "tampered"}
#: What the referral Bundle writes and what its sender may therefore change later.
KINDS = ("Patient", "Condition", "Organization", "PractitionerRole", "Practitioner", "Endpoint")


def send(c: FlaskClient, bundle: dict[str, Any]) -> Any:
    return c.post("/fhir", data=json.dumps(bundle), content_type=FHIR)


def put(c: FlaskClient, body: dict[str, Any]) -> Any:
    path = f"/fhir/{body['resourceType']}/{body['id']}"
    return c.put(path, data=json.dumps(body), content_type=FHIR)


def stored(staff: FlaskClient, rtype: str, rid: str) -> dict[str, Any]:
    r = staff.get(f"/fhir/{rtype}/{rid}")
    assert r.status_code == 200
    found: dict[str, Any] = r.get_json()
    return found


def tampered(resource: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(resource)
    body["meta"] = {"tag": [TAG]}
    return body


def refused(r: Any, *secrets: str) -> None:
    """403, an OperationOutcome, and nothing from the resource in the answer."""
    assert r.status_code == 403, r.get_json()
    outcome = r.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    text = json.dumps(outcome)
    for secret in secrets:
        assert secret not in text


def _actor(organisation: str) -> dict[str, Any]:
    """A Consent provision actor: the Organization with this identifier value."""
    return {
        "role": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass", "code": "PROV"}
            ]
        },
        "reference": {
            "identifier": {
                "system": "https://fhir-kat.example.org/fhir/sid/organization",
                "value": organisation,
            }
        },
    }


def referred(app: Flask) -> dict[str, dict[str, Any]]:
    """CLINIC-7 (``referrer``) refers the example patient through FHIR REST, plus a Consent;
    returns one stored resource of each kind, as staff read them."""
    staff = client_as(app, "staff")
    referrer = client_as(app, "referrer")
    bundle = transform(staff, referral())
    assert send(referrer, bundle).status_code == 200
    by_type: dict[str, dict[str, Any]] = {}
    for entry in bundle["entry"]:
        res = entry["resource"]
        if res["resourceType"] in KINDS and not (
            res["resourceType"] == "Organization" and res["identifier"][0]["value"] != "CLINIC-7"
        ):
            by_type.setdefault(res["resourceType"], stored(staff, res["resourceType"], res["id"]))
    consent = {
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
        "patient": {"reference": f"Patient/{by_type['Patient']['id']}"},
        "dateTime": "2026-01-01",
        # A referrer's Consent concerns only itself (docs/security.md): here, no feedback.
        "provision": {"type": "deny", "actor": [_actor("CLINIC-7")]},
    }
    r = referrer.post("/fhir/Consent", data=json.dumps(consent), content_type=FHIR)
    assert r.status_code == 201, r.get_json()  # creating stays open to a referrer
    by_type["Consent"] = stored(staff, "Consent", r.get_json()["id"])
    return by_type


def test_another_referrer_cannot_change_what_it_did_not_send(app: Flask) -> None:
    staff, other = client_as(app, "staff"), client_as(app, "other-referrer")
    mine = referred(app)
    assert sorted(mine) == sorted((*KINDS, "Consent"))
    family = mine["Patient"]["name"][0]["family"]
    for rtype, current in mine.items():
        refused(put(other, tampered(current)), current["id"], family)
        assert stored(staff, rtype, current["id"]) == current, rtype  # unchanged
        # Sending exactly what is stored changes nothing, so it is answered, not written.
        assert put(other, current).status_code == 200, rtype
        assert stored(staff, rtype, current["id"]) == current, rtype

    # Inside a transaction: 403 for the whole Bundle, not even the new Patient is kept.
    patients = staff.get("/fhir/Patient").get_json()["total"]
    newcomer = {"resourceType": "Patient", "gender": "unknown"}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:7e4b3c1e-0d7a-4d55-9a4e-2b8c0c6f0a11",
                "resource": newcomer,
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": tampered(mine["Condition"]),
                "request": {"method": "PUT", "url": f"Condition/{mine['Condition']['id']}"},
            },
        ],
    }
    refused(send(other, bundle), mine["Condition"]["id"], family)
    assert staff.get("/fhir/Patient").get_json()["total"] == patients
    assert stored(staff, "Condition", mine["Condition"]["id"]) == mine["Condition"]

    # In a batch each entry stands alone: the foreign PUT is refused, the create is kept.
    bundle["type"] = "batch"
    bundle["entry"][0] = {
        "resource": {"resourceType": "Organization", "name": "Another practice"},
        "request": {"method": "POST", "url": "Organization"},
    }
    r = send(other, bundle)
    assert r.status_code == 200
    assert [e["response"]["status"][:3] for e in r.get_json()["entry"]] == ["201", "403"]
    assert stored(staff, "Condition", mine["Condition"]["id"]) == mine["Condition"]

    # The same change by the sender itself, or by program staff, goes through.
    referrer = client_as(app, "referrer")
    for rtype, current in mine.items():
        r = put(referrer, tampered(current))
        assert r.status_code == 200, (rtype, r.get_json())
        assert r.get_json()["meta"]["tag"] == [TAG]
    r = put(staff, dict(tampered(mine["Condition"]), meta={"tag": [TAG, TAG | {"code": "x"}]}))
    assert r.status_code == 200


def test_a_resent_referral_still_works_and_a_second_sender_freezes_shared_data(
    app: Flask,
) -> None:
    staff = client_as(app, "staff")
    referrer, other = client_as(app, "referrer"), client_as(app, "other-referrer")
    bundle = transform(staff, referral())
    assert send(referrer, bundle).status_code == 200
    r = send(referrer, bundle)  # the same referral again: idempotent
    assert r.status_code == 200, r.get_json()
    assert staff.get("/fhir/ServiceRequest").get_json()["total"] == 1
    assert staff.get("/fhir/Task").get_json()["total"] == 1
    # The sender updates its referral (a new phone number).
    changed = referral({"patient": referral()["patient"] | {"contact": {"phone": "250-555-0199"}}})
    r = send(referrer, transform(staff, changed))
    assert r.status_code == 200, r.get_json()
    patient = staff.get("/fhir/Patient").get_json()["entry"][0]["resource"]
    assert patient["telecom"][0]["value"] == "250-555-0199"

    # CLINIC-8 refers the same person under its own referral number, with the same data: fine.
    theirs = copy.deepcopy(changed)
    theirs["referral_identifier"] = {
        "system": "https://emr.clinic-8.example/referrals",
        "value": "9",
    }
    theirs["referrer"]["organization"]["identifier"]["value"] = "CLINIC-8"
    theirs["referrer"]["licence_number"] = "99002"
    theirs["referrer"]["fhir_endpoint"] = "https://emr.clinic-8.example/fhir"
    r = send(other, transform(staff, theirs))
    assert r.status_code == 200, r.get_json()
    assert staff.get("/fhir/ServiceRequest").get_json()["total"] == 2
    # From now on neither sender alone may change the person's data; program staff may.
    for c, payload in ((referrer, changed), (other, theirs)):
        moved = copy.deepcopy(payload)
        moved["patient"]["contact"] = {"phone": "250-555-0142"}
        refused(send(c, transform(staff, moved)), "250-555-0142", patient["id"])
    assert stored(staff, "Patient", patient["id"]) == patient
    assert put(staff, tampered(patient)).status_code == 200


def test_the_message_and_native_routes_apply_the_same_rule(app: Flask) -> None:
    staff, other = client_as(app, "staff"), client_as(app, "other-referrer")
    mine = referred(app)
    before = stored(staff, "Patient", mine["Patient"]["id"])
    moved = referral()
    moved["patient"] = moved["patient"] | {"contact": {"phone": "250-555-0177"}}
    r = other.post("/api/v1/referrals", data=json.dumps(moved), content_type="application/json")
    refused(r, "250-555-0177", before["id"])
    r = process(other, as_message(transform(staff, moved), event="notify-update-service-request"))
    refused(r, "250-555-0177", before["id"])
    assert stored(staff, "Patient", before["id"]) == before
    assert staff.get("/fhir/ServiceRequest").get_json()["total"] == 1


def test_a_referrer_cannot_grant_itself_consent_to_a_patient_it_did_not_refer(
    app: Flask,
) -> None:
    """A Consent opens a patient's data to outside parties: another referrer recording a permit
    for itself would read data it has no business with. Refused on every create path, and
    nothing stored; the referring organisation itself may still record one."""
    staff, other = client_as(app, "staff"), client_as(app, "other-referrer")
    mine = referred(app)
    grant = copy.deepcopy(mine["Consent"])
    for key in ("id", "meta"):
        grant.pop(key)
    grant["provision"] = {"type": "permit", "actor": [_actor("CLINIC-8")]}
    consents = staff.get("/fhir/Consent?_summary=count").get_json()["total"]
    family = mine["Patient"]["name"][0]["family"]

    refused(other.post("/fhir/Consent", data=json.dumps(grant), content_type=FHIR), family)
    refused(put(other, grant | {"id": "self-granted"}), family)  # update as create
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": grant, "request": {"method": "POST", "url": "Consent"}}],
    }
    refused(send(other, bundle), family)
    assert staff.get("/fhir/Consent?_summary=count").get_json()["total"] == consents

    # The referring organisation records a Consent about itself (the feedback it receives),
    # never one that opens the patient to another party.
    referrer = client_as(app, "referrer")
    for_other = grant | {"provision": {"type": "permit", "actor": [_actor("HA-ISLAND")]}}
    refused(referrer.post("/fhir/Consent", data=json.dumps(for_other), content_type=FHIR))
    no_actor = grant | {"provision": {"type": "deny"}}  # would cut off every other party
    refused(referrer.post("/fhir/Consent", data=json.dumps(no_actor), content_type=FHIR))
    grant["provision"] = {"type": "permit", "actor": [_actor("CLINIC-7")]}
    r = referrer.post("/fhir/Consent", data=json.dumps(grant), content_type=FHIR)
    assert r.status_code == 201, r.get_json()
    assert staff.post("/fhir/Consent", data=json.dumps(grant), content_type=FHIR).status_code == 201
