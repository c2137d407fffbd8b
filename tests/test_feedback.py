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


def draft(c: FlaskClient) -> dict[str, Any]:
    """The feedback document of the (only) referral."""
    bundle = c.get("/fhir/Composition").get_json()
    assert bundle["total"] == 1, bundle
    found: dict[str, Any] = bundle["entry"][0]["resource"]
    return found


CLINICIAN = {
    "resourceType": "Practitioner",
    "id": "dr-program",
    "name": [{"family": "Doctorperson"}],
}


def attest(c: FlaskClient, plan: str = "Continue the alumni community of practice.") -> Any:
    """A program clinician writes the plan and attests the document: final."""
    c.put(
        "/fhir/Practitioner/dr-program",
        data=json.dumps(CLINICIAN),
        content_type="application/fhir+json",
    )
    doc = draft(c)
    doc.pop("meta", None)
    for section in doc["section"]:
        if section["code"]["coding"][0]["code"] == "18776-5":
            section.pop("emptyReason")
            section["text"] = {
                "status": "additional",
                "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{plan}</p></div>',
            }
    doc["status"] = "final"
    doc["attester"] = [
        {
            "mode": "professional",
            "time": "2026-05-01T10:00:00Z",
            "party": {"reference": "Practitioner/dr-program"},
        }
    ]
    return c.put(
        f"/fhir/Composition/{doc['id']}", data=json.dumps(doc), content_type="application/fhir+json"
    )


def test_completion_with_consent_writes_a_valid_feedback_document(app: Flask) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    share_with_referrer(staff)
    qr = example("questionnaire-responses") | {"authored": "2026-01-20T10:00:00-08:00"}
    post(staff, "questionnaire-responses", qr)
    r = end(staff, t["id"], {"outcome": "completed", "date": "2026-04-14"})
    assert r.status_code == 200, r.get_json()
    assert "output" not in task(staff)  # a draft is neither linked nor sent
    assert draft(staff)["status"] == "preliminary"
    later = qr | {"source_id": "QR-POST", "authored": "2026-04-20T10:00:00-07:00"}
    later["answers"] = [
        a | {"answer": "LA6568-5"} if a["item"] != "phq9-difficulty" else a for a in qr["answers"]
    ]
    post(staff, "questionnaire-responses", later)  # the draft follows the new score
    # Final only attested, with the plan written.
    unattested = draft(staff) | {"status": "final"}
    unattested.pop("meta")
    r = staff.put(
        f"/fhir/Composition/{unattested['id']}",
        data=json.dumps(unattested),
        content_type="application/fhir+json",
    )
    assert r.status_code == 422
    assert {tuple(i["expression"]) for i in r.get_json()["issue"]} == {
        ("Composition.attester",),
        ("Composition.section[5]",),
    }
    r = attest(staff)
    assert r.status_code == 200, r.get_json()
    done = task(staff)
    ref = done["output"][0]["valueReference"]["reference"]
    assert ref.startswith("Composition/")
    composition = staff.get(f"/fhir/{ref}").get_json()
    assert composition["status"] == "final"
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
    assert list(sections) == [
        "Reason for referral and diagnoses",
        "Attendance",
        "KaT sessions",
        "Baseline and post scores",
        "Safety events",
        "Recommendations and plan",
    ]
    codes = [s["code"]["coding"][0]["code"] for s in comp["section"]]
    assert codes == ["42349-1", "46240-8", "29549-3", "outcome-scores", "safety-events", "18776-5"]
    reason = sections["Reason for referral and diagnoses"]["text"]["div"]
    assert "Treatment-resistant PTSD after two SSRIs" in reason and "SNOMED CT 47505003" in reason
    assert "KaT sessions given: 1" in sections["Attendance"]["text"]["div"]
    assert "2026-02-10 to 2026-04-14" in sections["Attendance"]["text"]["div"]
    assert len(sections["KaT sessions"]["entry"]) == 1
    assert "84 mg (1.20 mg/kg at 70 kg)" in sections["KaT sessions"]["text"]["div"]
    scores = sections["Baseline and post scores"]["text"]["div"]
    assert "PHQ-9: baseline 13" in scores and "post 0" in scores and "improved" in scores
    assert "PHQ-9 item 9" in scores and "2026-01-20: Not at all" in scores
    assert len(sections["Baseline and post scores"]["entry"]) == 2
    assert "alumni community of practice" in sections["Recommendations and plan"]["text"]["div"]
    assert (
        comp["attester"][0]["party"]["reference"]
        == "urn:uuid:" + comp["attester"][0]["party"]["reference"].split(":")[-1]
    )
    assert "9999999998" not in json.dumps(comp)  # the summary text carries no identifiers
    # Ending again changes nothing; the document is written once.
    assert put_task(staff, done).status_code == 200
    assert staff.get("/fhir/Composition").get_json()["total"] == 1


def test_without_consent_the_referrer_sees_the_status_alone(app: Flask) -> None:
    staff = client_as(app, "staff")
    done = complete(staff, participating(staff))
    assert done["status"] == "completed" and "output" not in done
    assert attest(staff).status_code == 200  # the program's own record, final
    assert "output" not in task(staff)  # but neither linked nor sent
    seen = client_as(app, "referrer").get(TASK_Q).get_json()
    assert seen["entry"][0]["resource"]["status"] == "completed"


def test_a_consent_for_another_purpose_does_not_share(app: Flask) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    share_with_referrer(staff, purposes=["HRESCH"])
    complete(staff, t)
    assert attest(staff).status_code == 200
    assert "output" not in task(staff)


def test_who_reads_the_document(app: Flask) -> None:
    staff = client_as(app, "staff")
    t = participating(staff)
    share_with_referrer(staff)
    complete(staff, t)
    assert attest(staff).status_code == 200
    ref = task(staff)["output"][0]["valueReference"]["reference"]
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
    # Every end gets a draft document (withdrawal and discontinuation too); none is linked
    # before a clinician attests it.
    assert "output" not in task(staff)
    assert draft(staff)["status"] == "preliminary"


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
    assert attest(staff).status_code == 200
    assert task(staff)["output"][0]["valueReference"]["reference"].startswith("Composition/")
    assert end(staff, t["id"], {"outcome": "failed", "reason": "x"}).status_code == 409
