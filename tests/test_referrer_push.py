"""End to end: a referral travels from receipt to ``completed`` through the HTTP API while a real
HTTP receiver on loopback stands in for the referrer's EMR. Every status change reaches it, in
order, as a conditional Task update — also after it was down for a while — and the feedback
document arrives only when the participant's consent permits sharing with the referrer."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_kat.app import create_app
from fhir_kat.exchange.standin_emr import StandInEmr
from fhir_kat.exchange.worker import DeliveryWorker
from fhir_kat.services.delivery import make_consent_gate, make_delivery_audit
from fhir_kat.settings import Settings
from tests.conftest import CLINIC_ORG, TEST_CLIENTS, client_as
from tests.support.conformance import assert_conformant
from tests.test_feedback import attest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
TASK_Q = "/fhir/Task?identifier=https://emr.example-clinic.ca/referrals|R-7781"


def example(kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / f"{kind}.json").read_text())
    return loaded


class Emr(StandInEmr):
    """The referrer's EMR (the demo's stand-in, fhir_kat/exchange/standin_emr.py): records every
    transaction it is sent and answers like a FHIR server; ``stop()`` takes it off the network,
    ``start()`` brings it back on the same port."""

    def __init__(self) -> None:
        super().__init__()
        self.url = f"{self.url}/fhir"

    @property
    def bundles(self) -> list[dict[str, Any]]:
        with self.lock:
            return [bundle for _, bundle in self.received]

    def tasks(self) -> list[dict[str, Any]]:
        return self.resources("Task")


@pytest.fixture
def emr() -> Iterator[Emr]:
    receiver = Emr()
    yield receiver
    if receiver.server is not None:
        receiver.stop()


@pytest.fixture
def kat(settings: Settings, emr: Emr) -> Iterator[Flask]:
    partners = {
        "clinic-7-emr": {
            "base_url": emr.url,
            "organization": CLINIC_ORG,
            "artifact_kinds": ["referral-status"],
            "timeout_seconds": 5,
            "max_attempts": 100,
            "backoff_base_seconds": 0.01,
            "backoff_cap_seconds": 0.05,
        }
    }
    app = create_app(replace(settings, extra={"clients": TEST_CLIENTS, "partners": partners}))
    yield app
    app.extensions["fhir_kat"].export.shutdown()
    app.extensions["fhir_kat"].store.dispose()


def run_worker(app: Flask, attempts: int = 40) -> dict[str, int]:
    """Run the worker until nothing more is due now (bounded)."""
    state = app.extensions["fhir_kat"]
    worker = DeliveryWorker(
        state.store,
        state.partners,
        make_consent_gate(state.store, state.consent, state.clock),
        sleep=lambda _: None,
        on_outcome=make_delivery_audit(state.store, state.clock),
    )
    totals = {"delivered": 0, "failed": 0, "blocked": 0}
    idle = 0
    for _ in range(attempts):
        report = worker.run_once()
        totals["delivered"] += report.delivered
        totals["blocked"] += report.blocked
        totals["failed"] += report.claimed - report.delivered - report.blocked
        if not report.claimed:
            idle += 1
            if idle >= 3:  # nothing due three times in a row, after the backoff has passed
                break
            time.sleep(0.06)  # > backoff_cap_seconds
        else:
            idle = 0
    return totals


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


def qr(source_id: str, authored: str, answer: str) -> dict[str, Any]:
    body = example("questionnaire-responses")
    body["source_id"], body["authored"] = source_id, authored
    body["answers"] = [
        a | {"answer": answer} if a["item"] != "phq9-difficulty" else a for a in body["answers"]
    ]
    return body


def drive_to_completion(kat: Flask, emr: Emr, consent: bool) -> FlaskClient:
    staff = client_as(kat, "staff")
    post(staff, "referrals", example("referrals"))
    if consent:
        post(
            staff,
            "consents",
            example("consents")
            | {
                "source_id": "CONSENT-REFERRER",
                "kind": "share-referrer",
                "permitted_party": {
                    "name": "Example Family Practice",
                    "identifier": {
                        "system": CLINIC_ORG.split("|")[0],
                        "value": CLINIC_ORG.split("|")[1],
                    },
                },
                "purposes": ["TREAT"],
            },
        )
    post(staff, "questionnaire-responses", qr("QR-BASE", "2026-01-20T10:00:00-08:00", "LA6571-9"))
    screening = example("screenings")
    post(staff, "screenings", screening)
    for step in ("psychiatrist-clearance", "contraindication-check"):
        post(staff, "screenings", copy.deepcopy(screening) | {"step": step, "source_id": step})
    assert run_worker(kat)["delivered"] == 5  # requested, accepted and three intake steps

    emr.stop()  # the EMR goes down: what happens now must wait, in order, and not be lost
    post(staff, "medication-administrations", example("medication-administrations"))
    assert task(staff)["status"] == "in-progress"
    done = task(staff) | {
        "status": "completed",
        "businessStatus": {
            "coding": [
                {
                    "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-referral-status",
                    "code": "program-completed",
                }
            ]
        },
        "executionPeriod": task(staff)["executionPeriod"] | {"end": "2026-04-14"},
    }
    r = put_task(staff, done)
    assert r.status_code == 200, r.get_json()
    # The post-program response arrives after the end; the draft follows it, and a clinician
    # attests the document: only then is it linked and sent (with the consent).
    post(staff, "questionnaire-responses", qr("QR-POST", "2026-04-20T10:00:00-07:00", "LA6568-5"))
    assert attest(staff).status_code == 200
    down = run_worker(kat, attempts=5)
    assert down["delivered"] == 0 and down["failed"] >= 1
    emr.start()
    run_worker(kat)
    return staff


@pytest.mark.parametrize("consent", [True, False], ids=["consent", "no-consent"])
def test_every_status_change_reaches_the_referrer_in_order(
    kat: Flask, emr: Emr, consent: bool
) -> None:
    staff = drive_to_completion(kat, emr, consent)
    seen = [
        (t["status"], t["businessStatus"]["coding"][0]["code"], "output" in t) for t in emr.tasks()
    ]
    expected = [
        ("requested", "received", False),
        ("received", "eligible", False),
        ("received", "nurse-intake-cleared", False),
        ("received", "psychiatrist-cleared", False),
        ("accepted", "intake-complete", False),
        ("in-progress", "participating", False),
        ("completed", "program-completed", False),
    ]
    if consent:
        expected.append(("completed", "program-completed", True))
    assert seen == expected
    for bundle in emr.bundles:
        assert bundle["type"] == "transaction"
        put = bundle["entry"][-1]["request"]
        assert put == {
            "method": "PUT",
            "url": "Task?identifier=https://emr.example-clinic.ca/referrals|R-7781",
        }
        sent = bundle["entry"][-1]["resource"]
        assert sent["for"]["reference"].startswith("Patient?identifier=")
        assert sent["focus"]["reference"].startswith("ServiceRequest?identifier=")
        assert "id" not in sent
    documents = [
        e["resource"]
        for b in emr.bundles
        for e in b["entry"]
        if e["resource"]["resourceType"] == "Bundle"
    ]
    stored = task(staff)
    admin = client_as(kat, "admin")
    statuses = {d["status"] for d in admin.get("/api/v1/deliveries").get_json()["deliveries"]}
    assert statuses == {"delivered"}  # nothing lost, nothing left behind
    if not consent:
        assert documents == [] and "output" not in stored
        return
    assert len(documents) == 1
    document = documents[0]
    assert_conformant(document)
    last = emr.bundles[-1]["entry"]
    assert last[0]["request"]["method"] == "POST" and last[0]["request"]["ifNoneExist"]
    assert emr.tasks()[-1]["output"][0]["valueReference"]["reference"] == last[0]["fullUrl"]
    composition = document["entry"][0]["resource"]
    assert composition["type"]["coding"][0]["code"] == "34133-9"
    scores = next(s for s in composition["section"] if s["title"] == "Baseline and post scores")
    assert "improved" in scores["text"]["div"]
    # The referrer, following its Task, can read the same document here.
    ref = stored["output"][0]["valueReference"]["reference"]
    referrer = client_as(kat, "referrer")
    r = referrer.get(f"/fhir/{ref}/$document")
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["entry"][0]["resource"]["id"] == ref.split("/")[1]
    assert client_as(kat, "other-referrer").get(f"/fhir/{ref}/$document").status_code == 404


def test_consent_withdrawn_before_sending_blocks_the_document_not_the_status(
    kat: Flask, emr: Emr
) -> None:
    staff = client_as(kat, "staff")
    post(staff, "referrals", example("referrals"))
    system, value = CLINIC_ORG.split("|")
    post(
        staff,
        "consents",
        example("consents")
        | {
            "source_id": "CONSENT-REFERRER",
            "kind": "share-referrer",
            "permitted_party": {"name": "Clinic", "identifier": {"system": system, "value": value}},
            "purposes": ["TREAT"],
        },
    )
    screening = example("screenings")
    post(staff, "screenings", screening)
    for step in ("psychiatrist-clearance", "contraindication-check"):
        post(staff, "screenings", copy.deepcopy(screening) | {"step": step, "source_id": step})
    post(staff, "medication-administrations", example("medication-administrations"))
    done = task(staff) | {
        "status": "completed",
        "businessStatus": {
            "coding": [
                {
                    "system": "https://fhir-kat.example.org/fhir/CodeSystem/kat-referral-status",
                    "code": "program-completed",
                }
            ]
        },
    }
    assert put_task(staff, done).status_code == 200
    assert attest(staff).status_code == 200
    assert "output" in task(staff)  # consent permitted at attestation: the document is linked
    # A refused move queues nothing (nothing half-stored).
    admin = client_as(kat, "admin")
    queued = len(admin.get("/api/v1/deliveries").get_json()["deliveries"])
    assert put_task(staff, task(staff) | {"status": "in-progress"}).status_code == 409
    assert len(admin.get("/api/v1/deliveries").get_json()["deliveries"]) == queued
    # The participant withdraws the consent before the worker runs.
    for entry in staff.get("/fhir/Consent").get_json()["entry"]:
        body = {k: v for k, v in entry["resource"].items() if k != "meta"}
        r = staff.put(
            f"/fhir/Consent/{body['id']}",
            data=json.dumps(body | {"status": "inactive"}),
            content_type="application/fhir+json",
        )
        assert r.status_code == 200
    report = run_worker(kat)
    assert report["blocked"] == 1
    assert [t["status"] for t in emr.tasks()][-1] == "completed"
    assert all("output" not in t for t in emr.tasks())
    assert not any(
        e["resource"]["resourceType"] == "Bundle" for b in emr.bundles for e in b["entry"]
    )
    statuses = sorted(d["status"] for d in admin.get("/api/v1/deliveries").get_json()["deliveries"])
    assert statuses.count("blocked-consent") == 1 and set(statuses) == {
        "delivered",
        "blocked-consent",
    }
