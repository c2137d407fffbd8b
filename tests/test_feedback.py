"""Program end and the feedback document: staff complete a referral through the API (only along
valid transitions); the document summarises the program, validates, and exists only with the
participant's consent to share with the referrer; ``$document`` serves it to whom may see it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.exchange import parse_partners
from fhir_kat.exchange.bundles import task_update_transaction
from fhir_kat.settings import SettingsError
from fhir_kat.validation.resource import validate_resource
from tests.conftest import CLINIC_ORG, client_as
from tests.support.conformance import assert_conformant

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
TASK_Q = "/fhir/Task?identifier=https://emr.example-clinic.ca/referrals|R-7781"
STATUS = "https://fhir-kat.example.org/fhir/CodeSystem/kat-referral-status"


def example(kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / f"{kind}.json").read_text())
    return loaded


def post(c: FlaskClient, kind: str, body: dict[str, Any]) -> None:
    r = c.post(f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 201, r.get_json()


def task(c: FlaskClient) -> dict[str, Any]:
    found: dict[str, Any] = c.get(TASK_Q).get_json()["entry"][0]["resource"]
    return found


def put_task(c: FlaskClient, body: dict[str, Any]) -> Any:
    body = {k: v for k, v in body.items() if k != "meta"}
    return c.put(
        f"/fhir/Task/{body['id']}", data=json.dumps(body), content_type="application/fhir+json"
    )


def share_with_referrer(c: FlaskClient, purposes: list[str] | None = None) -> None:
    system, value = CLINIC_ORG.split("|")
    post(
        c,
        "consents",
        example("consents")
        | {
            "source_id": "CONSENT-REFERRER",
            "kind": "share-referrer",
            "permitted_party": {
                "name": "Example Family Practice",
                "identifier": {"system": system, "value": value},
            },
            "purposes": purposes or ["TREAT"],
        },
    )


def participating(c: FlaskClient) -> dict[str, Any]:
    post(c, "referrals", example("referrals"))
    screening = example("screenings")
    post(c, "screenings", screening)
    for step in ("psychiatrist-clearance", "contraindication-check"):
        post(c, "screenings", copy.deepcopy(screening) | {"step": step, "source_id": step})
    post(c, "medication-administrations", example("medication-administrations"))
    t = task(c)
    assert t["status"] == "in-progress"
    return t


def complete(c: FlaskClient, t: dict[str, Any]) -> dict[str, Any]:
    done = t | {
        "status": "completed",
        "businessStatus": {"coding": [{"system": STATUS, "code": "program-completed"}]},
    }
    r = put_task(c, done)
    assert r.status_code == 200, r.get_json()
    return task(c)


def test_completion_with_consent_writes_a_valid_feedback_document(app: Flask) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    share_with_referrer(staff)
    qr = example("questionnaire-responses")
    post(staff, "questionnaire-responses", qr)
    later = qr | {"source_id": "QR-POST", "authored": "2026-04-20T10:00:00-07:00"}
    later["answers"] = [
        a | {"answer": "LA6568-5"} if a["item"] != "phq9-difficulty" else a for a in qr["answers"]
    ]
    post(staff, "questionnaire-responses", later)
    done = complete(staff, t)
    ref = done["output"][0]["valueReference"]["reference"]
    assert ref.startswith("Composition/")
    composition = staff.get(f"/fhir/{ref}").get_json()
    assert not validate_resource(composition, "Composition")  # the service's own validation
    assert_conformant(composition)
    r = staff.get(f"/fhir/{ref}/$document")
    assert r.status_code == 200
    document = r.get_json()
    assert_conformant(document)
    Bundle.model_validate(document)  # R4B structure
    assert document["type"] == "document" and document["identifier"]["value"]
    entries = [e["resource"] for e in document["entry"]]
    assert entries[0]["resourceType"] == "Composition"
    urls = {e["fullUrl"] for e in document["entry"]}
    # self-contained: every reference of the Composition resolves inside the document
    comp = entries[0]
    refs = [comp["subject"]["reference"]] + [
        e["reference"] for s in comp["section"] for e in s.get("entry", [])
    ]
    assert refs and all(r in urls for r in refs)
    sections = {s["title"]: s for s in comp["section"]}
    assert set(sections) == {
        "Attendance",
        "KaT sessions",
        "Baseline and post scores",
        "Safety events",
    }
    assert "KaT sessions given: 1" in sections["Attendance"]["text"]["div"]
    assert len(sections["KaT sessions"]["entry"]) == 1
    scores = sections["Baseline and post scores"]["text"]["div"]
    assert "PHQ-9" in scores and "baseline" in scores and "post 0" in scores
    assert len(sections["Baseline and post scores"]["entry"]) == 2
    assert "9999999998" not in json.dumps(comp)  # the summary text carries no identifiers
    # Completing again changes nothing; the document is written once.
    assert put_task(staff, done).status_code == 200
    assert staff.get("/fhir/Composition").get_json()["total"] == 1


def test_without_consent_the_referrer_sees_the_status_alone(app: Flask) -> None:
    staff = client_as(app, "staff")
    done = complete(staff, participating(staff))
    assert done["status"] == "completed" and "output" not in done
    assert staff.get("/fhir/Composition").get_json()["total"] == 0
    seen = client_as(app, "referrer").get(TASK_Q).get_json()
    assert seen["entry"][0]["resource"]["status"] == "completed"


def test_a_consent_for_another_purpose_does_not_share(app: Flask) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    share_with_referrer(staff, purposes=["HRESCH"])
    assert "output" not in complete(staff, t)


def test_who_reads_the_document(app: Flask) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    share_with_referrer(staff)
    ref = complete(staff, t)["output"][0]["valueReference"]["reference"]
    assert client_as(app, "referrer").get(f"/fhir/{ref}/$document").status_code == 200
    r = client_as(app, "other-referrer").get(f"/fhir/{ref}/$document")
    # Not its referral: for it the document does not exist (the answer for an unknown id).
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"
    assert staff.get("/fhir/Composition/nope/$document").status_code == 404
    # Revoking the consent ends the referrer's access to the document at once.
    consent = staff.get("/fhir/Consent?_count=10").get_json()["entry"]
    for entry in consent:
        body = entry["resource"] | {"status": "inactive"}
        body.pop("meta", None)
        assert (
            staff.put(
                f"/fhir/Consent/{body['id']}",
                data=json.dumps(body),
                content_type="application/fhir+json",
            ).status_code
            == 200
        )
    assert client_as(app, "referrer").get(f"/fhir/{ref}/$document").status_code == 404


@pytest.mark.parametrize(
    ("status", "reason"),
    [("completed", None), ("cancelled", "Participant withdrew"), ("failed", "Missed sessions")],
)
def test_program_end_only_along_valid_transitions(
    app: Flask, status: str, reason: str | None
) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    refused = [
        (t | {"status": status, "statusReason": None}, 422 if reason else 200),
        (t | {"status": "requested"}, 409),  # no way back
    ]
    for body, code in refused:
        if code == 200:
            continue
        r = put_task(staff, {k: v for k, v in body.items() if v is not None})
        assert r.status_code == code, r.get_json()
        assert r.get_json()["resourceType"] == "OperationOutcome"
        assert task(staff)["status"] == "in-progress"
    body = t | {"status": status}
    if reason:
        body["statusReason"] = {"text": reason}
    r = put_task(staff, body)
    assert r.status_code == 200, r.get_json()
    assert task(staff)["status"] == status
    if status != "completed":
        assert "output" not in task(staff)  # only a completed program gets a document


def test_a_referrer_cannot_complete_its_own_referral_into_a_document(app: Flask) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    r = put_task(client_as(app, "other-referrer"), t | {"status": "completed"})
    assert r.status_code == 403
    assert task(staff)["status"] == "in-progress"


def test_task_update_transaction_shape() -> None:
    stored = {
        ("Patient", "p1"): {
            "resourceType": "Patient",
            "id": "p1",
            "identifier": [{"system": "https://phn.example", "value": "1"}],
        },
        ("ServiceRequest", "s1"): {
            "resourceType": "ServiceRequest",
            "id": "s1",
            "identifier": [{"system": "https://emr.example/ref", "value": "R|1"}],
        },
        ("Organization", "o1"): {
            "resourceType": "Organization",
            "id": "o1",
            "identifier": [{"system": "https://org.example", "value": "PROGRAM"}],
        },
    }
    task = {
        "resourceType": "Task",
        "id": "t1",
        "meta": {"versionId": "3"},
        "identifier": [{"system": "https://emr.example/ref", "value": "R|1"}],
        "status": "completed",
        "intent": "order",
        "for": {"reference": "Patient/p1"},
        "focus": {"reference": "ServiceRequest/s1"},
        "owner": {"reference": "Organization/o1"},
        "requester": {"reference": "PractitionerRole/unknown"},
        "output": [{"type": {"text": "x"}, "valueReference": {"reference": "Composition/c"}}],
    }
    bundle = task_update_transaction(task, lambda t, i: stored.get((t, i)))
    (entry,) = bundle["entry"]
    assert entry["request"] == {
        "method": "PUT",
        "url": "Task?identifier=https://emr.example/ref|R%5C|1",  # R\|1, FHIR-escaped
    }
    sent = entry["resource"]
    assert "id" not in sent and "meta" not in sent and "output" not in sent
    assert sent["for"] == {"reference": "Patient?identifier=https://phn.example|1"}
    assert sent["owner"] == {"identifier": {"system": "https://org.example", "value": "PROGRAM"}}
    assert sent["requester"] == {"display": "PractitionerRole"}
    document = {
        "resourceType": "Bundle",
        "type": "document",
        "identifier": {"system": "https://docs.example", "value": "d1"},
        "timestamp": "2026-04-30T10:00:00Z",
    }
    with_doc = task_update_transaction(task, lambda t, i: stored.get((t, i)), document)
    first, last = with_doc["entry"]
    assert first["request"]["ifNoneExist"] == "identifier=https://docs.example|d1"
    assert last["resource"]["output"][0]["valueReference"]["reference"] == first["fullUrl"]
    assert_conformant(with_doc)


def test_a_referral_status_partner_must_name_the_referrer() -> None:
    with pytest.raises(SettingsError, match="organization"):
        parse_partners(
            {"emr": {"base_url": "https://emr.example/fhir", "artifact_kinds": ["referral-status"]}}
        )
    parsed = parse_partners(
        {
            "emr": {
                "base_url": "https://emr.example/fhir",
                "artifact_kinds": ["referral-status"],
                "organization": CLINIC_ORG,
            }
        }
    )
    assert parsed["emr"].wants("referral-status")


def end(c: FlaskClient, task_id: str, body: dict[str, Any]) -> Any:
    return c.post(
        f"/api/v1/referrals/{task_id}/$end", data=json.dumps(body), content_type="application/json"
    )


def test_the_native_program_end_endpoint(app: Flask) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    share_with_referrer(staff)
    for body, code in [
        ({"outcome": "finished"}, 400),
        ({"outcome": "cancelled"}, 422),  # a cancellation needs its reason
        ({"outcome": "completed", "colour": "blue"}, 400),
    ]:
        r = end(staff, t["id"], body)
        assert r.status_code == code, r.get_json()
        assert r.get_json()["resourceType"] == "OperationOutcome"
    assert end(staff, "no-such-task", {"outcome": "completed"}).status_code == 404
    assert end(client_as(app, "referrer"), t["id"], {"outcome": "completed"}).status_code == 403
    assert task(staff)["status"] == "in-progress"
    r = end(staff, t["id"], {"outcome": "completed", "reason": "Finished all 12 weeks"})
    assert r.status_code == 200, r.get_json()
    done = task(staff)
    assert done["status"] == "completed"
    assert done["businessStatus"]["coding"][0]["code"] == "program-completed"
    assert done["statusReason"]["text"] == "Finished all 12 weeks"
    assert done["output"][0]["valueReference"]["reference"].startswith("Composition/")
    assert end(staff, t["id"], {"outcome": "failed", "reason": "x"}).status_code == 409
