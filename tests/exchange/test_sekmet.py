"""Integration against a real FHIR R4 server on loopback (SEKMET: FastAPI + SQLite, atomic
transactions, conditional create, SMART Backend Services token endpoint), on both of our
database backends: every resource arrives exactly once, through partner outages and a worker
killed with SIGKILL between the partner's commit and our record of it."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.partners import PartnerConfig, parse_partners
from fhir_kat.exchange.routing import enqueue_artifact
from fhir_kat.exchange.worker import DeliveryWorker
from fhir_kat.store import Store, Tx

from .conftest import (
    OBS_SYSTEM,
    PID_SYSTEM,
    LoopbackPartner,
    SekmetServer,
    Workers,
    artifact,
    wait_for,
)

ARTIFACTS = 20


def partner(base_url: str, **table: Any) -> dict[str, PartnerConfig]:
    raw = {"base_url": base_url, "timeout_seconds": 5, **table}
    return parse_partners({"ehr": raw})


def store_and_enqueue(tx: Tx, partners: dict[str, PartnerConfig], bundle: dict[str, Any]) -> None:
    """What the artifact service does: store the artifact, queue it, in one transaction."""
    for entry in bundle["entry"]:
        resource = entry["resource"]
        tx.put(resource, current=tx.get(resource["resourceType"], resource["id"]))
    patient = bundle["entry"][0]["resource"]
    key = patient["id"] if patient["resourceType"] == "Patient" else patient["subject"]["reference"]
    queued = enqueue_artifact(tx, partners, "screenings", bundle, key.removeprefix("Patient/"))
    assert list(queued) == ["ehr"]


def enqueue_artifacts(store: Store, partners: dict[str, PartnerConfig], numbers: range) -> None:
    with store.write() as tx:
        for i in numbers:
            store_and_enqueue(tx, partners, artifact(i))


def finished(store: Store) -> bool:
    s = ob.stats(store)
    return s.pending == 0 and s.in_flight == 0


@contextmanager
def background_worker(
    store: Store, partners: dict[str, PartnerConfig], **kw: Any
) -> Iterator[DeliveryWorker]:
    worker = DeliveryWorker(
        store, partners, lambda _c: True, worker_id="bg", idle_seconds=0.05, **kw
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"max_iterations": 20_000})
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(timeout=30)
        worker.close()
        assert not thread.is_alive()


def strip(resource: dict[str, Any]) -> dict[str, Any]:
    """What must survive the trip: everything but server-assigned id/meta and references."""
    out = {k: v for k, v in resource.items() if k not in ("id", "meta", "subject")}
    return out


def assert_partner_holds_each_once(sekmet: SekmetServer, count: int) -> dict[str, str]:
    """Compare the partner with what we sent, resource for resource; returns our Patient id →
    the partner's."""
    patients = sekmet.search_all("Patient")
    observations = sekmet.search_all("Observation")
    assert len(patients) == count
    assert len(observations) == 2 * count
    ids: dict[str, str] = {}
    for i in range(count):
        sent = [e["resource"] for e in artifact(i)["entry"]]
        found = sekmet.get("Patient", identifier=f"{PID_SYSTEM}|P{i:04d}")
        assert found["total"] == 1, f"Patient P{i:04d}: {found['total']} copies"
        patient = found["entry"][0]["resource"]
        assert strip(patient) == strip(sent[0])
        ids[sent[0]["id"]] = patient["id"]
        for k, obs_sent in enumerate(sent[1:]):
            found = sekmet.get("Observation", identifier=f"{OBS_SYSTEM}|O{i:04d}-{k}")
            assert found["total"] == 1
            obs = found["entry"][0]["resource"]
            assert strip(obs) == strip(obs_sent)
            assert obs["subject"] == {"reference": f"Patient/{patient['id']}"}
        linked = sekmet.get("Observation", subject=f"Patient/{patient['id']}")
        assert linked["total"] == 2
    return ids


def test_transaction_bundles_arrive_once_and_resending_changes_nothing(
    real_store: Store, sekmet: SekmetServer
) -> None:
    partners = partner(sekmet.base)
    enqueue_artifacts(real_store, partners, range(ARTIFACTS))
    with background_worker(real_store, partners, batch_size=5):
        wait_for(lambda: finished(real_store), 60, "deliveries", step=0.05)
    ids = assert_partner_holds_each_once(sekmet, ARTIFACTS)

    delivered = ob.list_deliveries(real_store, status="delivered", limit=100)
    assert len(delivered) == ARTIFACTS
    for info in delivered:
        assert info.partner_response is not None
        first = info.partner_response[0]
        assert first["status"].startswith("201") and first["type"] == "Patient"
        assert first["id"] in ids.values()

    # The same artifacts again (a replay, a double click, a recovered backlog): conditional
    # create finds every resource, so the partner still holds each exactly once.
    enqueue_artifacts(real_store, partners, range(ARTIFACTS))
    with background_worker(real_store, partners, batch_size=5):
        wait_for(lambda: finished(real_store), 60, "replayed deliveries", step=0.05)
    assert assert_partner_holds_each_once(sekmet, ARTIFACTS) == ids
    replayed = ob.list_deliveries(real_store, status="delivered", limit=ARTIFACTS)
    for info in replayed:
        assert info.partner_response is not None
        assert {e["status"] for e in info.partner_response} == {"200 OK"}

    # A later artifact refers to a Patient stored (and delivered) earlier: the partner knows
    # that Patient by its identifier, so the reference travels as a conditional reference.
    with real_store.write() as tx:
        for i in range(ARTIFACTS):
            later = artifact(i)["entry"][1]
            later["resource"] = {
                **later["resource"],
                "id": f"obs-{i:04d}-later",
                "identifier": [{"system": OBS_SYSTEM, "value": f"O{i:04d}-later"}],
            }
            store_and_enqueue(tx, partners, {"resourceType": "Bundle", "entry": [later]})
    with background_worker(real_store, partners, batch_size=5):
        wait_for(lambda: finished(real_store), 60, "later deliveries", step=0.05)
    for i in range(ARTIFACTS):
        found = sekmet.get("Observation", identifier=f"{OBS_SYSTEM}|O{i:04d}-later")
        assert found["total"] == 1
        subject = found["entry"][0]["resource"]["subject"]
        assert subject == {"reference": f"Patient/{ids[f'pt-{i:04d}']}"}
    assert len(sekmet.search_all("Patient")) == ARTIFACTS


def test_smart_backend_and_put_mode_against_a_real_token_endpoint(
    real_store: Store,
    sekmet_factory: Callable[..., SekmetServer],
    key_files: dict[str, Path],
) -> None:
    sekmet = sekmet_factory(
        "server_auth:\n"
        "  types: [smart, bearer]\n"
        "  tokens: [test-reader]\n"
        "  token_lifetime: 120\n"
        "  smart_clients:\n"
        "    - client_id: fhir-kat\n"
        f"      public_key_path: {key_files['ES384']}\n"
        '      scopes: "system/*.*"\n'
    )
    sekmet.read_headers = {"Authorization": "Bearer test-reader"}
    partners = partner(
        sekmet.base,
        auth="smart_backend",
        token_url=f"{sekmet.root}/auth/token",
        client_id="fhir-kat",
        private_key_file=str(key_files["ES384"]),
        algorithm="ES384",
        kid="kat-es384",
        scopes=["system/*.cu"],
        write_mode="put",
    )
    enqueue_artifacts(real_store, partners, range(5))
    worker = DeliveryWorker(real_store, partners, lambda _c: True, worker_id="put")
    try:
        for _ in range(10):
            if finished(real_store):
                break
            worker.run_once()
    finally:
        worker.close()
    assert ob.stats(real_store).dead == 0 and finished(real_store)
    # Our deterministic ids are the partner's ids; the references stayed as they were.
    patient = sekmet.get("Patient/pt-0003")
    assert patient["identifier"][0]["value"] == "P0003"
    obs = sekmet.get("Observation/obs-0003-1")
    assert obs["subject"] == {"reference": "Patient/pt-0003"}
    assert len(sekmet.search_all("Patient")) == 5


def test_partner_outage_mid_run_then_every_delivery_completes(
    real_store: Store, sekmet: SekmetServer
) -> None:
    partners = partner(
        sekmet.base,
        timeout_seconds=2,
        max_attempts=1000,
        backoff_base_seconds=0.05,
        backoff_cap_seconds=0.5,
    )
    total = 40
    enqueue_artifacts(real_store, partners, range(total))
    with background_worker(real_store, partners, batch_size=2):
        wait_for(
            lambda: len(ob.list_deliveries(real_store, status="delivered", limit=1000)) >= 2,
            60,
            "the first deliveries",
            step=0.005,
        )
        sekmet.stop(signal.SIGKILL)  # the partner crashes mid-run
        wait_for(
            lambda: any(
                i.last_error is not None and "connection" in i.last_error["issue"][0]["diagnostics"]
                for i in ob.list_deliveries(real_store, status="pending", limit=1000)
            ),
            30,
            "a failed attempt while the partner is down",
        )
        assert not finished(real_store)
        sekmet.start()  # ... and comes back on the same port with the same database
        wait_for(lambda: finished(real_store), 90, "the backlog after the restart", step=0.05)
    assert ob.stats(real_store).dead == 0
    assert max(i.attempts for i in ob.list_deliveries(real_store, limit=1000)) > 1
    assert_partner_holds_each_once(sekmet, total)


def test_worker_killed_after_the_partner_committed(
    real_store: Store,
    sekmet: SekmetServer,
    tmp_path: Path,
    loopback_partner: Callable[..., LoopbackPartner],
    workers: Callable[[Path], Workers],
) -> None:
    # The 5th request reaches the partner and commits; its answer is held back, and the worker
    # is killed (SIGKILL) while it waits: the delivery is in flight, and already at the partner.
    proxy = loopback_partner(upstream=sekmet.base, hold_request=5)
    partners = partner(proxy.url, timeout_seconds=1)
    enqueue_artifacts(real_store, partners, range(ARTIFACTS))
    config = tmp_path / "kat.toml"
    config.write_text(f'[partners.ehr]\nbase_url = "{proxy.url}"\ntimeout_seconds = 1\n')
    pool = workers(config)
    args = ("--batch-size", "4", "--lease-seconds", "5", "--idle-seconds", "0.05")

    first = pool.start("first", *args)
    assert proxy.committed.wait(timeout=60)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL
    proxy.release.set()
    in_flight = ob.list_deliveries(real_store, status="in-flight", limit=100)
    assert in_flight, "the killed worker's claim is still in flight"

    second = pool.start("second", *args)
    wait_for(lambda: finished(real_store), 90, "recovery after the lease expired", step=0.1)
    assert pool.stop(second) == 0

    assert ob.stats(real_store).dead == 0
    assert_partner_holds_each_once(sekmet, ARTIFACTS)
    # The delivery whose answer was lost was sent again, and the partner recognised every
    # resource in it (conditional create matched): a retry, not a duplicate.
    assert proxy.held_delivery is not None
    resent = ob.get_delivery(real_store, proxy.held_delivery)
    assert resent.status == "delivered" and resent.attempts >= 2
    assert resent.partner_response is not None
    assert {e["status"] for e in resent.partner_response} == {"200 OK"}
    # One more request than deliveries (more only if a slow answer timed out on the way).
    assert proxy.requests >= ARTIFACTS + 1
