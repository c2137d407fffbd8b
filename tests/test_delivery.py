"""Stored artifacts reach a health-authority EHR through the outbox: queued in the artifact's own
transaction, sent by the worker only when the patient's consent names that authority, visible
and operable by admins at /api/v1/deliveries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from fhir_kat.app import create_app
from fhir_kat.exchange import outbox
from fhir_kat.exchange.worker import DeliveryWorker
from fhir_kat.services.delivery import make_consent_gate, make_delivery_audit
from fhir_kat.settings import Settings
from fhir_kat.validation.resource import SUPPORTED_TYPES
from tests.conftest import HA_ORG, TEST_CLIENTS, client_as

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


class Receiver:
    """A loopback FHIR endpoint that records the transaction Bundles it is sent."""

    def __init__(self) -> None:
        self.bundles: list[dict[str, Any]] = []
        app = Flask("receiver")

        @app.post("/fhir")
        def transaction() -> Any:
            bundle = request.get_json(force=True)
            self.bundles.append(bundle)
            entries = [
                {
                    "response": {
                        "status": "201 Created",
                        "location": f"{e['request']['url']}/_history/1",
                    }
                }
                for e in bundle["entry"]
            ]
            return jsonify(
                {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
            )

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/fhir"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def kat(settings: Settings, receiver: Receiver) -> Iterator[Flask]:
    partners = {
        "island-ehr": {
            "base_url": receiver.url,
            "write_mode": "put",
            "organization": HA_ORG,
            "timeout_seconds": 5,
            # Provenance has no identifier to match on, and nothing refers to it.
            "resource_types": sorted(set(SUPPORTED_TYPES) - {"Provenance"}),
        }
    }
    app = create_app(replace(settings, extra={"clients": TEST_CLIENTS, "partners": partners}))
    yield app
    app.extensions["fhir_kat"].export.shutdown()
    app.extensions["fhir_kat"].store.dispose()


def send(app: Flask, kind: str, body: dict[str, Any] | None = None) -> Any:
    body = body or json.loads((EXAMPLES / f"{kind}.json").read_text())
    return client_as(app, "staff").post(
        f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json"
    )


def run_worker(app: Flask) -> dict[str, int]:
    """Run the worker until nothing is due (bounded): one patient's deliveries go in order."""
    state = app.extensions["fhir_kat"]
    worker = DeliveryWorker(
        state.store,
        state.partners,
        make_consent_gate(state.store, state.consent, state.clock),
        sleep=lambda _: None,
        on_outcome=make_delivery_audit(state.store, state.clock),
    )
    totals = {"blocked": 0, "delivered": 0}
    for _ in range(20):
        report = worker.run_once()
        if not report.claimed:
            break
        totals["blocked"] += report.blocked
        totals["delivered"] += report.delivered
    return totals


def deliveries(app: Flask, **query: str) -> list[dict[str, Any]]:
    r = client_as(app, "admin").get("/api/v1/deliveries", query_string=query)
    assert r.status_code == 200
    rows: list[dict[str, Any]] = r.get_json()["deliveries"]
    return rows


def test_consent_decides_at_send_time(kat: Flask, receiver: Receiver) -> None:
    assert send(kat, "referrals").status_code == 201
    assert send(kat, "questionnaire-responses").status_code == 201
    queued = deliveries(kat, status="pending")
    # The referral, its Task as triage left it (a later version: the partner's copy follows),
    # and the questionnaire response.
    assert len(queued) == 3 and {q["partner"] for q in queued} == {"island-ehr"}
    report = run_worker(kat)
    assert report["blocked"] == 3 and receiver.bundles == []  # no consent names the authority
    assert send(kat, "consents").status_code == 201  # consent to share with HA-ISLAND
    admin = client_as(kat, "admin")
    for blocked in deliveries(kat, status="blocked-consent"):
        assert admin.post(f"/api/v1/deliveries/{blocked['id']}/retry").status_code == 200
    run_worker(kat)
    sent_types = sorted(
        {e["resource"]["resourceType"] for b in receiver.bundles for e in b["entry"]}
    )
    assert "QuestionnaireResponse" in sent_types and "Observation" in sent_types
    assert all(e["request"]["method"] == "PUT" for b in receiver.bundles for e in b["entry"])
    assert {d["status"] for d in deliveries(kat)} == {"delivered"}
    audit = client_as(kat, "admin").get("/fhir/AuditEvent?_count=200").get_json()["entry"]
    trail = [e["resource"].get("outcomeDesc", "") for e in audit]
    assert any("to island-ehr: delivered" in t for t in trail)
    assert any("to island-ehr: blocked-consent" in t for t in trail)


def test_identical_resend_queues_nothing_and_admin_tools(kat: Flask) -> None:
    send(kat, "referrals")
    send(kat, "consents")
    before = len(deliveries(kat))
    send(kat, "consents")
    assert len(deliveries(kat)) == before  # nothing changed, nothing to send
    stats = client_as(kat, "admin").get("/api/v1/deliveries/stats").get_json()
    assert stats["pending"] == before
    one = deliveries(kat)[0]["id"]
    cancelled = client_as(kat, "admin").post(f"/api/v1/deliveries/{one}/cancel")
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    assert client_as(kat, "staff").get("/api/v1/deliveries").status_code == 403
    bad = client_as(kat, "admin").get("/api/v1/deliveries?status=bogus")
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"


def test_unknown_partner_kind_is_a_clear_settings_error(settings: Settings) -> None:
    from fhir_kat.settings import SettingsError

    bad = {"x": {"base_url": "https://ehr.example/fhir", "artifact_kinds": ["referal"]}}
    with pytest.raises(SettingsError, match="unknown kind 'referal'"):
        create_app(replace(settings, extra={"clients": TEST_CLIENTS, "partners": bad}))


def _worker(app: Flask, gate: Any) -> DeliveryWorker:
    state = app.extensions["fhir_kat"]
    return DeliveryWorker(state.store, state.partners, gate, sleep=lambda _: None)


def _drain(worker: DeliveryWorker) -> None:
    for _ in range(20):
        if not worker.run_once().claimed:
            return


def test_consent_committed_between_check_and_block_is_not_lost(
    kat: Flask, receiver: Receiver
) -> None:
    """The interleaving the fault runs found, step by step: the worker asks the consent
    decision point (no consent yet: no), a Consent for the patient commits (its requeue finds
    nothing blocked: the delivery is in flight), then the worker records the block."""
    assert send(kat, "referrals").status_code == 201
    state = kat.extensions["fhir_kat"]
    real = make_consent_gate(state.store, state.consent, state.clock)
    consent_written: list[int] = []

    def gate(check: dict[str, Any]) -> bool:
        allowed = real(check)
        if not consent_written:
            consent_written.append(1)
            # Commits here, after the check and before the worker records its answer.
            assert send(kat, "consents").status_code == 201
        return allowed

    worker = _worker(kat, gate)
    _drain(worker)
    statuses = {d["status"] for d in deliveries(kat)}
    assert statuses == {"delivered"}, statuses
    assert outbox.stats(state.store).blocked_consent == 0
    sent = [e["resource"]["resourceType"] for b in receiver.bundles for e in b["entry"]]
    assert "Patient" in sent and "Task" in sent
