"""The referral form through the FHIR door (issue 21): a ``Questionnaire/kat-referral`` response
written to ``/fhir`` — POST, PUT, transaction and batch entries — is the referral the native
route stores, in the same transaction (the write pipeline's "referral form" check and step).

Parity: after the form, the native route's re-send of the same answers
(``tests/golden/referrals-sdc/<case>.native.json``) writes nothing — every resource it would
store is already stored as it would store it. Refusals are the native route's: 422 naming each
item, 403 for another organisation's referral, and nothing stored, the response included.
Runs on SQLite and PostgreSQL (the ``app`` fixture's databases)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import client_as

GOLDEN = Path(__file__).parent / "golden" / "referrals-sdc"
CASES = sorted(p.name.removesuffix(".input.json") for p in GOLDEN.glob("*.input.json"))
FHIR = "application/fhir+json"
REFERRAL_SYSTEM = "https://emr.example-clinic.ca/referrals"


def _load(name: str) -> dict[str, Any]:
    """A golden file; a response's ``valueUrl`` answers (what some renderers write, which the
    native route reads but R4's QuestionnaireResponse cannot hold) as ``valueUri``."""
    text = (GOLDEN / name).read_text()
    if name.endswith(".input.json"):
        text = text.replace('"valueUrl"', '"valueUri"')
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _post(c: FlaskClient, path: str, body: dict[str, Any]) -> Any:
    return c.post(path, data=json.dumps(body), content_type=FHIR)


def _put(c: FlaskClient, body: dict[str, Any]) -> Any:
    path = f"/fhir/{body['resourceType']}/{body['id']}"
    return c.put(path, data=json.dumps(body), content_type=FHIR)


def _referral_ids(staff: FlaskClient, native: dict[str, Any]) -> list[tuple[str, str]]:
    """Every resource the native route would store for these answers (its dry run)."""
    r = staff.post("/api/v1/referrals/$transform", json=native)
    assert r.status_code == 200, r.get_json()
    return [(e["resource"]["resourceType"], e["resource"]["id"]) for e in r.get_json()["entry"]]


def _versions(staff: FlaskClient, ids: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    out = {}
    for rtype, rid in ids:
        r = staff.get(f"/fhir/{rtype}/{rid}")
        assert r.status_code == 200, (rtype, r.get_json())
        out[(rtype, rid)] = r.get_json()["meta"]["versionId"]
    return out


def _total(c: FlaskClient, query: str) -> int:
    total: int = c.get(f"/fhir/{query}").get_json()["total"]
    return total


def _task_of(staff: FlaskClient, ids: list[tuple[str, str]]) -> dict[str, Any]:
    [task] = [rid for rtype, rid in ids if rtype == "Task"]
    found: dict[str, Any] = staff.get(f"/fhir/Task/{task}").get_json()
    return found


@pytest.mark.parametrize("case", CASES)
def test_posted_response_is_the_native_referral(app: Flask, case: str) -> None:
    staff, referrer = client_as(app, "staff"), client_as(app, "referrer")
    qr, native = _load(f"{case}.input.json"), _load(f"{case}.native.json")
    ids = _referral_ids(staff, native)

    r = _post(referrer, "/fhir/QuestionnaireResponse", qr)
    assert r.status_code == 201, r.get_json()
    answered = r.get_json()
    assert answered["resourceType"] == "QuestionnaireResponse"
    [patient] = [rid for rtype, rid in ids if rtype == "Patient"]
    assert answered["subject"] == {"reference": f"Patient/{patient}"}
    assert answered["item"] == qr["item"]

    before = _versions(staff, ids)  # every resource of the referral is stored
    assert _task_of(staff, ids)["status"] in ("received", "on-hold")  # triaged
    # The referral's Task is reachable from the response through its Provenance.
    found = staff.get(
        f"/fhir/Provenance?entity=QuestionnaireResponse/{answered['id']}&_include=Provenance:target"
    ).get_json()
    targets = {e["resource"]["resourceType"] for e in found["entry"]}
    assert {"Provenance", "Task", "ServiceRequest", "Patient"} <= targets

    # Parity: the same answers through the native route are the same referral, so they
    # write nothing at all (no resource gets a new version).
    again = staff.post("/api/v1/referrals", json=native)
    assert again.status_code == 200, again.get_json()
    assert _versions(staff, ids) == before


def test_resent_and_amended_responses_do_not_duplicate_the_referral(app: Flask) -> None:
    staff = client_as(app, "staff")
    qr, native = _load("complete.input.json"), _load("complete.native.json")
    ids = _referral_ids(staff, native)
    created = _put(staff, {**qr, "id": "form-1"})
    assert created.status_code == 201, created.get_json()
    before = _versions(staff, ids)
    qr_version = created.get_json()["meta"]["versionId"]

    # The identical PUT writes nothing (ADR 0020): not the response, not the referral.
    same = _put(staff, {**created.get_json()})
    assert same.status_code == 200
    assert same.get_json()["meta"]["versionId"] == qr_version
    assert _versions(staff, ids) == before

    # A second POST of the same answers is a second response, the same referral unchanged.
    assert _post(staff, "/fhir/QuestionnaireResponse", qr).status_code == 201
    assert _versions(staff, ids) == before
    assert _total(staff, f"ServiceRequest?identifier={REFERRAL_SYSTEM}|R-7781") == 1

    # An amended response with another answer updates the same referral (same ids).
    amended = copy.deepcopy(created.get_json())
    amended["status"] = "amended"
    notes = next(i for i in amended["item"][2]["item"] if i["linkId"] == "notes")
    notes["answer"] = [{"valueString": "Amended synthetic note"}]
    assert _put(staff, amended).status_code == 200
    after = _versions(staff, ids)
    assert set(after) == set(before)
    [sr] = [k for k in ids if k[0] == "ServiceRequest"]
    assert after[sr] != before[sr]
    assert _total(staff, "Task?code=fulfill") == 1


def test_an_unfinished_response_is_stored_and_not_a_referral(app: Flask) -> None:
    staff = client_as(app, "staff")
    qr = {**_load("complete.input.json"), "status": "in-progress"}
    r = _post(staff, "/fhir/QuestionnaireResponse", qr)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["subject"] == qr["subject"]  # as sent
    assert _total(staff, "ServiceRequest") == 0
    assert _total(staff, "Task") == 0


def test_bad_answers_are_422_per_item_and_nothing_is_stored(app: Flask) -> None:
    staff = client_as(app, "staff")
    qr = _load("complete.input.json")
    patient = qr["item"][0]["item"]
    patient[0]["answer"] = [{"valueInteger": 42}]  # a PHN is not a number
    patient[3]["answer"].append({"valueDate": "1984-03-03"})  # two birth dates
    for response in (
        _post(staff, "/fhir/QuestionnaireResponse", qr),
        _put(staff, {**qr, "id": "form-bad"}),
    ):
        assert response.status_code == 422, response.get_json()
        outcome = response.get_json()
        assert outcome["resourceType"] == "OperationOutcome"
        named = sorted(i["expression"][0] for i in outcome["issue"])
        assert named == ["patient.birth_date", "patient.phn"]
        assert "Testcase" not in json.dumps(outcome)  # no PHI echoed
    assert _total(staff, "QuestionnaireResponse") == 0
    assert _total(staff, "Patient") == 0
    assert _total(staff, "ServiceRequest") == 0


def _bundle(btype: str, qr: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": btype,
        "entry": [
            {
                "fullUrl": "urn:uuid:2f1a4a1e-5c3e-4d7e-9a53-0b2d6c1e8f10",
                "resource": qr,
                "request": {"method": "POST", "url": "QuestionnaireResponse"},
            }
        ],
    }


@pytest.mark.parametrize("btype", ["transaction", "batch"])
def test_a_response_inside_a_bundle_is_a_referral(app: Flask, btype: str) -> None:
    staff, referrer = client_as(app, "staff"), client_as(app, "referrer")
    qr, native = _load("complete.input.json"), _load("complete.native.json")
    ids = _referral_ids(staff, native)
    r = _post(referrer, "/fhir", _bundle(btype, qr))
    assert r.status_code == 200, r.get_json()
    [entry] = r.get_json()["entry"]
    assert entry["response"]["status"].startswith("201"), entry
    before = _versions(staff, ids)
    assert _task_of(staff, ids)["status"] in ("received", "on-hold")
    assert staff.post("/api/v1/referrals", json=native).status_code == 200
    assert _versions(staff, ids) == before

    # A bad response in a transaction fails the whole Bundle; in a batch, its entry only.
    bad = copy.deepcopy(qr)
    bad["identifier"]["value"] = "R-9000"
    bad["item"][0]["item"][0]["answer"] = [{"valueString": "123"}]  # not a PHN
    answer = _post(referrer, "/fhir", _bundle(btype, bad))
    if btype == "transaction":
        assert answer.status_code == 422, answer.get_json()
    else:
        [entry] = answer.get_json()["entry"]
        assert entry["response"]["status"].startswith("422"), entry
    assert _total(staff, "ServiceRequest") == 1


def test_who_may_send_it_and_who_sees_it(app: Flask) -> None:
    staff = client_as(app, "staff")
    referrer, other = client_as(app, "referrer"), client_as(app, "other-referrer")
    qr, native = _load("complete.input.json"), _load("complete.native.json")
    ids = _referral_ids(staff, native)

    # Another clinic cannot refer in CLINIC-7's name: 403, nothing stored.
    refused = _post(other, "/fhir/QuestionnaireResponse", qr)
    assert refused.status_code == 403, refused.get_json()
    assert _total(staff, "QuestionnaireResponse") == 0
    assert _total(staff, "ServiceRequest") == 0

    sent = _post(referrer, "/fhir/QuestionnaireResponse", qr)
    assert sent.status_code == 201, sent.get_json()
    qr_id = sent.get_json()["id"]
    task = _task_of(staff, ids)
    # The sender follows its referral; the other clinic sees none of it.
    assert referrer.get(f"/fhir/Task/{task['id']}").status_code == 200
    # (a referrer does not read responses back: its role creates them only)
    assert referrer.get(f"/fhir/QuestionnaireResponse/{qr_id}").status_code == 403
    assert other.get(f"/fhir/Task/{task['id']}").status_code == 404
    assert other.get(f"/fhir/QuestionnaireResponse/{qr_id}").status_code in (403, 404)
    assert _total(other, "Task") == 0

    # Nor can it change the referral by sending an amended response under its own name.
    mine = copy.deepcopy(qr)
    mine["status"] = "amended"
    org = mine["item"][1]["item"]
    value = next(i for i in org if i["linkId"] == "referrer.organization.identifier.value")
    value["answer"] = [{"valueString": "CLINIC-8"}]
    assert _post(other, "/fhir/QuestionnaireResponse", mine).status_code == 403
    assert _task_of(staff, ids)["meta"]["versionId"] == task["meta"]["versionId"]
