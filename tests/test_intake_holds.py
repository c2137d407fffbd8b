"""Issue 16, principle 4: intake holds are cleared by the step that owns them, and a referral is
accepted for dosing only after the three-step intake (or an explicit staff override) — through
the native screening artifact and through FHIR."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
TASK_Q = "/fhir/Task?identifier=https://emr.example-clinic.ca/referrals|R-7781"
STEPS = ("nurse-intake", "psychiatrist-clearance", "contraindication-check")


def example(kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / f"{kind}.json").read_text())
    return loaded


def send(c: FlaskClient, kind: str, body: dict[str, Any]) -> Any:
    return c.post(f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json")


def task(c: FlaskClient) -> dict[str, Any]:
    found: dict[str, Any] = c.get(TASK_Q).get_json()["entry"][0]["resource"]
    return found


def state(c: FlaskClient) -> tuple[str, str, str]:
    t = task(c)
    return (
        t["status"],
        t["businessStatus"]["coding"][0]["code"],
        t.get("statusReason", {}).get("text", ""),
    )


def step(c: FlaskClient, name: str, decision: str = "cleared", n: int = 0) -> None:
    body = copy.deepcopy(example("screenings")) | {
        "step": name,
        "decision": decision,
        "source_id": f"S-{name}-{decision}-{n}",
        "date": f"2026-01-2{n}T1{STEPS.index(name)}:00:00-08:00",
    }
    r = send(c, "screenings", body)
    assert r.status_code == 201, r.get_json()


def refer(c: FlaskClient, **change: Any) -> None:
    referral = example("referrals") | change
    r = send(c, "referrals", referral)
    assert r.status_code == 201, r.get_json()


def test_a_medical_hold_waits_for_the_physician_whoever_clears_first(client: FlaskClient) -> None:
    refer(client, contraindications=[{"code": "hypertension"}])  # control not stated
    assert state(client)[0] == "on-hold"
    step(client, "nurse-intake")
    status, business, reason = state(client)
    assert (status, business) == ("on-hold", "needs-review")  # a nurse does not lift it
    assert "hypertension" in reason and "contraindication-check" in reason
    step(client, "psychiatrist-clearance")
    assert state(client)[0] == "on-hold"  # nor does the psychiatrist
    step(client, "contraindication-check")
    assert state(client)[:2] == ("accepted", "intake-complete")


def test_a_psychiatric_hold_waits_for_the_psychiatrist(client: FlaskClient) -> None:
    refer(client, flags=[{"code": "extreme-emotional-lability", "value": True}])
    step(client, "contraindication-check")
    assert state(client)[0] == "on-hold"
    step(client, "psychiatrist-clearance")
    # The hold is lifted; the nurse's intake is still to come.
    assert state(client)[:2] == ("received", "psychiatrist-cleared")
    step(client, "nurse-intake")
    assert state(client)[:2] == ("accepted", "intake-complete")


def test_no_dosing_status_before_the_three_steps(client: FlaskClient) -> None:
    refer(client)
    assert state(client)[:2] == ("received", "eligible")
    step(client, "nurse-intake")
    step(client, "psychiatrist-clearance")
    assert state(client)[:2] == ("received", "psychiatrist-cleared")
    # The first session before the intake is complete does not move the referral on.
    ma = example("medication-administrations")
    assert send(client, "medication-administrations", ma).status_code == 201
    assert state(client)[0] == "received"
    # Staff cannot accept it by writing the Task either, without saying it is an override.
    t = task(client)
    t.pop("meta")
    r = client.put(
        f"/fhir/Task/{t['id']}",
        data=json.dumps(t | {"status": "accepted"}),
        content_type="application/fhir+json",
    )
    assert r.status_code == 422
    assert "contraindication-check" in r.get_json()["issue"][0]["diagnostics"]
    override = t | {
        "status": "accepted",
        "businessStatus": {
            "coding": [
                {
                    "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-referral-status",
                    "code": "intake-override",
                }
            ]
        },
        "statusReason": {"text": "Physician check done on paper on 2026-01-21"},
    }
    r = client.put(
        f"/fhir/Task/{t['id']}", data=json.dumps(override), content_type="application/fhir+json"
    )
    assert r.status_code == 200, r.get_json()
    assert state(client)[:2] == ("accepted", "intake-override")


def test_review_at_a_step_holds_until_that_step_clears_and_a_decline_rejects(
    client: FlaskClient,
) -> None:
    refer(client)
    step(client, "nurse-intake", "needs-review", n=1)
    status, _, reason = state(client)
    assert status == "on-hold" and "nurse-intake" in reason
    step(client, "nurse-intake", "cleared", n=2)  # the same step, later: its latest decision
    assert state(client)[:2] == ("received", "nurse-intake-cleared")
    step(client, "contraindication-check", "declined", n=3)
    status, business, reason = state(client)
    assert (status, business) == ("rejected", "intake-declined")
    assert "contraindication-check" in reason


def test_a_hold_from_a_timing_condition_is_cleared_by_its_owner(client: FlaskClient) -> None:
    refer(client, flags=[{"code": "recent-mood-medication-change", "value": True}])
    status, business, reason = state(client)
    assert (status, business) == ("on-hold", "needs-review")
    assert "psychiatrist-clearance" in reason
    for name in STEPS:
        step(client, name)
    assert state(client)[:2] == ("accepted", "intake-complete")
