"""Ingest while delivering (issue 18): a synthetic program's artifacts are stored while
delivery workers send to a real FHIR server (SEKMET on loopback), workers die at random points
— before sending, and after the partner committed but before the outcome was recorded — and
are replaced, and sharing consents arrive in the middle of it all. At the end the partner holds,
for every patient who consented, exactly what is stored now (each resource once), the patient's
deliveries went in order, and nothing of a patient who did not consent left the program."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from fhir_kat.app import create_app
from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.bundles import NO_IDENTIFIER_SEARCH, identifier_query
from fhir_kat.exchange.client import Delivered, PartnerClient
from fhir_kat.exchange.copies import partner_copy
from fhir_kat.exchange.worker import DeliveryWorker
from fhir_kat.services.delivery import make_consent_gate
from fhir_kat.settings import Settings
from fhir_kat.synthetic import HEALTH_AUTHORITY, generate_program
from tests.conftest import token_for

from .conftest import SekmetServer
from .test_sekmet_convergence import _comparable

HA = f"{HEALTH_AUTHORITY['identifier']['system']}|{HEALTH_AUTHORITY['identifier']['value']}"
PHN_SYSTEM = "https://fhir.infoway-inforoute.ca/NamingSystem/ca-bc-patient-healthcare-id"
LEASE = 3 * 10 + 2  # the worker's minimum lease for a 10 s partner timeout


class Crash(BaseException):
    """A worker dying mid-delivery: not an ``Exception``, so nothing in the worker catches it
    and the delivery stays in flight, as after a SIGKILL."""


class CrashingClient(PartnerClient):
    """The real client; now and then the worker dies right after the partner committed."""

    def __init__(self, *args: Any, rng: random.Random, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.rng = rng

    def send(self, kind: str, payload: dict[str, Any], delivery_id: int) -> Any:
        result = super().send(kind, payload, delivery_id)
        if isinstance(result, Delivered) and self.rng.random() < 0.08:
            raise Crash("after the partner's commit")
        return result


def test_ingest_while_delivering_with_worker_crashes_converges(
    settings: Settings, sekmet: SekmetServer
) -> None:
    rng = random.Random(18)
    program = generate_program(6, seed=7)
    artifacts = list(program.artifacts())
    sharing = [
        a
        for a in artifacts
        if a.kind == "consents" and a.payload["kind"] == "share-health-authority"
    ]
    refused = {sharing[0].payload["patient_phn"], sharing[-1].payload["patient_phn"]}
    artifacts = [
        a for a in artifacts if a not in sharing or a.payload["patient_phn"] not in refused
    ]
    signed = max(a.payload["signed_at"] for a in sharing)
    # The consent decision is made as of a fixed day, after every consent was signed.
    decided_on = datetime.fromisoformat(signed).astimezone(UTC) + timedelta(days=1)

    partners = {
        "ehr": {
            "base_url": sekmet.base,
            "timeout_seconds": 10,
            "organization": HA,
            # SEKMET has no QuestionnaireResponse or AdverseEvent endpoint.
            "artifact_kinds": ["referrals", "screenings", "medication-administrations"],
        }
    }
    app = create_app(replace(settings, extra={**settings.extra, "partners": partners}))
    state = app.extensions["fhir_kat"]
    real_gate = make_consent_gate(state.store, state.consent, lambda: decided_on)
    offset = [0.0]  # each new worker's clock is a lease ahead: it takes over what died

    def gate(check: dict[str, Any]) -> bool:
        if rng.random() < 0.04:
            raise Crash("after the claim, before anything was sent")
        return real_gate(check)

    def new_worker(n: int, crashing: bool) -> DeliveryWorker:
        offset[0] += LEASE + 1
        shift = timedelta(seconds=offset[0])

        def clock() -> datetime:
            return datetime.now(UTC) + shift

        partner = state.partners["ehr"]
        client = (
            CrashingClient(partner, rng=rng, clock=lambda: clock().timestamp())
            if crashing
            else PartnerClient(partner, clock=lambda: clock().timestamp())
        )
        return DeliveryWorker(
            state.store,
            state.partners,
            gate if crashing else real_gate,
            clock,
            worker_id=f"w{n}",
            lease_seconds=LEASE,
            batch_size=rng.randint(1, 4),
            idle_seconds=0.02,
            clients={"ehr": client},
            recheck_blocked_seconds=0,  # the Consent write's requeue must do it on its own
        )

    ingest_done = threading.Event()
    failures: list[str] = []

    def ingest() -> None:
        c = app.test_client()
        c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token_for(app, 'staff')}"
        try:
            for artifact in artifacts:
                r = c.post(
                    f"/api/v1/{artifact.kind}",
                    data=json.dumps(artifact.payload),
                    content_type="application/json",
                )
                if r.status_code not in (200, 201):
                    failures.append(f"{artifact.name}: {r.status_code} {r.get_json()}")
                time.sleep(rng.random() * 0.01)
        finally:
            ingest_done.set()

    def run_until_crash(worker: DeliveryWorker, stop: threading.Event) -> None:
        with contextlib.suppress(Crash):
            worker.run(stop, max_iterations=2000)

    feeder = threading.Thread(target=ingest)
    feeder.start()
    crashes = 0
    deadline = time.monotonic() + 240
    n = 0
    try:
        while not ingest_done.is_set() and time.monotonic() < deadline:
            n += 1
            worker, stop = new_worker(n, crashing=True), threading.Event()
            thread = threading.Thread(target=run_until_crash, args=(worker, stop))
            thread.start()
            thread.join(timeout=rng.uniform(0.2, 1.0))
            if thread.is_alive():  # stopped on purpose (a restart), not a crash
                stop.set()
                thread.join(timeout=60)
            else:
                crashes += 1
            assert not thread.is_alive()
            worker.close()
        feeder.join(timeout=120)
        assert not feeder.is_alive() and not failures, failures[:3]
        final = new_worker(n + 1, crashing=False)
        drain_until = time.monotonic() + 120
        while time.monotonic() < drain_until:  # bounded: one worker that does not crash
            left = ob.stats(state.store)
            if left.pending == 0 and left.in_flight == 0:
                break
            if not final.run_once().claimed:
                time.sleep(0.1)
        final.close()
    finally:
        ingest_done.wait(timeout=120)

    assert crashes >= 1 and n >= 3, (crashes, n)
    stats = ob.stats(state.store)
    assert stats.pending == 0 and stats.in_flight == 0 and stats.dead == 0, stats

    with state.store.read() as tx:
        patients = {
            s.id: next(i["value"] for i in s.json()["identifier"] if i["system"] == PHN_SYSTEM)
            for s in (
                tx.get("Patient", pid)
                for pid in {r.patient_key for r in ob.list_deliveries(state.store, limit=1000)}
            )
            if s is not None
        }
        copies = list(tx.conn.execute(select(partner_copy)))
        current = {
            (r.resource_type, r.resource_id): tx.get(r.resource_type, r.resource_id) for r in copies
        }
    # Those whose sharing consent was sent (an excluded referral never gets one).
    shared = {a.payload["patient_phn"] for a in sharing} - refused
    consented = {pid for pid, phn in patients.items() if phn in shared}
    assert consented and len(consented) < len(patients)
    infos = sorted(ob.list_deliveries(state.store, limit=1000), key=lambda i: i.id)
    for pid in patients:
        mine = [i for i in infos if i.patient_key == pid]
        if pid in consented:
            assert {i.status for i in mine} == {"delivered"}, (pid, [i.status for i in mine])
            moments = [i.delivered_at for i in mine]
            assert moments == sorted(moments), f"patient {pid}: delivered out of order"  # type: ignore[type-var]
        else:
            assert {i.status for i in mine} == {"blocked-consent"}

    # The partner holds, once each, every resource of a consented patient as stored now.
    compared = 0
    for row in copies:
        stored = current[(row.resource_type, row.resource_id)]
        assert stored is not None
        ours = stored.json()
        if row.patient_key not in consented:
            continue
        if row.resource_type in NO_IDENTIFIER_SEARCH or identifier_query(ours) is None:
            theirs = sekmet.get(f"{row.resource_type}/{row.resource_id}")
        else:
            query = identifier_query(ours)
            assert query is not None
            found = sekmet.search_all(row.resource_type, **dict([query.split("=", 1)]))
            assert len(found) == 1, (row.resource_type, len(found))
            theirs = found[0]
        assert _comparable(theirs) == _comparable(ours), row.resource_type
        compared += 1
    assert compared > 20
    # Nothing about a patient who did not consent reached the partner.
    for phn in set(patients.values()) - shared:
        assert sekmet.get("Patient", identifier=f"{PHN_SYSTEM}|{phn}")["total"] == 0
    state.export.shutdown()
    state.store.dispose()
