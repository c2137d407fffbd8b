"""Golden feedback documents (issue 17): a completed participant (improved; a PCL-5 rise that
must never read "improved"; a safety Flag resolved during the program; a mid-program response and
a late follow-up that are neither baseline nor post), a withdrawn one (the document is drafted at
withdrawal too) and one who never screened positive (changes and their direction, no verdict).

``tests/golden/feedback/scenarios.input.json`` describes each participant; the expected file
holds each draft Composition (its ``date`` aside) and must match on SQLite and PostgreSQL.
``pytest tests/test_feedback_documents.py --update-golden`` rewrites it; review the diff like
code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.mapping.narrative import narrative
from tests.conftest import CLINIC_ORG, client_as
from tests.support.conformance import assert_conformant
from tests.support.responses import response
from tests.test_feedback import attest, example, post
from tests.test_messaging import phn_for

GOLDEN = Path(__file__).parent / "golden" / "feedback"
CASES: dict[str, dict[str, Any]] = json.loads((GOLDEN / "scenarios.input.json").read_text())
EXPECTED = GOLDEN / "scenarios.expected.json"
FHIR = "application/fhir+json"
REFERRALS = "https://emr.example-clinic.ca/referrals"


def run(c: FlaskClient, name: str, case: dict[str, Any]) -> dict[str, Any]:
    phn = phn_for(name)
    number = f"R-{name}"
    referral = example("referrals") | {
        "referral_identifier": {"system": REFERRALS, "value": number},
        "source_id": f"INTAKE-{name}",
    }
    referral["patient"] = referral["patient"] | {"phn": phn}
    post(c, "referrals", referral)
    for step in ("nurse-intake", "psychiatrist-clearance", "contraindication-check"):
        screening = example("screenings") | {
            "referral_identifier": {"system": REFERRALS, "value": number},
            "patient_phn": phn,
            "step": step,
            "source_id": f"S-{name}-{step}",
        }
        post(c, "screenings", screening)
    treatment = example("consents") | {
        "source_id": f"TREAT-{name}",
        "patient_phn": phn,
        "kind": "treatment",
    }
    treatment.pop("permitted_party")
    treatment.pop("purposes")
    post(c, "consents", treatment)
    if case.get("consent"):
        system, value = CLINIC_ORG.split("|")
        consent = example("consents") | {
            "source_id": f"CONSENT-{name}",
            "patient_phn": phn,
            "kind": "share-referrer",
            "permitted_party": {
                "name": "Example Family Practice",
                "identifier": {"system": system, "value": value},
            },
            "purposes": ["TREAT"],
        }
        post(c, "consents", consent)
    pid = _task(c, number)["for"]["reference"].split("/", 1)[1]
    for i, (instrument, authored, score) in enumerate(case["responses"]):
        values = score if isinstance(score, list) else None
        total = score if isinstance(score, int) else None
        qr = response(instrument, pid, authored, total=total, values=values, rid=f"qr-{name}-{i}")
        r = c.put(f"/fhir/QuestionnaireResponse/{qr['id']}", data=json.dumps(qr), content_type=FHIR)
        assert r.status_code == 201, r.get_json()
        if i == 0:  # the first KaT session, after the baseline
            session = example("medication-administrations") | {
                "source_id": f"SES-{name}",
                "patient_phn": phn,
            }
            post(c, "medication-administrations", session)
        if i == 1 and case.get("resolve_flags"):
            _resolve_flags(c, pid, case["resolve_flags"])
        if authored[:10] > case["end"] and not _ended(c, number):
            _end(c, number, case)
    if not _ended(c, number):
        _end(c, number, case)
    bundle = c.get(f"/fhir/Composition?subject=Patient/{pid}").get_json()
    assert bundle["total"] == 1, bundle
    found: dict[str, Any] = bundle["entry"][0]["resource"]
    return found


def _task(c: FlaskClient, number: str) -> dict[str, Any]:
    found: dict[str, Any] = c.get(f"/fhir/Task?identifier={REFERRALS}|{number}").get_json()[
        "entry"
    ][0]["resource"]
    return found


def _ended(c: FlaskClient, number: str) -> bool:
    return _task(c, number)["status"] in ("completed", "cancelled", "failed")


def _end(c: FlaskClient, number: str, case: dict[str, Any]) -> None:
    body = {"outcome": case["outcome"], "date": case["end"]}
    if case.get("reason"):
        body["reason"] = case["reason"]
    r = c.post(
        f"/api/v1/referrals/{_task(c, number)['id']}/$end",
        data=json.dumps(body),
        content_type="application/json",
    )
    assert r.status_code == 200, r.get_json()


def _resolve_flags(c: FlaskClient, pid: str, when: str) -> None:
    """Staff resolve the participant's safety Flags on ``when`` (status inactive, period.end,
    who and when in the flag-resolution extension — by a FHIR PUT, so the date is the
    scenario's rather than today's as ``$resolve`` would record)."""
    for entry in c.get(f"/fhir/Flag?patient=Patient/{pid}").get_json().get("entry", []):
        flag = entry["resource"]
        flag.pop("meta")
        flag["status"] = "inactive"
        flag["period"] = dict(flag["period"], end=when)
        flag["extension"] = [
            *flag.get("extension", []),
            {
                "url": "https://fhir-kat.example.org/fhir/StructureDefinition/flag-resolution",
                "extension": [
                    {"url": "by", "valueReference": {"display": "Program psychiatrist"}},
                    {"url": "at", "valueDateTime": when},
                ],
            },
        ]
        r = c.put(f"/fhir/Flag/{flag['id']}", data=json.dumps(flag), content_type=FHIR)
        assert r.status_code == 200, r.get_json()


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _stable(composition: dict[str, Any]) -> dict[str, Any]:
    """The document without ``meta`` and ``date`` (also shown in its generated narrative, which
    must be the narrative of its elements), its server-assigned ids (derived from the
    installation's secret) renamed ``id-1``, ``id-2``… in order of first appearance."""
    elements = {k: v for k, v in composition.items() if k != "text"}
    assert composition.get("text") == narrative(elements)
    text = json.dumps({k: v for k, v in composition.items() if k not in ("meta", "date", "text")})
    names: dict[str, str] = {}
    for found in UUID.findall(text):
        names.setdefault(found, f"id-{len(names) + 1}")
    stable: dict[str, Any] = json.loads(UUID.sub(lambda m: names[m.group(0)], text))
    return stable


def test_golden_feedback_documents(app: Flask, request: pytest.FixtureRequest) -> None:
    staff = client_as(app, "staff")
    drafts = {name: run(staff, name, case) for name, case in CASES.items()}
    for composition in drafts.values():
        assert composition["status"] == "preliminary"
        assert_conformant(composition)
    got = {name: _stable(composition) for name, composition in drafts.items()}
    if request.config.getoption("--update-golden"):
        EXPECTED.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n")
    assert got == json.loads(EXPECTED.read_text())


def test_the_golden_documents_say_what_the_issue_asks() -> None:
    docs = json.loads(EXPECTED.read_text())

    def text(name: str, title: str) -> str:
        section = next(s for s in docs[name]["section"] if s["title"] == title)
        div: str = section["text"]["div"]
        return div

    completed = text("completed", "Baseline and post scores")
    assert "PHQ-9: baseline 15" in completed and "post 3" in completed
    assert "improved by the program's definition" in completed
    # 12 → 30 on the PCL-5: a rise at the safety threshold is never "improved".
    pcl = next(line for line in completed.split("<li>") if line.startswith("PCL-5"))
    assert "improved" not in pcl and "safety threshold" in pcl
    # The mid-program 7 and the follow-up 21 are neither baseline nor post.
    assert "baseline 7" not in completed and "post 21" not in completed
    assert "2026-01-20: Several days" in completed  # item 9 at baseline
    safety = text("completed", "Safety events")
    assert "resolved 2026-03-01" in safety  # item-9 Flag, resolved during the program
    assert "still active" in safety  # the PCL-5 rise Flag
    withdrawn = text("withdrawn", "Baseline and post scores")
    # Withdrew on 02-24: the mid-program 6 is no post score; the 03-01 answer is.
    assert "baseline 18" in withdrawn and "post 9" in withdrawn
    assert "Withdrawn" in text("withdrawn", "Attendance")
    never = text("never-positive", "Baseline and post scores")
    assert "improved" not in never and "below the screening cut-off" in never
    assert "change -3, lower (better)" in never and "change +6, higher (worse)" in never


def test_a_draft_becomes_final_and_reaches_the_referrer_once_attested(app: Flask) -> None:
    staff = client_as(app, "staff")
    draft = run(staff, "completed", CASES["completed"])
    task = staff.get(f"/fhir/Task?identifier={REFERRALS}|R-completed").get_json()["entry"][0][
        "resource"
    ]
    assert "output" not in task
    # A draft is not the referrer's to see: as good as absent.
    assert (
        client_as(app, "referrer").get(f"/fhir/Composition/{draft['id']}/$document").status_code
        == 404
    )
    assert attest(staff, "Continue the alumni group; review PCL-5 at 3 months.").status_code == 200
    task = staff.get(f"/fhir/Task?identifier={REFERRALS}|R-completed").get_json()["entry"][0][
        "resource"
    ]
    assert task["output"][0]["valueReference"]["reference"] == f"Composition/{draft['id']}"
    document = client_as(app, "referrer").get(f"/fhir/Composition/{draft['id']}/$document")
    assert document.status_code == 200
    final = document.get_json()["entry"][0]["resource"]
    assert final["status"] == "final" and final["attester"][0]["mode"] == "professional"
    assert_conformant(document.get_json())
    # New data after attestation does not change the final document.
    pid = draft["subject"]["reference"].split("/")[1]
    later = response("phq9", pid, "2026-11-01T10:00:00Z", total=20, rid="qr-after")
    staff.put("/fhir/QuestionnaireResponse/qr-after", data=json.dumps(later), content_type=FHIR)
    again = staff.get(f"/fhir/Composition/{draft['id']}").get_json()
    attested = draft_after_attest(staff, draft["id"])
    assert again["status"] == "final" and again["meta"] == attested["meta"]


def draft_after_attest(c: FlaskClient, cid: str) -> dict[str, Any]:
    found: dict[str, Any] = c.get(f"/fhir/Composition/{cid}/_history").get_json()["entry"][0][
        "resource"
    ]
    return found
