"""Outbound delivery wiring: what the artifact service queues, and the consent gate the
delivery worker asks at send time — the same decision point as reads, searches and $export.

Owns: ``consent_gate`` (a patient's active privacy Consents must permit the partner's
Organization for the purpose, now), ``queue_artifact``, ``note_derived`` (what the program
derived from a stored resource travels with it), ``PartnerCopies`` (a later version of a
resource a partner was sent is queued for it too, so its copy converges to the record) and
``requeue_on_consent`` (a Consent written for a patient releases that patient's
consent-blocked deliveries, in the same transaction). Must not: send anything (the worker in
``fhir_kat.exchange`` does), or decide a partner's wire form (decided at send time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from fhir_kat.exchange import Delivery, PartnerConfig, enqueue_artifact
from fhir_kat.exchange.copies import copies_of
from fhir_kat.exchange.outbox import requeue_blocked
from fhir_kat.exchange.partners import DEFAULT_PURPOSE, purpose_for
from fhir_kat.security.audit import AuditRecord, build_audit_event, write_audit_event
from fhir_kat.security.consent import ConsentDecisionPoint, actor_for
from fhir_kat.store import Store, StoredResource, Tx

#: Deliveries to health-authority EHRs serve the quality-improvement project: healthcare
#: operations (v3 PurposeOfUse HOPERAT, DOMAIN.md); safety Flags are for treatment
#: (``exchange.partners.purpose_for`` holds the policy per kind).
DELIVERY_PURPOSE = DEFAULT_PURPOSE


def make_consent_gate(
    store: Store, consent: ConsentDecisionPoint, clock: Callable[[], datetime]
) -> Callable[[dict[str, Any]], bool]:
    def gate(check: dict[str, Any]) -> bool:
        with store.read() as tx:
            actor = actor_for(tx, check.get("actor"))
            if actor is None:
                return False  # a partner with no Organization can be named by no consent
            # Subscription notifications name the type they disclose; bundles the Patient.
            rtype = str(check.get("type", "Patient"))
            return consent.permits(
                tx, str(check["patient"]), actor, str(check["purpose"]), rtype, clock()
            )

    return gate


def make_delivery_audit(
    store: Store, clock: Callable[[], datetime]
) -> Callable[[Delivery, str], None]:
    """An AuditEvent for every delivery outcome: a disclosure to a partner leaves a trace like
    any read (IHE BALP; the partner is the recipient, the patient the subject)."""

    def record(delivery: Delivery, status: str) -> None:
        audit = AuditRecord(
            interaction="operation",
            client_id=f"partner:{delivery.partner}",
            role="partner",
            status={"delivered": 200, "blocked-consent": 403}.get(status, 502),
            detail=f"delivery {delivery.id} to {delivery.partner}: {status}",
        )
        # A rest-hook notification is ordered per subscriber; its patient is in the payload.
        patient = (
            delivery.payload.get("patient")
            if delivery.kind == "rest-hook"
            else delivery.patient_key
        )
        if patient:
            audit.patients.add(str(patient))
        write_audit_event(store, build_audit_event(audit, clock()))

    return record


def queue_artifact(
    tx: Tx,
    partners: Mapping[str, PartnerConfig],
    kind: str,
    resources: list[dict[str, Any]],
    patient_id: str | None,
    derived: Sequence[Mapping[str, Any]] = (),
) -> dict[str, int]:
    """Queue a stored artifact for every partner that wants it, in the caller's transaction.
    Patient data for a party outside the program is consent-checked again at send time (under
    ``purpose_for(kind)``); data about no patient, or for the program's care team, is not.
    ``derived`` (``derived_of``) travels with it unless a partner opts out."""
    if not partners:
        return {}
    purpose = purpose_for(kind) if patient_id else None
    return enqueue_artifact(
        tx, partners, kind, resources, patient_id, consent_purpose=purpose, derived=derived
    )


#: ``tx.memo`` key: ``{"Type/id": [resources derived from it, as stored]}`` in this transaction.
DERIVED = "delivery:derived"


def note_derived(tx: Tx, source: str, resources: Sequence[Mapping[str, Any]]) -> None:
    """Record, for this transaction, resources the program derived from ``source`` (``Type/id``)
    — the score Observations extracted from a QuestionnaireResponse and their Provenance — so
    the artifact that stored ``source`` queues them with it (``derived_of``)."""
    tx.memo.setdefault(DERIVED, {})[source] = [dict(r) for r in resources]


def derived_of(tx: Tx, sources: Iterable[str]) -> list[dict[str, Any]]:
    """What ``note_derived`` recorded for these sources in this transaction, in order."""
    noted: dict[str, list[dict[str, Any]]] = tx.memo.get(DERIVED, {})
    return [r for source in sources for r in noted.get(source, [])]


class PartnerCopies:
    """A write-pipeline step: every later version of a resource a partner was sent (under a
    kind it still receives) is queued for that partner, at the end of the write transaction,
    so the partner's copy converges to the program's record — referral Task status changes,
    resolved Flags, corrected Observations, an updated Patient. One delivery per partner,
    kind and patient, carrying the resources as stored now; its wire form (built at send
    time) replaces the partner's copy (``exchange.bundles``: conditional update or PUT).
    Deletions are not sent (a partner keeps what it received; docs/exchange.md)."""

    MEMO = "delivery:written"

    def __init__(self, partners: Mapping[str, PartnerConfig]) -> None:
        self.partners = {name: p for name, p in partners.items() if p.enabled}

    def on_write(self, tx: Tx, stored: StoredResource, _created: bool) -> None:
        if not self.partners or stored.deleted:
            return
        tx.memo.setdefault(self.MEMO, set()).add((stored.type, stored.id))
        # At the end: the workflow's own deferred steps (triage) may write again meanwhile.
        tx.defer(self.MEMO, self._converge)

    def _converge(self, tx: Tx) -> None:
        written: set[tuple[str, str]] = tx.memo.pop(self.MEMO, set())
        if not written:
            return
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for copy in copies_of(tx, written):
            partner = self.partners.get(copy.partner)
            if partner is None or not partner.wants(copy.artifact_kind):
                continue
            current = tx.get(copy.resource_type, copy.resource_id)
            if current is None or current.deleted or current.version_id <= copy.version_id:
                continue  # already queued at this version (the artifact itself, say)
            key = (copy.partner, copy.artifact_kind, copy.patient_key or "")
            groups.setdefault(key, []).append(current.json())
        for (name, kind, patient), resources in sorted(groups.items()):
            queue_artifact(tx, {name: self.partners[name]}, kind, resources, patient or None)


def requeue_on_consent(tx: Tx, stored: StoredResource, _created: bool) -> None:
    """A write hook: a Consent created or updated for a patient sends that patient's
    consent-blocked deliveries again (the gate decides again at send time, so a Consent that
    still says no blocks them again, and one that says yes lets them through)."""
    if stored.type == "Consent" and not stored.deleted and stored.patient_id:
        requeue_blocked(tx, stored.patient_id)
