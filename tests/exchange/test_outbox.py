"""The outbox on SQLite and PostgreSQL: transactional enqueue, claims, per-patient ordering,
leases, retry timing, dead letters and operator actions."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from fhir_kat.errors import BadRequest, Conflict, NotFound
from fhir_kat.exchange import outbox as ob
from fhir_kat.exchange.outbox import RetryPolicy, outbox
from fhir_kat.store import Store

from .conftest import ManualClock

PAYLOAD = {"resourceType": "Bundle", "type": "transaction", "entry": []}


def put(store: Store, partner: str = "ehr", patient: str | None = "p1", **kw: object) -> int:
    with store.write() as tx:
        return ob.enqueue(
            tx, partner, "bundle", {**PAYLOAD, "id": f"{partner}-{patient}"}, patient, **kw
        )  # type: ignore[arg-type]


def count(store: Store) -> int:
    with store.read() as tx:
        return int(tx.conn.execute(select(func.count()).select_from(outbox)).scalar_one())


def test_enqueue_commits_and_rolls_back_with_the_callers_transaction(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write() as tx:
        ob.enqueue(tx, "ehr", "bundle", PAYLOAD, "p1")
        raise RuntimeError("the artifact write failed after the enqueue")
    assert count(store) == 0
    did = put(store, consent_check={"patient": "p1", "actor": "org|HA", "purpose": "TREAT"})
    info = ob.get_delivery(store, did)
    assert (info.status, info.attempts, info.partner, info.patient_key) == (
        "pending",
        0,
        "ehr",
        "p1",
    )
    with pytest.raises(ValueError, match="kind"), store.write() as tx:
        ob.enqueue(tx, "ehr", "fax", PAYLOAD, "p1")


def test_claim_takes_due_rows_in_id_order_once(store: Store) -> None:
    ids = [put(store, patient=f"p{i}") for i in range(5)]
    batch = ob.claim(store, "w1", 3)
    assert [d.id for d in batch] == ids[:3]
    assert all(d.attempts == 1 and d.payload["type"] == "transaction" for d in batch)
    rest = ob.claim(store, "w2", 10)
    assert [d.id for d in rest] == ids[3:]
    assert ob.claim(store, "w3", 10) == []
    assert ob.get_delivery(store, ids[0]).claimed_by == "w1"


def test_per_patient_ordering(store: Store, clock: ManualClock) -> None:
    a1 = put(store, patient="A")
    a2 = put(store, patient="A")
    b1 = put(store, patient="B")
    a_other = put(store, partner="other", patient="A")
    unordered = [put(store, patient=None), put(store, patient=None)]
    first = ob.claim(store, "w", 10)
    assert [d.id for d in first] == [a1, b1, a_other, *unordered]
    # A's second delivery waits while the first is in flight ...
    assert ob.claim(store, "w", 10) == []
    by_id = {d.id: d for d in first}
    # ... and while it waits for a retry ...
    policy = RetryPolicy(max_attempts=5, base_seconds=10, cap_seconds=10)
    assert ob.mark_retry(store, by_id[a1], "HTTP 503", policy=policy).status == "pending"
    assert ob.claim(store, "w", 10) == []
    # ... and goes once the first is delivered.
    clock.advance(11)
    again = ob.claim(store, "w", 10)
    assert [d.id for d in again] == [a1]
    assert ob.mark_delivered(store, again[0], [{"type": "Patient", "id": "9"}])
    assert [d.id for d in ob.claim(store, "w", 10)] == [a2]


def test_a_final_failure_does_not_block_the_patients_later_deliveries(store: Store) -> None:
    first, second, third = put(store), put(store), put(store)
    (d,) = ob.claim(store, "w", 10)
    assert ob.mark_dead(store, d, {"resourceType": "OperationOutcome", "issue": []})
    (d2,) = ob.claim(store, "w", 10)
    assert d2.id == second
    assert ob.mark_blocked(store, d2, "consent withdrawn")
    (d3,) = ob.claim(store, "w", 10)
    assert d3.id == third and first < second < third


def test_lease_expiry_recovers_a_dead_workers_claim(store: Store, clock: ManualClock) -> None:
    did = put(store)
    (stale,) = ob.claim(store, "crashed", 1, lease_seconds=60)
    clock.advance(59)
    assert ob.claim(store, "w2", 1, lease_seconds=60) == []
    clock.advance(2)
    (fresh,) = ob.claim(store, "w2", 1, lease_seconds=60)
    assert fresh.id == did and fresh.attempts == 2
    # The old claim is fenced off: its late outcome is not recorded.
    assert not ob.mark_delivered(store, stale, [])
    assert not ob.mark_dead(store, stale, "late")
    assert ob.mark_delivered(store, fresh, [{"id": "x"}])
    assert ob.get_delivery(store, did).status == "delivered"


def test_renew_keeps_a_lease_alive(store: Store, clock: ManualClock) -> None:
    ids = [put(store, patient=f"p{i}") for i in range(3)]
    batch = ob.claim(store, "w1", 3, lease_seconds=60)
    clock.advance(50)
    assert ob.renew(store, batch[1:]) == set(ids[1:])
    clock.advance(20)
    taken = ob.claim(store, "w2", 3, lease_seconds=60)
    assert [d.id for d in taken] == [ids[0]]  # only the one not renewed
    assert ob.renew(store, batch) == set(ids[1:])


def test_backoff_is_full_jitter_and_retry_after_wins() -> None:
    policy = RetryPolicy(max_attempts=10, base_seconds=2, cap_seconds=60)
    rng = random.Random(7)
    for attempts, ceiling in ((1, 2), (2, 4), (3, 8), (6, 60), (40, 60)):
        delays = [ob.backoff_delay(attempts, policy, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range, not clustered
    assert ob.backoff_delay(1, policy, retry_after=120, rng=rng) == 120
    assert ob.backoff_delay(6, policy, retry_after=0.001, rng=random.Random(1)) > 0.001


def test_retries_until_max_attempts_then_dead(store: Store, clock: ManualClock) -> None:
    did = put(store)
    policy = RetryPolicy(max_attempts=3, base_seconds=1, cap_seconds=1)
    outcomes = []
    for _ in range(3):
        (d,) = ob.claim(store, "w", 1)
        decision = ob.mark_retry(store, d, "timeout", policy=policy, retry_after=5)
        outcomes.append(decision.status)
        if decision.next_attempt_at is not None:
            assert decision.next_attempt_at == (clock.now + timedelta(seconds=5)).replace(
                tzinfo=None
            )
        clock.advance(5)
    assert outcomes == ["pending", "pending", "dead"]
    info = ob.get_delivery(store, did)
    assert info.status == "dead" and info.attempts == 3
    assert info.last_error is not None
    assert info.last_error["issue"][0]["diagnostics"] == "timeout"


def test_release_gives_the_attempt_back(store: Store, clock: ManualClock) -> None:
    did = put(store)
    (d,) = ob.claim(store, "w", 1)
    assert ob.release(store, d, clock.now + timedelta(seconds=30))
    info = ob.get_delivery(store, did)
    assert (info.status, info.attempts) == ("pending", 0)
    assert ob.claim(store, "w", 1) == []
    clock.advance(30)
    assert [x.id for x in ob.claim(store, "w", 1)] == [did]


def test_dead_letters_keep_the_partners_outcome_and_can_be_retried(store: Store) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "expression": ["Observation.code"]}],
    }
    ids = [put(store, patient=f"p{i}") for i in range(3)]
    for d in ob.claim(store, "w", 3):
        ob.mark_dead(store, d, outcome)
    dead = ob.list_deliveries(store, status="dead")
    assert [i.id for i in dead] == sorted(ids, reverse=True)
    assert dead[0].last_error == outcome
    assert "payload" not in dead[0].to_json()
    requeued = ob.requeue(store, ids[0])
    assert (requeued.status, requeued.attempts) == ("pending", 0)
    assert ob.retry_dead(store, partner="nobody") == ob.RetryDeadResult(0, [])
    assert ob.retry_dead(store) == ob.RetryDeadResult(2, [])
    assert ob.stats(store).dead == 0 and ob.stats(store).pending == 3


def test_cancel_and_its_refusals(store: Store) -> None:
    waiting = put(store, patient="A")
    flying = put(store, patient="B")
    assert ob.cancel(store, waiting).status == "cancelled"
    (d,) = ob.claim(store, "w", 5)
    assert d.id == flying
    with pytest.raises(Conflict, match="in-flight"):
        ob.cancel(store, flying)
    with pytest.raises(NotFound):
        ob.cancel(store, 999_999)
    with pytest.raises(Conflict):
        ob.requeue(store, flying)
    assert ob.requeue(store, waiting).status == "pending"
    with pytest.raises(BadRequest):
        ob.list_deliveries(store, status="lost")
    with pytest.raises(BadRequest):
        ob.list_deliveries(store, limit=0)


def test_stats(store: Store, clock: ManualClock) -> None:
    assert ob.stats(store).to_json() == {
        "pending": 0,
        "inFlight": 0,
        "dead": 0,
        "blockedConsent": 0,
        "oldestPendingAgeSeconds": 0.0,
    }
    put(store, patient="A")
    clock.advance(30)
    put(store, patient="B")
    put(store, partner="other", patient="C")
    clock.advance(15)
    (d, *_rest) = ob.claim(store, "w", 1)
    ob.mark_dead(store, d, "x")
    s = ob.stats(store)
    assert (s.pending, s.in_flight, s.dead) == (2, 0, 1)
    assert s.oldest_pending_age_seconds == 15
    assert ob.stats(store, partner="other").pending == 1


def test_claim_only_for_the_given_partners(store: Store) -> None:
    put(store, partner="a", patient="x")
    b = put(store, partner="b", patient="x")
    assert [d.id for d in ob.claim(store, "w", 5, partners=["b"])] == [b]
    assert ob.claim(store, "w", 5, partners=[]) == []


def test_concurrent_claimers_take_disjoint_sets(store: Store) -> None:
    total = 120
    with store.write() as tx:
        for i in range(total):
            ob.enqueue(tx, "ehr", "bundle", PAYLOAD, f"p{i}")
    claimed: list[list[int]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4, timeout=30)

    def work(n: int) -> None:
        barrier.wait()
        for _ in range(200):  # bounded: 120 rows in batches of 3 need far fewer
            batch = ob.claim(store, f"w{n}", 3)
            if not batch:
                return
            claimed[n] += [d.id for d in batch]
            time.sleep(0.005)  # "sending": gives the other claimers their turn

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    everything = [i for ids in claimed for i in ids]
    assert len(everything) == len(set(everything)) == total
    assert sum(1 for ids in claimed if ids) >= 2


def test_claim_serves_partner_prefixes_and_in_flight_can_be_cancelled(store: Store) -> None:
    put(store, partner="ehr", patient="x")
    hook = put(store, partner="subscription:s1", patient="subscriber")
    put(store, partner="subscriptionist", patient="x")  # a configured name, not a prefix match
    got = ob.claim(store, "w", 5, partners=[], partner_prefixes=[ob.SUBSCRIPTION_PREFIX])
    assert [d.id for d in got] == [hook]
    assert ob.mark_cancelled(store, got[0], "the subscription no longer exists")
    info = ob.get_delivery(store, hook)
    assert info.status == ob.CANCELLED and info.last_error is not None
    assert info.last_error["issue"][0]["code"] == "not-found"
    assert not ob.mark_cancelled(store, got[0], "again")  # the lease is gone


def test_requeue_blocked_releases_only_that_patients_deliveries(store: Store) -> None:
    ids = {}
    for patient in ("p1", "p2"):
        check = {"patient": patient, "partner": "ehr", "actor": None, "purpose": "HOPERAT"}
        ids[patient] = put(store, patient=patient, consent_check=check)
    for d in ob.claim(store, "w", 5):
        assert ob.mark_blocked(store, d, "no consent")
    with store.write() as tx:
        assert ob.requeue_blocked(tx, "p2") == 1
        assert ob.requeue_blocked(tx, "p3") == 0
    assert ob.get_delivery(store, ids["p1"]).status == ob.BLOCKED_CONSENT
    again = ob.get_delivery(store, ids["p2"])
    assert again.status == ob.PENDING and again.attempts == 0


def test_retry_refuses_what_a_later_delivery_superseded_unless_forced(store: Store) -> None:
    """Sent after a later delivery of the same patient, an older one would replace the newer
    content at the partner (PUT, or the conditional update of a later version)."""
    old, new, other = put(store, patient="A"), put(store, patient="A"), put(store, patient="B")
    claimed = {d.id: d for d in ob.claim(store, "w", 5)}
    assert set(claimed) == {old, other}  # the newer one waits behind the older
    ob.mark_dead(store, claimed[old], "HTTP 400")
    ob.mark_dead(store, claimed[other], "HTTP 400")
    (d,) = ob.claim(store, "w", 5)
    assert d.id == new
    ob.mark_delivered(store, d)
    with pytest.raises(Conflict, match="newer one"):
        ob.requeue(store, old)
    assert ob.retry_dead(store) == ob.RetryDeadResult(1, [old])  # other goes, old stays dead
    assert ob.get_delivery(store, old).status == "dead"
    assert ob.retry_dead(store, force=True) == ob.RetryDeadResult(1, [])
    assert ob.get_delivery(store, old).status == "pending"
