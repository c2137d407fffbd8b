"""The worker against ``responses`` partners, on SQLite and PostgreSQL: outcomes become the
right outbox states, a failing partner is paused for the rest of the batch, consent is
checked at send time, and the loop is bounded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses

from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.bundles import to_transaction
from fhir_kat.exchange.worker import DeliveryWorker, RunReport, main
from fhir_kat.store import Store

from .conftest import BASE, ManualClock, artifact, make_partner

OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "processing", "diagnostics": "rule 7"}],
}


def ok_response(request: Any) -> tuple[int, dict[str, str], str]:
    sent = json.loads(request.body)
    entries = [
        {"response": {"status": "201 Created", "location": f"{e['request']['url']}/{i}/_history/1"}}
        for i, e in enumerate(sent["entry"])
    ]
    body = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
    return 200, {"Content-Type": "application/fhir+json"}, json.dumps(body)


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def fill(store: Store, n: int, partner: str = "ehr", start: int = 0, **kw: Any) -> list[int]:
    ids = []
    with store.write() as tx:
        for i in range(start, start + n):
            bundle = to_transaction(artifact(i), "conditional-create")
            ids.append(ob.enqueue(tx, partner, "bundle", bundle, f"pt-{i}", **kw))
    return ids


def worker(store: Store, clock: ManualClock, gate: Any = None, **kw: Any) -> DeliveryWorker:
    partners = {"ehr": make_partner(max_attempts=3, backoff_base_seconds=1, backoff_cap_seconds=4)}
    return DeliveryWorker(
        store, partners, gate or (lambda _c: True), clock, lambda _s: None, worker_id="t", **kw
    )


def test_delivers_and_records_partner_ids(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    ids = fill(store, 4)
    rsps.add_callback(responses.POST, BASE, callback=ok_response)
    report = worker(store, clock).run_once()
    assert report == RunReport(claimed=4, delivered=4)
    info = ob.get_delivery(store, ids[0])
    assert info.status == "delivered" and info.partner_response is not None
    assert info.partner_response[0]["type"] == "Patient"
    assert info.partner_response[0]["fullUrl"].startswith("urn:uuid:")
    assert len(rsps.calls) == 4


def test_an_outage_pauses_the_partner_for_the_rest_of_the_batch(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    ids = fill(store, 5)
    rsps.post(BASE, status=503)
    report = worker(store, clock).run_once()
    assert report == RunReport(claimed=5, retried=1, released=4)
    assert len(rsps.calls) == 1  # one timeout's worth, not five
    infos = {i: ob.get_delivery(store, i) for i in ids}
    assert infos[ids[0]].attempts == 1
    assert all(infos[i].attempts == 0 and infos[i].status == "pending" for i in ids[1:])
    # They all wait for the same moment, then go.
    assert len({infos[i].next_attempt_at for i in ids}) == 1
    rsps.replace(responses.POST, BASE, status=200)
    rsps.add_callback(responses.POST, BASE, callback=ok_response)
    clock.advance(2)
    assert worker(store, clock).run_once().delivered == 5


def test_429_waits_as_long_as_the_partner_says(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    (did,) = fill(store, 1)
    rsps.post(BASE, status=429, headers={"Retry-After": "600"})
    worker(store, clock).run_once()
    info = ob.get_delivery(store, did)
    assert info.status == "pending"
    assert (info.next_attempt_at - clock.now.replace(tzinfo=None)).total_seconds() == 600
    assert info.last_error is not None and info.last_error["issue"][0]["code"] == "throttled"


@pytest.mark.parametrize("status", [400, 412, 422])
def test_refusals_are_dead_lettered_with_the_outcome(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock, status: int
) -> None:
    (did,) = fill(store, 1)
    rsps.post(BASE, status=status, json=OUTCOME)
    assert worker(store, clock).run_once().dead == 1
    info = ob.get_delivery(store, did)
    assert info.status == "dead" and info.last_error == OUTCOME and info.attempts == 1


def test_transient_failures_end_dead_after_max_attempts(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    (did,) = fill(store, 1)
    rsps.post(BASE, status=500)
    w = worker(store, clock)
    for _ in range(3):
        w.run_once()
        clock.advance(10)
    assert ob.get_delivery(store, did).status == "dead"
    assert len(rsps.calls) == 3


def test_consent_gate_at_send_time(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    check = {"patient": "pt-0", "actor": "org|HA-ISLAND", "purpose": "TREAT"}
    denied, allowed = fill(store, 2, consent_check=check)
    (unchecked,) = fill(store, 1, start=2)
    rsps.add_callback(responses.POST, BASE, callback=ok_response)
    seen: list[dict[str, Any]] = []

    def gate(c: dict[str, Any]) -> bool:
        seen.append(c)
        return len(seen) > 2  # no, and no again when asked under the consent lock; then yes

    report = worker(store, clock, gate).run_once()
    assert report == RunReport(claimed=3, delivered=2, blocked=1)
    assert seen == [check, check, check]
    assert ob.get_delivery(store, denied).status == "blocked-consent"
    assert ob.get_delivery(store, allowed).status == "delivered"
    assert ob.get_delivery(store, unchecked).status == "delivered"
    assert len(rsps.calls) == 2


def test_an_unavailable_consent_decision_retries_and_sends_nothing(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    (did,) = fill(store, 1, consent_check={"patient": "pt-0"})

    def broken(_c: dict[str, Any]) -> bool:
        raise ConnectionError("consent service down")

    assert worker(store, clock, broken).run_once().retried == 1
    assert ob.get_delivery(store, did).status == "pending"
    assert len(rsps.calls) == 0


def test_run_is_bounded_and_sleeps_when_idle(store: Store, clock: ManualClock) -> None:
    import threading

    sleeps: list[float] = []
    w = DeliveryWorker(
        store,
        {"ehr": make_partner()},
        lambda _c: True,
        clock,
        sleeps.append,
        idle_seconds=0.5,
    )
    assert w.run(threading.Event(), max_iterations=3) == 3
    assert sleeps == [0.5, 0.5, 0.5]
    stop = threading.Event()
    stop.set()
    assert w.run(stop) == 0


def test_lease_must_outlast_a_send(store: Store, clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="lease_seconds"):
        worker(store, clock, lease_seconds=30)


def test_main_runs_one_batch_from_the_configuration(
    database_url: str,
    store: Store,
    tmp_path: Path,
    rsps: responses.RequestsMock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fill(store, 3)
    cfg = tmp_path / "kat.toml"
    cfg.write_text(f'[partners.ehr]\nbase_url = "{BASE}"\n')
    monkeypatch.setenv("FHIR_KAT_CONFIG", str(cfg))
    monkeypatch.setenv("FHIR_KAT_DATABASE_URL", database_url)
    monkeypatch.setattr("fhir_kat.logging.configure_logging", lambda _level: None)
    rsps.add_callback(responses.POST, BASE, callback=ok_response)
    assert main(["--once", "--worker-id", "cli"]) == 0
    assert ob.stats(store).pending == 0 and len(rsps.calls) == 3


def test_main_refuses_a_bad_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "kat.toml"
    cfg.write_text('[partners.ehr]\nbase_url = "ftp://nope"\n')
    monkeypatch.setenv("FHIR_KAT_CONFIG", str(cfg))
    assert main(["--once"]) == 2
    assert "[partners.ehr].base_url" in capsys.readouterr().err
    cfg.write_text("[service]\n")
    # Without partners the worker still has Subscriptions to serve, unless told not to.
    assert main(["--once", "--no-subscriptions"]) == 2
    assert "nothing to deliver" in capsys.readouterr().err


def test_the_wire_form_is_decided_when_sent_and_an_impossible_one_is_dead_lettered(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    """Outbound never vetoes inbound: a resource without a business identifier is queued like
    any other; at send time it goes by PUT with our id (default), or — for a partner that takes
    conditional creates only — the delivery is dead-lettered with a reason naming the resource
    and the setting, and nothing is sent."""
    from fhir_kat.exchange.routing import enqueue_artifact

    art = artifact(1)
    del art["entry"][1]["resource"]["identifier"]
    partners = {
        "ehr": make_partner(),
        "strict": make_partner("strict", without_identifier="dead-letter"),
    }
    with store.write() as tx:
        queued = enqueue_artifact(tx, partners, "screenings", art, "pt-1")
    rsps.add_callback(responses.POST, BASE, callback=ok_response)
    w = DeliveryWorker(store, partners, lambda _c: True, clock, lambda _s: None, worker_id="t")
    report = w.run_once()
    assert (report.delivered, report.dead) == (1, 1)
    sent = json.loads(rsps.calls[0].request.body)
    methods = [e["request"]["method"] for e in sent["entry"]]
    assert methods == ["POST", "PUT", "POST"]
    dead = ob.get_delivery(store, queued["strict"])
    assert dead.status == "dead" and dead.last_error is not None
    first, second = dead.last_error["issue"][:2]
    assert "partner strict cannot take this delivery" in first["diagnostics"]
    assert "the stored record is unchanged" in first["diagnostics"]
    assert second["expression"] == ["Bundle.entry[1].resource.identifier"]
    assert len(rsps.calls) == 1  # nothing went to the strict partner


def _first_url(i: int) -> str:
    return str(to_transaction(artifact(i), "conditional-create")["entry"][0]["fullUrl"])


def _same_patient(store: Store, n: int, check: dict[str, Any] | None) -> list[int]:
    """``n`` deliveries of one patient (``pt-0``) for partner ``ehr``, in order."""
    with store.write() as tx:
        return [
            ob.enqueue(
                tx,
                "ehr",
                "bundle",
                to_transaction(artifact(i), "conditional-create"),
                "pt-0",
                consent_check=check,
            )
            for i in range(n)
        ]


def test_the_periodic_recheck_releases_what_consent_now_permits_in_order(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    """The safety net behind the Consent write's requeue: blocked rows the gate now permits
    are released and go out in their original order; ones it still refuses stay blocked."""
    check = {"patient": "pt-0", "actor": "org|HA", "purpose": "HOPERAT"}
    ids = _same_patient(store, 3, check)
    other = fill(store, 1, start=5, consent_check={"patient": "pt-5", "purpose": "HOPERAT"})
    rsps.add_callback(responses.POST, BASE, callback=ok_response)
    permitted: set[str] = set()
    w = worker(store, clock, lambda c: c["patient"] in permitted)
    for _ in range(5):
        w.run_once()
    assert {ob.get_delivery(store, i).status for i in ids + other} == {"blocked-consent"}
    permitted.add("pt-0")  # a Consent whose own requeue was lost
    assert w.recheck_blocked() == 3
    assert ob.get_delivery(store, other[0]).status == "blocked-consent"
    for _ in range(5):
        w.run_once()
    sent = [json.loads(c.request.body)["entry"][0]["fullUrl"] for c in rsps.calls]
    assert sent == [_first_url(i) for i in range(3)]
    assert [ob.get_delivery(store, i).status for i in ids] == ["delivered"] * 3


def test_run_rechecks_blocked_rows_periodically(store: Store, clock: ManualClock) -> None:
    import threading

    check = {"patient": "pt-0", "purpose": "HOPERAT"}
    (did,) = _same_patient(store, 1, check)
    with store.write() as tx:
        tx.conn.execute(
            ob.outbox.update().where(ob.outbox.c.id == did).values(status=ob.BLOCKED_CONSENT)
        )
    asked: list[dict[str, Any]] = []

    def gate(c: dict[str, Any]) -> bool:
        asked.append(c)
        return False

    w = worker(store, clock, gate, recheck_blocked_seconds=60)
    w.run(threading.Event(), max_iterations=3)  # the clock stands still: one re-check
    assert asked == [check]
    clock.advance(61)
    w.run(threading.Event(), max_iterations=1)
    assert asked == [check, check]


def test_a_released_earlier_delivery_keeps_its_place(
    store: Store, clock: ManualClock, rsps: responses.RequestsMock
) -> None:
    """The referral (with the Patient) was blocked; a later delivery of the same patient is
    being sent when a Consent releases the referral: the later one goes back unsent, and the
    referral goes first."""
    check = {"patient": "pt-0", "purpose": "HOPERAT"}
    first, later = _same_patient(store, 2, check)
    with store.write() as tx:
        tx.conn.execute(
            ob.outbox.update().where(ob.outbox.c.id == first).values(status=ob.BLOCKED_CONSENT)
        )
    rsps.add_callback(responses.POST, BASE, callback=ok_response)

    def gate(c: dict[str, Any]) -> bool:
        # The Consent commits (and releases the referral) while the later one is in flight.
        ob.release_blocked(store, [first])
        return True

    report = worker(store, clock, gate).run_once()
    assert report.claimed == 1 and report.released == 1 and len(rsps.calls) == 0
    assert ob.get_delivery(store, later).attempts == 0  # the unsent claim is taken back
    w = worker(store, clock)
    for _ in range(3):
        w.run_once()
    sent = [json.loads(c.request.body)["entry"][0]["fullUrl"] for c in rsps.calls]
    assert sent == [_first_url(0), _first_url(1)]
