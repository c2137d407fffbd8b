"""End to end against a real FHIR server (SEKMET on loopback): the program's artifacts, with
safety signals in them, stored by the service and sent by the worker to a conditional-create
partner (resources without a business identifier — the Provenance — go by PUT with our id)
and to the care team (each Flag with its Patient). Every resource arrives once; sending the
whole outbox again creates nothing new."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from fhir_kat.app import create_app
from fhir_kat.clinical.safety import FLAG_IDS
from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.worker import DeliveryWorker
from fhir_kat.settings import Settings
from tests.conftest import token_for

from .conftest import SekmetServer

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def _example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text())
    return loaded


def test_artifacts_and_safety_flags_reach_a_real_fhir_server_once(
    settings: Settings, sekmet: SekmetServer
) -> None:
    partners = {
        "ehr": {
            "base_url": sekmet.base,
            "artifact_kinds": ["referrals", "medication-administrations"],
        },
        "team": {"base_url": sekmet.base, "artifact_kinds": ["safety-flags"], "care_team": True},
    }
    app = create_app(replace(settings, extra={**settings.extra, "partners": partners}))
    state = app.extensions["fhir_kat"]
    try:
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app, 'staff')}"
        session = _example("medication-administrations")
        session["vital_signs_before"]["systolic_mmhg"] = 190
        for kind, body in (
            ("referrals", _example("referrals")),
            ("medication-administrations", session),
        ):
            r = client.post(
                f"/api/v1/{kind}", data=json.dumps(body), content_type="application/json"
            )
            assert r.status_code == 201, r.get_json()
        flags = client.get("/fhir/Flag?category=safety").get_json()
        raised = sorted(e["resource"]["code"]["coding"][0]["code"] for e in flags["entry"])
        # No intake steps and no treatment consent before this session (the referral waits in
        # "received" until nurse, psychiatrist and physician have cleared it — issue 16).
        assert raised == [
            "dosing-intake-incomplete",
            "dosing-without-treatment-consent",
            "systolic-bp-high",
        ]

        worker = DeliveryWorker(state.store, state.partners, lambda _c: True, batch_size=50)
        for _ in range(20):
            if not worker.run_once().claimed:
                break
        infos = ob.list_deliveries(state.store, limit=100)
        assert {i.status for i in infos} == {"delivered"}, [(i.id, i.last_error) for i in infos]

        for entry in flags["entry"]:
            found = sekmet.get("Flag", identifier=f"{FLAG_IDS}|{entry['resource']['id']}")
            assert found["total"] == 1
        assert len(sekmet.search_all("Patient")) == 1  # the referral's, found again by PHN
        provenances = sekmet.search_all("Provenance")
        assert len(provenances) == 2  # one per artifact, by PUT with our ids
        before = {
            t: len(sekmet.search_all(t)) for t in ("Patient", "Observation", "Flag", "Condition")
        }

        # Everything again (a replay): conditional create and PUT find what is there.
        with state.store.write() as tx:
            tx.conn.execute(ob.outbox.update().values(status="pending", attempts=0))
        for _ in range(20):
            if not worker.run_once().claimed:
                break
        assert {i.status for i in ob.list_deliveries(state.store, limit=100)} == {"delivered"}
        after = {t: len(sekmet.search_all(t)) for t in before}
        assert after == before
        worker.close()
    finally:
        state.export.shutdown()
        state.store.dispose()
