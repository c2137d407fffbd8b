"""Referral Tasks move only along the program's state machine, through any write path."""

from __future__ import annotations

import json
from typing import Any

from flask.testing import FlaskClient

FHIR = "application/fhir+json"


def task(status: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "code": {
            "coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]
        },
        **extra,
    }


def put(c: FlaskClient, body: dict[str, Any], **headers: str) -> Any:
    return c.put(
        f"/fhir/Task/{body['id']}", data=json.dumps(body), content_type=FHIR, headers=headers
    )


OVERRIDE = {
    "businessStatus": {
        "coding": [
            {
                "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-referral-status",
                "code": "intake-override",
            }
        ]
    },
    "statusReason": {"text": "Accepted by the program lead: intake records on paper"},
}


def test_valid_and_invalid_transitions(client: FlaskClient) -> None:
    assert put(client, task("requested", id="ref-1")).status_code == 201
    assert put(client, task("accepted", id="ref-1", **OVERRIDE)).status_code == 200
    r = put(client, task("completed", id="ref-1"))
    assert r.status_code == 409
    body = r.get_json()
    assert body["issue"][0]["expression"] == ["Task.status"]
    assert "in-progress" in body["issue"][0]["diagnostics"]
    assert put(client, task("in-progress", id="ref-1")).status_code == 200
    assert put(client, task("completed", id="ref-1")).status_code == 200
    assert put(client, task("in-progress", id="ref-1")).status_code == 409  # final
    history = client.get("/fhir/Task/ref-1/_history").get_json()
    assert [e["resource"]["status"] for e in history["entry"]] == [
        "completed",
        "in-progress",
        "accepted",
        "requested",
    ]


def test_accepted_for_dosing_only_after_the_intake_or_by_an_explicit_override(
    client: FlaskClient,
) -> None:
    """Principle 4 (issue 16): no intake on record → 422 naming the missing steps; an override
    needs its reason; a new Task cannot skip the gate by starting as accepted or in progress."""
    put(client, task("requested", id="ref-4"))
    r = put(client, task("accepted", id="ref-4"))
    assert r.status_code == 422
    text = r.get_json()["issue"][0]["diagnostics"]
    assert "nurse-intake" in text and "intake-override" in text
    no_reason = dict(task("accepted", id="ref-4", **OVERRIDE))
    no_reason.pop("statusReason")
    assert put(client, no_reason).status_code == 422
    assert put(client, task("in-progress", id="ref-5")).status_code == 422
    assert put(client, task("accepted", id="ref-4", **OVERRIDE)).status_code == 200


def test_rejection_needs_a_reason(client: FlaskClient) -> None:
    put(client, task("requested", id="ref-2"))
    r = put(client, task("rejected", id="ref-2"))
    assert r.status_code == 422 and r.get_json()["issue"][0]["expression"] == ["Task.statusReason"]
    ok = put(client, task("rejected", id="ref-2", statusReason={"text": "exclusion: pregnancy"}))
    assert ok.status_code == 200


def test_the_rule_guards_transactions_too(client: FlaskClient) -> None:
    put(client, task("requested", id="ref-3"))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": task("completed", id="ref-3"),
                "request": {"method": "PUT", "url": "Task/ref-3"},
            }
        ],
    }
    r = client.post("/fhir", data=json.dumps(bundle), content_type=FHIR)
    assert r.status_code == 409
    assert client.get("/fhir/Task/ref-3").get_json()["status"] == "requested"


def test_other_tasks_are_not_constrained(client: FlaskClient) -> None:
    plain = {"resourceType": "Task", "id": "t-9", "status": "requested", "intent": "order"}
    assert put(client, plain).status_code == 201
    assert put(client, dict(plain, status="completed")).status_code == 200
