"""The transactional outbox: every delivery to a partner, from enqueue to a final state.

Owns: the ``outbox`` table (on the store's ``MetaData``, so ``Store.create_schema()`` creates it
once this module is imported), the delivery state machine, claiming with leases, per-patient
ordering, retry timing (exponential backoff with full jitter; a larger ``Retry-After`` wins), and
the operator actions (cancel, requeue, retry dead, stats, listing).

States::

    pending ──claim──▶ in-flight ──▶ delivered
       ▲                  │  ├─────▶ dead             (permanent refusal, or attempts used up)
       │   retry/release  │  └─────▶ blocked-consent  (the consent gate said no at send time)
       └──────────────────┘
    pending | dead | blocked-consent ──cancel──▶ cancelled
    in-flight ──────────────────────────────────▶ cancelled   (its destination is gone)
    dead | blocked-consent | cancelled ──requeue──▶ pending
    blocked-consent ──a Consent for the patient is written──▶ pending

Must not: make HTTP calls or decide what a partner's answer means (``client.py`` does), hold a
database transaction open across a network call, or put PHI into ``last_error`` beyond the
partner's own OperationOutcome. ``enqueue`` runs inside the caller's write transaction so an
artifact and its deliveries commit or roll back together.

See ``docs/adr/0004-outbox.md`` for why it works this way.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    ColumnElement,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)

from fhir_kat.errors import BadRequest, Conflict, NotFound
from fhir_kat.exchange.partners import PartnerConfig
from fhir_kat.store import Store, Tx
from fhir_kat.store.schema import SeqType, metadata

PENDING = "pending"
IN_FLIGHT = "in-flight"
DELIVERED = "delivered"
DEAD = "dead"
CANCELLED = "cancelled"
BLOCKED_CONSENT = "blocked-consent"
STATUSES = (PENDING, IN_FLIGHT, DELIVERED, DEAD, CANCELLED, BLOCKED_CONSENT)
#: States a later delivery for the same partner and patient waits behind.
ACTIVE = (PENDING, IN_FLIGHT)
#: ``rest-hook``: an R4 Subscription notification; its partner is ``subscription:<id>``.
#: ``artifact`` / ``referral-status``: resources as stored, put in the partner's wire form
#: when sent (``routing.wire_form``); ``bundle`` / ``notification``: sent as queued.
ARTIFACT = "artifact"
REFERRAL_STATUS_KIND = "referral-status"
KINDS = ("bundle", "notification", "rest-hook", ARTIFACT, REFERRAL_STATUS_KIND)
#: Partner names of dynamic destinations (resolved at send time, not configured).
SUBSCRIPTION_PREFIX = "subscription:"
#: Largest ``last_error`` kept; a partner's OperationOutcome beyond it is summarised.
MAX_ERROR_CHARS = 32_000

outbox = Table(
    "outbox",
    metadata,
    Column("id", SeqType, primary_key=True, autoincrement=True),
    Column("partner", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    # Ordering key (our Patient id). NULL: the delivery waits behind nothing.
    Column("patient_key", String(128), nullable=True),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime, nullable=False),
    Column("claimed_by", String(128), nullable=True),
    Column("claimed_at", DateTime, nullable=True),
    # Fencing token of the current claim: a worker whose lease was taken over cannot mark.
    Column("lease_token", String(32), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("partner_response", Text, nullable=True),
    Column("consent_check", Text, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("delivered_at", DateTime, nullable=True),
    Index("ix_outbox_due", "status", "next_attempt_at"),
    Index("ix_outbox_order", "partner", "patient_key", "id"),
    # A Consent's re-queue of what waited for it (``requeue_blocked``): one lookup per branch
    # of its OR, whatever the size of the outbox's history (issue 25).
    Index("ix_outbox_blocked_patient", "status", "patient_key"),
    Index("ix_outbox_blocked_kind", "status", "kind"),
    # The admins' list of one status, newest first: read in index order, stops at the page.
    Index("ix_outbox_status", "status", "id"),
)


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery, as a worker sees it."""

    id: int
    partner: str
    kind: str
    patient_key: str | None
    payload: dict[str, Any]
    attempts: int  # including the one this claim starts
    lease_token: str
    consent_check: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class DeliveryInfo:
    """A delivery as operators see it: everything but the payload (which is PHI)."""

    id: int
    partner: str
    kind: str
    patient_key: str | None
    status: str
    attempts: int
    next_attempt_at: datetime
    claimed_by: str | None
    last_error: dict[str, Any] | None
    partner_response: list[dict[str, Any]] | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "partner": self.partner,
            "kind": self.kind,
            "patientKey": self.patient_key,
            "status": self.status,
            "attempts": self.attempts,
            "nextAttemptAt": _iso(self.next_attempt_at),
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(self.updated_at),
        }
        if self.delivered_at is not None:
            out["deliveredAt"] = _iso(self.delivered_at)
        if self.claimed_by is not None:
            out["claimedBy"] = self.claimed_by
        if self.last_error is not None:
            out["lastError"] = self.last_error
        if self.partner_response is not None:
            out["partnerResponse"] = self.partner_response
        return out


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    in_flight: int
    dead: int
    blocked_consent: int
    #: Age of the oldest pending or in-flight delivery (0 when there is none).
    oldest_pending_age_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "inFlight": self.in_flight,
            "dead": self.dead,
            "blockedConsent": self.blocked_consent,
            "oldestPendingAgeSeconds": round(self.oldest_pending_age_seconds, 3),
        }


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 12
    base_seconds: float = 2.0
    cap_seconds: float = 3600.0

    @classmethod
    def for_partner(cls, partner: PartnerConfig) -> RetryPolicy:
        return cls(partner.max_attempts, partner.backoff_base_seconds, partner.backoff_cap_seconds)


@dataclass(frozen=True)
class RetryDecision:
    status: str  # PENDING (will retry) or DEAD (attempts used up); "" when the lease was lost
    next_attempt_at: datetime | None = None


# ---------------------------------------------------------------------------- enqueue


def enqueue(
    tx: Tx,
    partner: str,
    kind: str,
    payload: Mapping[str, Any],
    patient_key: str | None,
    consent_check: Mapping[str, Any] | None = None,
) -> int:
    """Add a delivery in the caller's write transaction; returns its id.

    Call it in the same ``Store.write()`` that stores the artifact: both commit or neither does.
    """
    if not partner or len(partner) > 64:
        raise ValueError("partner must be a name of 1 to 64 characters")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if patient_key is not None and (not patient_key or len(patient_key) > 128):
        raise ValueError("patient_key must be None or 1 to 128 characters")
    if patient_key is not None:
        # Deliveries of one patient must commit in id order, or a worker could see id 6
        # (committed) before id 5 (still in its transaction) and send them out of order.
        tx.lock(f"outbox:{partner}:{patient_key}")
    now = _now(tx.store)
    result = tx.conn.execute(
        insert(outbox).values(
            partner=partner,
            kind=kind,
            patient_key=patient_key,
            payload=_dumps(payload),
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            consent_check=_dumps(consent_check) if consent_check is not None else None,
            created_at=now,
            updated_at=now,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


# ---------------------------------------------------------------------------- claiming


def claim(
    target: Store | Tx,
    worker_id: str,
    limit: int,
    *,
    lease_seconds: float = 300.0,
    partners: Collection[str] | None = None,
    now: datetime | None = None,
    partner_prefixes: Collection[str] = (),
) -> list[Delivery]:
    """Take up to ``limit`` due deliveries for ``worker_id`` (in id order).

    ``partners`` (None = any) and ``partner_prefixes`` (e.g. ``subscription:``) together name
    the destinations this worker serves.

    Due: ``pending`` with ``next_attempt_at`` reached, or ``in-flight`` whose lease (started at
    the claim) is older than ``lease_seconds`` — a worker that died mid-send. Never a delivery
    with an earlier pending or in-flight delivery for the same partner and patient. PostgreSQL:
    ``FOR UPDATE SKIP LOCKED``, so concurrent workers take disjoint rows without waiting;
    SQLite: ``Store.write()`` is ``BEGIN IMMEDIATE``, one claimer at a time.
    """
    if limit < 1:
        return []
    if isinstance(target, Tx):
        return _claim(target, worker_id, limit, lease_seconds, partners, now, partner_prefixes)
    with target.write() as tx:
        return _claim(tx, worker_id, limit, lease_seconds, partners, now, partner_prefixes)


def _claim(
    tx: Tx,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    partners: Collection[str] | None,
    now: datetime | None,
    partner_prefixes: Collection[str] = (),
) -> list[Delivery]:
    moment = _naive(now) if now is not None else _now(tx.store)
    row, earlier = outbox.alias("o"), outbox.alias("earlier")
    due = or_(
        and_(row.c.status == PENDING, row.c.next_attempt_at <= moment),
        and_(
            row.c.status == IN_FLIGHT,
            row.c.claimed_at < moment - timedelta(seconds=lease_seconds),
        ),
    )
    waits = exists().where(
        earlier.c.partner == row.c.partner,
        earlier.c.patient_key == row.c.patient_key,
        earlier.c.id < row.c.id,
        earlier.c.status.in_(ACTIVE),
    )
    stmt = select(row.c.id).where(due, ~waits).order_by(row.c.id).limit(limit)
    if partners is not None:
        if not partners and not partner_prefixes:
            return []
        served: list[ColumnElement[bool]] = (
            [row.c.partner.in_(sorted(partners))] if partners else []
        )
        served += [row.c.partner.startswith(p, autoescape=True) for p in sorted(partner_prefixes)]
        stmt = stmt.where(or_(*served))
    if not tx.store.is_sqlite:
        stmt = stmt.with_for_update(skip_locked=True)
    ids = [int(r.id) for r in tx.conn.execute(stmt)]
    if not ids:
        return []
    token = uuid.uuid4().hex
    tx.conn.execute(
        update(outbox)
        .where(outbox.c.id.in_(ids))
        .values(
            status=IN_FLIGHT,
            claimed_by=worker_id[:128],
            claimed_at=moment,
            lease_token=token,
            attempts=outbox.c.attempts + 1,
            updated_at=moment,
        )
    )
    rows = tx.conn.execute(select(outbox).where(outbox.c.id.in_(ids)).order_by(outbox.c.id))
    return [
        Delivery(
            id=int(r.id),
            partner=r.partner,
            kind=r.kind,
            patient_key=r.patient_key,
            payload=json.loads(r.payload),
            attempts=int(r.attempts),
            lease_token=token,
            consent_check=json.loads(r.consent_check) if r.consent_check else None,
            created_at=r.created_at,
        )
        for r in rows
    ]


def renew(store: Store, deliveries: Sequence[Delivery], now: datetime | None = None) -> set[int]:
    """Restart the lease of deliveries this worker still holds; returns their ids.

    A worker renews the rest of its batch before each send, so the lease only has to outlast one
    send, not a whole batch; a delivery another worker took over is left out.
    """
    if not deliveries:
        return set()
    moment = _naive(now) if now is not None else _now(store)
    held: set[int] = set()
    with store.write() as tx:
        for token in {d.lease_token for d in deliveries}:
            ids = [d.id for d in deliveries if d.lease_token == token]
            result = tx.conn.execute(
                update(outbox)
                .where(
                    outbox.c.id.in_(ids),
                    outbox.c.status == IN_FLIGHT,
                    outbox.c.lease_token == token,
                )
                .values(claimed_at=moment)
                .returning(outbox.c.id)
            )
            held.update(int(r.id) for r in result)
    return held


# ---------------------------------------------------------------------------- outcomes


def mark_delivered(
    store: Store,
    delivery: Delivery,
    partner_response: Sequence[Mapping[str, Any]] | None = None,
    now: datetime | None = None,
) -> bool:
    """Record success (with the partner's ids/versions). False: the lease was lost meanwhile."""
    moment = _naive(now) if now is not None else _now(store)
    return _finish(
        store,
        delivery,
        status=DELIVERED,
        partner_response=_dumps(list(partner_response or [])),
        last_error=None,
        delivered_at=moment,
        updated_at=moment,
    )


def mark_dead(
    store: Store,
    delivery: Delivery,
    error: Mapping[str, Any] | str,
    now: datetime | None = None,
) -> bool:
    """Dead-letter: a permanent refusal (the partner's OperationOutcome is kept)."""
    moment = _naive(now) if now is not None else _now(store)
    return _finish(store, delivery, status=DEAD, last_error=_error_text(error), updated_at=moment)


def mark_blocked(
    store: Store, delivery: Delivery, reason: str, now: datetime | None = None
) -> bool:
    """The consent gate refused at send time; nothing was sent."""
    moment = _naive(now) if now is not None else _now(store)
    return _finish(
        store,
        delivery,
        status=BLOCKED_CONSENT,
        last_error=_error_text(_outcome("forbidden", reason)),
        updated_at=moment,
    )


def consent_lock(patient: str) -> str:
    """The lock that orders a consent block and a Consent's requeue for one patient: the
    worker holds it while it records a block (after asking the gate once more), and a Consent
    write holds it while it releases that patient's blocked deliveries. Whichever comes
    second sees what the first committed, so no block outlives the Consent that lifts it."""
    return f"outbox-consent:{patient}"


def block_unless_consented(
    store: Store,
    delivery: Delivery,
    reason: str,
    recheck: Callable[[], bool],
    now: datetime | None = None,
) -> str:
    """The consent gate said no: record the block under the patient's ``consent_lock``,
    after asking ``recheck`` (the gate) once more while holding it. Returns ``BLOCKED_CONSENT``,
    ``PENDING`` (a Consent committed since the first answer: the delivery is due again now,
    the attempt taken back, at its place in the patient's order) or ``""`` (lease lost).

    Without the lock a Consent that commits between the gate's answer and the block would
    release nothing (the delivery was in flight, not blocked) and the block would stay for
    good; see ``docs/adr/0018-partner-copies-converge.md``."""
    moment = _naive(now) if now is not None else _now(store)
    patient = (delivery.consent_check or {}).get("patient")
    with store.write() as tx:
        if patient:
            tx.lock(consent_lock(str(patient)))
        if recheck():
            status = PENDING
            values: dict[str, Any] = {
                "status": PENDING,
                "next_attempt_at": moment,
                "attempts": outbox.c.attempts - 1,
                "updated_at": moment,
            }
        else:
            status = BLOCKED_CONSENT
            values = {
                "status": BLOCKED_CONSENT,
                "last_error": _error_text(_outcome("forbidden", reason)),
                "updated_at": moment,
            }
        result = tx.conn.execute(
            update(outbox)
            .where(
                outbox.c.id == delivery.id,
                outbox.c.status == IN_FLIGHT,
                outbox.c.lease_token == delivery.lease_token,
            )
            .values(lease_token=None, **values)
        )
        return status if result.rowcount == 1 else ""


def waits_behind(store: Store, delivery: Delivery) -> bool:
    """Whether an earlier delivery for the same partner and patient became due again after
    this one was claimed (a consent-blocked one released by a Consent): this one then goes
    back unsent, so the released one keeps its place (the Patient first)."""
    if delivery.patient_key is None:
        return False
    with store.read() as tx:
        found = tx.conn.execute(
            select(outbox.c.id)
            .where(
                outbox.c.partner == delivery.partner,
                outbox.c.patient_key == delivery.patient_key,
                outbox.c.id < delivery.id,
                outbox.c.status.in_(ACTIVE),
            )
            .limit(1)
        ).first()
    return found is not None


def blocked_checks(
    store: Store, *, after_id: int = 0, limit: int = 200
) -> list[tuple[int, str, dict[str, Any]]]:
    """``(id, partner, consent_check)`` of consent-blocked deliveries after ``after_id``, in
    id order: what the worker's periodic re-check asks the gate about again."""
    stmt = (
        select(outbox.c.id, outbox.c.partner, outbox.c.consent_check)
        .where(
            outbox.c.status == BLOCKED_CONSENT,
            outbox.c.id > after_id,
            outbox.c.consent_check.is_not(None),
        )
        .order_by(outbox.c.id)
        .limit(limit)
    )
    with store.read() as tx:
        return [
            (int(r.id), str(r.partner), json.loads(r.consent_check)) for r in tx.conn.execute(stmt)
        ]


def release_blocked(store: Store, ids: Collection[int], now: datetime | None = None) -> int:
    """Make these consent-blocked deliveries due again now (attempts reset; each keeps its id,
    so its place in its patient's order); returns how many were still blocked."""
    if not ids:
        return 0
    moment = _naive(now) if now is not None else _now(store)
    with store.write() as tx:
        result = tx.conn.execute(
            update(outbox)
            .where(outbox.c.id.in_(sorted(ids)), outbox.c.status == BLOCKED_CONSENT)
            .values(status=PENDING, attempts=0, next_attempt_at=moment, updated_at=moment)
        )
        return int(result.rowcount)


def mark_cancelled(
    store: Store, delivery: Delivery, reason: str, now: datetime | None = None
) -> bool:
    """The destination no longer exists (a deleted or switched-off Subscription): never sent."""
    moment = _naive(now) if now is not None else _now(store)
    return _finish(
        store,
        delivery,
        status=CANCELLED,
        last_error=_error_text(_outcome("not-found", reason)),
        updated_at=moment,
    )


def backoff_delay(
    attempts: int,
    policy: RetryPolicy,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds before the next try: full jitter over ``min(cap, base · 2^(attempts-1))``
    (spreads a crowd of retries after an outage), unless the partner's ``Retry-After`` is
    longer — then that."""
    ceiling = min(policy.cap_seconds, policy.base_seconds * 2 ** min(max(attempts - 1, 0), 62))
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def mark_retry(
    store: Store,
    delivery: Delivery,
    error: Mapping[str, Any] | str,
    *,
    policy: RetryPolicy,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    now: datetime | None = None,
) -> RetryDecision:
    """A transient failure: back to ``pending`` after a backoff, or ``dead`` once
    ``policy.max_attempts`` attempts have been made."""
    moment = _naive(now) if now is not None else _now(store)
    if delivery.attempts >= policy.max_attempts:
        ok = _finish(store, delivery, status=DEAD, last_error=_error_text(error), updated_at=moment)
        return RetryDecision(DEAD if ok else "")
    delay = backoff_delay(delivery.attempts, policy, retry_after, rng)
    when = moment + timedelta(seconds=delay)
    ok = _finish(
        store,
        delivery,
        status=PENDING,
        next_attempt_at=when,
        last_error=_error_text(error),
        updated_at=moment,
    )
    return RetryDecision(PENDING, when) if ok else RetryDecision("")


def release(
    store: Store, delivery: Delivery, next_attempt_at: datetime, now: datetime | None = None
) -> bool:
    """Give a claimed delivery back unsent (its partner is failing right now): ``pending``
    again at ``next_attempt_at``, and the attempt the claim counted is taken back."""
    moment = _naive(now) if now is not None else _now(store)
    return _finish(
        store,
        delivery,
        status=PENDING,
        next_attempt_at=_naive(next_attempt_at),
        attempts=outbox.c.attempts - 1,
        updated_at=moment,
    )


def _finish(store: Store, delivery: Delivery, **values: Any) -> bool:
    with store.write() as tx:
        result = tx.conn.execute(
            update(outbox)
            .where(
                outbox.c.id == delivery.id,
                outbox.c.status == IN_FLIGHT,
                outbox.c.lease_token == delivery.lease_token,
            )
            # claimed_by stays: it names the worker that recorded the outcome.
            .values(lease_token=None, **values)
        )
        return result.rowcount == 1


# ---------------------------------------------------------------------------- operators


def cancel(store: Store, delivery_id: int, now: datetime | None = None) -> DeliveryInfo:
    """Never send this delivery. Refused (409) when it is in flight or already final."""
    return _transition(
        store, delivery_id, (PENDING, DEAD, BLOCKED_CONSENT), CANCELLED, "cancel", now
    )


def requeue(
    store: Store, delivery_id: int, now: datetime | None = None, *, force: bool = False
) -> DeliveryInfo:
    """Send a dead, consent-blocked or cancelled delivery again, from attempt 0, now.

    Refused (409) when a later delivery of the same partner and patient was delivered since
    (``superseded``): sending the older content now would replace the newer one at the
    partner (a ``PUT``, or the conditional update that carries a later version). ``force``
    sends it anyway."""
    if not force:
        with store.read() as tx:
            if superseded(tx, [delivery_id]):
                raise Conflict(
                    f"delivery {delivery_id} is older than a delivery of the same patient that "
                    "the partner already received: sent now, its content would replace the "
                    "newer one there. Check what the partner holds, then retry with force"
                )
    return _transition(
        store, delivery_id, (DEAD, BLOCKED_CONSENT, CANCELLED), PENDING, "requeue", now
    )


@dataclass(frozen=True)
class RetryDeadResult:
    requeued: int
    #: Dead deliveries left dead: a later one of the same partner and patient was delivered.
    superseded: list[int]


def retry_dead(
    store: Store,
    *,
    partner: str | None = None,
    now: datetime | None = None,
    force: bool = False,
) -> RetryDeadResult:
    """Requeue every dead delivery (of one partner), except — unless ``force`` — those a later
    delivery of the same partner and patient has superseded (``superseded``): they stay dead
    and are named, so an operator looks before older content replaces newer at the partner."""
    moment = _naive(now) if now is not None else _now(store)
    with store.write() as tx:
        stmt = select(outbox.c.id).where(outbox.c.status == DEAD)
        if partner is not None:
            stmt = stmt.where(outbox.c.partner == partner)
        dead = [int(r.id) for r in tx.conn.execute(stmt)]
        skipped = [] if force else superseded(tx, dead)
        chosen = sorted(set(dead) - set(skipped))
        count = 0
        for start in range(0, len(chosen), 500):
            count += int(
                tx.conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_(chosen[start : start + 500]), outbox.c.status == DEAD)
                    .values(status=PENDING, attempts=0, next_attempt_at=moment, updated_at=moment)
                ).rowcount
            )
    return RetryDeadResult(count, skipped)


def superseded(tx: Tx, ids: Collection[int]) -> list[int]:
    """Those of ``ids`` for which a later delivery of the same partner and patient was
    delivered: the partner holds newer content than theirs."""
    if not ids:
        return []
    row, later = outbox.alias("o"), outbox.alias("later")
    newer = exists().where(
        later.c.partner == row.c.partner,
        later.c.patient_key == row.c.patient_key,
        later.c.id > row.c.id,
        later.c.status == DELIVERED,
    )
    found: list[int] = []
    ordered = sorted(ids)
    for start in range(0, len(ordered), 500):
        stmt = select(row.c.id).where(
            row.c.id.in_(ordered[start : start + 500]), row.c.patient_key.is_not(None), newer
        )
        found += [int(r.id) for r in tx.conn.execute(stmt)]
    return sorted(found)


def requeue_blocked(tx: Tx, patient_id: str) -> int:
    """Send again, now, every delivery the consent gate blocked for ``patient_id``; returns
    how many. Runs in the transaction that writes a Consent for that patient, so a consent that
    arrives later releases what waited for it; the worker asks the gate again at send time.
    Holds the patient's ``consent_lock``, so a block being recorded right now either commits
    first (and is released here) or sees this Consent when it asks the gate again."""
    tx.lock(consent_lock(patient_id))
    moment = _now(tx.store)
    rows = tx.conn.execute(
        select(outbox.c.id, outbox.c.consent_check).where(
            outbox.c.status == BLOCKED_CONSENT,
            # Bundles are keyed by their patient; rest-hook notifications by their subscriber.
            or_(outbox.c.patient_key == patient_id, outbox.c.kind == "rest-hook"),
        )
    )
    ids = [
        int(r.id)
        for r in rows
        if r.consent_check and json.loads(r.consent_check).get("patient") == patient_id
    ]
    if not ids:
        return 0
    tx.conn.execute(
        update(outbox)
        .where(outbox.c.id.in_(ids), outbox.c.status == BLOCKED_CONSENT)
        .values(status=PENDING, attempts=0, next_attempt_at=moment, updated_at=moment)
    )
    return len(ids)


def _transition(
    store: Store,
    delivery_id: int,
    allowed: tuple[str, ...],
    target: str,
    action: str,
    now: datetime | None,
) -> DeliveryInfo:
    moment = _naive(now) if now is not None else _now(store)
    values: dict[str, Any] = {"status": target, "updated_at": moment}
    if target == PENDING:
        values.update(attempts=0, next_attempt_at=moment)
    with store.write() as tx:
        current = tx.conn.execute(select(outbox.c.status).where(outbox.c.id == delivery_id)).first()
        if current is None:
            raise NotFound(f"delivery {delivery_id} not found")
        result = tx.conn.execute(
            update(outbox)
            .where(outbox.c.id == delivery_id, outbox.c.status.in_(allowed))
            .values(**values)
        )
        if result.rowcount != 1:
            raise Conflict(
                f"cannot {action} a delivery that is {current.status}"
                f" (allowed from: {', '.join(allowed)})"
            )
        row = tx.conn.execute(select(outbox).where(outbox.c.id == delivery_id)).one()
    return _info(row)


def get_delivery(store: Store, delivery_id: int) -> DeliveryInfo:
    with store.read() as tx:
        row = tx.conn.execute(select(outbox).where(outbox.c.id == delivery_id)).first()
    if row is None:
        raise NotFound(f"delivery {delivery_id} not found")
    return _info(row)


def list_deliveries(
    store: Store,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
    *,
    partner: str | None = None,
) -> list[DeliveryInfo]:
    """Deliveries, newest first, without payloads."""
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of: {', '.join(STATUSES)}", expression="status")
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000", expression="limit")
    if offset < 0:
        raise BadRequest("offset must not be negative", expression="offset")
    columns = [c for c in outbox.c if c.name != "payload"]
    stmt = select(*columns).order_by(outbox.c.id.desc()).limit(limit).offset(offset)
    if status is not None:
        stmt = stmt.where(outbox.c.status == status)
    if partner is not None:
        stmt = stmt.where(outbox.c.partner == partner)
    with store.read() as tx:
        return [_info(r) for r in tx.conn.execute(stmt)]


def stats(store: Store, *, partner: str | None = None, now: datetime | None = None) -> OutboxStats:
    moment = _naive(now) if now is not None else _now(store)
    counts = select(outbox.c.status, func.count()).group_by(outbox.c.status)
    oldest = select(func.min(outbox.c.created_at)).where(outbox.c.status.in_(ACTIVE))
    if partner is not None:
        counts = counts.where(outbox.c.partner == partner)
        oldest = oldest.where(outbox.c.partner == partner)
    with store.read() as tx:
        by_status = {str(s): int(n) for s, n in tx.conn.execute(counts)}
        first = tx.conn.execute(oldest).scalar()
    age = max(0.0, (moment - first).total_seconds()) if first is not None else 0.0
    return OutboxStats(
        pending=by_status.get(PENDING, 0),
        in_flight=by_status.get(IN_FLIGHT, 0),
        dead=by_status.get(DEAD, 0),
        blocked_consent=by_status.get(BLOCKED_CONSENT, 0),
        oldest_pending_age_seconds=age,
    )


# ---------------------------------------------------------------------------- helpers


def _info(row: Any) -> DeliveryInfo:
    return DeliveryInfo(
        id=int(row.id),
        partner=row.partner,
        kind=row.kind,
        patient_key=row.patient_key,
        status=row.status,
        attempts=int(row.attempts),
        next_attempt_at=row.next_attempt_at,
        claimed_by=row.claimed_by,
        last_error=json.loads(row.last_error) if row.last_error else None,
        partner_response=json.loads(row.partner_response) if row.partner_response else None,
        created_at=row.created_at,
        updated_at=row.updated_at,
        delivered_at=row.delivered_at,
    )


def _error_text(error: Mapping[str, Any] | str) -> str:
    doc = _outcome("exception", error) if isinstance(error, str) else dict(error)
    text = _dumps(doc)
    if len(text) > MAX_ERROR_CHARS:
        text = _dumps(
            _outcome("too-costly", "the partner's OperationOutcome was too large to keep")
        )
    return text


def _outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics[:500]}],
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _naive(moment: datetime) -> datetime:
    """Naive UTC, as every DateTime column of the store holds."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _now(store: Store) -> datetime:
    return _naive(store.clock())


def _iso(moment: datetime) -> str:
    return moment.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


__all__ = [
    "ACTIVE",
    "ARTIFACT",
    "BLOCKED_CONSENT",
    "CANCELLED",
    "DEAD",
    "DELIVERED",
    "IN_FLIGHT",
    "KINDS",
    "PENDING",
    "REFERRAL_STATUS_KIND",
    "STATUSES",
    "SUBSCRIPTION_PREFIX",
    "Delivery",
    "DeliveryInfo",
    "OutboxStats",
    "RetryDeadResult",
    "RetryDecision",
    "RetryPolicy",
    "backoff_delay",
    "block_unless_consented",
    "blocked_checks",
    "cancel",
    "claim",
    "consent_lock",
    "enqueue",
    "get_delivery",
    "list_deliveries",
    "mark_blocked",
    "mark_cancelled",
    "mark_dead",
    "mark_delivered",
    "mark_retry",
    "outbox",
    "release",
    "release_blocked",
    "renew",
    "requeue",
    "requeue_blocked",
    "retry_dead",
    "stats",
    "superseded",
    "waits_behind",
]
