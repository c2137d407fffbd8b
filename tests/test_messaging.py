"""FHIR messaging ($process-message) for referrals, and the same triage outcome on all four
entry routes (FHIR REST transaction, FHIR message, native JSON, HL7 v2 REF^I12 over MLLP)."""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.api.mllp import ListenerConfig, MllpListener
from fhir_kat.artifacts import bc_phn_check_digit
from tests.conftest import client_as
from tests.support.conformance import assert_conformant
from tests.support.v2_messages import ack_code, referral_message, send

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
EVENTS = "https://fhir-kat.example.org/fhir/CodeSystem/kat-message-event"
EMR = "https://emr.example-clinic.ca/fhir"
REFERRAL_SYSTEM = "https://emr.example-clinic.ca/referrals"


def referral(
    change: dict[str, Any] | None = None, number: str = "R-7781", *, own_patient: bool = False
) -> dict[str, Any]:
    """The example referral under ``number``; ``own_patient``: for a patient of its own (triage
    reads every condition of the patient, so scenarios must not share one)."""
    loaded: dict[str, Any] = json.loads((EXAMPLES / "referrals.json").read_text())
    loaded.update(change or {})
    loaded["referral_identifier"] = {"system": REFERRAL_SYSTEM, "value": number}
    loaded["source_id"] = f"INTAKE-{number}"
    if own_patient:
        loaded["patient"] = dict(loaded["patient"], phn=phn_for(number))
    return {k: v for k, v in loaded.items() if v is not None}


def phn_for(label: str) -> str:
    """A valid synthetic BC PHN (9999… range, Mod 11 check digit) derived from ``label``."""
    seed = int(hashlib.sha256(label.encode()).hexdigest(), 16)
    while True:
        first_nine = "9999" + f"{seed % 100000:05d}"
        digit = bc_phn_check_digit(first_nine)
        if digit is not None:
            return first_nine + str(digit)
        seed += 1


def transform(c: FlaskClient, native: dict[str, Any]) -> dict[str, Any]:
    """The referrer's resources as a transaction Bundle (what an EMR would send), without
    the Task and Provenance the service adds itself."""
    r = c.post(
        "/api/v1/referrals/$transform", data=json.dumps(native), content_type="application/json"
    )
    assert r.status_code == 200, r.get_json()
    bundle: dict[str, Any] = r.get_json()
    bundle["entry"] = [
        e for e in bundle["entry"] if e["resource"]["resourceType"] not in ("Task", "Provenance")
    ]
    return bundle


def as_message(
    transaction: dict[str, Any], event: str = "add-service-request", bundle_id: str | None = None
) -> dict[str, Any]:
    """A CA:eReC-style message: MessageHeader first, focus on the ServiceRequest; the
    referrer's own ids (fullUrls are absolute URLs at the referrer)."""
    entries = []
    renames: dict[str, str] = {}
    for e in transaction["entry"]:
        res = copy.deepcopy(e["resource"])
        theirs = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{res['resourceType']}/{res['id']}"))
        renames[e["fullUrl"]] = f"{EMR}/{res['resourceType']}/{theirs}"
        renames[f"{res['resourceType']}/{res['id']}"] = f"{res['resourceType']}/{theirs}"
        res["id"] = theirs
        entries.append(res)
    text = json.dumps(entries)
    for old, new in sorted(renames.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f'"{old}"', f'"{new}"')
    resources = json.loads(text)
    sr = next(r for r in resources if r["resourceType"] == "ServiceRequest")
    header = {
        "resourceType": "MessageHeader",
        "id": str(uuid.uuid4()),
        "eventCoding": {"system": EVENTS, "code": event},
        "source": {"name": "Example EMR", "endpoint": EMR},
        "focus": [{"reference": f"{EMR}/ServiceRequest/{sr['id']}"}],
    }
    return {
        "resourceType": "Bundle",
        "id": bundle_id or str(uuid.uuid4()),
        "type": "message",
        "timestamp": "2026-01-12T09:30:00-08:00",
        "entry": [{"fullUrl": f"urn:uuid:{header['id']}", "resource": header}]
        + [{"fullUrl": f"{EMR}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources],
    }


def process(c: FlaskClient, message: dict[str, Any]) -> Any:
    return c.post(
        "/fhir/$process-message", data=json.dumps(message), content_type="application/fhir+json"
    )


def task_of(c: FlaskClient, number: str) -> dict[str, Any]:
    bundle = c.get(f"/fhir/Task?identifier={REFERRAL_SYSTEM}|{number}").get_json()
    assert bundle["total"] == 1, bundle
    found: dict[str, Any] = bundle["entry"][0]["resource"]
    return found


def outcome(task: dict[str, Any]) -> tuple[str, str, str | None]:
    return (
        task["status"],
        task["businessStatus"]["coding"][0]["code"],
        task.get("statusReason", {}).get("text"),
    )


def contraindication(code: str) -> dict[str, Any]:
    return {"contraindications": [{"code": code}]}


SCENARIOS: dict[str, tuple[dict[str, Any], str]] = {
    "eligible": ({}, "received"),  # triage found nothing: the intake can start
    # each exclusion criterion alone (mappings/workflow/eligibility.yaml)
    **{
        code: (contraindication(code), "rejected")
        for code in (
            "psychosis",
            "dementia",
            "delirium",
            "coronary-artery-disease",
            "intracerebral-haemorrhage",
            "hepatic-cirrhosis",
            "hepatorenal-disease",
            "pregnancy",
            "aneurysm",
        )
    },
    "hypersensitivity": ({"ketamine_hypersensitivity": True}, "rejected"),
    # timing conditions hold the referral, they never reject it
    "breastfeeding": (contraindication("breastfeeding"), "on-hold"),
    "recent-medication-change": (
        {"flags": [{"code": "recent-mood-medication-change", "value": True}]},
        "on-hold",
    ),
    # a coded hypertension without "uncontrolled": a clinician decides
    "hypertension": (contraindication("hypertension"), "on-hold"),
    "aneurysm-flag": ({"flags": [{"code": "aneurysm", "value": True}]}, "rejected"),
    "uncontrolled-hypertension": (
        {
            **contraindication("hypertension"),
            "flags": [{"code": "uncontrolled-hypertension", "value": True}],
        },
        "rejected",
    ),
    "no-prior-failure": ({"prior_treatment_failure": False}, "rejected"),
    "prior-failure-missing": ({"prior_treatment_failure": None}, "on-hold"),
    "lability": ({"flags": [{"code": "extreme-emotional-lability", "value": True}]}, "on-hold"),
    "no-diagnosis": ({"diagnoses": []}, "on-hold"),
}


def test_the_four_routes_triage_identically(app: Flask) -> None:
    """One app for every scenario (a setup per scenario would cost more than the scenario).
    The HL7 v2 route goes through a live MLLP listener, sent by python-hl7's client."""
    staff = client_as(app, "staff")
    referrer = client_as(app, "referrer")
    v2 = app.extensions["fhir_kat"].services.v2
    with MllpListener(ListenerConfig(port=0, idle_timeout=30), v2.receive) as listener:
        _four_routes(staff, referrer, listener.address[1])


def _four_routes(staff: FlaskClient, referrer: FlaskClient, port: int) -> None:
    for n, (name, (change, expected)) in enumerate(SCENARIOS.items()):
        native = referral(change, f"N-{n}", own_patient=True)
        r = staff.post(
            "/api/v1/referrals", data=json.dumps(native), content_type="application/json"
        )
        assert r.status_code == 201, (name, r.get_json())
        rest = transform(staff, referral(change, f"T-{n}", own_patient=True))
        r = referrer.post("/fhir", data=json.dumps(rest), content_type="application/fhir+json")
        assert r.status_code == 200, (name, r.get_json())
        message = as_message(transform(staff, referral(change, f"M-{n}", own_patient=True)))
        r = process(referrer, message)
        assert r.status_code == 200, (name, r.get_json())
        answer = r.get_json()
        header = answer["entry"][0]["resource"]
        assert header["response"]["code"] == "ok", (name, answer)
        assert header["response"]["identifier"] == message["entry"][0]["resource"]["id"]
        assert answer["entry"][1]["resource"]["status"] == expected, name  # triage in the answer
        v2 = referral(change, f"V-{n}", own_patient=True)
        ack = send(port, referral_message(v2, f"PARITY-{n}"))
        assert ack_code(ack) == "AA", (name, str(ack))
        routes = ("N", "T", "M", "V")
        results = {route: outcome(task_of(staff, f"{route}-{n}")) for route in routes}
        assert results["N"][0] == expected, (name, results)
        assert results["N"] == results["T"] == results["M"] == results["V"], (name, results)
        if expected != "received":
            assert results["M"][2], name  # the reason is named


def test_a_resent_message_is_answered_the_same_and_processed_once(app: Flask) -> None:
    staff = client_as(app, "staff")
    referrer = client_as(app, "referrer")
    message = as_message(transform(staff, referral()))
    first = process(referrer, message).get_json()
    assert_conformant(first)
    assert first["type"] == "message" and first["entry"][0]["resource"]["response"]["code"] == "ok"
    history = staff.get(f"/fhir/Task/{task_of(staff, 'R-7781')['id']}/_history").get_json()
    second = process(referrer, message).get_json()
    assert second == first
    again = staff.get(f"/fhir/Task/{task_of(staff, 'R-7781')['id']}/_history").get_json()
    assert again["total"] == history["total"]
    # The same referral in a new message (new Bundle.id): no second referral either.
    resent = as_message(transform(staff, referral()), event="notify-update-service-request")
    assert process(referrer, resent).get_json()["entry"][0]["resource"]["response"]["code"] == "ok"
    assert staff.get("/fhir/ServiceRequest").get_json()["total"] == 1
    assert staff.get("/fhir/Task").get_json()["total"] == 1


def test_a_message_after_a_rest_referral_updates_the_same_referral(app: Flask) -> None:
    staff = client_as(app, "staff")
    assert (
        staff.post(
            "/api/v1/referrals", data=json.dumps(referral()), content_type="application/json"
        ).status_code
        == 201
    )
    message = as_message(transform(staff, referral()), event="notify-update-service-request")
    answer = process(client_as(app, "referrer"), message).get_json()
    assert answer["entry"][0]["resource"]["response"]["code"] == "ok", answer
    assert staff.get("/fhir/ServiceRequest").get_json()["total"] == 1
    assert staff.get("/fhir/Patient").get_json()["total"] == 1
    assert task_of(staff, "R-7781")["status"] == "received"


@pytest.mark.parametrize(
    ("spoil", "where"),
    [
        (lambda m: m["entry"][0]["resource"].update(eventCoding={"code": "x"}), "eventCoding"),
        (lambda m: m["entry"][0]["resource"].pop("focus"), "focus"),
        # A code of one system under another: the event is the pair, not the code alone.
        (
            lambda m: m["entry"][0]["resource"]["eventCoding"].update(code="I12"),
            "eventCoding",
        ),
        (lambda m: m["entry"][2]["resource"].update(gender="bogus"), "gender"),
    ],
)
def test_a_bad_message_gets_a_fatal_error_with_details(app: Flask, spoil: Any, where: str) -> None:
    staff = client_as(app, "staff")
    message = as_message(transform(staff, referral()))
    message["entry"].sort(key=lambda e: e["resource"]["resourceType"] != "MessageHeader")
    patient = next(
        i for i, e in enumerate(message["entry"]) if e["resource"]["resourceType"] == "Patient"
    )
    message["entry"].insert(2, message["entry"].pop(patient))
    spoil(message)
    r = process(client_as(app, "referrer"), message)
    assert r.status_code == 200
    answer = r.get_json()
    assert_conformant(answer)
    header = answer["entry"][0]["resource"]
    assert header["response"]["code"] == "fatal-error"
    details = header["response"]["details"]["reference"]
    oo = next(e["resource"] for e in answer["entry"] if e["fullUrl"] == details)
    assert oo["resourceType"] == "OperationOutcome"
    assert any(where in json.dumps(i) for i in oo["issue"]), oo
    assert staff.get("/fhir/ServiceRequest").get_json()["total"] == 0  # nothing half-stored
    assert process(client_as(app, "referrer"), message).get_json() == answer  # same answer


def test_what_is_not_a_message_is_a_400(client: FlaskClient) -> None:
    r = process(client, {"resourceType": "Bundle", "type": "transaction", "id": "x"})
    assert r.status_code == 400
    assert r.get_json()["resourceType"] == "OperationOutcome"
    r = process(client, {"resourceType": "Patient"})
    assert r.status_code == 400


def test_capability_statement_advertises_messaging(client: FlaskClient) -> None:
    cap = client.get("/fhir/metadata").get_json()
    assert_conformant(cap)
    names = [o["name"] for o in cap["rest"][0]["operation"]]
    assert "process-message" in names
    assert cap["messaging"][0]["endpoint"][0]["address"].endswith("/fhir/$process-message")


def test_another_referrer_cannot_overwrite_a_referral(app: Flask) -> None:
    staff = client_as(app, "staff")
    first = as_message(transform(staff, referral()))
    assert process(client_as(app, "referrer"), first).status_code == 200
    before = task_of(staff, "R-7781")
    hijack = as_message(
        transform(staff, referral({"prior_treatment_failure": False})),
        event="notify-update-service-request",
    )
    r = process(client_as(app, "other-referrer"), hijack)
    assert r.status_code == 403 and r.get_json()["resourceType"] == "OperationOutcome"
    assert task_of(staff, "R-7781") == before


def test_a_message_whose_focus_is_a_task(app: Flask) -> None:
    staff = client_as(app, "staff")
    native = referral()
    bundle = staff.post(
        "/api/v1/referrals/$transform", data=json.dumps(native), content_type="application/json"
    ).get_json()
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Provenance"]
    message = as_message(bundle)
    task = next(e for e in message["entry"] if e["resource"]["resourceType"] == "Task")
    message["entry"][0]["resource"]["focus"] = [{"reference": task["fullUrl"]}]
    answer = process(client_as(app, "referrer"), message).get_json()
    header = answer["entry"][0]["resource"]
    assert header["response"]["code"] == "ok", answer
    assert answer["entry"][1]["resource"]["status"] == "received"
    assert staff.get("/fhir/Task").get_json()["total"] == 1


def test_a_bser_referral_message_with_the_v2_event_code(app: Flask) -> None:
    """HL7 BSeR fixes eventCoding to v2-0003 I12 (new referral); I13 modifies one."""
    staff, referrer = client_as(app, "staff"), client_as(app, "referrer")
    message = as_message(transform(staff, referral(number="B-1")))
    event = {"system": "http://terminology.hl7.org/CodeSystem/v2-0003", "code": "I12"}
    message["entry"][0]["resource"]["eventCoding"] = event
    r = process(referrer, message)
    assert r.get_json()["entry"][0]["resource"]["response"]["code"] == "ok", r.get_json()
    assert task_of(staff, "B-1")["status"] == "received"
    update = copy.deepcopy(message)
    update["id"] = str(uuid.uuid4())
    update["entry"][0]["resource"]["id"] = str(uuid.uuid4())
    update["entry"][0]["resource"]["eventCoding"] = event | {"code": "I13"}
    r = process(referrer, update)
    assert r.get_json()["entry"][0]["resource"]["response"]["code"] == "ok", r.get_json()
    assert staff.get(f"/fhir/Task?identifier={REFERRAL_SYSTEM}|B-1").get_json()["total"] == 1
