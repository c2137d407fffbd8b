"""Referral triage and the intake path, through the native API and FHIR REST: eligible,
excluded, inclusion missing, relative exclusion, missing data; intake steps; first session."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
TASK_Q = "/fhir/Task?identifier=https://emr.example-clinic.ca/referrals|R-7781"


def example(kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / f"{kind}.json").read_text())
    return loaded


def send(c: FlaskClient, kind: str, body: dict[str, Any]) -> Any:
    return c.post(f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json")


def task(c: FlaskClient) -> dict[str, Any]:
    found: dict[str, Any] = c.get(TASK_Q).get_json()["entry"][0]["resource"]
    return found


@pytest.mark.parametrize(
    ("change", "status", "business", "reason"),
    [
        ({}, "received", "eligible", None),
        ({"contraindications": [{"code": "pregnancy"}]}, "rejected", "ineligible", "pregnancy"),
        ({"ketamine_hypersensitivity": True}, "rejected", "ineligible", "hypersensitivity"),
        (
            {"prior_treatment_failure": False},
            "rejected",
            "ineligible",
            "previous treatment failure",
        ),
        (
            {"prior_treatment_failure": None},
            "on-hold",
            "needs-review",
            "previous treatment failure",
        ),
        (
            {"flags": [{"code": "extreme-emotional-lability", "value": True}]},
            "on-hold",
            "needs-review",
            "emotional lability",
        ),
        ({"diagnoses": []}, "on-hold", "needs-review", "diagnosis"),
        (
            {"contraindications": [{"code": "hypertension"}]},
            "on-hold",
            "needs-review",
            "hypertension",
        ),
    ],
)
def test_triage_from_the_native_route(
    client: FlaskClient, change: dict[str, Any], status: str, business: str, reason: str | None
) -> None:
    referral = example("referrals")
    referral.update(change)
    referral = {k: v for k, v in referral.items() if v is not None}
    assert send(client, "referrals", referral).status_code == 201
    t = task(client)
    assert t["status"] == status
    assert t["businessStatus"]["coding"][0]["code"] == business
    if reason:
        assert reason in t["statusReason"]["text"]
    else:
        assert "statusReason" not in t
    # a re-send never resets the workflow
    send(client, "referrals", referral)
    assert task(client)["status"] == status
    assert client.get("/fhir/Task").get_json()["total"] == 1


def test_fhir_rest_referral_gets_a_task_and_triage(client: FlaskClient) -> None:
    bundle = client.post(
        "/api/v1/referrals/$transform",
        data=json.dumps(example("referrals")),
        content_type="application/json",
    ).get_json()
    bundle["entry"] = [
        e for e in bundle["entry"] if e["resource"]["resourceType"] not in ("Task", "Provenance")
    ]
    r = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json")
    assert r.status_code == 200, r.get_json()
    tasks = client.get(
        "/fhir/Task?code=http://hl7.org/fhir/CodeSystem/task-code|fulfill"
    ).get_json()
    assert tasks["total"] == 1  # the service created the Task the referrer did not send
    t = tasks["entry"][0]["resource"]
    assert t["status"] == "received" and t["focus"]["reference"].startswith("ServiceRequest/")


def test_intake_steps_and_first_session_move_the_task(client: FlaskClient) -> None:
    send(client, "referrals", example("referrals"))
    screening = example("screenings")
    assert send(client, "screenings", screening).status_code == 201
    t = task(client)
    assert (t["status"], t["businessStatus"]["coding"][0]["code"]) == (
        "received",
        "nurse-intake-cleared",
    )
    for step in ("psychiatrist-clearance", "contraindication-check"):
        s = copy.deepcopy(screening) | {"step": step, "source_id": f"S-{step}"}
        assert send(client, "screenings", s).status_code == 201
    t = task(client)
    assert t["status"] == "accepted"  # accepted for dosing only now, the intake complete
    assert t["businessStatus"]["coding"][0]["code"] == "intake-complete"
    assert (
        send(
            client, "medication-administrations", example("medication-administrations")
        ).status_code
        == 201
    )
    t = task(client)
    assert t["status"] == "in-progress"
    assert t["businessStatus"]["coding"][0]["code"] == "participating"


def test_a_declining_step_rejects_with_the_reason(client: FlaskClient) -> None:
    send(client, "referrals", example("referrals"))
    declined = example("screenings") | {"step": "psychiatrist-clearance", "decision": "declined"}
    assert send(client, "screenings", declined).status_code == 201
    t = task(client)
    assert t["status"] == "rejected" and "psychiatrist-clearance" in t["statusReason"]["text"]
    assert t["businessStatus"]["coding"][0]["code"] == "intake-declined"
